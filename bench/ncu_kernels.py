"""The kernels whose targets are missed (docs/KERNELS.md), one launch each, for Nsight Compute.

Every case runs twice untimed (Triton compiles, autotune settles), then once between
`cudaProfilerStart` / `cudaProfilerStop`, so `ncu --profile-from-start off` sees exactly one call
per case (its Triton kernels and the torch ops around them). Llama-3.1-8B layer shape: Hq=32,
Hkv=8, d=128; routed cases choose top-k chunks per (token, KV head) uniformly at random, as
bench/attention.py does.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --csv --page details \\
        python bench/ncu_kernels.py > ncu.csv
    python bench/ncu_kernels.py --summarize ncu.csv     # the table docs/KERNELS.md quotes
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HQ, HKV, D = 32, 8, 128

# (name, N, B, dtype, density, chunk, impl)
CASES = (
    ("dense bf16 N=32K B=128", 32768, 128, "bf16", 1.0, 64, "dense"),
    ("dense bf16 N=128K B=256", 131072, 256, "bf16", 1.0, 64, "dense"),
    ("dense fp8 N=128K B=8", 131072, 8, "fp8", 1.0, 64, "dense"),
    ("routed scatter N=128K B=256 chunk 128 25%", 131072, 256, "bf16", 0.25, 128, "scatter"),
    ("routed union N=128K B=256 chunk 64 25%", 131072, 256, "bf16", 0.25, 64, "union"),
    ("routed grouped N=128K B=256 chunk 128 25%", 131072, 256, "bf16", 0.25, 128, "grouped"),
    ("routed grouped N=128K B=256 chunk 128 10%", 131072, 256, "bf16", 0.10, 128, "grouped"),
)


def run() -> None:
    import torch

    import attention.shared_routed as routed
    from attention.shared_dense import shared_attention_dense

    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    for name, n, b, dtype, density, chunk, impl in CASES:
        if only not in name:
            continue
        q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=g)
        scales = {}
        if dtype == "fp8":
            ks = k.abs().amax(dim=(0, 2)).float() / 448.0
            vs = v.abs().amax(dim=(0, 2)).float() / 448.0
            k = (k / ks[None, :, None]).to(torch.float8_e4m3fn)
            v = (v / vs[None, :, None]).to(torch.float8_e4m3fn)
            scales = dict(k_scale=ks, v_scale=vs)
        if impl == "dense":
            call = lambda: shared_attention_dense(q, k, v, chunk, **scales)  # noqa: E731
        else:
            c = math.ceil(n / chunk)
            top = max(1, math.ceil(density * c))
            idx = torch.rand(b, HKV, c, device=dev, generator=g).topk(top, dim=-1).indices

            def call(idx=idx, chunk=chunk, impl=impl):
                return routed.shared_attention_routed(q, k, v, idx, chunk, impl=impl)

        for _ in range(2):
            call()
        torch.cuda.synchronize()
        print(f"profiling: {name}", file=sys.stderr, flush=True)
        torch.cuda.profiler.start()
        call()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del q, k, v
        torch.cuda.empty_cache()


METRICS = {
    "Duration": "ns",
    "Compute (SM) Throughput": "sm %",
    "Memory Throughput": "mem %",
    "DRAM Throughput": "dram %",
    "Achieved Occupancy": "occ %",
    "Registers Per Thread": "regs",
    "Block Limit Registers": "blk/SM regs",
    "Block Limit Shared Mem": "blk/SM smem",
}


def summarize(path: str) -> None:
    """One row per profiled Triton kernel: time, SOL compute and memory, occupancy, top stall."""
    rows: dict[tuple, dict] = {}
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prints its own log lines first
    for r in csv.DictReader(lines):
        key = (r["ID"], r["Kernel Name"].split("(")[0])
        row = rows.setdefault(key, {})
        m = r["Metric Name"]
        if m in METRICS:
            row[METRICS[m]] = r["Metric Value"]
        if (
            r["Section Name"] == "Warp State Statistics"
            and m == "Warp Cycles Per Issued Instruction"
        ):
            row["cycles/issue"] = r["Metric Value"]
    print(
        f"{'id':>3s} {'kernel':28s} "
        + " ".join(f"{v:>11s}" for v in list(METRICS.values()) + ["cycles/issue"])
    )
    for (i, name), row in rows.items():
        if not name.startswith("_"):
            continue  # torch's own kernels (sort, copies) are in the CSV too
        print(
            f"{i:>3s} {name[:28]:28s} "
            + " ".join(f"{row.get(v, ''):>11s}" for v in list(METRICS.values()) + ["cycles/issue"])
        )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summarize":
        summarize(sys.argv[2])
    else:
        run()
