"""Which of the model's own attention signals find the passage that holds an answer.

Over a multi-document corpus of bench/quality.py (built by its `build_corpus`, through the
service), every question's tokens run the selection pass (kb/engine/selection.py) and their
queries score every shared chunk, at every layer, in two ways:
- `virtual`: position-neutral (keys re-based to chunk-local positions, the question right after
  each chunk), the service's selection;
- `stored`: the keys as stored and the query at the request's real position (today's layout).
Per layer, layer set, phrase window and calibration (subtracting the chunk scores of neutral
questions), it reports how often the answer's chunk ranks first and how often it is inside a
budget of 1024 / 2048 tokens (with one neighbour chunk on each side). No decoding: a fast design
loop for the choices docs/QUALITY.md records.

    .venv/bin/python bench/selection_probe.py --task needle_docs --n 32
Writes bench/results/selection_probe.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

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

NEUTRAL = (
    "What do the documents say?",
    "Summarize the documents.",
    "What is this about?",
    "Tell me something from the text.",
)


def main(argv=None) -> None:
    from kb.engine.selection import PassageSelector, SelectionConfig, rotate, selection_queries
    from kb.prompt import build_prompt, encode, question_span
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="needle_docs")
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segment-len", type=int, default=1024)
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--windows", default="1,9,17")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_probe.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    home = Path(tempfile.mkdtemp(prefix="kb-probe-"))
    kb = KnowledgeBase(Settings(home=home / "home", models_dir=args.models_dir))
    t0 = time.perf_counter()
    try:
        data = generate(args.task, args.seed, args.n, args.size)
        paths = []
        for i, text in enumerate(data.docs or (data.text,)):
            paths.append(home / f"doc{i:03d}.txt")
            paths[-1].write_text(text)
        meta = build_corpus(kb, "probe", paths, args.segment_len, args.chunk_size)
        print(f"corpus {meta} ({time.perf_counter() - t0:.0f} s)", flush=True)
        loaded = kb.load_corpus("probe")
        sh, cmap, lm = loaded.shared, loaded.citation_map, kb.loaded
        layers = tuple(range(lm.config.num_layers))
        sel = PassageSelector.build(
            sh.k,
            sh.positions,
            sh.chunk_size,
            sh.always_chunks,
            lm.model.inv_freq,
            SelectionConfig(layers=layers, window=1),
        )
        p0 = sh.always_chunks * sh.chunk_size
        raw = {li: sh.k[li][p0:].float().transpose(0, 1).contiguous() for li in layers}
        q_pos0 = sel.query_position(sh.pos_offset)

        def passes(question: str, history) -> dict:
            parts = build_prompt(lm.tokenizer, kb.settings.system_prompt, _turns(history), question)
            ids = encode(lm.tokenizer, parts.suffix)
            span = question_span(lm.tokenizer, parts.suffix, question) or (0, len(ids))
            pos = list(range(q_pos0, q_pos0 + len(ids)))
            return selection_queries(
                lm.model,
                ids,
                pos,
                span,
                [k[: sh.preamble_len] for k in sh.k],
                [v[: sh.preamble_len] for v in sh.v],
                layers,
            )

        def token_scores(queries: dict, mode: str) -> torch.Tensor:
            """[L, N'] per-layer token scores."""
            out = []
            for li in layers:
                q, pos = queries[li]
                if mode == "virtual":
                    out.append(sel.token_scores(li, q, pos))
                    continue
                t, hq, d = q.shape
                hkv = raw[li].shape[0]
                real = sh.pos_offset + (pos - pos[0]) + (pos[0] - q_pos0)
                qr = rotate(q, real - pos, lm.model.inv_freq) / d**0.5
                qh = qr.view(t, hkv, hq // hkv, d).permute(1, 0, 2, 3).reshape(hkv, -1, d)
                out.append(
                    torch.softmax(torch.bmm(qh, raw[li].transpose(1, 2)), -1).sum((0, 1)) / (t * hq)
                )
            return torch.stack(out)

        targets, scores = [], {"virtual": [], "stored": []}
        for q in data.questions:
            targets.append(answer_chunks(cmap, lm.tokenizer, q))
            qs = passes(q.question, q.history)
            for m in scores:
                scores[m].append(token_scores(qs, m))
        neutral = {
            m: torch.stack([token_scores(passes(t, ()), m) for t in NEUTRAL]).mean(0)
            for m in scores
        }
        print(f"scored {len(targets)} questions ({time.perf_counter() - t0:.0f} s)", flush=True)

        def evaluate(mode: str, lset: tuple[int, ...], window: int, calibrate: bool) -> dict:
            sel.config = SelectionConfig(layers=layers, window=window, neighbours=1)
            top1 = r1k = r2k = 0
            ranks = []
            for tgt, ts in zip(targets, scores[mode]):
                s = ts[list(lset)].mean(0)
                cs = sel.phrase_chunks(s)
                if calibrate:
                    base = sel.phrase_chunks(neutral[mode][list(lset)].mean(0))
                    cs = (
                        cs - base if calibrate == "sub" else cs / (base + base[sel.always :].mean())
                    )
                cs[: sel.always] = float("-inf")
                order = cs.argsort(descending=True).tolist()
                rank = min(order.index(c) for c in tgt)
                ranks.append(rank)
                top1 += rank == 0
                for budget, acc in ((1024, "r1k"), (2048, "r2k")):
                    sel.config = SelectionConfig(
                        budget=budget, layers=layers, window=window, neighbours=1
                    )
                    chosen = set(sel.choose(cs).tolist())
                    if tgt & chosen:
                        if acc == "r1k":
                            r1k += 1
                        else:
                            r2k += 1
            n = len(targets)
            return {
                "mode": mode,
                "layers": list(lset),
                "window": window,
                "calibrate": calibrate,
                "top1": round(top1 / n, 3),
                "recall_1024": round(r1k / n, 3),
                "recall_2048": round(r2k / n, 3),
                "median_rank": sorted(ranks)[n // 2],
            }

        rows = []
        windows = [int(w) for w in args.windows.split(",")]
        sets = [(li,) for li in layers] + [
            tuple(range(a, b)) for a, b in ((0, 30), (5, 15), (8, 16), (10, 20), (15, 25), (20, 30))
        ]
        for mode in scores:
            for lset in sets:
                for w in windows if len(lset) > 1 else (9,):
                    for cal in (None, "sub", "ratio"):
                        rows.append(evaluate(mode, lset, w, cal))
        result = {
            "task": args.task,
            "n": len(targets),
            "seed": args.seed,
            "corpus": meta,
            "chunk_size": args.chunk_size,
            "segment_len": args.segment_len,
            "rows": rows,
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        write(args.out, result)
        best = sorted(rows, key=lambda r: (-r["recall_2048"], -r["top1"]))[:15]
        for r in best:
            print(r)
        for mode in scores:
            single = [
                r
                for r in rows
                if r["mode"] == mode and len(r["layers"]) == 1 and not r["calibrate"]
            ]
            print(
                mode,
                " ".join(
                    f"L{r['layers'][0]}:{r['top1']:.2f}/{r['recall_2048']:.2f}" for r in single
                ),
            )
    finally:
        kb.close()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
