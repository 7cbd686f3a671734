"""Prefilling an upload's documents one at a time vs together, on the CPU with the demo model.

Today each document of an upload is built on its own: its segments are packed into forward
passes of up to `prefill_batch_tokens` tokens (varlen: one causal attention per segment), and
the next document starts after. Together, the segments of all N documents are packed into the
same passes. We time both for N documents of a few sizes (real prose, each segment after the
corpus preamble as ingestion does), the prefill alone, and then a whole `KnowledgeBase.ingest`
of N small files one at a time, to see what share of an ingestion the prefill is.

    python bench/ingest_batch.py [--threads 1] [--docs 4] [--sizes 32 128 512 1024] [--repeats 4]

Writes bench/results/ingest_batch.json and prints a table.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.machine import cpu_name  # noqa: E402
from kb.ingest.precompute import prefill_segments  # noqa: E402
from kb.model.demo import ensure_demo_model  # noqa: E402
from kb.model.loader import load_model  # noqa: E402
from kb.prompt import encode, preamble_text  # noqa: E402
from kb.settings import Settings  # noqa: E402


def prose() -> str:
    import argparse as a
    import collections
    import json as j
    import logging

    return "\n\n".join(inspect.getdoc(m) for m in (j, a, logging, collections))


def documents(ids: list[int], n: int, size: int, segment_len: int) -> list[list[list[int]]]:
    """n documents of `size` tokens each (distinct slices of the prose), cut into segments."""
    docs = []
    for d in range(n):
        off = (d * size) % max(1, len(ids) - size)
        t = ids[off : off + size]
        docs.append([t[i : i + segment_len] for i in range(0, len(t), segment_len)])
    return docs


def time_pair(a, b, repeats: int) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """(wall, CPU) seconds of `a` and `b`, run alternately after a warm-up of each, so a load
    that comes and goes on the machine falls on both alike. The CPU time of this process (one
    torch thread) moves much less than the wall time when other processes share the cores."""
    a(), b()
    out: tuple[list, list] = ([], [])
    for _ in range(repeats):
        for fn, times in ((a, out[0]), (b, out[1])):
            w, c = time.perf_counter(), time.process_time()
            fn()
            times.append((time.perf_counter() - w, time.process_time() - c))
    return out


def sdpa_rows(repeats: int) -> list[dict]:
    """One layer's causal GQA attention (the demo model's 9 query and 3 KV heads of 64) as
    SegmentPrefill calls it, with 3-D [H, S, d] inputs and with a batch dimension added."""
    import torch.nn.functional as F

    rows = []
    for t in (256, 1024):
        q, k, v = (torch.randn(1, n, t, 64) for n in (9, 3, 3))
        row = {"tokens": t}
        for name, args in (("3d", (q[0], k[0], v[0])), ("4d", (q, k, v))):

            def call(args=args):
                F.scaled_dot_product_attention(*args, is_causal=True, enable_gqa=True)

            call()
            c = time.process_time()
            for _ in range(repeats):
                call()
            row[f"{name}_ms"] = round((time.process_time() - c) / repeats * 1000, 2)
        rows.append(row)
        print(f"SDPA {t} tokens: 3-D {row['3d_ms']} ms, 4-D {row['4d_ms']} ms", flush=True)
    return rows


def prefill_rows(lm, args) -> list[dict]:
    s = Settings()
    preamble = encode(lm.tokenizer, preamble_text(lm.tokenizer, s.system_prompt))
    ids = encode(lm.tokenizer, prose())
    rows = []
    for size in args.sizes:
        docs = documents(ids, args.docs, size, s.segment_len)
        p = len(preamble)

        def one_at_a_time(docs=docs):
            for segs in docs:
                starts = [p + sum(len(x) for x in segs[:i]) for i in range(len(segs))]
                for _ in prefill_segments(
                    lm.model, preamble, segs, s.prefill_batch_tokens, starts=starts
                ):
                    pass

        def together(docs=docs):
            segs = [seg for d in docs for seg in d]
            starts = [p + sum(len(x) for x in segs[:i]) for i in range(len(segs))]
            for _ in prefill_segments(
                lm.model, preamble, segs, s.prefill_batch_tokens, starts=starts
            ):
                pass

        a, b = time_pair(one_at_a_time, together, args.repeats)
        tokens = sum(len(seg) + p for d in docs for seg in d)
        wa, wb = (statistics.median(w for w, _ in x) for x in (a, b))
        ca, cb = (statistics.median(c for _, c in x) for x in (a, b))
        rows.append(
            {
                "docs": args.docs,
                "tokens_per_doc": size,
                "segments": sum(len(d) for d in docs),
                "prefilled_tokens": tokens,
                "preamble_tokens": p,
                "one_at_a_time_cpu_s": round(ca, 4),
                "together_cpu_s": round(cb, 4),
                "speedup_cpu": round(ca / cb, 3),
                "one_at_a_time_wall_s": round(wa, 4),
                "together_wall_s": round(wb, 4),
                "speedup_wall": round(wa / wb, 3),
                "one_at_a_time_all": [[round(w, 4), round(c, 4)] for w, c in a],
                "together_all": [[round(w, 4), round(c, 4)] for w, c in b],
                "tokens_per_cpu_s_one": round(tokens / ca, 1),
                "tokens_per_cpu_s_together": round(tokens / cb, 1),
                "load": [round(x, 2) for x in os.getloadavg()],
            }
        )
        r = rows[-1]
        print(
            f"{args.docs} docs x {size:5d} tokens ({r['segments']} segments, {tokens} prefilled): "
            f"CPU s one at a time {ca:7.3f}, together {cb:7.3f}, speedup {r['speedup_cpu']:.3f} "
            f"(wall {wa:.3f} vs {wb:.3f}; load {r['load'][0]})",
            flush=True,
        )
    return rows


def ingest_row(args, models: Path) -> dict:
    """A whole ingest of `docs` small text files (one at a time, as today): where the time goes."""
    from kb.service import KnowledgeBase

    ids_text = prose().split("\n\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = []
        for d in range(args.docs):
            f = root / f"doc{d}.txt"
            f.write_text("\n\n".join(ids_text[d * 3 : d * 3 + 3]) or f"document {d}")
            paths.append(f)
        kb = KnowledgeBase(Settings(home=root / "home", models_dir=models))
        kb.create_corpus("bench")
        kb.ingest("bench", [paths[0]])  # load the model, prefill the preamble
        stages: list[tuple[float, str, str]] = []
        t0, c0 = time.perf_counter(), time.process_time()
        results = kb.ingest(
            "bench",
            paths[1:],
            progress=lambda name, stage, _f: stages.append((time.perf_counter(), name, stage)),
        )
        total, cpu = time.perf_counter() - t0, time.process_time() - c0
        kb.close()
    # prefill time: from each document's first "prefilled" update to its last
    pre = 0.0
    for name in {n for _, n, _ in stages}:
        ts = [t for t, n, st in stages if n == name and st == "prefilled"]
        if ts:
            pre += ts[-1] - ts[0]
    tokens = sum(r.tokens for r in results)
    row = {
        "files": len(results),
        "tokens": tokens,
        "ingest_s": round(total, 3),
        "ingest_cpu_s": round(cpu, 3),
        "prefill_s": round(pre, 3),
        "prefill_share": round(pre / total, 3),
        "ready": sum(r.status == "ready" for r in results),
    }
    print(
        f"ingest of {row['files']} small text files ({tokens} tokens): {total:.3f} s, "
        f"of which prefill {pre:.3f} s ({100 * pre / total:.0f}%)",
        flush=True,
    )
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128, 512, 1024])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--note", default="", help="what else ran on the machine, for the record")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ingest_batch.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = Path(os.environ.get("KB_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models"))
    lm = load_model(ensure_demo_model(models))
    sdpa = sdpa_rows(5)
    rows = prefill_rows(lm, args)
    ingest = ingest_row(args, models)
    out = {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct",
        "settings": {
            "segment_len": Settings().segment_len,
            "prefill_batch_tokens": Settings().prefill_batch_tokens,
        },
        "notes": "prefill alone: N documents' segments through prefill_segments one document "
        "at a time vs all in one call (packed into the same forward passes); median CPU and "
        "wall seconds of the repeats, the two run alternately after a warm-up. " + args.note,
        "sdpa": sdpa,
        "rows": rows,
        "ingest": ingest,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
