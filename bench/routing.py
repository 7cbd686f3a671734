"""Cost of routing one decode step over 1K..1M chunks: torch on the device against FAISS on the CPU.

Per size, one layer and `--kv-heads` KV heads of chunk vectors (d=128, the Llama-3.1-8B head) drawn
from a mixture of overlapping Gaussian clusters, and `--batch` decode tokens whose GQA groups of
`--group` query heads are summed (as `Router.route` does). Methods:
- `torch`: `index.router.Router.route` on the device (CUDA when available, else CPU);
- `faiss_flat`: exact `IndexFlatIP` (`index.faiss_index`), the reference for recall;
- `faiss_ivf`: `IndexIVFFlat`, nlist = round(sqrt(C)), at each `--nprobe`; build time includes
  k-means training.
ms is the median (ms_min the least) of at least `--reps` calls and 0.2 s after a warm-up;
recall is |selected & exact| / k, averaged over tokens and KV heads.
A full step costs about ms x layers for the whole model. CPU work runs on `--threads` threads
(default 1: steadier on a small shared host; the host's core count is recorded).

    python bench/routing.py                      # 1K..1M chunks, ~1-2 minutes on 2 CPU cores
    python bench/routing.py --max-chunks 100000  # quicker
    python bench/routing.py --append             # add this host's run (e.g. CUDA) to the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from index.faiss_index import IndexSettings, build_layer, faiss_module
from index.router import Router
from index.summaries import ChunkSummaries

OUT = Path(__file__).parent / "results" / "routing.json"


def make_data(
    c: int, hkv: int, d: int, t: int, group: int, clusters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk vectors [C, Hkv, d] and decode queries [T, Hkv*group, d] near random clusters."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(clusters, hkv, d, generator=g)
    x = centers[torch.randint(clusters, (c,), generator=g)]
    x += torch.randn(c, hkv, d, generator=g)
    qc = centers[torch.randint(clusters, (t, group), generator=g)]  # [T, group, Hkv, d]
    q = (qc + torch.randn(t, group, hkv, d, generator=g)).transpose(1, 2).reshape(t, hkv * group, d)
    return x, q / group


def timed(fn, reps: int, sync, min_s: float = 0.2) -> tuple[float, float]:
    """(median, min) milliseconds of fn() after a warm-up, over at least `reps` calls and
    `min_s` seconds: the min shows the cost without other processes' noise on a shared host."""
    fn()
    sync()
    out: list[float] = []
    while len(out) < reps or (sum(out) < min_s * 1e3 and len(out) < 200):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out), min(out)


def recall(got: torch.Tensor, want: torch.Tensor) -> float:
    """Mean share of the exact top-k found, per (token, KV head)."""
    g, w = got.long().cpu().numpy(), want.long().cpu().numpy()
    hits = [
        len(set(a) & set(b)) / len(b)
        for a, b in zip(g.reshape(-1, g.shape[-1]), w.reshape(-1, w.shape[-1]))
    ]
    return float(np.mean(hits))


