"""Shared-KV attention against per-request baselines at the Llama-3.1-8B layer shape.

One process, one run: measures the bf16 matmul peak and the device-to-device copy bandwidth
first, then for each shared length N and batch B (concurrent decoding requests, one query token
each) times
  copies      torch SDPA, each request over its own copy of the KV (B copies; skipped where
              they do not fit in --copies-gib)
  paged       our paged kernel, every request's block table pointing at the one shared copy
              (prefix caching: each request still reads the shared pages itself)
  torch_fold  torch SDPA with the batch (and the GQA group) folded into the query length:
              one plain dense attention per KV head
  ours_dense  attention.shared_attention(q, k, v, None)
  ours_routed attention.shared_attention(q, k, v, chunk_idx) at density 25% (uniform and Zipf
              chunk popularity) and 100%; the CSR build is inside the timing, routing is not
and writes bench/results/attention.json. Roofline per row: floor = max(flops / peak_tflops,
bytes / peak_tbps), roofline_frac = floor / measured. flops = 4 * B * Hq * keys_attended * d;
bytes = the KV the row's data layout must read once (B copies for `copies`, one copy for the
others; for routed, the chunks some query chose) plus q and o.

Usage (GPU): python3 bench/attention.py [--quick] [--sweep] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attention  # noqa: E402
from attention import shared_dense  # noqa: E402
from attention.paged import unique_attention_paged  # noqa: E402

HQ, HKV, D = 32, 8, 128
G = HQ // HKV
PAGE = 16


DRY = False  # --dry: tiny shapes on the CPU, to check this script without a GPU


def bench(fn, rep_ms=200):
    if DRY:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing as tt
    # median of event-timed runs; do_bench clears L2 before each run
    return tt.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def timed(fn):
    """Median ms of `fn` replayed from a CUDA graph (host launch overhead out of the numbers,
    as in a captured decode step); eager if capture fails. Returns (ms, graphed)."""
    if DRY:
        return bench(fn), False
    fn()  # compile and warm outside the capture
    torch.cuda.synchronize()
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # a host sync inside fn, ...
        print("graph capture failed, timing eagerly:", type(e).__name__, str(e)[:120], flush=True)
        torch.cuda.synchronize()
        return bench(fn), False
    ms = bench(graph.replay)
    del graph
    return ms, True


def measure_peaks(dev):
    m = 8192 if not DRY else 256
    a = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=dev, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, 300)
    tflops = 2 * m ** 3 / ms / 1e9
    src = torch.randn(1 << (29 if not DRY else 20), device=dev, dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    ms_c = bench(lambda: dst.copy_(src), 300)
    tbps = 2 * src.numel() * 4 / ms_c / 1e9
    del a, b, src, dst
    empty_cache()
    return tflops, tbps


def zipf_weights(c, s, gen):
    w = 1.0 / torch.arange(1, c + 1, dtype=torch.float64) ** s
    return w[torch.randperm(c, generator=gen)].float()  # popular chunks spread over the corpus


def make_idx(b, c, top_k, skew, dev, seed):
    gen = torch.Generator().manual_seed(seed)
    w = zipf_weights(c, 1.1, gen) if skew else torch.ones(c)
    w = w.to(dev).expand(b * HKV, c).contiguous()
    idx = torch.multinomial(w, top_k, replacement=False).view(b, HKV, top_k).int()
    return idx


def row(impl, n, b, density, skew, dtype, ms, flops, nbytes, peak_tflops, peak_tbps, **extra):
    floor_ms = max(flops / peak_tflops / 1e9, nbytes / peak_tbps / 1e9)
    return dict(impl=impl, N=n, B=b, density=density, skew=skew, dtype=dtype, ms=round(ms, 4),
                tflops=round(flops / ms / 1e9, 2), tbps=round(nbytes / ms / 1e9, 3),
                roofline_frac=round(floor_ms / ms, 3), **extra)


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(args):
    dev = torch.device("cuda" if not DRY else "cpu")
    import triton
    peak_tflops, peak_tbps = measure_peaks(dev)
    name = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    print(f"device {name}  bf16 matmul {peak_tflops:.0f} TFLOP/s  "
          f"copy {peak_tbps:.2f} TB/s", flush=True)
    out = dict(device=name, torch=torch.__version__,
               triton=triton.__version__, peak_tflops=round(peak_tflops, 1),
               peak_tbps=round(peak_tbps, 3), chunk_size=args.chunk, hq=HQ, hkv=HKV, d=D,
               zipf_s=1.1, rows=[], checks=[])
    if args.sweep:
        out["sweep"] = sweep(dev, args)
    bs = [1, 8, 32, 128, 256] if not args.quick else [1, 256]
    ns = [(32768, "bf16"), (131072, "bf16"), (524288, "fp8")]
    if args.quick:
        ns = ns[:2]
    if DRY:
        bs, ns = [1, 4], [(1024, "bf16"), (2048, "fp8")]
    gen = torch.Generator().manual_seed(0)
    for n, kvt in ns:
        c = n // args.chunk
        kf = torch.randn(n, HKV, D, generator=gen).to(dev, torch.bfloat16)
        vf = torch.randn(n, HKV, D, generator=gen).to(dev, torch.bfloat16)
        if kvt == "fp8":
            # per chunk and head scales, amax-based, as the KV store writes them
            ks = kf.float().view(c, args.chunk, HKV, D).abs().amax(dim=(1, 3)) / 448.0
            vs = vf.float().view(c, args.chunk, HKV, D).abs().amax(dim=(1, 3)) / 448.0
            tok = torch.arange(n, device=dev) // args.chunk
            k = (kf.float() / ks[tok][:, :, None]).to(torch.float8_e4m3fn)
            v = (vf.float() / vs[tok][:, :, None]).to(torch.float8_e4m3fn)
            elt = 1
        else:
            k, v, ks, vs, elt = kf, vf, None, None, 2
        kv_bytes = 2 * n * HKV * D * elt
        # baselines' layouts: [1, Hkv, N, d] for SDPA, pages [N/16, 16, Hkv, d] (a view)
        k_t = kf.permute(1, 0, 2).contiguous().unsqueeze(0)
        v_t = vf.permute(1, 0, 2).contiguous().unsqueeze(0)
        kc, vc = kf.view(n // PAGE, PAGE, HKV, D), vf.view(n // PAGE, PAGE, HKV, D)
        for b in bs:
            q = torch.randn(b, HQ, D, generator=gen).to(dev, torch.bfloat16)
            qo_bytes = 2 * b * HQ * D * 2
            fl = 4.0 * b * HQ * n * D
            rows = []

            def add(impl, fn, flops, nbytes, density=1.0, skew="none", dtype=kvt, **extra):
                ms, graphed = timed(fn)
                r = row(impl, n, b, density, skew, dtype, ms, flops, nbytes, peak_tflops,
                        peak_tbps, graph=graphed, **extra)
                rows.append(r)
                print(f"{impl:12s} N={n:7d} B={b:4d} dens={density:4.2f} skew={skew:5s} "
                      f"{dtype:4s} {r['ms']:9.4f} ms {r['tflops']:7.1f} TF/s {r['tbps']:6.3f} "
                      f"TB/s  roof {r['roofline_frac']:.3f}", flush=True)

            # (a) copies: B distinct KV copies, per-request SDPA (query length G after GQA fold)
            copy_bytes = b * 2 * n * HKV * D * 2
            if copy_bytes <= args.copies_gib * 2 ** 30:
                kb = k_t.expand(b, -1, -1, -1).contiguous()
                vb = v_t.expand(b, -1, -1, -1).contiguous()
                qb = q.view(b, HKV, G, D)
                add("copies", lambda: F.scaled_dot_product_attention(qb, kb, vb), fl,
                    copy_bytes + qo_bytes, dtype="bf16")
                del kb, vb
                empty_cache()
            # (b) paged: all block tables point at the one shared copy
            bt = torch.arange(n // PAGE, device=dev, dtype=torch.int32).expand(b, -1).contiguous()
            seq = torch.full((b,), n, device=dev, dtype=torch.int32)
            cu = torch.arange(b + 1, device=dev, dtype=torch.int32)
            add("paged", lambda: unique_attention_paged(q, kc, vc, bt, seq, cu, max_seqlen_q=1,
                                                        max_seqlen_k=n), fl,
                2 * n * HKV * D * 2 + qo_bytes, dtype="bf16")
            # (c) torch_fold: [1, Hkv, B*G, d] against [1, Hkv, N, d]
            qf = q.view(b, HKV, G, D).permute(1, 0, 2, 3).reshape(1, HKV, b * G, D)
            fold = lambda: F.scaled_dot_product_attention(qf, k_t, v_t)  # noqa: E731
            add("torch_fold", fold, fl, 2 * n * HKV * D * 2 + qo_bytes, dtype="bf16")
            # (d) ours dense
            dense = lambda: attention.shared_attention(q, k, v, None, args.chunk, None, ks, vs)  # noqa: E731
            add("ours_dense", dense, fl, kv_bytes + qo_bytes)
            o_d, _ = dense()
            o_f = fold().view(HKV, b, G, D).permute(1, 0, 2, 3).reshape(b, HQ, D)
            err = (o_d.float() - o_f.float()).norm() / o_f.float().norm()
            out["checks"].append(dict(what="ours_dense vs torch_fold (bf16 source KV)", N=n, B=b,
                                      dtype=kvt, rel_err=float(err)))
            # (e) ours routed
            plans = [(1.0, "none", args.chunk), (0.25, "none", args.chunk),
                     (0.25, "zipf", args.chunk)]
            if args.extra_chunk and n == 131072 and b >= 128:
                plans += [(0.25, "none", args.extra_chunk), (0.25, "zipf", args.extra_chunk)]
            for density, skew, chunk in plans:
                c = n // chunk
                top_k = max(1, int(round(density * c)))
                if top_k == c:  # every chunk
                    idx = torch.arange(c, device=dev, dtype=torch.int32).expand(b, HKV, c)
                else:
                    idx = make_idx(b, c, top_k, skew == "zipf", dev, seed=b)
                chosen = torch.zeros(HKV, c, dtype=torch.bool, device=dev)
                chosen[torch.arange(HKV, device=dev).view(1, HKV, 1).expand_as(idx), idx.long()] = True
                union_bytes = int(chosen.sum()) * chunk * D * 2 * elt
                if ks is not None and chunk != args.chunk:
                    continue  # fp8 scales are per args.chunk chunk
                routed = lambda: attention.shared_attention(q, k, v, idx, chunk, None, ks, vs)  # noqa: E731
                add("ours_routed", routed, 4.0 * b * HQ * top_k * chunk * D,
                    union_bytes + qo_bytes, density, "uniform" if skew == "none" else skew,
                    top_k=top_k, chunk_size=chunk)
                if args.profile and b == 256 and n == 131072 and density < 1 \
                        and chunk == args.chunk and skew == "none":
                    profile(routed, "routed N=131072 B=256 25% uniform")
                    profile(dense, "dense N=131072 B=256")
                if density == 1.0:
                    o_r, _ = routed()
                    err = (o_r.float() - o_d.float()).norm() / o_d.float().norm()
                    out["checks"].append(dict(what="ours_routed(all chunks) vs ours_dense",
                                              N=n, B=b, dtype=kvt, rel_err=float(err)))
                if (b == 256 and n == 131072 or DRY) and density < 1 and chunk == args.chunk:
                    cent = torch.randn(c, HKV, D, device=dev, dtype=torch.bfloat16)
                    ms_r = bench(lambda: attention.route(q, cent, top_k))
                    out[f"route_ms_B{b}_N{n}_{skew}"] = round(ms_r, 4)
            out["rows"].extend(rows)
            del q
        del k, v, kf, vf, k_t, v_t, kc, vc
        empty_cache()
    return out


def profile(fn, what):
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof
    fn()
    torch.cuda.synchronize()
    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"profile {what} (3 calls)", flush=True)
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8), flush=True)


def sweep(dev, args):
    """Launch configurations of the dense kernel at a memory-bound and a compute-bound point."""
    res = []
    n = 131072
    k = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16)
    v = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16)
    tok = torch.arange(n, device=dev) // args.chunk
    s8 = torch.full((n // args.chunk, HKV), 0.01, device=dev)
    k8 = (k.float() / s8[tok][:, :, None]).to(torch.float8_e4m3fn)
    v8 = (v.float() / s8[tok][:, :, None]).to(torch.float8_e4m3fn)
    # (BLOCK_N, num_warps, num_stages, TMA descriptors, warp specialization)
    small = [(128, 8, 3, False, False), (64, 4, 3, False, False)]
    large = [(128, 8, 3, False, False), (128, 8, 3, True, False), (128, 8, 3, True, True),
             (128, 8, 4, True, False)]
    fp8 = [(128, 8, 3, False, False), (64, 8, 3, False, False), (128, 4, 3, False, False)]
    for b, kv, cands in [(1, "bf16", small), (256, "bf16", large), (64, "fp8", fp8)]:
        q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
        for bn, w, st, tma, ws in cands:
            cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma, WARP_SPEC=ws)
            shared_dense.CONFIG_OVERRIDE = {"small": cfg, "large": cfg}
            if kv == "fp8":
                fn = lambda: attention.shared_attention(q, k8, v8, None, args.chunk, None, s8, s8)  # noqa: E731
            else:
                fn = lambda: attention.shared_attention(q, k, v)  # noqa: E731
            try:
                ms, _ = timed(fn)
            except Exception as e:  # out of shared memory, ...
                ms = float("nan")
                print("sweep", cfg, "failed:", type(e).__name__, flush=True)
            res.append(dict(B=b, kv=kv, **cfg, ms=round(ms, 4)))
            print(f"sweep N={n} B={b} {kv} {cfg} {ms:.4f} ms", flush=True)
    shared_dense.CONFIG_OVERRIDE = None
    del k8, v8
    # routed: row-block size and occupancy at B=256, 25% uniform
    from attention import shared_routed
    c = n // args.chunk
    q = torch.randn(256, HQ, D, device=dev, dtype=torch.bfloat16)
    idx = make_idx(256, c, c // 4, False, dev, seed=1)
    for bm, bn, w, st in [(128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 2), (64, 64, 4, 3),
                          (32, 128, 4, 2)]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        shared_routed.CONFIG_OVERRIDE = cfg
        try:
            ms, _ = timed(lambda: attention.shared_attention(q, k, v, idx, args.chunk))
        except Exception as e:
            ms = float("nan")
            print("sweep routed", cfg, "failed:", type(e).__name__, flush=True)
        res.append(dict(B=256, kv="bf16", routed=True, **cfg, ms=round(ms, 4)))
        print(f"sweep routed N={n} B=256 25% {cfg} {ms:.4f} ms", flush=True)
    shared_routed.CONFIG_OVERRIDE = None
    del k, v
    torch.cuda.empty_cache()
    return res


def table(out):
    print(f"\n{out['device']}  torch {out['torch']}  triton {out['triton']}  "
          f"peak {out['peak_tflops']} TFLOP/s  {out['peak_tbps']} TB/s  chunk {out['chunk_size']}")
    print(f"{'impl':12s} {'N':>7s} {'B':>4s} {'dens':>5s} {'skew':>7s} {'chunk':>5s} {'dt':>4s} "
          f"{'ms':>9s} {'TF/s':>7s} {'TB/s':>6s} {'roof':>5s}")
    for r in out["rows"]:
        print(f"{r['impl']:12s} {r['N']:7d} {r['B']:4d} {r['density']:5.2f} {r['skew']:>7s} "
              f"{str(r.get('chunk_size', '')):>5s} {r['dtype']:>4s} {r['ms']:9.4f} "
              f"{r['tflops']:7.1f} {r['tbps']:6.3f} {r['roofline_frac']:5.3f}")
    idx = {(r["impl"], r["N"], r["B"], r["density"], r["skew"],
            r.get("chunk_size", out["chunk_size"])): r for r in out["rows"]}

    def ms(impl, n, b, dens=1.0, skew="none", chunk=out["chunk_size"]):
        r = idx.get((impl, n, b, dens, skew, chunk))
        return r["ms"] if r else None

    print("\ntargets")
    ns = sorted({r["N"] for r in out["rows"]})
    bs = sorted({r["B"] for r in out["rows"]})
    ch = out["chunk_size"]
    fr = [idx[("ours_dense", n, b, 1.0, "none", ch)]["roofline_frac"] for n in ns for b in bs
          if ("ours_dense", n, b, 1.0, "none", ch) in idx]
    print(f"  ours_dense roofline_frac min {min(fr):.3f} (target >= 0.70)")
    for n in ns:
        for b in bs:
            f, d = ms("torch_fold", n, b), ms("ours_dense", n, b)
            if f and d and (b <= 8 or b == 256):
                tgt = 5.0 if b <= 8 else 1.5
                print(f"  N={n} B={b}: torch_fold / ours_dense = {f / d:.2f}x (target >= {tgt}x)")
    c, d = ms("copies", 32768, 256), ms("ours_dense", 32768, 256)
    if c and d:
        print(f"  N=32768 B=256: copies / ours_dense = {c / d:.1f}x (target >= 40x)")
    for chunk in sorted({r.get("chunk_size", ch) for r in out["rows"]}):
        for skew in ("uniform", "zipf"):
            r, d = ms("ours_routed", 131072, 256, 0.25, skew, chunk), ms("ours_dense", 131072, 256)
            if r and d:
                print(f"  N=131072 B=256 {skew} chunk {chunk}: ours_dense / ours_routed(25%) = "
                      f"{d / r:.2f}x (target >= 2.5x)")
    for ch in out["checks"]:
        print(f"  check {ch['what']} N={ch['N']} B={ch['B']} {ch['dtype']}: rel_err "
              f"{ch['rel_err']:.2e}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "attention.json"))
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--copies-gib", type=float, default=40.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--extra-chunk", type=int, default=256,
                    help="also time routed with this chunk size at N=128K, B>=128 (0: off)")
    ap.add_argument("--sweep-only", action="store_true",
                    help="only the launch-configuration sweep (its own process: a config that "
                         "faults cannot take the main run down)")
    args = ap.parse_args()
    global DRY
    DRY = args.dry
    if args.sweep_only:
        import triton
        res = dict(device=torch.cuda.get_device_name(), triton=triton.__version__,
                   sweep=sweep(torch.device("cuda"), args))
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
        return
    t0 = time.time()
    out = run(args)
    out["wall_s"] = round(time.time() - t0, 1)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    table(out)


if __name__ == "__main__":
    main()
