"""Answer quality of dense against routed shared attention, in SCBench's multi-request style.

One corpus per task, many different questions over it; the corpus's KV is built once per
(task, segmentation, chunk size) and reused for every question, router and density. All data is
generated here from a seed, or taken from docstrings that ship with Python (`inspect.getdoc` of
standard-library modules, as real prose); nothing is downloaded.

Tasks
  kv        key-value retrieval in a large JSON object of random ids ("What is the value of key X?")
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
import inspect
import json
import os
import random
import string
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_MODELS_DIR = Path(os.environ.get("KB_TEST_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models"))
RESULTS = ROOT / "bench" / "results" / "quality.json"

# Standard-library modules whose docstrings serve as real prose (fixed order: reproducible).
PROSE_MODULES = ("json", "argparse", "logging", "collections", "re", "string", "textwrap", "functools",
                 "subprocess", "pickle", "csv", "datetime", "decimal", "difflib", "email", "heapq",
                 "http.client", "inspect", "pdb", "pydoc", "shutil", "tarfile", "threading", "unittest",
                 "urllib.parse", "zipfile", "calendar", "configparser", "contextlib", "dataclasses",
                 "enum", "fractions", "locale", "optparse", "pprint", "sched", "shlex", "tempfile",
                 "timeit", "typing", "uuid", "warnings", "weakref", "xml.dom.minidom", "zipimport")

ATTRIBUTES = ("locker number", "badge number", "room number", "access code", "account number",
              "ticket number", "ledger number", "parcel number", "permit number", "seat number",
              "vault code", "pager number", "license number", "crate number", "gate code", "file number")


@dataclass(frozen=True)
class Question:
    question: str
    expected: str


@dataclass(frozen=True)
class TaskData:
    task: str
    text: str
    questions: tuple[Question, ...]


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


def _prose(rng: random.Random, chars: int) -> list[str]:
    """Consecutive real paragraphs totalling about `chars` characters, from a seeded start."""
    paras = _prose_paragraphs()
    start = rng.randrange(len(paras))
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
        v = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        if v not in used:
            used.add(v)
            return v


def gen_kv(seed: int, n: int, size: int) -> TaskData:
    """A JSON object of ~`size` random 8-hex-digit keys and values; n questions on distinct keys."""
    rng = random.Random(f"kv-{seed}")
    hexd = "0123456789abcdef"
    seen: set[str] = set()
    pairs = []
    while len(pairs) < max(size, n):
        k, v = ("".join(rng.choice(hexd) for _ in range(8)) for _ in range(2))
        if k in seen or v in seen:
            continue
        seen.update((k, v))
        pairs.append((k, v))
    # one pair per line; a blank line every 16 pairs lets the segmenter cut between pairs
    lines = ["{"]
    for i, (k, v) in enumerate(pairs):
        if i and i % 16 == 0:
            lines.append("")
        lines.append(f'  "{k}": "{v}"' + ("," if i + 1 < len(pairs) else ""))
    lines.append("}")
    asked = rng.sample(range(len(pairs)), n)
    qs = tuple(Question(f'In the JSON object above, what is the value of the key "{pairs[i][0]}"?', pairs[i][1])
               for i in sorted(asked, key=lambda j: rng.random()))
    return TaskData("kv", "\n".join(lines), qs)


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
    slots = sorted(rng.randrange(i * len(paras) // n, max(i * len(paras) // n + 1, (i + 1) * len(paras) // n))
                   for i in range(n))
    for off, (slot, (name, attr, value)) in enumerate(zip(slots, facts)):
        paras.insert(slot + off, f"{name} works at the municipal archive. The {attr} of {name} is {value}.")
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
        stmts = [f"VAR {names[0]} = {value}."] + [f"VAR {names[j]} = {names[j - 1]}." for j in range(1, hops)]
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
    qs = tuple(Question(f"What is the value of the variable {last}?", value) for last, value, _ in chains)
    return TaskData("vartrace", "\n\n".join(out), qs)


GENERATORS = {"kv": gen_kv, "needle": gen_needle, "vartrace": gen_vartrace}
# size units: kv pairs for kv, characters of prose for the others (~ equal token counts)
DEFAULT_SIZES = {"kv": 220, "needle": 16000, "vartrace": 16000}
QUICK_SIZES = {"kv": 120, "needle": 7000, "vartrace": 7000}


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
    if cached is not None and getattr(cached.shared.router, "router", None) is not None \
            and cached.shared.router.router.kind == kind:
        return cached
    kb.cache.drop(name)
    return kb.load_corpus(name)


def position_limit(kb) -> int:
    """Where shared positions end (the service's rule: leave room for the question and answer)."""
    max_pos = kb.loaded.config.max_position_embeddings
    return max_pos - min(2048, max_pos // 4)


def ask_all(kb, name: str, questions, max_tokens: int) -> list[str]:
    """Queue every question over the corpus at once (the multi-request case), step the engine
    until all finish, and return the greedy answers in order."""
    from kb.engine.sequence import SamplingParams

    answers = [kb.ask(name, q.question, SamplingParams(max_tokens=max_tokens)) for q in questions]
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


def build_corpus(kb, name: str, path: Path, segment_len: int, chunk_size: int) -> dict:
    kb.settings.segment_len, kb.settings.chunk_size = segment_len, chunk_size
    kb.create_corpus(name)
    res = kb.ingest(name, [path])
    if res[0].status != "ready":
        raise RuntimeError(f"ingest of {name} failed: {res[0].error}")
    docs = kb.documents(name)
    return {"segments": docs[0]["segments"], "tokens": docs[0]["tokens"]}


def run(args) -> dict:
    import torch

    from kb.service import KnowledgeBase
    from kb.settings import Settings

    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="kb-quality-"))
    kb = KnowledgeBase(Settings(home=home / "home", models_dir=args.models_dir, max_tokens=args.max_tokens))
    rows, info = [], {}
    t_start = time.perf_counter()
    try:
        limit = position_limit(kb)
        for task in args.tasks:
            data = generate(task, args.seed, args.n, args.sizes[task])
            path = home / f"{task}.txt"
            path.write_text(data.text)
            qs = data.questions

            def evaluate(name, spec: Spec):
                t0 = time.perf_counter()
                answers = ask_all(kb, name, qs, args.max_tokens)
                hits = [score(a, q.expected) for a, q in zip(answers, qs)]
                row = {"task": spec.task, "mode": spec.mode, "router": spec.router, "chunk_size": spec.chunk_size,
                       "density": spec.density, "n": len(qs), "accuracy": round(sum(hits) / len(qs), 4)}
                rows.append(row)
                if args.verbose:
                    for a, q, h in zip(answers, qs, hits):
                        print(f"    [{'+' if h else '-'}] {q.expected:>10}  {a.strip()[:70]!r}", flush=True)
                print(f"  {spec.mode:10} {str(spec.router or '-'):5} chunk={str(spec.chunk_size or '-'):>4} "
                      f"density={spec.density:<5} acc={row['accuracy']:.3f}  ({time.perf_counter() - t0:.1f}s)",
                      flush=True)
                return row

            if "contiguous" in args.modes:
                name = f"{task}-contig"
                meta = build_corpus(kb, name, path, limit, 64)
                info[name] = meta
                print(f"{task}: contiguous corpus {meta}", flush=True)
                if meta["segments"] != 1 or meta["tokens"] > limit:
                    print(f"  contiguous skipped: {meta['tokens']} tokens do not fit one segment "
                          f"within {limit} positions", flush=True)
                else:
                    kb.settings.density = 1.0
                    evaluate(name, Spec(task, "contiguous", None, None, 1.0))
            if "dense" in args.modes or "routed" in args.modes:
                chunk_sizes = args.chunk_sizes if "routed" in args.modes else args.chunk_sizes[:1]
                for ci, chunk in enumerate(chunk_sizes):
                    name = f"{task}-seg{args.segment_len}-c{chunk}"
                    meta = build_corpus(kb, name, path, args.segment_len, chunk)
                    info[name] = meta
                    print(f"{task}: segmented corpus {name} {meta}", flush=True)
                    if ci == 0 and "dense" in args.modes:  # dense attention does not depend on the chunk size
                        kb.settings.density = 1.0
                        evaluate(name, Spec(task, "dense", None, None, 1.0))
                    if "routed" not in args.modes:
                        continue
                    for router in args.routers:
                        loaded = use_router(kb, name, router)
                        if loaded.shared.router is None:
                            print(f"  {name}: too few chunks to route", flush=True)
                            break
                        for density in args.densities:
                            kb.settings.density = density
                            row = evaluate(name, Spec(task, "routed", router, chunk, density))
                            row["top_k"] = loaded.shared.router.top_k(density)
                            row["num_chunks"] = loaded.shared.num_chunks
    finally:
        kb.close()
        if not args.keep:
            import shutil
            shutil.rmtree(home, ignore_errors=True)
    return {"model": kb.settings.model, "torch": torch.__version__, "seed": args.seed,
            "segment_len": args.segment_len, "max_tokens": args.max_tokens, "corpora": info,
            "wall_s": round(time.perf_counter() - t_start, 1), "rows": rows}


