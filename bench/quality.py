"""Answer quality of dense against routed shared attention, in SCBench's multi-request style.

One corpus per task, many different questions over it; the corpus's KV is built once per
(task, segmentation, chunk size) and reused for every question, router and density. All data is
generated here from a seed, or taken from docstrings that ship with Python (`inspect.getdoc` of
standard-library modules, as real prose); nothing is downloaded.

Tasks
  kv        key-value retrieval in a JSON object of random word ids ("What is the value of key X?",
            after two worked examples on other keys as earlier chat turns)
  needle    planted facts (an invented name and a number) in long real prose
  vartrace  multi-hop variable tracing ("VAR A = 4821. ... VAR B = A. ... What is the value of B?")

Modes
  contiguous  the whole corpus in one segment (it must fit the model's context), dense attention
  dense       cut into segments of --segment-len tokens (position-independent), dense attention
  routed      the same segments, each query attends the preamble's chunks plus the top chunks of
              a router (mean | quest) at --densities, for each of --chunk-sizes

Metric: the expected value occurs as a substring of the greedy answer (--max-tokens tokens).

    .venv/bin/python bench/quality.py --quick
    .venv/bin/python bench/quality.py --n 8 --tasks kv,needle,vartrace --chunk-sizes 16,64,256

Writes bench/results/quality.json and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import itertools
import json
import os
import random
import shutil
import string
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kb.ingest import build  # noqa: E402  (the service's position rule)
from kb.ingest.precompute import PIC_SCHEMES  # noqa: E402

DEFAULT_MODELS_DIR = Path(
    os.environ.get("KB_TEST_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models")
)
RESULTS = ROOT / "bench" / "results" / "quality.json"

# Standard-library modules whose docstrings serve as real prose (fixed order: reproducible).
PROSE_MODULES = (
    "json",
    "argparse",
    "logging",
    "collections",
    "re",
    "string",
    "textwrap",
    "functools",
    "subprocess",
    "pickle",
    "csv",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "heapq",
    "http.client",
    "inspect",
    "pdb",
    "pydoc",
    "shutil",
    "tarfile",
    "threading",
    "unittest",
    "urllib.parse",
    "zipfile",
    "calendar",
    "configparser",
    "contextlib",
    "dataclasses",
    "enum",
    "fractions",
    "locale",
    "optparse",
    "pprint",
    "sched",
    "shlex",
    "tempfile",
    "timeit",
    "typing",
    "uuid",
    "warnings",
    "weakref",
    "xml.dom.minidom",
    "zipimport",
)

ATTRIBUTES = (
    "locker number",
    "badge number",
    "room number",
    "access code",
    "account number",
    "ticket number",
    "ledger number",
    "parcel number",
    "permit number",
    "seat number",
    "vault code",
    "pager number",
    "license number",
    "crate number",
    "gate code",
    "file number",
)


@dataclass(frozen=True)
class Question:
    question: str
    expected: str
    history: tuple[tuple[str, str], ...] = ()  # worked examples: (question, answer) turns before it
    doc: int | None = None  # multi-document tasks: which document holds the answer
    fact: str | None = None  # the text that holds the answer (a passage hit contains it)


@dataclass(frozen=True)
class TaskData:
    task: str
    text: str
    questions: tuple[Question, ...]
    docs: tuple[str, ...] = ()  # multi-document tasks: one text per document (`text` joins them)


# -- data generators (deterministic given the seed) ---------------------------------------------


def _prose_paragraphs() -> list[str]:
    import importlib

    paras: list[str] = []
    for name in PROSE_MODULES:
        try:
            doc = inspect.getdoc(importlib.import_module(name)) or ""
        except ImportError:  # a minimal Python without the module: skip it
            continue
        paras.extend(p.strip() for p in doc.split("\n\n") if len(p.strip()) > 40)
    return paras


def _prose(rng: random.Random, chars: int, taken: set[int] | None = None) -> list[str]:
    """Consecutive real paragraphs totalling about `chars` characters, from a seeded start; with
    `taken`, a start no earlier call used (documents of a large corpus differ: the ingestor keeps
    one copy of identical documents)."""
    paras = _prose_paragraphs()
    start = rng.randrange(len(paras))
    if taken is not None:
        while start in taken and len(taken) < len(paras):
            start = rng.randrange(len(paras))
        taken.add(start)
    out, total, i = [], 0, 0
    while total < chars:
        p = paras[(start + i) % len(paras)]
        out.append(p)
        total += len(p) + 2
        i += 1
    return out


def _name(rng: random.Random, used: set[str]) -> str:
    """An invented two-part name ("Velmora Quenist"), unique within `used`."""
    cons, vows = "bdfghklmnprstvz", "aeiou"
    while True:
        parts = []
        for _ in range(2):
            syl = [rng.choice(cons).upper() + rng.choice(vows)]
            syl += [rng.choice(cons) + rng.choice(vows) for _ in range(rng.randint(1, 2))]
            syl.append(rng.choice("nrstl"))
            parts.append("".join(syl))
        name = " ".join(parts)
        if name not in used:
            used.add(name)
            return name


def _number(rng: random.Random, used: set[str], digits: int = 5) -> str:
    while True:
        v = str(rng.randrange(10 ** (digits - 1), 10**digits))
        if v not in used:
            used.add(v)
            return v


def _word(rng: random.Random, used: set[str]) -> str:
    """An invented lowercase id of three syllables and a final consonant ("kavomir"), unique in `used`."""
    while True:
        k = "".join(
            rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(3)
        ) + rng.choice("nrstl")
        if k not in used:
            used.add(k)
            return k


KV_ASK = 'In the JSON object above, what is the value of the key "{key}"?'


def gen_kv(seed: int, n: int, size: int, shots: int = 2) -> TaskData:
    """A JSON object of ~`size` random word ids mapped to random 5-digit values; n questions on
    distinct keys, each after `shots` worked examples on other keys as earlier chat turns
    (question, then the answer as the JSON line `"key": "value"`).

    The first version (8-hex-digit ids, a bare question) scored 0 with the 135M demo model even
    over one contiguous context; docs/QUALITY.md records the variants tried. It is still retrieval
    of one value by its key in a JSON object of random ids.
    """
    rng = random.Random(f"kv-{seed}")
    seen: set[str] = set()
    pairs = []
    while len(pairs) < max(size, n * (1 + shots)):
        pairs.append((_word(rng, seen), _number(rng, seen)))
    # one pair per line; a blank line every 16 pairs lets the segmenter cut between pairs
    lines = ["{"]
    for i, (k, v) in enumerate(pairs):
        if i and i % 16 == 0:
            lines.append("")
        lines.append(f'  "{k}": "{v}"' + ("," if i + 1 < len(pairs) else ""))
    lines.append("}")
    order = rng.sample(range(len(pairs)), n * (1 + shots))
    asked, examples = order[:n], order[n:]
    qs = []
    for qi, i in enumerate(asked):
        shown = [pairs[e] for e in examples[qi * shots : (qi + 1) * shots]]
        qs.append(
            Question(
                KV_ASK.format(key=pairs[i][0]),
                pairs[i][1],
                tuple((KV_ASK.format(key=k), f'"{k}": "{v}"') for k, v in shown),
            )
        )
    return TaskData("kv", "\n".join(lines), tuple(qs))


def gen_needle(seed: int, n: int, size: int) -> TaskData:
    """About `size` characters of real prose with n planted facts (name, attribute, 5-digit number)."""
    rng = random.Random(f"needle-{seed}")
    paras = _prose(rng, size)
    names: set[str] = set()
    nums: set[str] = set()
    facts = []
    for i in range(n):
        name, attr, value = _name(rng, names), ATTRIBUTES[i % len(ATTRIBUTES)], _number(rng, nums)
        facts.append((name, attr, value))
    # spread the needles over the document: one per equal slice, at a random place inside it
    slots = sorted(
        rng.randrange(i * len(paras) // n, max(i * len(paras) // n + 1, (i + 1) * len(paras) // n))
        for i in range(n)
    )
    for off, (slot, (name, attr, value)) in enumerate(zip(slots, facts)):
        paras.insert(
            slot + off, f"{name} works at the municipal archive. The {attr} of {name} is {value}."
        )
    qs = tuple(Question(f"What is the {attr} of {name}?", value) for name, attr, value in facts)
    return TaskData("needle", "\n\n".join(paras), qs)


def gen_vartrace(seed: int, n: int, size: int, hops: int = 4) -> TaskData:
    """n chains of `hops` assignments (a 5-digit number, then copies), interleaved and scattered
    through ~`size` characters of real prose; each question asks a chain's last variable."""
    rng = random.Random(f"vartrace-{seed}")
    paras = _prose(rng, size)
    used: set[str] = set()
    nums: set[str] = set()

    def var() -> str:
        while True:
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if v not in used:
                used.add(v)
                return v

    chains = []
    for _ in range(n):
        names = [var() for _ in range(hops)]
        value = _number(rng, nums)
        stmts = [f"VAR {names[0]} = {value}."] + [
            f"VAR {names[j]} = {names[j - 1]}." for j in range(1, hops)
        ]
        chains.append((names[-1], value, stmts))
    # interleave the chains, keeping each chain's order, then scatter statements through the prose
    order = [c for c in range(n) for _ in range(hops)]
    rng.shuffle(order)
    progress = [0] * n
    stmts = []
    for c in order:
        stmts.append(chains[c][2][progress[c]])
        progress[c] += 1
    slots = sorted(rng.randrange(len(paras) + 1) for _ in stmts)
    out, si = [], 0
    for pi in range(len(paras) + 1):
        while si < len(stmts) and slots[si] == pi:
            out.append(stmts[si])
            si += 1
        if pi < len(paras):
            out.append(paras[pi])
    qs = tuple(
        Question(f"What is the value of the variable {last}?", value) for last, value, _ in chains
    )
    return TaskData("vartrace", "\n\n".join(out), qs)


