"""Focused routed-attention bench: dense vs scatter-routed vs union-routed at N=128K.

Llama-3.1-8B layer shapes (Hq=32, Hkv=8, d=128, bf16), density 25%, B in {32, 128, 256},
chunk 64 and 128, chunk popularity uniform, Zipf (s=1.1, as bench/attention.py) and clustered
(8 topics; each token weights its topic's chunks 30x: routing with structure, as related
requests on one knowledge base would have). Each time is the median of CUDA-graph replays
(`triton.testing.do_bench`, L2 cleared before each replay); routed times include the device-side
plan (CSR / union lists), which is captured in the graph. Prints a table, writes JSON.

    python3 bench/routed_focus.py --out $OUT/attention_routed.json [--dry]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

HQ, HKV, D = 32, 8, 128


def timed(fn, dry):
    if dry:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt

    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return tt.do_bench(g.replay, warmup=10, rep=100, return_mode="median")


def make_idx(b, c, top_k, skew, dev, seed):
    gen = torch.Generator().manual_seed(seed)
    if skew == "zipf":
        w = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** 1.1
        w = w[torch.randperm(c, generator=gen)].float().expand(b * HKV, c)
    elif skew == "clustered":
        topics = 8
        sets = torch.stack([torch.randperm(c, generator=gen)[:top_k] for _ in range(topics)])
        tw = torch.ones(topics, c)
        tw.scatter_(1, sets, 30.0)
        topic = torch.randint(0, topics, (b,), generator=gen)
        w = tw[topic].repeat_interleave(HKV, 0)
    else:
        w = torch.ones(c).expand(b * HKV, c)
    idx = torch.multinomial(w.contiguous(), top_k, replacement=False, generator=gen)
    return idx.view(b, HKV, top_k).int().to(dev)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="attention_routed.json")
    ap.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--batches", default="1,8,32,128,256")
    ap.add_argument("--chunks", default="64,128")
    args = ap.parse_args()
    if args.dry:
        os.environ["TRITON_INTERPRET"] = "1"
    import triton

    import attention
    from attention import shared_routed, shared_routed_union

    dev = torch.device("cpu" if args.dry else "cuda")
    n = 1024 if args.dry else 131072
    batches = [2, 8] if args.dry else [int(x) for x in args.batches.split(",")]
    chunks = [32, 64] if args.dry else [int(x) for x in args.chunks.split(",")]
    out = dict(
        device=("cpu-interpreter" if args.dry else torch.cuda.get_device_name()),
        torch=torch.__version__,
        triton=triton.__version__,
        N=n,
        Hq=HQ,
        Hkv=HKV,
        d=D,
        dtype="bf16",
        density=0.25,
        date=time.strftime("%Y-%m-%d"),
        rows=[],
        sweep=[],
    )

    def save():
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)

    gen = torch.Generator().manual_seed(0)
    k = torch.randn(n, HKV, D, generator=gen).to(dev, torch.bfloat16)
    v = torch.randn(n, HKV, D, generator=gen).to(dev, torch.bfloat16)
    print(
        f"{'B':>4} {'chunk':>5} {'routing':>9} {'dense ms':>9} {'scatter':>8} {'union':>8} "
        f"{'dense/union':>11} {'dense/scatter':>13} {'union_frac':>10} {'useful':>7}",
        flush=True,
    )
    for b in batches:
        q = torch.randn(b, HQ, D, generator=gen).to(dev, torch.bfloat16)
        dense_ms = timed(lambda: attention.shared_attention(q, k, v, None, 128), args.dry)
        o_d, _ = attention.shared_attention(q, k, v, None, 128)
        out["rows"].append(dict(impl="dense", B=b, ms=round(dense_ms, 4)))
        for chunk in chunks:
            c = n // chunk
            top_k = c // 4
            for skew in ("uniform", "zipf", "clustered"):
                idx = make_idx(b, c, top_k, skew, dev, seed=b + chunk)
                res = {}
                outs = {}
                for impl in ("scatter", "union"):

                    def fn(impl=impl, q=q, idx=idx, chunk=chunk):
                        if args.dry:  # CPU tensors: the facade's CPU path
                            return attention.shared_attention(q, k, v, idx, chunk)
                        return shared_routed.shared_attention_routed(q, k, v, idx, chunk, impl=impl)

                    res[impl] = timed(fn, args.dry)
                    outs[impl] = fn()[0].float()
                err = ((outs["union"] - outs["scatter"]).norm() / outs["scatter"].norm()).item()
                bm = shared_routed_union._config(b * HQ // HKV, chunk, args.dry)["BLOCK_M"]
                st = shared_routed_union.union_stats(idx, c, HQ // HKV, bm, "minhash")
                row = dict(
                    B=b,
                    chunk=chunk,
                    routing=skew,
                    dense_ms=round(dense_ms, 4),
                    scatter_ms=round(res["scatter"], 4),
                    union_ms=round(res["union"], 4),
                    dense_over_union=round(dense_ms / res["union"], 3),
                    dense_over_scatter=round(dense_ms / res["scatter"], 3),
                    union_vs_scatter_rel_err=round(err, 5),
                    **st,
                )
                out["rows"].append(row)
                save()
                print(
                    f"{b:>4} {chunk:>5} {skew:>9} {dense_ms:>9.4f} {res['scatter']:>8.4f} "
                    f"{res['union']:>8.4f} {row['dense_over_union']:>11.3f} "
                    f"{row['dense_over_scatter']:>13.3f} {st['union_frac']:>10.4f} "
                    f"{st['useful_frac']:>7.4f}",
                    flush=True,
                )
    # union kernel launch configs at the headline shape (B=256, chunk 128, uniform)
    if not args.dry:
        b, chunk = 256, 128
        q = torch.randn(b, HQ, D, generator=gen).to(dev, torch.bfloat16)
        idx = make_idx(b, n // chunk, n // chunk // 4, "uniform", dev, seed=1)
        for cfg in (
            dict(contig=True),
            dict(contig=True, BLOCK_N=64, num_stages=3),
            dict(contig=True, num_stages=3),
            dict(contig=True, slices=4),
            dict(contig=True, slices=16),
            dict(contig=False, slices=8),
        ):
            try:
                ms = timed(
                    lambda cfg=cfg: shared_routed.shared_attention_routed(
                        q, k, v, idx, chunk, impl="union", config=cfg
                    ),
                    False,
                )
            except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
                print("sweep", cfg, "failed:", type(e).__name__, flush=True)
                continue
            out["sweep"].append(dict(B=b, chunk=chunk, routing="uniform", **cfg, ms=round(ms, 4)))
            save()
            print(f"sweep union B=256 chunk 128 uniform {cfg}: {ms:.4f} ms", flush=True)
    save()


if __name__ == "__main__":
    main()