def table(rows: list[dict]) -> str:
    head = f"| {'task':8} | {'mode':10} | {'router':6} | {'chunk':5} | {'density':7} | {'n':>3} | {'accuracy':>8} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r['task']:8} | {r['mode']:10} | {str(r['router'] or '-'):6} | "
                     f"{str(r['chunk_size'] or '-'):5} | {r['density']:<7} | {r['n']:>3} | {r['accuracy']:>8.3f} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8, help="questions per task")
    p.add_argument("--tasks", default="kv,needle,vartrace")
    p.add_argument("--modes", default="contiguous,dense,routed")
    p.add_argument("--routers", default="mean,quest")
    p.add_argument("--chunk-sizes", default="16,64,256")
    p.add_argument("--densities", default="0.5,0.25,0.1")
    p.add_argument("--segment-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=None,
                   help="corpus size for every task (kv pairs for kv, prose characters otherwise)")
    p.add_argument("--quick", action="store_true",
                   help="the smallest grid: n=4, smaller corpora, chunk 64, density 0.25, both routers")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep the temporary KB home")
    p.add_argument("-v", "--verbose", action="store_true", help="print every answer")
    args = p.parse_args(argv)
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
    for t in args.tasks:
        if t not in GENERATORS:
            p.error(f"unknown task {t!r}; choose from {', '.join(GENERATORS)}")
    for m in args.modes:
        if m not in ("contiguous", "dense", "routed"):
            p.error(f"unknown mode {m!r}")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result["rows"]))
    print(f"wrote {args.out} ({result['wall_s']} s)")


if __name__ == "__main__":
    main()