def gen_needle_docs(seed: int, n: int, size: int, doc_chars: int = 4500) -> TaskData:
    """About `size` characters of real prose as documents of ~`doc_chars` characters (~1.6K tokens),
    with n planted facts spread over them (question i's fact in document i mod the count)."""
    rng = random.Random(f"needle-docs-{seed}")
    count = max(1, size // doc_chars)
    starts: set[int] = set()
    docs = [_prose(rng, doc_chars, starts) for _ in range(count)]
    names: set[str] = set()
    nums: set[str] = set()
    qs = []
    for i in range(n):
        name, attr, value = _name(rng, names), ATTRIBUTES[i % len(ATTRIBUTES)], _number(rng, nums)
        fact = f"{name} works at the municipal archive. The {attr} of {name} is {value}."
        d = i % count
        docs[d].insert(rng.randrange(len(docs[d]) + 1), fact)
        qs.append(Question(f"What is the {attr} of {name}?", value, doc=d, fact=fact))
    texts = tuple("\n\n".join(p) for p in docs)
    return TaskData("needle_docs", "\n\n".join(texts), tuple(qs), texts)


def gen_kv_docs(seed: int, n: int, size: int, doc_pairs: int = 80, shots: int = 2) -> TaskData:
    """About `size` key-value pairs as JSON objects of `doc_pairs` pairs each (~1.1K tokens: the
    size at which the demo model still reads one object, docs/QUALITY.md), one per document; n
    questions on distinct keys after `shots` worked examples from the same document."""
    rng = random.Random(f"kv-docs-{seed}")
    count = max(1, size // doc_pairs)
    seen: set[str] = set()
    docs = [
        [(_word(rng, seen), _number(rng, seen)) for _ in range(doc_pairs)] for _ in range(count)
    ]
    texts = []
    for pairs in docs:
        lines = ["{"]
        for i, (k, v) in enumerate(pairs):
            if i and i % 16 == 0:
                lines.append("")
            lines.append(f'  "{k}": "{v}"' + ("," if i + 1 < len(pairs) else ""))
        lines.append("}")
        texts.append("\n".join(lines))
    qs = []
    for i in range(n):
        d = i % count
        picks = rng.sample(range(doc_pairs), 1 + shots)
        k, v = docs[d][picks[0]]
        shown = tuple(
            (KV_ASK.format(key=a), f'"{a}": "{b}"') for a, b in (docs[d][j] for j in picks[1:])
        )
        qs.append(Question(KV_ASK.format(key=k), v, shown, doc=d, fact=f'"{k}": "{v}"'))
    return TaskData("kv_docs", "\n\n".join(texts), tuple(qs), tuple(texts))


GENERATORS = {
    "kv": gen_kv,
    "needle": gen_needle,
    "vartrace": gen_vartrace,
    "needle_docs": gen_needle_docs,
    "kv_docs": gen_kv_docs,
}
# size units: kv pairs for kv, characters of prose for the others (~ equal token counts)
DEFAULT_SIZES = {
    "kv": 80,
    "needle": 9000,
    "vartrace": 9000,  # kv ~1.1K tokens (see gen_kv), others ~2.5K-3K
    "needle_docs": 68000,
    "kv_docs": 1840,
}  # ~24K tokens: three times the demo model's context
QUICK_SIZES = {"kv": 60, "needle": 7000, "vartrace": 7000, "needle_docs": 27000, "kv_docs": 480}


def generate(task: str, seed: int, n: int, size: int | None = None) -> TaskData:
    return GENERATORS[task](seed, n, DEFAULT_SIZES[task] if size is None else size)


def score(answer: str, expected: str) -> bool:
    return expected.lower() in answer.lower()


# -- running against the service -----------------------------------------------------------------


def use_router(kb, name: str, kind: str):
    """Serve corpus `name` with router `kind` from now on; returns the loaded corpus.

    The service builds a corpus's router once per cached load (`kb.cache`, keyed by the corpus's
    KV version, not by `settings.router`), so setting `kb.settings.router` alone does not change
    an already loaded corpus. This drops the cached load with `kb.cache.drop` (which refuses while
    the corpus answers questions) so the next load builds the router anew; the KV files are
    re-read, not recomputed.
    """
    kb.settings.router = kind
    cached = kb.cache.loaded.get(name)
    if (
        cached is not None
        and getattr(cached.shared.router, "router", None) is not None
        and cached.shared.router.router.kind == kind
    ):
        return cached
    kb.cache.drop(name)
    return kb.load_corpus(name)


def position_limit(kb) -> int:
    """Where shared positions end (the service's rule: leave room for the question and answer)."""
    return build.position_limit(kb.loaded.config.max_position_embeddings)


def _turns(history: tuple[tuple[str, str], ...]) -> list[dict]:
    return [
        {"role": role, "content": text}
        for qa in history
        for role, text in zip(("user", "assistant"), qa)
    ]


def ask_all(kb, name: str, questions, max_tokens: int, frequency_penalty: float = 0.0) -> list[str]:
    """Queue every question over the corpus at once (the multi-request case), step the engine
    until all finish, and return the greedy answers in order. Requests carry what the service
    sends by default (`kb.default_sampling()`: KB_REPETITION_PENALTY) at `max_tokens`."""
    from dataclasses import replace

    sampling = replace(
        kb.default_sampling(), max_tokens=max_tokens, frequency_penalty=frequency_penalty
    )
    answers = [kb.ask(name, q.question, sampling, history=_turns(q.history)) for q in questions]
    return _collect(kb.engine, [a.handle for a in answers])


def _collect(engine, handles) -> list[str]:
    from kb.engine.request import Finished
    from kb.errors import KBError

    while any(h.result is None for h in handles):
        if not engine.step():
            raise KBError("the engine has no work but requests are unfinished")
        for h in handles:
            h.drain()
    for h in handles:
        if h.result.reason == "error":
            raise KBError(f"generation failed: {h.result.error}")
        assert isinstance(h.result, Finished)
    return [h.result.text for h in handles]


@dataclass
class Spec:
    task: str
    mode: str  # contiguous | dense | routed
    router: str | None
    chunk_size: int | None
    density: float
    pic: str | None = None  # position-independence scheme of the segments (kb.ingest.precompute)
    prefill_routing: str | None = None  # the engine runner's prefill routing, where it has one
    dense_layers: int = 0  # leading layers attended densely although routed (DenseFirstLayers)


def build_corpus(
    kb,
    name: str,
    path: Path | list[Path],
    segment_len: int,
    chunk_size: int,
    pic: str = "shared",
    link_tokens: int = 32,
) -> dict:
    """Create corpus `name` from one file (or several documents) with the given segmentation and
    scheme (kb.ingest.precompute.PIC_SCHEMES: "own" is the harness's only, the service has
    "shared" and "linked"); its size."""
    if pic not in PIC_SCHEMES:
        raise ValueError(f"unknown scheme {pic!r}")
    s = kb.settings
    s.segment_len, s.chunk_size = segment_len, chunk_size
    s.pic, s.pic_link_tokens = pic, link_tokens
    kb.create_corpus(name)
    paths = path if isinstance(path, list) else [path]
    res = kb.ingest(name, paths)
    for r in res:
        if r.status != "ready":
            raise RuntimeError(f"ingest of {name}: a document is {r.status}: {r.error}")
    return corpus_size(kb, name, pic)


def corpus_size(kb, name: str, pic: str) -> dict:
    """A built corpus's documents, segments and tokens (and its scheme), for the JSON."""
    docs = kb.documents(name)
    return {
        "documents": len(docs),
        "segments": sum(d["segments"] for d in docs),
        "tokens": sum(d["tokens"] for d in docs),
        "pic": pic,
    }


class DenseFirstLayers:
    """A corpus router that attends every chunk in the first `layers` layers and routes the rest
    (Quest keeps its first two layers dense: their attention is broad). A harness experiment:
    the service routes every layer."""

    def __init__(self, inner, layers: int):
        self.inner, self.layers = inner, layers

    def route(self, layer: int, q, top_k: int, spans=None):
        """None (dense) in the first layers, else the inner router's chunk_idx."""
        return None if layer < self.layers else self.inner.route(layer, q, top_k, spans)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@contextmanager
def dense_first_layers(shared, layers: int) -> Iterator[None]:
    """While inside, corpus `shared` attends its first `layers` layers densely when routed."""
    inner = shared.router
    if layers > 0:
        shared.router = DenseFirstLayers(inner, layers)
    try:
        yield
    finally:
        shared.router = inner


def prefill_runner(kb):
    """The engine's model runner when it has a prefill-routing choice (`prefill_routing`), else None."""
    runner = getattr(kb.engine, "runner", None)
    return runner if hasattr(runner, "prefill_routing") else None


class Runner:
    """Runs one task's grid against a KnowledgeBase, appending rows and saving partial results."""

    def __init__(self, kb, args, rows: list[dict], save: Callable[[], None]):
        self.kb, self.args, self.rows, self.save = kb, args, rows, save
        self.runner = prefill_runner(kb)
        self.default_prefill = self.runner.prefill_routing if self.runner is not None else None

    def evaluate(self, name: str, spec: Spec, qs) -> dict:
        """Ask every question over corpus `name` at once and record one row."""
        args, t0 = self.args, time.perf_counter()
        if self.runner is not None:
            self.runner.prefill_routing = spec.prefill_routing or self.default_prefill
        answers = ask_all(self.kb, name, qs, args.max_tokens, args.frequency_penalty)
        hits = [score(a, q.expected) for a, q in zip(answers, qs)]
        row = {
            "task": spec.task,
            "mode": spec.mode,
            "pic": spec.pic,
            "router": spec.router,
            "chunk_size": spec.chunk_size,
            "density": spec.density,
            "n": len(qs),
            "accuracy": round(sum(hits) / len(qs), 4),
            "correct": sum(hits),
        }
        if self.runner is not None and spec.mode == "routed":
            row["prefill_routing"] = spec.prefill_routing or self.default_prefill
        if spec.dense_layers:
            row["dense_layers"] = spec.dense_layers
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        self.rows.append(row)
        if args.verbose:
            for a, q, h in zip(answers, qs, hits):
                print(f"    [{'+' if h else '-'}] {q.expected:>10}  {a.strip()[:70]!r}", flush=True)
        print(
            f"  {spec.mode:10} pic={str(spec.pic or '-'):6} {str(spec.router or '-'):5} "
            f"chunk={str(spec.chunk_size or '-'):>4} density={spec.density:<5} "
            f"{'' if spec.prefill_routing is None else f'prefill={spec.prefill_routing} '}"
            f"{f'dense_layers={spec.dense_layers} ' if spec.dense_layers else ''}"
            f"acc={row['accuracy']:.3f}  ({row['wall_s']}s)",
            flush=True,
        )
        self.save()
        return row

    def routed(self, task: str, name: str, pic: str, chunk: int, qs) -> None:
        """Every router and density (and prefill-routing value, where there is one) over one corpus."""
        kb, args = self.kb, self.args
        for router in args.routers:
            loaded = use_router(kb, name, router)
            if loaded.shared.router is None:
                print(f"  {name}: too few chunks to route", flush=True)
                return
            for density in args.densities:
                kb.settings.density = density
                values = [None]
                if (
                    self.runner is not None
                    and args.prefill_routing
                    and density in args.prefill_routing_densities
                ):
                    values = args.prefill_routing
                for value in values:
                    for layers in args.dense_layers:
                        with dense_first_layers(loaded.shared, layers):
                            spec = Spec(task, "routed", router, chunk, density, pic, value, layers)
                            row = self.evaluate(name, spec, qs)
                        row["top_k"] = loaded.shared.router.top_k(density)
                        row["num_chunks"] = loaded.shared.num_chunks
                        self.save()

    def task(self, task: str, home: Path, info: dict) -> None:
        """Contiguous, then per scheme dense and (for --routed-pic schemes) the routed grid."""
        kb, args = self.kb, self.args
        data = generate(task, args.seed, args.n, args.sizes[task])
        path = home / f"{task}.txt"
        path.write_text(data.text)
        qs = data.questions
        if "contiguous" in args.modes:
            limit = position_limit(kb)
            name = f"{task}-contig"
            info[name] = meta = build_corpus(kb, name, path, limit, 64)
            print(f"{task}: contiguous corpus {meta}", flush=True)
            if meta["segments"] != 1 or meta["tokens"] > limit:
                print(
                    f"  contiguous skipped: {meta['tokens']} tokens do not fit one segment "
                    f"within {limit} positions",
                    flush=True,
                )
            else:
                kb.settings.density = 1.0
                self.evaluate(name, Spec(task, "contiguous", None, None, 1.0), qs)
        if "dense" not in args.modes and "routed" not in args.modes:
            return
        for pic in args.pic:
            route = "routed" in args.modes and pic in args.routed_pic
            for ci, chunk in enumerate(args.chunk_sizes if route else args.chunk_sizes[:1]):
                name = f"{task}-{pic}-seg{args.segment_len}-c{chunk}"
                info[name] = meta = build_corpus(
                    kb, name, path, args.segment_len, chunk, pic, args.link_tokens
                )
                print(f"{task}: segmented corpus {name} {meta}", flush=True)
                if (
                    ci == 0 and "dense" in args.modes
                ):  # dense attention does not depend on the chunk size
                    kb.settings.density = 1.0
                    self.evaluate(name, Spec(task, "dense", None, None, 1.0, pic), qs)
                if route:
                    self.routed(task, name, pic, chunk, qs)


# -- attention retrieval over corpora beyond the model's context (issue 16) ---------------------


def ask_measured(kb, name: str, questions, max_tokens: int, dense: bool = False):
    """Queue every question at once (dense: no selection); step to the end, timing each step.
    Returns (answers, texts, median ms of the decode-only steps)."""
    from kb.engine.sequence import SamplingParams

    answers = [
        kb.ask(
            name,
            q.question,
            SamplingParams(max_tokens=max_tokens),
            history=_turns(q.history),
            dense=dense,
        )
        for q in questions
    ]
    handles = [a.handle for a in answers]
    engine, times = kb.engine, []
    while any(h.result is None for h in handles):
        decode = (
            all(s.num_computed >= len(s.prompt_ids) for s in engine.scheduler.running)
            and not engine.scheduler.waiting
            and engine.scheduler.running
        )
        t0 = time.perf_counter()
        if not engine.step():
            raise RuntimeError("the engine has no work but requests are unfinished")
        if decode:
            times.append((time.perf_counter() - t0) * 1000)
        for h in handles:
            h.drain()
    times.sort()
    return (
        answers,
        [h.result.text for h in handles],
        round(times[len(times) // 2], 1) if times else None,
    )


def attended_tokens(shared, answers) -> int:
    """Shared tokens one decode step of a request reads (the mean over the answers)."""
    sel = [
        a.handle.seq.selection
        for a in answers
        if getattr(a.handle.seq, "selection", None) is not None
    ]
    if sel:
        return round(
            sum(min(shared.num_tokens, s.chunks.numel() * shared.chunk_size) for s in sel)
            / len(sel)
        )
    if shared.routed:
        return min(shared.num_tokens, shared.top_k * shared.chunk_size)
    return shared.num_tokens


def citation_hits(answers, questions) -> tuple[int, int]:
    """(first citation's segment holds the fact, first citation's passage holds it) counts."""
    seg = psg = 0
    for a, q in zip(answers, questions):
        cites = a.citations()
        if not cites or q.fact is None:
            continue
        key = q.fact.split(". ")[-1].rstrip(".")
        seg += key in cites[0]["segment_text"]
        psg += key in cites[0]["text"]
    return seg, psg


def row_key(row: dict) -> tuple:
    """What one row of the large grid measures: its cell (task, size, seed), mode and budget."""
    return row["task"], row["size"], row["seed"], row["mode"], row["budget"]


def earlier_rows(path: Path) -> tuple[list[dict], dict]:
    """Rows and corpora of an earlier large-grid file (nothing when there is none); a row this
    run measures again replaces the earlier one (`row_key`), every other row stays."""
    if not path.exists():
        return [], {}
    old = json.loads(path.read_text())
    return old.get("rows", []), old.get("corpora", {})


def answer_chunks(cmap, tokenizer, q) -> set[int]:
    """Chunks of the layout holding the answer's value inside its fact text."""
    out = set()
    for seg in cmap.segments:
        at = seg.text.find(q.fact)
        if at < 0:
            continue
        at = seg.text.find(q.expected, at)
        offs = tokenizer(seg.text, add_special_tokens=False, return_offsets_mapping=True)[
            "offset_mapping"
        ]
        for i, (a, b) in enumerate(offs):
            if b > at and a < at + len(q.expected):
                out.add((seg.layout_start + i) // cmap.chunk_size)
    return out


def selection_recall(answers, targets) -> float | None:
    """Share of selecting answers whose chosen chunks hold their answer's chunk (what a decode
    reads: a refresh during decode could only help the rest); None without selections."""
    pairs = [
        (a.handle.seq.selection, t)
        for a, t in zip(answers, targets)
        if t and getattr(a.handle.seq, "selection", None) is not None
    ]
    if not pairs:
        return None
    return round(sum(bool(t & set(s.chunks.tolist())) for s, t in pairs) / len(pairs), 4)


# the grid's name of each selection layout (positions, order of the virtual layout)
SELECT_MODES = {
    ("virtual", "corpus"): "select",
    ("virtual", "best_last"): "select_best_last",
    ("stored", "corpus"): "select_stored",
}


def selection_variant(spec: str) -> tuple[str, dict]:
    """('[field=value,...]' mode suffix, SelectionConfig overrides) of one --variants entry."""
    from kb.engine.selection import SelectionConfig

    fields = {f.name: f.type for f in dataclasses.fields(SelectionConfig)}
    extra: dict = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if key not in fields or key in ("budget", "positions", "order"):
            raise SystemExit(f"--variants: {key!r} is not a selection setting to vary")
        if key == "heads":  # the selector keeps only the named heads' keys, built at load
            raise SystemExit("--variants: heads are chosen at load: set KB_SELECTION_HEADS")
        default = getattr(SelectionConfig(), key)
        if key == "layers":
            extra[key] = tuple(int(x) for x in value.split("+"))
        elif isinstance(default, bool):  # bool("false") is True
            extra[key] = value.strip().lower() in ("1", "true", "on", "yes")
        else:
            extra[key] = type(default)(value)
    return (f"[{spec.strip()}]" if extra else ""), extra


def heads_tag(tag: str, kb) -> str:
    """A grid mode's variant tag with the scoring heads where they are not the model's measured
    ones (KB_SELECTION_HEADS, KB_SELECTION_LAYERS), so such rows do not replace the default's."""
    s = kb.settings
    if s.selection_heads.strip().lower() == "auto":
        return tag
    heads = s.selection_heads.strip().replace(",", "+") or "all"
    extra = f"heads={heads},layers={s.selection_layers.replace(',', '+')}"
    return f"[{extra}]" if not tag else f"{tag[:-1]},{extra}]"


def large(args) -> dict:
    """The attention-retrieval grid: per task and size, contiguous (the fact's document alone),
    dense, routed and selection at each budget; one row per mode."""
    import torch

    from kb.service import KnowledgeBase
    from kb.settings import Settings

    torch.set_num_threads(args.threads)
    home = (
        Path(args.home).resolve()
        if args.home
        else Path(tempfile.mkdtemp(prefix="kb-quality-large-"))
    )
    home.mkdir(parents=True, exist_ok=True)
    kb = KnowledgeBase(
        Settings(home=home / "home", models_dir=args.models_dir, max_tokens=args.max_tokens)
    )
    rows, info, t_start = [], {}, time.perf_counter()
    result = {
        "model": kb.settings.model,
        "torch": torch.__version__,
        "seeds": args.seeds,
        "threads": args.threads,
        "segment_len": args.segment_len,
        "chunk_size": args.large_chunk,
        "max_tokens": args.max_tokens,
        "n": args.n,
        "corpora": info,
        "complete": False,
        "rows": rows,
    }

    earlier, earlier_info = earlier_rows(args.out)

    def save() -> None:
        # the cells of earlier runs stay in the file beside this run's (one grid, many runs)
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        fresh = {row_key(r) for r in rows}
        kept = [r for r in earlier if row_key(r) not in fresh]
        write(args.out, {**result, "corpora": {**earlier_info, **info}, "rows": kept + rows})

    targets: list[set[int]] = []  # the answer's chunks of each question of the current corpus

    def record(task, size, seed, mode, budget, name, qs, answers, texts, ms, shared) -> None:
        hits = [score(a, q.expected) for a, q in zip(texts, qs)]
        seg, psg = citation_hits(answers, qs)
        row = {
            "task": task,
            "size": size,
            "tokens": info[f"{task}-{size}-s{seed}"]["tokens"],
            "seed": seed,
            "mode": mode,
            "budget": budget,
            "n": len(qs),
            "correct": sum(hits),
            "accuracy": round(sum(hits) / len(qs), 4),
            "cite_segment_top1": round(seg / len(qs), 4),
            "cite_passage_top1": round(psg / len(qs), 4),
            "attended_tokens": attended_tokens(shared, answers) if shared is not None else None,
            "selection_recall": selection_recall(answers, targets) if shared is not None else None,
            "ms_per_decode_step": ms,
            "batch": len(qs),
        }
        rows.append(row)
        print(
            f"  {task:11} {size:>6} s{seed} {mode:10} {str(budget or '-'):>5} acc={row['accuracy']:.3f} "
            f"seg={row['cite_segment_top1']:.2f} psg={row['cite_passage_top1']:.2f} "
            f"tok={row['attended_tokens']} ms={ms}",
            flush=True,
        )
        save()

    try:
        for seed in args.seeds:
            for task in args.tasks:
                for size in args.large_sizes[task]:
                    data = generate(task, seed, args.n, size)
                    qs = data.questions
                    paths = []
                    for i, text in enumerate(data.docs):
                        paths.append(home / f"{task}-{size}-s{seed}-doc{i:03d}.txt")
                        paths[-1].write_text(text)
                    name = f"{task}-{size}-s{seed}"
                    kb.settings.selection_budget = max(args.budgets)
                    if args.home and name in {c.name for c in kb.list_corpora()}:
                        kb.settings.segment_len = args.segment_len  # as built (same arguments)
                        kb.settings.chunk_size = args.large_chunk
                        info[name] = corpus_size(kb, name, kb.settings.pic)
                    else:
                        info[name] = build_corpus(
                            kb, name, paths, args.segment_len, args.large_chunk
                        )
                    print(
                        f"{name}: {info[name]} ({time.perf_counter() - t_start:.0f} s)", flush=True
                    )
                    if "contiguous" in args.modes:  # each fact's document alone, dense: the ceiling
                        answers, texts, ms = [], [], []
                        for d in sorted({q.doc for q in qs}):
                            sub = [q for q in qs if q.doc == d]
                            cname = f"{name}-doc{d}"
                            build_corpus(kb, cname, [paths[d]], args.segment_len, args.large_chunk)
                            a, t, m = ask_measured(kb, cname, sub, args.max_tokens, dense=True)
                            answers += a
                            texts += t
                            ms.append(m)
                            kb.delete_corpus(cname)
                        order = [q for d in sorted({q.doc for q in qs}) for q in qs if q.doc == d]
                        record(
                            task,
                            size,
                            seed,
                            "contiguous",
                            None,
                            name,
                            order,
                            answers,
                            texts,
                            None,
                            None,
                        )
                    loaded = kb.load_corpus(name)
                    targets[:] = [
                        answer_chunks(loaded.citation_map, kb.loaded.tokenizer, q) for q in qs
                    ]
                    if "dense" in args.modes:
                        kb.settings.density = 1.0
                        a, t, m = ask_measured(kb, name, qs, args.max_tokens, dense=True)
                        record(task, size, seed, "dense", None, name, qs, a, t, m, loaded.shared)
                    if "routed" in args.modes and loaded.shared.router is not None:
                        kb.settings.density = args.large_density
                        a, t, m = ask_measured(kb, name, qs, args.max_tokens)
                        record(task, size, seed, "routed", None, name, qs, a, t, m, loaded.shared)
                        kb.settings.density = 1.0
                        loaded.shared.top_k = None
                    if "select" in args.modes and loaded.shared.selector is not None:
                        sel = loaded.shared.selector
                        base = sel.config
                        layouts = [("stored", "corpus")] if "stored" in args.positions else []
                        layouts += [
                            ("virtual", o) for o in args.orders if "virtual" in args.positions
                        ]
                        for budget in args.budgets:
                            for (positions, order), (tag, extra) in itertools.product(
                                layouts, args.variants
                            ):
                                sel.config = dataclasses.replace(
                                    base, budget=budget, positions=positions, order=order, **extra
                                )
                                a, t, m = ask_measured(kb, name, qs, args.max_tokens)
                                mode = SELECT_MODES[positions, order] + heads_tag(tag, kb)
                                record(
                                    task, size, seed, mode, budget, name, qs, a, t, m, loaded.shared
                                )
                        sel.config = base
                    if not args.home:
                        kb.delete_corpus(name)
        result["complete"] = True
        save()
    finally:
        kb.close()
        if not args.home:
            shutil.rmtree(home, ignore_errors=True)
    return result


def run(args) -> dict:
    """The whole grid; the result (also saved to args.out after every row) as a dict."""
    import torch

    from kb.service import KnowledgeBase
    from kb.settings import Settings

    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="kb-quality-"))
    penalty = (
        {} if args.repetition_penalty is None else {"repetition_penalty": args.repetition_penalty}
    )
    for dry in ("dry_multiplier", "dry_base", "dry_allowed_length"):
        if getattr(args, dry) is not None:
            penalty[dry] = getattr(args, dry)
    kb = KnowledgeBase(
        Settings(
            home=home / "home", models_dir=args.models_dir, max_tokens=args.max_tokens, **penalty
        )
    )
    rows, info = [], {}
    t_start = time.perf_counter()
    result = {
        "model": kb.settings.model,
        "torch": torch.__version__,
        "seed": args.seed,
        "threads": args.threads,
        "segment_len": args.segment_len,
        "max_tokens": args.max_tokens,
        "repetition_penalty": kb.settings.repetition_penalty,
        "frequency_penalty": args.frequency_penalty,
        "dry_multiplier": kb.settings.dry_multiplier,
        "dry_base": kb.settings.dry_base,
        "dry_allowed_length": kb.settings.dry_allowed_length,
        "link_tokens": args.link_tokens,
        "sizes": {t: args.sizes[t] for t in args.tasks},
        "corpora": info,
        "complete": False,
        "rows": rows,
    }

    def save() -> None:
        result["wall_s"] = round(time.perf_counter() - t_start, 1)
        write(args.out, result)

    try:
        runner = Runner(kb, args, rows, save)
        for task in args.tasks:
            runner.task(task, home, info)
        result["complete"] = True
        save()
    finally:
        kb.close()
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    return result


def write(path: Path, result: dict) -> None:
    """Write the result atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table (prefill-routing and dense-layer columns where rows have them)."""
    cols = [("task", 8), ("mode", 10), ("pic", 6), ("router", 6), ("chunk_size", 5), ("density", 7)]
    cols += [(c, 7) for c in ("prefill_routing", "dense_layers") if any(c in r for r in rows)]
    cols += [("n", 3), ("accuracy", 8)]
    names = {"chunk_size": "chunk", "prefill_routing": "prefill", "dense_layers": "dense_l"}
    cols = [(c, max(w, len(names.get(c, c)))) for c, w in cols]
    lines = [
        "| " + " | ".join(f"{names.get(c, c):{w}}" for c, w in cols) + " |",
        "|" + "|".join("-" * (w + 2) for _, w in cols) + "|",
    ]
    for r in rows:
        cells = [
            f"{r[c]:.3f}" if c == "accuracy" else str(r.get(c) if r.get(c) is not None else "-")
            for c, _ in cols
        ]
        lines.append("| " + " | ".join(f"{x:{w}}" for x, (_, w) in zip(cells, cols)) + " |")
    return "\n".join(lines)


MODE_ORDER = ("contiguous", "dense", "routed")
MODE_NAMES = {"contiguous": "contiguous (ceiling)", "routed": "routed (quest, 0.25)"}


def large_tables(result: dict, model_positions: int = 8192) -> str:
    """docs/QUALITY.md's grid tables from a large-grid result: one table per corpus (task, size,
    seed), its rows by mode (ceiling, dense, routed, then each selection layout by budget)."""

    def num(x, fmt="{:,}"):
        return "–" if x is None else fmt.format(x)

    cells: dict[tuple, list[dict]] = {}
    for r in result["rows"]:
        cells.setdefault((r["task"], r["size"], r["seed"]), []).append(r)
    out = []
    for (task, size, seed), rows in sorted(cells.items()):
        meta = result["corpora"].get(f"{task}-{size}-s{seed}", {})
        tokens = rows[0]["tokens"]
        ceiling = next((r["correct"] for r in rows if r["mode"] == "contiguous"), None)
        out.append(
            f"**{task}, {tokens:,} tokens ({meta.get('documents', '?')} documents, "
            f"{tokens / model_positions:.1f}× the model's {model_positions:,} positions), "
            f"seed {seed}, n = {rows[0]['n']}**\n"
        )
        out.append(
            "| mode | budget | correct | accuracy | of ceiling | cite top-1 segment | top-1 passage "
            "| answer's chunk read | shared tokens / step | ms / step (B=32, loaded) |"
        )
        out.append("|" + "|".join(["------"] * 10) + "|")
        rank = {m: i for i, m in enumerate(MODE_ORDER)}
        for r in sorted(rows, key=lambda r: (rank.get(r["mode"], 9), r["mode"], r["budget"] or 0)):
            share = (
                "–"
                if r["mode"] == "contiguous" or not ceiling
                else f"{round(100 * r['correct'] / ceiling)}%"
            )
            out.append(
                f"| {MODE_NAMES.get(r['mode'], r['mode'])} | {num(r['budget'], '{}')} "
                f"| {r['correct']}/{r['n']} | {r['accuracy']:.3f} | {share} "
                f"| {r['cite_segment_top1']:.2f} | {r['cite_passage_top1']:.2f} "
                f"| {num(r.get('selection_recall'), '{:.2f}')} "
                f"| {'one document' if r['mode'] == 'contiguous' else num(r['attended_tokens'])} "
                f"| {num(r['ms_per_decode_step'], '{:,.0f}')} |"
            )
        out.append("")
    return "\n".join(out)


PIC_ALIASES = {"a": "own", "b": "shared", "c": "linked"}


def _pics(text: str) -> list[str]:
    return [PIC_ALIASES.get(x, x) for x in text.split(",") if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="questions per task")
    p.add_argument("--tasks", default="kv,needle,vartrace")
    p.add_argument("--modes", default="contiguous,dense,routed")
    p.add_argument("--routers", default="mean,quest")
    p.add_argument("--chunk-sizes", default="16,64,256")
    p.add_argument("--densities", default="0.5,0.25,0.1")
    p.add_argument(
        "--pic",
        default="shared",
        help="segment schemes for dense mode: own (a), shared (b), linked (c); see kb/ingest/precompute.py",
    )
    p.add_argument("--routed-pic", default="shared", help="the schemes the routed grid runs under")
    p.add_argument(
        "--link-tokens",
        type=int,
        default=32,
        help="previous-segment tokens the linked scheme prefills",
    )
    p.add_argument(
        "--prefill-routing",
        default="",
        help="values of the engine runner's prefill_routing to compare in routed mode (where it has one), "
        "e.g. request,token",
    )
    p.add_argument("--prefill-routing-densities", default="0.25")
    p.add_argument(
        "--dense-layers",
        default="0",
        help="routed mode: leading layers attended densely (an experiment; the service routes all)",
    )
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=None,
        help="the answers' repetition penalty (default: the service's, KB_REPETITION_PENALTY)",
    )
    p.add_argument(
        "--frequency-penalty", type=float, default=0.0, help="the answers' frequency penalty"
    )
    for flag, kind in (("multiplier", float), ("base", float), ("allowed-length", int)):
        p.add_argument(
            f"--dry-{flag}",
            type=kind,
            default=None,
            help=f"the answers' DRY {flag} (default: the service's, KB_DRY_"
            f"{flag.upper().replace('-', '_')})",
        )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--size",
        type=int,
        default=None,
        help="corpus size for every task (kv pairs for kv, prose characters otherwise)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="the smallest grid: n=4, smaller corpora, chunk 64, density 0.25, both routers",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temporary KB home")
    p.add_argument("-v", "--verbose", action="store_true", help="print every answer")
    p.add_argument(
        "--large",
        action="store_true",
        help="the attention-retrieval grid over multi-document corpora beyond the model's context "
        "(tasks needle_docs,kv_docs; modes contiguous,dense,routed,select); "
        "writes bench/results/quality_large.json",
    )
    p.add_argument(
        "--large-sizes",
        default="needle_docs:92000,kv_docs:1840",
        help="task:size[:size...] (prose characters / kv pairs; ~24K tokens each by default)",
    )
    p.add_argument(
        "--budgets", default="512,1024,2048,4096", help="selection budgets (shared tokens)"
    )
    p.add_argument("--positions", default="virtual", help="selection positions: virtual,stored")
    p.add_argument(
        "--orders",
        default="corpus",
        help="orders of the virtual layout: corpus,best_last (kb/engine/selection.py)",
    )
    p.add_argument("--seeds", default="0", help="seeds of the large grid")
    p.add_argument(
        "--tables",
        action="store_true",
        help="with --large: print docs/QUALITY.md's grid tables from --out and measure nothing",
    )
    p.add_argument(
        "--variants",
        default="",
        help="selection variants, ';'-separated, each SelectionConfig overrides "
        "'field=value,...' (e.g. 'neighbours=2;window=5'); '' is the defaults",
    )
    p.add_argument(
        "--home",
        default=None,
        help="large grid: a KB home kept between runs; corpora already built there are reused "
        "(built with the same arguments), so a run over a built 64K corpus skips its prefill",
    )
    p.add_argument("--large-chunk", type=int, default=64)
    p.add_argument(
        "--large-density", type=float, default=0.25, help="today's routed mode in the large grid"
    )
    args = p.parse_args(argv)
    if args.large:
        if args.tasks == "kv,needle,vartrace":
            args.tasks = "needle_docs,kv_docs"
        if args.modes == "contiguous,dense,routed":
            args.modes = "contiguous,dense,routed,select"
        if args.segment_len == 512:
            args.segment_len = 1024  # the service's default
        if args.out == RESULTS:
            args.out = RESULTS.with_name("quality_large.json")
        if args.max_tokens == 24:
            args.max_tokens = 16
        spec, args.large_sizes = args.large_sizes, {}
        for part in spec.split(","):
            t, *sizes = part.split(":")
            args.large_sizes[t] = [int(x) for x in sizes]
        args.budgets = [int(b) for b in args.budgets.split(",") if b]
        args.positions = [x for x in args.positions.split(",") if x]
        args.orders = [x for x in args.orders.split(",") if x]
        args.variants = [selection_variant(v) for v in args.variants.split(";")]
        args.seeds = [int(x) for x in args.seeds.split(",") if x]
        args.tasks = [t for t in args.tasks.split(",") if t]
        args.modes = [m for m in args.modes.split(",") if m]
        return args
    if args.quick:
        args.n, args.chunk_sizes, args.densities = 4, "64", "0.25"
        sizes = dict(QUICK_SIZES)
    else:
        sizes = dict(DEFAULT_SIZES)
    if args.size is not None:
        sizes = {t: args.size for t in sizes}
    args.sizes = sizes
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.modes = [m for m in args.modes.split(",") if m]
    args.routers = [r for r in args.routers.split(",") if r]
    args.chunk_sizes = [int(c) for c in str(args.chunk_sizes).split(",") if c]
    args.densities = [float(d) for d in str(args.densities).split(",") if d]
    args.pic, args.routed_pic = _pics(args.pic), _pics(args.routed_pic)
    args.prefill_routing = [x for x in args.prefill_routing.split(",") if x]
    args.dense_layers = [int(x) for x in args.dense_layers.split(",") if x]
    args.prefill_routing_densities = [
        float(d) for d in args.prefill_routing_densities.split(",") if d
    ]
    for t in args.tasks:
        if t not in GENERATORS:
            p.error(f"unknown task {t!r}; choose from {', '.join(GENERATORS)}")
    for m in args.modes:
        if m not in ("contiguous", "dense", "routed"):
            p.error(f"unknown mode {m!r}")
    for pic in args.pic + args.routed_pic:
        if pic not in ("own", "shared", "linked"):
            p.error(f"unknown scheme {pic!r}: own (a), shared (b) or linked (c)")
    if "routed" in args.modes:  # the routed grid runs over these schemes' corpora
        args.pic += [x for x in args.routed_pic if x not in args.pic]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.large and args.tables:
        print(large_tables(json.loads(args.out.read_text())))
        return
    if args.large:
        result = large(args)
        for r in result["rows"]:
            print(r)
        print(f"wrote {args.out} ({result['wall_s']} s)")
        return
    result = run(args)
    print(table(result["rows"]))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
