"""Shared-KV attention against per-request baselines at the Llama-3.1-8B layer shape.

One process, one run: measures the bf16 matmul peak and the device-to-device copy bandwidth
first, then for each shared length N and batch B (concurrent decoding requests, one query token
each) times
  copies      torch SDPA, each request over its own copy of the KV (B copies; skipped where
              they do not fit in --copies-gib)
  paged       our paged kernel, every request's block table pointing at the one shared copy
              (prefix caching: each request still reads the shared pages itself)
  torch_fold  torch SDPA with the batch (and the GQA group) folded into the query length:
              one plain dense attention per KV head (torch's default dispatch)
  torch_flash the same with the flash backend forced (the default chose cuDNN on the H200)
  fi_cascade_fa2 / fi_cascade_fa3  FlashInfer's cascade level 0: all B queries as one request
              over the shared pages (BatchPrefillWithPagedKVCacheWrapper, backend fa2 / fa3)
  fi_decode / fi_decode_tc  FlashInfer paged decode, every request's pages the shared pages
              (prefix caching, as vLLM/SGLang serve it), CUDA cores / tensor cores
              (FlashInfer rows only where `import flashinfer` works: .peers/flashinfer/README.md)
  ours_dense  attention.shared_attention(q, k, v, None)
  ours_routed attention.shared_attention(q, k, v, chunk_idx, plan=plan) at densities 0.5 / 0.25
              / 0.1, uniform and Zipf chunk popularity, per-token selections (every token and KV
              head its own chunks) and per-request selections (one set per request, all heads);
              the time is the run (kernel + combine) with the plan built beforehand, as the engine
              builds it once per step for all layers; `plan_ms` is that plan's own time
  (and at N=128K, B=256: the chunk granularity study, kernel spans, persistent grid, passages,
   and the two older routed designs, `ours_routed_scatter` / `ours_routed_union`)
and writes bench/results/attention.json. Roofline per row: floor = max(flops / peak_tflops,
bytes / peak_tbps), roofline_frac = floor / measured. flops = 4 * B * Hq * keys_attended * d;
bytes = the KV the row's data layout must read once (B copies for `copies`, one copy for the
others; for routed, the chunks some query chose) plus q and o.

Usage (GPU): python3 bench/attention.py [--quick] [--sweep] [--out PATH]
             [--ns 131072 --bs 1,256 --ours-only]  (a subset: our rows at those shapes)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import attention  # noqa: E402
from attention import shared_dense  # noqa: E402
from attention.paged import unique_attention_paged  # noqa: E402

HQ, HKV, D = 32, 8, 128
PEERS = (
    "paged",
    "torch_fold",
    "torch_flash",
    "fi_cascade_fa2",
    "fi_cascade_fa3",
    "fi_decode",
    "fi_decode_tc",
)
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
    tflops = 2 * m**3 / ms / 1e9
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


def make_idx(b, c, top_k, skew, dev, seed, per="token"):
    """chunk_idx[B, Hkv, k]: per="token" draws every (request, KV head) its own chunks,
    per="request" one set per request for all heads (the attention-retrieval selection),
    per="runs" per request contiguous passages of 8 chunks at random places."""
    gen = torch.Generator().manual_seed(seed)
    w = zipf_weights(c, 1.1, gen) if skew else torch.ones(c)
    if per == "runs":
        run = 8
        starts = (
            torch.multinomial(
                w[::run].contiguous().expand(b, c // run).contiguous(),
                max(1, top_k // run),
                replacement=False,
                generator=gen,
            )
            * run
        )
        idx = (starts[:, :, None] + torch.arange(run)).flatten(1)[:, :top_k]
        return idx[:, None, :].expand(b, HKV, idx.shape[1]).contiguous().int().to(dev)
    rows = b * HKV if per == "token" else b
    idx = torch.multinomial(w.expand(rows, c).contiguous(), top_k, replacement=False, generator=gen)
    if per == "request":
        return idx[:, None, :].expand(b, HKV, top_k).contiguous().int().to(dev)
    return idx.view(b, HKV, top_k).int().to(dev)


def flashinfer_peers(q, kc, vc, n):
    """{name: fn} of FlashInfer's calls over the shared pages kc, vc [P, 16, Hkv, d]; {} where
    flashinfer does not import. Plans run here (host side, outside the timing)."""
    try:
        import flashinfer
    except Exception as e:  # noqa: BLE001 - optional peer
        return {}, f"flashinfer not importable: {type(e).__name__}: {str(e)[:100]}"
    b, dev = q.shape[0], q.device
    pages = n // PAGE
    if getattr(flashinfer_peers, "ws", None) is None:
        flashinfer_peers.ws = torch.empty(128 << 20, dtype=torch.uint8, device=dev)
    ws = flashinfer_peers.ws
    out, notes = {}, []
    i32 = dict(dtype=torch.int32, device=dev)
    for backend in ("fa2", "fa3"):
        try:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(ws, "NHD", backend=backend)
            w.plan(
                torch.tensor([0, b], **i32),
                torch.tensor([0, pages], **i32),
                torch.arange(pages, **i32),
                torch.tensor([PAGE], **i32),
                HQ,
                HKV,
                D,
                PAGE,
                causal=False,
                q_data_type=torch.bfloat16,
            )
            out[f"fi_cascade_{backend}"] = lambda w=w: w.run(q, (kc, vc), return_lse=True)
        except Exception as e:  # noqa: BLE001
            notes.append(f"cascade {backend}: {type(e).__name__}: {str(e)[:100]}")
    for tc in (False, True):
        try:
            w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(ws, "NHD", use_tensor_cores=tc)
            w.plan(
                torch.arange(b + 1, **i32) * pages,
                torch.arange(pages, **i32).repeat(b),
                torch.full((b,), PAGE, **i32),
                HQ,
                HKV,
                D,
                PAGE,
                q_data_type=torch.bfloat16,
                kv_data_type=torch.bfloat16,
            )
            out["fi_decode_tc" if tc else "fi_decode"] = lambda w=w: w.run(
                q, (kc, vc), return_lse=True
            )
        except Exception as e:  # noqa: BLE001
            notes.append(f"decode tc={tc}: {type(e).__name__}: {str(e)[:100]}")
    return out, "; ".join(notes)


def row(impl, n, b, density, skew, dtype, ms, flops, nbytes, peak_tflops, peak_tbps, **extra):
    floor_ms = max(flops / peak_tflops / 1e9, nbytes / peak_tbps / 1e9)
    return dict(
        impl=impl,
        N=n,
        B=b,
        density=density,
        skew=skew,
        dtype=dtype,
        ms=round(ms, 4),
        tflops=round(flops / ms / 1e9, 2),
        tbps=round(nbytes / ms / 1e9, 3),
        roofline_frac=round(floor_ms / ms, 3),
        **extra,
    )


def empty_cache():
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fi_version():
    try:
        import flashinfer

        return flashinfer.__version__
    except Exception as e:  # noqa: BLE001 - optional peer
        return f"not importable ({type(e).__name__})"


def run(args):
    dev = torch.device("cuda" if not DRY else "cpu")
    import triton

    peak_tflops, peak_tbps = measure_peaks(dev)
    name = torch.cuda.get_device_name() if not DRY else "cpu (dry run)"
    print(
        f"device {name}  bf16 matmul {peak_tflops:.0f} TFLOP/s  copy {peak_tbps:.2f} TB/s",
        flush=True,
    )
    out = dict(
        device=name,
        torch=torch.__version__,
        triton=triton.__version__,
        peak_tflops=round(peak_tflops, 1),
        peak_tbps=round(peak_tbps, 3),
        chunk_size=args.chunk,
        hq=HQ,
        hkv=HKV,
        d=D,
        zipf_s=1.1,
        rows=[],
        checks=[],
        notes=[],
        flashinfer=fi_version(),
        date=time.strftime("%Y-%m-%d"),
    )
    if args.sweep:
        out["sweep"] = sweep(dev, args)
    bs = [1, 8, 32, 128, 256] if not args.quick else [1, 256]
    ns = [(32768, "bf16"), (131072, "bf16"), (524288, "fp8")]
    if args.quick:
        ns = ns[:2]
    if args.focus:  # the routed study alone: dense, routed grid and granularity at 128K, B=256
        bs, ns = [128, 256], [(131072, "bf16")]
    if DRY:
        bs, ns = [1, 4], [(1024, "bf16"), (2048, "fp8")]
    if args.ns:
        ns = [(n, kvt) for n, kvt in ns if str(n) in args.ns.split(",")]
    if args.bs:
        bs = [b for b in bs if str(b) in args.bs.split(",")]
    peers = not (args.focus or args.ours_only)
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
                r = row(
                    impl,
                    n,
                    b,
                    density,
                    skew,
                    dtype,
                    ms,
                    flops,
                    nbytes,
                    peak_tflops,
                    peak_tbps,
                    graph=graphed,
                    **extra,
                )
                rows.append(r)
                print(
                    f"{impl:14s} N={n:7d} B={b:4d} dens={density:4.2f} skew={skew:5s} "
                    f"{dtype:4s} {r['ms']:9.4f} ms {r['tflops']:7.1f} TF/s {r['tbps']:6.3f} "
                    f"TB/s  roof {r['roofline_frac']:.3f} {extra.get('selection', '')} "
                    f"{extra.get('kernel', '')} {extra.get('chunk_size', '')} "
                    f"plan {extra.get('plan_ms', '')}",
                    flush=True,
                )

            # (a) copies: B distinct KV copies, per-request SDPA (query length G after GQA fold)
            copy_bytes = b * 2 * n * HKV * D * 2
            if copy_bytes <= args.copies_gib * 2**30 and peers:
                kb = k_t.expand(b, -1, -1, -1).contiguous()
                vb = v_t.expand(b, -1, -1, -1).contiguous()
                qb = q.view(b, HKV, G, D)
                add(
                    "copies",
                    lambda: F.scaled_dot_product_attention(qb, kb, vb),
                    fl,
                    copy_bytes + qo_bytes,
                    dtype="bf16",
                )
                del kb, vb
                empty_cache()
            # (b) paged: all block tables point at the one shared copy
            bt = torch.arange(n // PAGE, device=dev, dtype=torch.int32).expand(b, -1).contiguous()
            seq = torch.full((b,), n, device=dev, dtype=torch.int32)
            cu = torch.arange(b + 1, device=dev, dtype=torch.int32)
            if not args.focus:
                add(
                    "paged",
                    lambda: unique_attention_paged(
                        q, kc, vc, bt, seq, cu, max_seqlen_q=1, max_seqlen_k=n
                    ),
                    fl,
                    2 * n * HKV * D * 2 + qo_bytes,
                    dtype="bf16",
                )
            # (c) torch_fold: [1, Hkv, B*G, d] against [1, Hkv, N, d]; default dispatch and
            # the flash backend forced
            qf = q.view(b, HKV, G, D).permute(1, 0, 2, 3).reshape(1, HKV, b * G, D)
            fold = lambda: F.scaled_dot_product_attention(qf, k_t, v_t)  # noqa: E731
            if not args.ours_only:
                add("torch_fold", fold, fl, 2 * n * HKV * D * 2 + qo_bytes, dtype="bf16")

            def fold_flash():
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(qf, k_t, v_t)

            try:
                if not args.ours_only:
                    add("torch_flash", fold_flash, fl, 2 * n * HKV * D * 2 + qo_bytes, dtype="bf16")
            except RuntimeError as e:
                out["notes"].append(f"torch_flash N={n} B={b}: {str(e)[:100]}")
            # (c') FlashInfer over the shared pages (bf16 source KV)
            fis, note = (
                flashinfer_peers(q, kc, vc, n)
                if not DRY and peers
                else ({}, "dry run, --focus or --ours-only")
            )
            if note and note not in out["notes"]:
                out["notes"].append(note)
            for name, fn in fis.items():
                try:
                    add(
                        name,
                        fn,
                        fl,
                        2 * n * HKV * D * 2 * (b if "decode" in name else 1) + qo_bytes,
                        dtype="bf16",
                    )
                except Exception as e:  # noqa: BLE001 - a peer that fails is noted, not fatal
                    out["notes"].append(f"{name} N={n} B={b}: {type(e).__name__} {str(e)[:100]}")
            # (d) ours dense
            dense = lambda: attention.shared_attention(q, k, v, None, args.chunk, None, ks, vs)  # noqa: E731
            add("ours_dense", dense, fl, kv_bytes + qo_bytes)
            o_d, _ = dense()
            o_f = fold().view(HKV, b, G, D).permute(1, 0, 2, 3).reshape(b, HQ, D)
            err = (o_d.float() - o_f.float()).norm() / o_f.float().norm()
            out["checks"].append(
                dict(
                    what="ours_dense vs torch_fold (bf16 source KV)",
                    N=n,
                    B=b,
                    dtype=kvt,
                    rel_err=float(err),
                )
            )
            if "fi_cascade_fa2" in fis:
                o_fi = fis["fi_cascade_fa2"]()[0]
                err = (o_d.float() - o_fi.float()).norm() / o_fi.float().norm()
                out["checks"].append(
                    dict(
                        what="ours_dense vs fi_cascade_fa2", N=n, B=b, dtype=kvt, rel_err=float(err)
                    )
                )
            del fis
            # (e) ours routed: the plan built once (as the engine does per step), the run timed
            full = n == 131072 or DRY
            plans = [(1.0, "none", "token")]
            for density in (0.5, 0.25, 0.1) if full else (0.25, 0.1):
                for skew in ("none", "zipf") if full else ("none",):
                    for per in ("token", "request"):
                        plans.append((density, skew, per))
            for density, skew, per in plans:
                add_routed(
                    add,
                    out,
                    q,
                    k,
                    v,
                    ks,
                    vs,
                    n,
                    b,
                    args.chunk,
                    density,
                    skew,
                    per,
                    elt,
                    qo_bytes,
                    o_d if density == 1.0 else None,
                )
            if args.focus and b == 128:
                small_budget_study(add, out, q, kf, vf, n, b, qo_bytes)
            studies = not args.ours_only and (
                (b == 256 and n == 131072) or (DRY and b == bs[-1] and n == ns[0][0])
            )
            if studies:
                granularity_study(add, out, q, kf, vf, n, b, elt, qo_bytes, args)
            out["rows"].extend(rows)
            with open(args.out, "w") as f:  # what is measured survives a later failure
                json.dump(out, f, indent=1)
            del q
        del k, v, kf, vf, k_t, v_t, kc, vc
        empty_cache()
    return out


def add_routed(
    add,
    out,
    q,
    k,
    v,
    ks,
    vs,
    n,
    b,
    chunk,
    density,
    skew,
    per,
    elt,
    qo_bytes,
    o_dense=None,
    impl="grouped",
    span=None,
    persist=None,
    tag="",
    cfg=None,
    profile_it=False,
):
    """Time one routed configuration: plan (alone) and run (with the plan built beforehand)."""
    from attention import shared_routed
    from attention import shared_routed_grouped as grouped

    dev = q.device
    c = n // chunk
    top_k = max(1, int(round(density * c)))
    if top_k == c:  # every chunk
        idx = torch.arange(c, device=dev, dtype=torch.int32).expand(b, HKV, c).contiguous()
    else:
        idx = make_idx(b, c, top_k, skew == "zipf", dev, seed=b, per=per)
    chosen = torch.zeros(HKV, c, dtype=torch.bool, device=dev)
    chosen[torch.arange(HKV, device=dev).view(1, HKV, 1).expand_as(idx), idx.long()] = True
    union_bytes = int(chosen.sum()) * chunk * D * 2 * elt
    over = dict(cfg or {})
    if span is not None:
        over["span"] = span
    if persist is not None:
        over["persist"] = persist
    over = over or None  # the grouped kernel's config, handed to its plan and its run
    skew_name = "uniform" if skew == "none" else skew
    flops = 4.0 * b * HQ * top_k * chunk * D
    extra = dict(top_k=top_k, chunk_size=chunk, selection=per, kernel=impl + tag, **(cfg or {}))
    if impl == "grouped":
        plan = grouped.plan_for(idx, c, G, chunk, config=over)
        plan_ms, _ = timed(lambda: grouped.plan_for(idx, c, G, chunk, config=over))
        extra.update(
            plan_ms=round(plan_ms, 4),
            span=plan.span,
            block_m=plan.block_m,
            persist=grouped.choose_config(b, G, top_k, c, chunk, DRY, over)["persist"],
        )
        fn = lambda: grouped.shared_attention_grouped(  # noqa: E731
            q, k, v, None, chunk, None, ks, vs, plan=plan, config=over
        )
    if impl != "grouped":
        fn = lambda: shared_routed.shared_attention_routed(  # noqa: E731
            q, k, v, idx, chunk, None, ks, vs, impl=impl
        )
    if DRY:  # CPU tensors take attention.cpu_shared
        fn = lambda: attention.shared_attention(q, k, v, idx, chunk, None, ks, vs)  # noqa: E731
    add(
        "ours_routed" if impl == "grouped" else f"ours_routed_{impl}",
        fn,
        flops,
        union_bytes + qo_bytes,
        density,
        skew_name,
        **extra,
    )
    if o_dense is not None:
        o_r, _ = fn()
        err = (o_r.float() - o_dense.float()).norm() / o_dense.float().norm()
        out["checks"].append(
            dict(
                what=f"ours_routed {impl} (all chunks) vs ours_dense",
                N=n,
                B=b,
                dtype="fp8" if ks is not None else "bf16",
                rel_err=float(err),
            )
        )
    if profile_it and not DRY:
        profile(fn, f"routed {impl}{tag} N={n} B={b} {density} {per}")


# launch configurations the studies sweep: rt (row tiles per program, 0: one), m BLOCK_M,
# n BLOCK_N, w num_warps, s num_stages; each spec is also its row's tag
SMALL_SWEEP = (
    "rt8m16n128w4s3 rt0m16n128w4s2 rt0m16n64w4s3 rt8m16n128w2s3 rt4m32n128w4s3 rt0m16n32w2s4"
)
GROUPED_SWEEP = "m64n64w4s2 m64n128w8s2 m128n128w8s2 m128n64w8s3 m32n128w4s2 m64n128w4s3"
STATIONARY_SWEEP = (
    "rt0m64w4s2 rt2m64w4s2 rt4m64w4s3 rt8m64w4s3 rt8m64w4s4 rt16m64w4s3 rt8m128w8s3 rt8m32w4s3 "
    "rt8m64w8s3"
)
CONFIG_KEYS = {"rt": "rt", "m": "BLOCK_M", "n": "BLOCK_N", "w": "num_warps", "s": "num_stages"}


def config(spec: str, **defaults: int) -> dict:
    """'rt8m64n128w4s3' -> dict(rt=8, BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3)."""
    return {**defaults, **{CONFIG_KEYS[k]: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", spec)}}


def small_budget_study(add, out, q, kf, vf, n, b, qo_bytes):
    """N=128K, B=128, per-request selections of 4096 tokens (32 chunks of 128, the serve
    bench's small budget): few rows per chunk, so the kernel is memory- and latency-bound."""
    routed = functools.partial(add_routed, add, out, q, kf, vf, None, None, n, b)
    for spec in SMALL_SWEEP.split():
        routed(128, 1 / 32, "none", "request", 2, qo_bytes, tag=f"_small_{spec}", cfg=config(spec))


def granularity_study(add, out, q, kf, vf, n, b, elt, qo_bytes, args):
    """N=128K, B=256, 25%: selection chunk 128/256/512, kernel spans, persistent grid,
    passages (contiguous runs), and the two earlier routed designs."""
    routed = functools.partial(add_routed, add, out, q, kf, vf, None, None, n, b)
    for chunk in (128, 256, 512):
        for per in ("token", "request"):
            routed(
                chunk,
                0.25,
                "none",
                per,
                2,
                qo_bytes,
                tag=f"_c{chunk}",
                profile_it=args.profile and chunk == 128 and per == "request",
            )
    for span in (2, 4):
        for per in ("request", "runs"):
            routed(128, 0.25, "none", per, 2, qo_bytes, span=span, tag=f"_span{span}")
    routed(128, 0.25, "none", "runs", 2, qo_bytes, tag="_span1")
    if not DRY:  # launch configurations of the grouped kernel
        for spec in GROUPED_SWEEP.split():
            routed(
                128, 0.25, "none", "request", 2, qo_bytes, tag=f"_{spec}", cfg=config(spec, rt=0)
            )
        for spec in STATIONARY_SWEEP.split():
            cfg = config(spec, BLOCK_N=128)
            routed(128, 0.25, "none", "request", 2, qo_bytes, tag=f"_stationary_{spec}", cfg=cfg)
    for per in ("token", "request"):
        routed(128, 0.25, "none", per, 2, qo_bytes, persist=True, tag="_persist", cfg=dict(rt=0))
        if not DRY:
            for impl in ("scatter", "union"):
                routed(128, 0.25, "none", per, 2, qo_bytes, impl=impl)


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
    large = [
        (128, 8, 3, False, False),
        (128, 8, 3, True, False),
        (128, 8, 3, True, True),
        (128, 8, 4, True, False),
    ]
    fp8 = [(128, 8, 3, False, False), (64, 8, 3, False, False), (128, 4, 3, False, False)]
    for b, kv, cands in [(1, "bf16", small), (256, "bf16", large), (64, "fp8", fp8)]:
        q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16)
        for bn, w, st, tma, ws in cands:
            cfg = dict(BLOCK_N=bn, num_warps=w, num_stages=st, USE_TMA=tma, WARP_SPEC=ws)
            if kv == "fp8":
                fn = lambda cfg=cfg: shared_dense.shared_attention_dense(  # noqa: E731
                    q, k8, v8, args.chunk, None, s8, s8, config=cfg
                )
            else:
                fn = lambda cfg=cfg: shared_dense.shared_attention_dense(  # noqa: E731
                    q, k, v, config=cfg
                )
            try:
                ms, _ = timed(fn)
            except Exception as e:  # out of shared memory, ...
                ms = float("nan")
                print("sweep", cfg, "failed:", type(e).__name__, flush=True)
            res.append(dict(B=b, kv=kv, **cfg, ms=round(ms, 4)))
            print(f"sweep N={n} B={b} {kv} {cfg} {ms:.4f} ms", flush=True)
    del k8, v8
    # routed: row-block size and occupancy at B=256, 25% uniform
    from attention import shared_routed

    c = n // args.chunk
    q = torch.randn(256, HQ, D, device=dev, dtype=torch.bfloat16)
    idx = make_idx(256, c, c // 4, False, dev, seed=1)
    for bm, bn, w, st in [
        (128, 128, 8, 3),
        (128, 64, 8, 3),
        (64, 128, 4, 2),
        (64, 64, 4, 3),
        (32, 128, 4, 2),
    ]:
        cfg = dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=st)
        try:  # the scatter kernel's configurations (the design these keys belong to)
            ms, _ = timed(
                lambda cfg=cfg: shared_routed.shared_attention_routed(
                    q, k, v, idx, args.chunk, impl="scatter", config=cfg
                )
            )
        except Exception as e:
            ms = float("nan")
            print("sweep routed", cfg, "failed:", type(e).__name__, flush=True)
        res.append(dict(B=256, kv="bf16", routed=True, kernel="scatter", **cfg, ms=round(ms, 4)))
        print(f"sweep routed N={n} B=256 25% {cfg} {ms:.4f} ms", flush=True)
    del k, v
    torch.cuda.empty_cache()
    return res


