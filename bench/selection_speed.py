"""CPU decode speed of attention retrieval against dense, at corpus sizes beyond the model's context.

The demo model and the engine as served; the corpus's shared KV is random (decode cost depends on
shapes only, so no ingestion is needed), laid out as the service lays it out on the CPU (float32),
and each request's selection is a random set of chunks filling the budget, at virtual positions
(the per-chunk shifts that the attention applies). Measures the median decode step of B requests
decoding together, dense and selecting, for each corpus size.

    .venv/bin/python bench/selection_speed.py --sizes 24576,65536,131072 --batch 1,8
    taskset -c 0,1 python bench/selection_speed.py --random-weights --threads 1,2  # 2 cores
Writes bench/results/selection_speed.json. `--random-weights`: the demo model's shape with random
weights (decode cost depends on shapes only), for a machine the weights cannot reach.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.machine import cpu_name  # noqa: E402
from bench.quality import DEFAULT_MODELS_DIR  # noqa: E402


def measure(engine, shared, batch: int, steps: int, selections) -> float:
    """Median ms of the decode steps of `batch` requests (selections: one per request, or None)."""
    from kb.engine.sequence import SamplingParams

    handles = []
    for b in range(batch):
        h = engine.add_request(
            list(range(100, 130)),
            SamplingParams(max_tokens=steps + 1, ignore_eos=True),
            shared.key,
            shared.pos_offset if selections is None else 2200,
        )
        if selections is not None:
            h.seq.select, h.seq.selection = True, selections[b]
        handles.append(h)
    times = []
    while engine.has_work:
        decoding = (
            all(s.num_computed >= len(s.prompt_ids) for s in engine.scheduler.running)
            and not engine.scheduler.waiting
        )
        t0 = time.perf_counter()
        engine.step()
        if decoding:
            times.append((time.perf_counter() - t0) * 1000)
        for h in handles:
            h.drain()
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    from kb.engine.engine import Engine, EngineConfig
    from kb.engine.selection import Selection
    from kb.engine.shared_kv import SharedKV
    from kb.model.demo import ensure_demo_model
    from kb.model.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="24576,65536,131072")
    p.add_argument("--batch", default="1,8")
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", default="1", help="torch CPU threads, a list")
    p.add_argument("--random-weights", action="store_true", help="the demo shape, random weights")
    p.add_argument("--modes", default="select,dense")
    p.add_argument("--models-dir", type=Path, default=DEFAULT_MODELS_DIR)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "selection_speed.json")
    args = p.parse_args(argv)
    if args.random_weights:
        from bench.distributed import DigitTokenizer
        from bench.serve import build_model, smollm2_135m
        from kb.model.loader import LoadedModel

        cfg = smollm2_135m()
        model = build_model(cfg, "cpu", torch.float32).eval().requires_grad_(False)
        lm = LoadedModel(model, DigitTokenizer(), cfg, Path("."), "random", "digits")
    else:
        lm = load_model(ensure_demo_model(args.models_dir))
        cfg = lm.config
    engine = Engine(lm, EngineConfig(unique_kv_tokens=8192, cuda_graphs=False, citation_layers=0))
    rows = []
    thread_counts = [int(x) for x in args.threads.split(",")]
    gen = torch.Generator().manual_seed(0)
    cs, preamble = 64, 40
    for n in [int(x) for x in args.sizes.split(",")]:
        k = [
            torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
            for _ in range(cfg.num_layers)
        ]
        v = [
            torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=gen)
            for _ in range(cfg.num_layers)
        ]
        shared = SharedKV(
            key=f"speed-{n}", k=k, v=v, chunk_size=cs, pos_offset=6144, preamble_len=preamble
        )
        engine.register_corpus(shared)
        num_chunks = shared.num_chunks
        want = args.budget // cs
        for batch in [int(x) for x in args.batch.split(",")]:
            sels = []
            for _ in range(batch):
                chunks = torch.cat(
                    [
                        torch.tensor([0]),
                        (torch.randperm(num_chunks - 1, generator=gen)[:want] + 1).sort().values,
                    ]
                )
                shift = torch.arange(chunks.numel()) * cs - chunks * cs
                sels.append(Selection(chunks, shift, torch.zeros(num_chunks)))
            for mode, threads in itertools.product(args.modes.split(","), thread_counts):
                torch.set_num_threads(threads)
                ms = measure(engine, shared, batch, args.steps, sels if mode == "select" else None)
                attended = (want + 1) * cs if mode == "select" else n
                row = {
                    "shared_tokens": n,
                    "batch": batch,
                    "mode": mode,
                    "attended_tokens": attended,
                    "ms_per_decode_step": round(ms, 1),
                    "tokens_per_s": round(batch * 1000 / ms, 1),
                    "per_request_tokens_per_s": round(1000 / ms, 1),
                    "threads": threads,
                }
                rows.append(row)
                print(row, flush=True)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(
                    json.dumps(
                        {
                            "model": "SmolLM2-135M-Instruct"
                            + (" shape, random weights" if args.random_weights else ""),
                            "torch": torch.__version__,
                            "cpu": cpu_name(),
                            "cores_available": len(os.sched_getaffinity(0)),
                            "budget": args.budget,
                            "steps": args.steps,
                            "rows": rows,
                        },
                        indent=1,
                    )
                    + "\n"
                )
        engine.unregister_corpus(shared.key)
        del k, v, shared


if __name__ == "__main__":
    main()
