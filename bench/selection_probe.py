"""Which query heads' attention finds the passage that holds an answer (no decoding).

Over corpora of bench/quality.py's large grid (built through the service by its `build_corpus`,
or reused from the grid's `--home`), every question runs the service's selection pass
(kb/engine/selection.py: the prompt with its earlier turns, at the request's virtual position)
and each query head's attention scores every chunk position-neutrally: per head the question
tokens' softmax mass, a window sum (a phrase), the best phrase per chunk, lifted over what the
neutral questions give (the service's calibration). Heads are ranked on the `--train` corpora
(how often the head's best chunk is the answer's, and is within one chunk of it: inside the
served 192-token passage); the best k heads together (their scores averaged, then lifted) are
evaluated on the `--test` corpora, beside every head of the layers 17 and 18 (the earlier
default) as the service scored them before (mean over heads, then phrase) and per head.
A scorer `aligned` shifts each question token's map back by its place in the question before the
sum (a run of the question's tokens found in the corpus in order adds up at one place).

    .venv/bin/python bench/selection_probe.py --home /tmp/kb-grid \\
        --train needle_docs:92000:2,kv_docs:1840:2 --test kv_docs:1840:0,kv_docs:9800:0
Writes bench/results/selection_heads.json; per corpus the scores are kept in --cache (default
HOME), so a corpus of another home (TASK:SIZE:SEED:SEGMENT_LEN) can rank or test once scored.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality import (  # noqa: E402
    DEFAULT_MODELS_DIR,
    _turns,
    answer_chunks,
    build_corpus,
    generate,
    write,
)

WINDOWS = (3, 9)
KS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)


def head_maps(sel, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """[Hq, T, N'] softmax mass of each query head and question token on every routed shared key,
    every chunk seen as if right before the question (the selector's geometry)."""
    from kb.engine.selection import rotate

    kr = sel.keys[layer]  # every KV head: the probe's selector scores with all heads
    hkv, _, d = kr.shape
    t, hq, _ = q.shape
    g = hq // hkv
    target = sel.chunk_size + torch.arange(t)
    qn = rotate(q, target - q_pos.long().cpu(), sel.inv_freq) / math.sqrt(d)
    qh = qn.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(hkv, g * t, d)
    p = torch.softmax(torch.bmm(qh, kr.transpose(1, 2)), dim=-1)  # [Hkv, G*T, N']
    return p.view(hq, t, -1)


def aligned(maps: torch.Tensor) -> torch.Tensor:
    """[H, N'] from maps[H, T, N']: position j collects maps[:, t, j + t] over question tokens t."""
    h, t, n = maps.shape
    out = torch.zeros(h, n)
    for i in range(t):
        out[:, : n - i] += maps[:, i, i:]
    return out / t


def phrase(sel, s: torch.Tensor, window: int) -> torch.Tensor:
    """[H, C'] best window sum per routed chunk of token scores s[H, N']."""
    cs = sel.chunk_size
    if window > 1:
        s = F.avg_pool1d(s[:, None], window, 1, window // 2, count_include_pad=True)[:, 0] * window
        s = s[:, : sel.num_tokens - sel.always * cs]
    return F.pad(s, (0, -s.shape[1] % cs)).view(s.shape[0], -1, cs).amax(-1)


def lift(cs: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The service's calibration (kb/engine/selection.py, calibrate="lift") over routed chunks."""
    return (cs - base) / (base + base.mean(-1, keepdim=True))


def hits(cs: torch.Tensor, targets: list[list[int]]) -> tuple[float, float]:
    """(best chunk is the answer's, best chunk within one of it) over questions; cs[Q, C']."""
    best = cs.argmax(-1).tolist()
    n = len(targets)
    top1 = sum(b in t for b, t in zip(best, targets)) / n
    near = sum(any(abs(b - x) <= 1 for x in t) for b, t in zip(best, targets)) / n
    return round(top1, 3), round(near, 3)


def score_corpus(
    kb, home: Path, cache_dir: Path, spec: str, n: int, layers: tuple[int, ...], scorers
) -> dict:
    """Per question and neutral question, per scorer, layer, head and window the chunk scores of
    corpus `spec` (TASK:SIZE:SEED[:SEGMENT_LEN], built in `home` with its segment length where
    not cached); cached in `cache_dir`."""
    from kb.engine.selection import (
        NEUTRAL_QUESTIONS,
        PassageSelector,
        SelectionConfig,
        preamble_kv,
        selection_queries,
    )
    from kb.prompt import build_prompt, encode, question_span, turn_spans

    task, size, seed, *seg = spec.split(":")
    segment = int(seg[0]) if seg else kb.settings.segment_len
    cache = cache_dir / f"probe-{task}-{size}-s{seed}-seg{segment}-n{n}-L{max(layers)}.pt"
    if cache.exists():
        return torch.load(cache)
    if segment != kb.settings.segment_len:
        raise SystemExit(f"{spec}: not in {cache_dir} and this home's segments are {segment}")
    data = generate(task, int(seed), n, int(size))
    name = f"{task}-{size}-s{seed}"  # the grid's name: one build serves both
    if name not in {c.name for c in kb.list_corpora()}:
        paths = []
        for i, text in enumerate(data.docs):
            paths.append(home / f"{name}-doc{i:03d}.txt")
            paths[-1].write_text(text)
        build_corpus(kb, name, paths, kb.settings.segment_len, kb.settings.chunk_size)
    loaded = kb.load_corpus(name)
    sh, cmap, lm = loaded.shared, loaded.citation_map, kb.loaded
    served = sh.selector
    assert served is not None, f"{name} does not select (within the model's positions)"
    sel = PassageSelector.build(
        sh.k,
        sh.positions,
        sh.chunk_size,
        sh.always_chunks,
        lm.model.inv_freq.cpu(),
        SelectionConfig(layers=layers),
    )
    pk, pv = preamble_kv(sh)

    def scores(question: str, history) -> torch.Tensor:
        """[S, L, Hq, W, C'] of the question's span."""
        parts = build_prompt(lm.tokenizer, kb.settings.system_prompt, _turns(history), question)
        ids = encode(lm.tokenizer, parts.suffix)
        span = question_span(lm.tokenizer, parts.suffix, question) or (0, len(ids))
        earlier = turn_spans(lm.tokenizer, parts.suffix, [u for u, _ in history])
        pos0 = served.query_position(sh.pos_offset, len(earlier))
        pos = list(range(pos0, pos0 + len(ids)))
        queries = selection_queries(lm.model, ids, pos, [*earlier, span], pk, pv, layers)[-1]
        out = []
        for kind in scorers:
            per_layer = []
            for li in layers:
                maps = head_maps(sel, li, *queries[li])
                s = maps.mean(1) if kind == "mass" else aligned(maps)
                per_layer.append(torch.stack([phrase(sel, s, w) for w in WINDOWS], 1))
            out.append(torch.stack(per_layer))
        return torch.stack(out)

    neutral = torch.stack([scores(t, ()) for t in NEUTRAL_QUESTIONS]).mean(0)
    qs = torch.stack([scores(q.question, q.history) for q in data.questions])
    targets = [
        sorted(c - sh.always_chunks for c in answer_chunks(cmap, lm.tokenizer, q))
        for q in data.questions
    ]
    out = {
        "layers": layers,
        "scorers": tuple(scorers),
        "q": qs,
        "neutral": neutral,
        "targets": targets,
        "tokens": sh.num_tokens,
    }
    torch.save(out, cache)
    kb.cache.drop(name)  # the next corpus's KV in its place
    return out


def main(argv=None) -> None:
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", default="needle_docs:92000:2,kv_docs:1840:2")
    p.add_argument("--test", default="kv_docs:1840:0,needle_docs:92000:0")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--layers", type=int, default=19, help="score heads of layers 0..N-1")
    p.add_argument("--scorers", default="mass")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--home", type=Path, required=True, help="the grid's --home (corpora kept)")
    p.add_argument("--segment-len", type=int, default=1024, help="of corpora built here")
    p.add_argument("--cache", type=Path, default=None, help="scores kept per corpus (default HOME)")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_heads.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    home = args.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    kb = KnowledgeBase(Settings(home=home / "home", models_dir=args.models_dir))
    kb.settings.segment_len, kb.settings.chunk_size = args.segment_len, 64  # the grid's: 1024
    layers = tuple(range(args.layers))
    scorers = args.scorers.split(",")
    t0 = time.perf_counter()
    try:
        data = {}
        for spec in dict.fromkeys(args.train.split(",") + args.test.split(",")):
            data[spec] = score_corpus(kb, home, args.cache or home, spec, args.n, layers, scorers)
            print(f"scored {spec} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        kb.close()
    rows = []
    for si, kind in enumerate(scorers):
        for wi, w in enumerate(WINDOWS):
            rank: dict[tuple[int, int], float] = {}
            for spec in args.train.split(","):
                d = data[spec]
                q, nq = d["q"][:, si, :, :, wi], d["neutral"][si, :, :, wi]  # [Q, L, H, C]
                for li in range(q.shape[1]):
                    for h in range(q.shape[2]):
                        rank[li, h] = rank.get((li, h), 0.0) + sum(
                            hits(lift(q[:, li, h], nq[li, h]), d["targets"])
                        )
            ranked = sorted(rank, key=lambda x: -rank[x])
            best = [f"{li}.{h}" for li, h in ranked[:16]]
            print(f"{kind} window {w}: train ranking {' '.join(best)}")
            for spec in args.test.split(","):
                d = data[spec]
                q, nq = d["q"][:, si, :, :, wi], d["neutral"][si, :, :, wi]
                for k in KS:
                    hs = ranked[:k]
                    cs = torch.stack([q[:, li, h] for li, h in hs]).mean(0)
                    base = torch.stack([nq[li, h] for li, h in hs]).mean(0)
                    rows.append(
                        {
                            "scorer": kind,
                            "window": w,
                            "test": spec,
                            "heads": best[:k],
                            "k": k,
                            **dict(zip(("top1", "near"), hits(lift(cs, base), d["targets"]))),
                        }
                    )
                idx = [17, 18]  # the earlier default's layers, every head
                cs, base = q[:, idx].mean((1, 2)), nq[idx].mean((0, 1))
                rows.append(
                    {
                        "scorer": kind,
                        "window": w,
                        "test": spec,
                        "heads": "all of 17,18",
                        "k": None,
                        **dict(zip(("top1", "near"), hits(lift(cs, base), d["targets"]))),
                    }
                )
                for r in rows[-len(KS) - 1 :]:
                    print(f"  {spec:18} k={r['k']!s:4} top1={r['top1']:.2f} near={r['near']:.2f}")
    write(
        args.out,
        {
            "model": kb.settings.model,
            "torch": torch.__version__,
            "threads": args.threads,
            "segment_len": args.segment_len,
            "train": args.train,
            "test": args.test,
            "n": args.n,
            "layers": args.layers,
            "windows": WINDOWS,
            "rows": rows,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
    )


if __name__ == "__main__":
    main()