def table(out):
    print(
        f"\n{out['device']}  torch {out['torch']}  triton {out['triton']}  "
        f"flashinfer {out.get('flashinfer')}  "
        f"peak {out['peak_tflops']} TFLOP/s  {out['peak_tbps']} TB/s  chunk {out['chunk_size']}"
    )
    print(
        f"{'impl':12s} {'N':>7s} {'B':>4s} {'dens':>5s} {'skew':>7s} {'chunk':>5s} {'dt':>4s} "
        f"{'ms':>9s} {'TF/s':>7s} {'TB/s':>6s} {'roof':>5s}"
    )
    for r in out["rows"]:
        print(
            f"{r['impl']:12s} {r['N']:7d} {r['B']:4d} {r['density']:5.2f} {r['skew']:>7s} "
            f"{str(r.get('chunk_size', '')):>5s} {r['dtype']:>4s} {r['ms']:9.4f} "
            f"{r['tflops']:7.1f} {r['tbps']:6.3f} {r['roofline_frac']:5.3f} "
            f"{r.get('selection', '')} {r.get('kernel', '')} {r.get('plan_ms', '')}"
        )
    idx = {
        (
            r["impl"],
            r["N"],
            r["B"],
            r["density"],
            r["skew"],
            r.get("chunk_size", out["chunk_size"]),
            r.get("selection"),
            r.get("kernel"),
        ): r
        for r in out["rows"]
    }
    ch = out["chunk_size"]

    def ms(impl, n, b, dens=1.0, skew="none", chunk=ch, sel=None, kernel=None):
        r = idx.get((impl, n, b, dens, skew, chunk, sel, kernel))
        return r["ms"] if r else None

    print("\ntargets")
    ns = sorted({r["N"] for r in out["rows"]})
    bs = sorted({r["B"] for r in out["rows"]})
    for n in ns:
        fr = [idx[k]["roofline_frac"] for k in idx if k[0] == "ours_dense" and k[1] == n]
        print(
            f"  N={n}: ours_dense roofline_frac {', '.join(f'{x:.3f}' for x in fr)}"
            f"{' (target >= 0.80)' if n >= 131072 else ''}"
        )
    peers = [p for p in PEERS]
    for n in ns:
        for b in bs:
            d = ms("ours_dense", n, b)
            got = [(ms(p, n, b), p) for p in peers if ms(p, n, b)]
            if d and got:
                best, name = min(got)
                print(
                    f"  N={n} B={b}: best peer {name} {best:.4f} ms / ours_dense {d:.4f} ms = "
                    f"{best / d:.2f}x (target >= 1.25x); torch default {ms('torch_fold', n, b)}"
                )
    c, d = ms("copies", 32768, 256), ms("ours_dense", 32768, 256)
    if c and d:
        print(f"  N=32768 B=256: copies / ours_dense = {c / d:.1f}x")
    d = ms("ours_dense", 131072, 256)
    for r in out["rows"]:
        if (
            r["impl"].startswith("ours_routed")
            and r["N"] == 131072
            and r["B"] == 256
            and d
            and r["density"] < 1
        ):
            tgt = {0.25: 3.0 if r["skew"] == "zipf" else 2.5, 0.1: 5.0}.get(r["density"])
            print(
                f"  N=131072 B=256 {r['impl']} {r.get('kernel')} {r.get('selection')} "
                f"{r['skew']} chunk {r.get('chunk_size')} dens {r['density']}: dense/routed = "
                f"{d / r['ms']:.2f}x (plan {r.get('plan_ms')} ms once per step)"
                f"{f' target >= {tgt}x' if tgt else ''}"
            )
    for ch in out["checks"]:
        print(
            f"  check {ch['what']} N={ch['N']} B={ch['B']} {ch['dtype']}: rel_err "
            f"{ch['rel_err']:.2e}"
        )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "attention.json")
    )
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--copies-gib", type=float, default=40.0)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--dry", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument(
        "--focus",
        action="store_true",
        help="only N=128K, B=256: dense, the routed grid and the granularity study",
    )
    ap.add_argument(
        "--extra-chunk",
        type=int,
        default=256,
        help="also time routed with this chunk size at N=128K, B>=128 (0: off)",
    )
    ap.add_argument("--ns", default="", help="only these of the run's shared lengths (commas)")
    ap.add_argument("--bs", default="", help="only these of the run's batches (commas)")
    ap.add_argument(
        "--ours-only",
        action="store_true",
        help="our kernels' rows only (paged, ours_dense, ours_routed grid): no peers, "
        "no granularity study",
    )
    ap.add_argument(
        "--sweep-only",
        action="store_true",
        help="only the launch-configuration sweep (its own process: a config that "
        "faults cannot take the main run down)",
    )
    args = ap.parse_args()
    global DRY
    DRY = args.dry
    if args.sweep_only:
        import triton

        res = dict(
            device=torch.cuda.get_device_name(),
            triton=triton.__version__,
            sweep=sweep(torch.device("cuda"), args),
        )
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
