"""Dense shared attention: every query of the step against the whole shared KV, as one GEMM.

Layout of the work: a program owns one KV head h, one block of BLOCK_M query rows and one split
of the key range. Rows are (token, q head of h's group) pairs, so the GQA group and all requests
of the step share each K/V tile loaded: a tile is read once per row block instead of once per
request and head (GEMV -> GEMM). When T x group is small (decode with few requests) the rows
cannot fill the GPU, so the key range is split across programs (flash-decoding) and the partial
(o, lse) of the splits are reduced by log-sum-exp in `combine.py`. With one split the kernel
writes the final output directly.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _triton as tt
from ._triton import HAS_TRITON, tl, triton
from .launch import cdiv, check_device, dot_dtype, sms, strides

if HAS_TRITON:
    from triton.tools.tensor_descriptor import TensorDescriptor

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

if HAS_TRITON:

    @triton.jit
    def _shared_dense_kernel(
        Q,
        K,
        V,
        KS,
        VS,
        O,
        LSE,
        T,
        N,
        chunk_size,
        split_len,
        qk_scale,
        ST,
        G: tl.constexpr,
        D: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        KV_SCALE: tl.constexpr,
        EVEN_N: tl.constexpr,
        DOT: tl.constexpr,
        USE_TMA: tl.constexpr,
        WARP_SPEC: tl.constexpr,
    ):
        sq, sk, sv, ss, so, sl = ST
        pid_m = tl.program_id(0)  # row block: fastest, so blocks sharing a KV range run together
        h = tl.program_id(1)  # KV head
        s = tl.program_id(2)  # split of the key range

        # rows of this block: (token t, member g of the GQA group) -> q head h * G + g
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        t = rows // G
        g = rows % G
        row_ok = t < T
        offs_d = tl.arange(0, D)
        # load q once: it stays in registers for the whole key range
        q = tt.load_q_rows(Q, t, h * G + g, row_ok, offs_d, sq).to(DOT)

        m_i, l_i, acc = tt.softmax_start(BLOCK_M, D)

        # this split's keys [n_lo, n_hi); the host sized splits so that none is empty.
        # The split's base offset is 64-bit (N * Hkv * d can pass 2^31); tiles step from it.
        n_lo = s * split_len
        n_hi = tl.minimum(n_lo + split_len, N)
        offs_n0 = tl.arange(0, BLOCK_N)
        if not USE_TMA:
            k_ptrs = (
                K
                + n_lo.to(tl.int64) * sk[0]
                + h * sk[1]
                + offs_n0[:, None] * sk[0]
                + offs_d[None, :]
            )
            v_ptrs = (
                V
                + n_lo.to(tl.int64) * sv[0]
                + h * sv[1]
                + offs_n0[:, None] * sv[0]
                + offs_d[None, :]
            )
        for start in tl.range(n_lo, n_hi, BLOCK_N, warp_specialize=WARP_SPEC):
            offs_n = start + offs_n0
            n_ok = offs_n < N
            if USE_TMA:
                # K, V are [N, Hkv * d] tensor descriptors: the copy engine fetches the
                # [BLOCK_N, d] tile of head h into shared memory (rows past N read as 0)
                k = K.load([start, h * D])
                v = V.load([start, h * D])
            elif EVEN_N:  # N is a multiple of BLOCK_N: every tile is full, no masks
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=n_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=n_ok[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k.to(DOT)))
            if KV_SCALE:
                # fp8: dequantize through the scores and probabilities, not the tiles:
                # (q . k8) * sk == q . (k8 * sk), and p @ (v8 * sv) == (p * sv) @ v8
                sc = (offs_n // chunk_size) * ss[0] + h * ss[1]
                ks = tl.load(KS + sc, mask=n_ok, other=0.0)
                vs = tl.load(VS + sc, mask=n_ok, other=0.0)
                qk = qk * ks[None, :]
            if not EVEN_N:
                qk = tl.where(n_ok[None, :], qk, float("-inf"))
            # every tile holds a key of every row (EVEN_N or not), so no row is ever empty
            m_i, l_i, acc = tt.softmax_update(
                m_i,
                l_i,
                acc,
                qk,
                v,
                qk_scale,
                vs[None, :] if KV_SCALE else 1.0,
                DOT,
                KV_SCALE,
                False,
            )
            if not USE_TMA:
                k_ptrs += BLOCK_N * sk[0]
                v_ptrs += BLOCK_N * sv[0]

        # every split holds at least one key, so l_i > 0 on every row
        o, lse = tt.softmax_finish(m_i, l_i, acc, False)
        tt.store_split_rows(O, LSE, o, lse, t, h * G + g, s, row_ok, offs_d, so, sl)


def _block_m(rows: int) -> int:
    # tl.dot needs M >= 16; beyond 128 rows a block gets no faster, only fewer
    return max(16, min(128, triton.next_power_of_2(rows)))


@functools.lru_cache(maxsize=1024)
def _plan(rows: int, n: int, hkv: int, device: torch.device, block_n: int) -> tuple[int, int, int]:
    """(BLOCK_M, splits, split_len). Enough programs to fill every SM a few times over; each
    split a whole number of key tiles and at least 4 of them (so partials stay a small share
    of the traffic); pick the split count whose last wave is fullest."""
    block_m = _block_m(rows)
    base = cdiv(rows, block_m) * hkv
    n_tiles = cdiv(n, block_n)
    num_sms = sms(device)
    max_splits = max(1, min(n_tiles // 4, 128))
    if base >= 2 * num_sms:
        splits = 1
    else:
        best, splits = -1.0, 1
        want = 2 * num_sms if block_m < 128 else num_sms  # small M is memory-bound: overlap
        for cand in range(1, max_splits + 1):
            programs = base * cand
            if programs < want and cand < max_splits:
                continue
            waves = cdiv(programs, num_sms)
            eff = programs / (waves * num_sms)
            if eff > best + 0.02:
                best, splits = eff, cand
            if programs > 8 * num_sms:
                break
    split_len = cdiv(n_tiles, splits) * block_n
    splits = cdiv(n, split_len)
    return block_m, splits, split_len


def _config(block_m: int, interp: bool, fp8: bool = False, config: dict | None = None) -> dict:
    """Launch configuration of a row block; `config` (bench sweeps: {"BLOCK_N", "num_warps",
    "num_stages", "USE_TMA", "WARP_SPEC"}) replaces the tuned default on the GPU."""
    if config is not None and not interp:
        return dict(config)
    if interp:  # both load paths, on small shapes
        return dict(BLOCK_N=16 if block_m <= 16 else 32, USE_TMA=block_m >= 32)
    # H100 sweeps (docs/KERNELS.md): 128-key tiles, 8 warps, 3 stages everywhere; TMA loads
    # for the GEMM-shaped 16-bit case (1.12 -> 1.01 ms at N=128K, B=256), plain loads for
    # fp8 (TMA measured 2% slower: the tile is converted in registers either way) and for the
    # memory-bound small-M case (no difference). Warp specialization gained 1.5% more, inside
    # the noise of one run, and failed to compile at 4 warps: left off.
    return dict(BLOCK_N=128, num_warps=8, num_stages=3, USE_TMA=block_m >= 128 and not fp8)


def shared_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_size: int = 64,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
    splits: int | None = None,
    config: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of `reference.shared_attention(q, k, v, None, ...)`.

    q[T,Hq,d] fp16/bf16; k, v[N,Hkv,d] in q's dtype or fp8 e4m3 with `k_scale`, `v_scale` of
    shape [Hkv] or [C, Hkv]. `splits` forces the number of key-range splits (tests); `config`
    a launch configuration in place of the tuned one (bench sweeps; see `_config`).
    Returns (o[T,Hq,d] in q.dtype, lse[T,Hq] float32).
    """
    from .combine import merge_splits, split_parts

    t, hq, d = q.shape
    n, hkv, _ = k.shape
    assert hq % hkv == 0 and d in (16, 32, 64, 128, 256), (hq, hkv, d)
    assert (k_scale is None) == (v_scale is None)
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    assert scale > 0, "the kernel takes row maxima of unscaled scores"
    o = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    if t == 0:
        return o, lse
    if n == 0:
        return o.zero_(), lse.fill_(float("-inf"))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    check_device(q)
    interp = q.device.type != "cuda"
    rows = t * g
    cfg = _config(_block_m(rows), interp, k.dtype.itemsize == 1, config)
    block_m, n_splits, split_len = _plan(rows, n, hkv, q.device, cfg["BLOCK_N"])
    if splits is not None:
        n_splits = max(1, min(splits, cdiv(n, cfg["BLOCK_N"])))
        split_len = cdiv(cdiv(n, cfg["BLOCK_N"]), n_splits) * cfg["BLOCK_N"]
        n_splits = cdiv(n, split_len)
    o_part, lse_part, so, sl = split_parts(o, lse, n_splits)
    if k_scale is not None:
        ks = k_scale.float().contiguous()
        vs = v_scale.float().contiguous()
        per_chunk = ks.dim() == 2
        ss = (ks.stride(0), ks.stride(1)) if per_chunk else (0, ks.stride(0))
    else:
        ks = vs = lse  # never read
        ss = (0, 0)
    grid = (cdiv(rows, block_m), hkv, n_splits)
    cfg = dict(cfg)
    use_tma = cfg.pop("USE_TMA", False)
    warp_spec = cfg.pop("WARP_SPEC", False)
    kk, vv = k, v
    if use_tma:
        # [N, Hkv*d] views; one [BLOCK_N, d] box per load (TMA: 16-byte aligned rows)
        box = [cfg["BLOCK_N"], d]
        kk = TensorDescriptor.from_tensor(k.view(n, hkv * d), box)
        vv = TensorDescriptor.from_tensor(v.view(n, hkv * d), box)
    _shared_dense_kernel[grid](
        q,
        kk,  # with TMA, tensor descriptors: the launcher cannot take them inside a tuple
        vv,
        ks,
        vs,
        o_part,
        lse_part,
        t,
        n,
        chunk_size,
        split_len,
        scale * LOG2E,
        (*strides(q, k, v), ss, so, sl),
        G=g,
        D=d,
        BLOCK_M=block_m,
        KV_SCALE=k_scale is not None,
        EVEN_N=n % cfg["BLOCK_N"] == 0,
        DOT=dot_dtype(q.dtype, q.device, k.dtype),
        USE_TMA=use_tma,
        WARP_SPEC=warp_spec,
        **cfg,
    )
    merge_splits(o_part, lse_part, o, lse)  # partials [T, Hq, S parts, d] -> o, lse
    return o, lse