def host_info(device: torch.device) -> dict:
    cpu = platform.processor()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    try:
        import faiss

        versions["faiss"] = faiss.__version__
    except ImportError:
        versions["faiss"] = None
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_threads": torch.get_num_threads(),
        "cpu_cores": os.cpu_count(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        "versions": versions,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    try:  # the GPU serving machine may lack faiss: then torch rows only
        faiss = faiss_module()
        have_faiss = True
    except ImportError:
        have_faiss = False
    if args.threads:  # one count for both OpenMP pools, so they don't oversubscribe the cores
        torch.set_num_threads(args.threads)
        if have_faiss:
            faiss.omp_set_num_threads(args.threads)
    rows = []
    sizes = [s for s in args.sizes if s <= args.max_chunks]
    for c in sizes:
        x, q_all = make_data(
            c, args.kv_heads, args.dim, max(args.batch), args.group, args.clusters, c
        )
        s = ChunkSummaries(x, x, x, chunk_size=1, num_tokens=c)  # one key per chunk: mean = x
        router = Router.from_summaries([s], "mean", device=device)
        indexes = {}
        if have_faiss:
            t0 = time.perf_counter()
            indexes["faiss_flat"] = build_layer(s, "mean", IndexSettings(use_gpu=False), ivf=False)
            flat_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            indexes["faiss_ivf"] = build_layer(s, "mean", IndexSettings(use_gpu=False), ivf=True)
            ivf_s = time.perf_counter() - t0
        for t in args.batch:
            q = q_all[:t]
            base = dict(
                chunks=c,
                batch=t,
                top_k=args.top_k,
                kv_heads=args.kv_heads,
                q_heads=args.kv_heads * args.group,
                dim=args.dim,
            )
            qd = q.to(device)
            ours = router.route(0, qd, args.top_k)
            ms, ms_min = timed(lambda: router.route(0, qd, args.top_k), args.reps, sync)
            rows.append(
                dict(
                    method="torch",
                    device=str(device),
                    **base,
                    ms=round(ms, 3),
                    ms_min=round(ms_min, 3),
                )
            )
            if not have_faiss:
                print(rows[-1])
                continue
            flat, ivf = indexes["faiss_flat"], indexes["faiss_ivf"]
            exact, _ = flat.search(q, args.top_k)
            rows[-1]["recall"] = round(recall(ours, exact), 4)  # device path vs exact FAISS
            print(rows[-1])
            ms, ms_min = timed(lambda: flat.search(q, args.top_k), args.reps, lambda: None)
            rows.append(
                dict(
                    method="faiss_flat",
                    device="cpu",
                    **base,
                    ms=round(ms, 3),
                    ms_min=round(ms_min, 3),
                    recall=1.0,
                    build_s=round(flat_s, 3),
                )
            )
            print(rows[-1])
            nlist = ivf.indexes[0].nlist
            for nprobe in sorted({min(n, nlist) for n in args.nprobe}):
                ivf.set_nprobe(nprobe)
                got, _ = ivf.search(q, args.top_k)
                ms, ms_min = timed(lambda: ivf.search(q, args.top_k), args.reps, lambda: None)
                rows.append(
                    dict(
                        method="faiss_ivf",
                        device="cpu",
                        **base,
                        ms=round(ms, 3),
                        ms_min=round(ms_min, 3),
                        recall=round(recall(got, exact), 4),
                        nlist=nlist,
                        nprobe=nprobe,
                        build_s=round(ivf_s, 3),
                    )
                )
                print(rows[-1])
        del router, indexes, s, x
    config = {k: v for k, v in vars(args).items() if k not in ("out", "append")}
    return dict(**host_info(device), config=config, rows=rows)


def print_table(rows: list[dict]) -> None:
    print(
        f"{'method':<11}{'device':>7}{'chunks':>9}{'batch':>6}{'nprobe':>7}{'ms':>10}"
        f"{'ms_min':>10}{'recall':>8}"
    )
    for r in rows:
        print(
            f"{r['method']:<11}{r['device']:>7}{r['chunks']:>9}{r['batch']:>6}"
            f"{r.get('nprobe', ''):>7}{r['ms']:>10.3f}{r['ms_min']:>10.3f}"
            f"{r.get('recall', float('nan')):>8.3f}"
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000, 1_000_000])
    p.add_argument("--max-chunks", type=int, default=1_000_000, help="skip larger sizes")
    p.add_argument(
        "--batch", type=int, nargs="+", default=[1, 16, 64], help="decode tokens routed together"
    )
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=1)
    p.add_argument("--group", type=int, default=4, help="query heads per KV head")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--clusters", type=int, default=256)
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch and faiss (0: their defaults). 1 by default: on a "
        "small shared host two OpenMP pools of all cores stall on scheduler slices",
    )
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument(
        "--append",
        action="store_true",
        help="add this run to the file's runs, replacing one on the same device name",
    )
    args = p.parse_args()
    result = run(args)
    runs = []
    if args.append and args.out.exists():
        runs = [
            r
            for r in json.loads(args.out.read_text())["runs"]
            if r["device_name"] != result["device_name"]
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench": "routing", "runs": runs + [result]}, indent=1) + "\n")
    print_table(result["rows"])
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
