"""Where a decode step's time goes: host (Python, launches) against device (kernels).

Runs bench/serve.py's machinery (random Llama-3.1-8B-shape bf16 weights, random shared KV,
synthetic unique prompts) for a few decode steps per (mode, concurrency) under torch.profiler and
reports, per configuration: wall time per step, the summed CUDA kernel time per step, how many
kernels a step launches, and the top kernels and host ops. A step whose wall time is far above its
kernel time is host-bound: CUDA graphs (or fewer, fused launches) pay there; a step near its kernel
time is device-bound: only faster kernels pay.

    python bench/profile_step.py [--shared 32768] [--conc 1,32,128] [--modes ours_dense,per_request]

Writes <out>/profile_step.json (with --graphs: profile_step_graphs.json) and prints a table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kb.engine.block_manager import BlockManager  # noqa: E402
from kb.engine.runner import ModelRunner  # noqa: E402
from kb.engine.shared_kv import SharedKV  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)


def _kernel_rows(prof, steps: int, top: int) -> tuple[float, int, list[dict]]:
    """(kernel ms per step, kernels per step, top kernels by device time)."""
    rows, total_us, count = [], 0.0, 0
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", None)
        if dev_us is None:
            dev_us = e.self_cuda_time_total
        if dev_us <= 0 or e.device_type != torch.autograd.DeviceType.CPU:
            continue
        rows.append(
            dict(name=e.key[:90], ms_per_step=dev_us / 1e3 / steps, calls_per_step=e.count / steps)
        )
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    for e in kernels:
        total_us += e.time_range.elapsed_us()
        count += 1
    rows.sort(key=lambda r: -r["ms_per_step"])
    return total_us / 1e3 / steps, count // steps, rows[:top]


def _host_rows(prof, steps: int, top: int) -> list[dict]:
    rows = [
        dict(
            name=e.key[:90],
            self_cpu_ms_per_step=e.self_cpu_time_total / 1e3 / steps,
            calls_per_step=e.count / steps,
        )
        for e in prof.key_averages()
    ]
    rows.sort(key=lambda r: -r["self_cpu_ms_per_step"])
    return rows[:top]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shared", type=int, default=32768)
    ap.add_argument("--conc", default="1,32,128")
    ap.add_argument("--modes", default="ours_dense,ours_routed,ours_routed_req,per_request")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--graphs", action="store_true", help="replay decode steps from CUDA graphs")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    args = ap.parse_args()
    dev, bs = "cuda", 16
    cfg = serve.llama31_8b()
    model = serve.build_model(cfg, dev, torch.bfloat16)
    concs = [int(c) for c in args.conc.split(",")]
    per_req = -(-(args.prompt + 64) // bs)
    n = args.shared
    runner = ModelRunner(model, max(concs) * per_req, bs, dev, shared_blocks=n // bs)
    if args.graphs:
        runner.enable_cuda_graphs()
    serve.fill_(runner.k_cache + runner.v_cache, seed=1)
    k, v = runner.reserve_shared("corpus", n)
    dense = SharedKV("corpus", k, v, chunk_size=64, pos_offset=n)
    routed = serve.with_router(dense, args.density)
    # ours_routed_req: per-request selections (density x N tokens in chunks of 128), planned once
    # per step for all layers inside the decode graph (kb/engine/routed_plan.py)
    selected = SharedKV("corpus", k, v, chunk_size=serve.SELECT_CHUNK, pos_offset=n)
    sel_k = max(1, int(args.density * n) // serve.SELECT_CHUNK)
    blocks = BlockManager(max(concs) * per_req, bs)
    import triton

    res = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        shared_tokens=n,
        prompt_tokens=args.prompt,
        cuda_graphs=args.graphs,
        rows=[],
    )
    for c in concs:
        for mode in args.modes.split(","):
            sh = {"ours_routed": routed, "ours_routed_req": selected}.get(mode, dense)
            sel = sel_k if mode == "ours_routed_req" else 0
            # warm run (compiles, autotunes), then the profiled run of the same shape
            serve.run_config(
                runner,
                blocks,
                {"corpus": sh},
                mode,
                ["corpus"] * c,
                args.prompt,
                64,
                "synthetic",
                warmup=2,
                max_steps=3,
                select=sel,
            )
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                r = serve.run_config(
                    runner,
                    blocks,
                    {"corpus": sh},
                    mode,
                    ["corpus"] * c,
                    args.prompt,
                    64,
                    "synthetic",
                    warmup=0,
                    max_steps=args.steps,
                    budget_s=1e9,
                    select=sel,
                )
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            steps = r["steps"]
            kern_ms, nkern, top_k = _kernel_rows(prof, steps, args.top)
            row = dict(
                mode=mode,
                concurrency=c,
                steps=steps,
                itl_ms_p50=r["itl_ms_p50"],
                profiled_wall_ms_per_step=1e3 * wall / steps,
                kernel_ms_per_step=kern_ms,
                kernels_per_step=nkern,
                top_kernels=top_k,
                top_host=_host_rows(prof, steps, args.top),
            )
            res["rows"].append(row)
            print(
                f"\n== {mode} B={c}: itl p50 {r['itl_ms_p50']:.2f} ms (unprofiled-equivalent), kernels "
                f"{kern_ms:.2f} ms/step, {nkern} kernels/step",
                flush=True,
            )
            for t in top_k[:8]:
                print(
                    f"   dev {t['ms_per_step']:8.3f} ms  x{t['calls_per_step']:6.1f}  {t['name']}"
                )
            for t in row["top_host"][:8]:
                print(
                    f"   cpu {t['self_cpu_ms_per_step']:8.3f} ms  x{t['calls_per_step']:6.1f}  {t['name']}"
                )
    os.makedirs(args.out, exist_ok=True)
    name = "profile_step_graphs.json" if args.graphs else "profile_step.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(res, f, indent=1)
    print(
        f"\n{'mode':12s} {'B':>4s} {'itl ms':>8s} {'kernel ms':>10s} {'kernels':>8s} {'host-bound':>10s}"
    )
    for r in res["rows"]:
        print(
            f"{r['mode']:12s} {r['concurrency']:>4d} {r['itl_ms_p50']:8.2f} {r['kernel_ms_per_step']:10.2f} "
            f"{r['kernels_per_step']:>8d} {r['itl_ms_p50'] / max(1e-9, r['kernel_ms_per_step']):9.1f}x"
        )


if __name__ == "__main__":
    main()
