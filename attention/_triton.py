"""Shared plumbing of the Triton kernels: availability, interpreter mode, device facts, and the
`@triton.jit` pieces every kernel is built from (the query tile, the online softmax, K/V and
fp8-scale loads, the partial stores).

Argument conventions of every kernel: a tensor's strides travel as one tuple, outermost
dimension first (`sq = (per token, per head)`, `sk = (per key, per head)`, `ss = (per chunk,
per head)`, `so = (per token, per head, per split)`; `launch.strides` builds them), and the
routed kernels take their common operands as one tuple `IO = (Q, K, V, KS, VS, O, LSE)` (the
dense kernel takes them one by one: its K and V may be TMA descriptors, which Triton's launcher
does not accept inside a tuple).
Triton specializes each member of a tuple as it does a plain argument (a stride of 1 becomes a
constant), so the compiled kernels are the ones flat arguments gave.

On a GPU the kernels compile. Without one they run under Triton's interpreter (the same kernel
source, executed with numpy), which is how the parity tests run in CI: the interpreter must be
chosen before triton is imported (TRITON_INTERPRET=1), because `tl.sum`, `tl.zeros`, ... are
themselves jitted functions bound at import. Nothing in `attention/__init__.py` imports triton
until a CUDA tensor arrives, so a test module can still set the variable first.
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton is a dev dependency; the CPU path needs none
    triton = None
    tl = None
    HAS_TRITON = False


def interpreting() -> bool:
    """True when the kernels were built for Triton's CPU interpreter."""
    if not HAS_TRITON:
        return False
    try:
        return bool(triton.knobs.runtime.interpret)
    except AttributeError:  # pragma: no cover - older triton
        return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _patch_interpreter_for_numpy2() -> None:
    """Triton 3.6's interpreter turns a scalar (a 1-element array) into a Python int with
    `int(array)`, which NumPy >= 2.3 refuses for arrays of ndim > 0: every `range(lo, hi)` with
    run-time bounds then fails. Re-bind that one conversion through `.item()`."""
    import numpy as np
    from triton.runtime import interpreter

    try:
        int(np.zeros(1, dtype=np.int32))
        return  # this NumPy still converts
    except TypeError:
        pass
    if getattr(interpreter, "_kb_index_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
    interpreter._kb_index_patched = True


if interpreting():
    _patch_interpreter_for_numpy2()


if HAS_TRITON:

    @triton.jit
    def softmax_update(
        m_i,
        l_i,
        acc,
        qk,
        v,
        qk_scale,
        vs,
        DOT: tl.constexpr,
        KV_SCALE: tl.constexpr,
        MAY_BE_EMPTY: tl.constexpr,
    ):
        """One K/V tile of the online softmax, in log2 units (exp2 is the native instruction):
        (m, l, acc) of the rows so far and the tile's raw scores qk (masked keys -inf) ->
        the updated (m, l, acc). The scale is folded into one FMA per score (qk * scale - m);
        `vs` (KV_SCALE: fp8 values' scale, broadcastable to p) multiplies the probabilities
        after they are summed. MAY_BE_EMPTY: a row may have seen no key yet (m = -inf), so the
        reference point is 0 there and exp2 stays finite."""
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        if MAY_BE_EMPTY:
            m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_ref = m_new
        alpha = tl.exp2(m_i - m_ref)  # rescales what was summed so far
        p = tl.exp2(qk * qk_scale - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if KV_SCALE:
            p = p * vs
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT))
        return m_new, l_i, acc

    @triton.jit
    def softmax_finish(m_i, l_i, acc, MAY_BE_EMPTY: tl.constexpr):
        """(m, l, acc) -> (o, lse): the normalized output and the natural-log normalizer.
        MAY_BE_EMPTY: a row that saw no key (l = 0) gets o = 0 and lse = -inf (merges skip it)."""
        if MAY_BE_EMPTY:
            has = l_i > 0
            o = acc / tl.where(has, l_i, 1.0)[:, None]
            lse = tl.where(
                has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf")
            )
        else:
            o = acc / l_i[:, None]
            lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
        return o, lse

    @triton.jit
    def load_kv(K, V, h, offs_n, offs_d, n_ok, sk, sv):
        """The K and V tiles [BLOCK_N, D] at key rows offs_n of KV head h (sk, sv: K's and V's
        strides per key and per head); rows outside n_ok read 0."""
        Kh, Vh = K + h * sk[1], V + h * sv[1]
        k = tl.load(Kh + offs_n[:, None] * sk[0] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        v = tl.load(Vh + offs_n[:, None] * sv[0] + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        return k, v

    @triton.jit
    def load_page_tile(C, page, slot, h, sc, offs_d, n_ok):
        """A paged cache's tile [BLOCK_N, D] of KV head h: row i is slot[i] of page[i] (sc: the
        cache's strides per page, slot and head); rows outside n_ok read 0 (the paged kernel's
        K and V)."""
        return tl.load(
            C + page[:, None] * sc[0] + slot[:, None] * sc[1] + h * sc[2] + offs_d[None, :],
            mask=n_ok[:, None],
            other=0.0,
        )

    @triton.jit
    def load_q_rows(Q, t, hq, row_ok, offs_d, sq):
        """The query tile [BLOCK_M, D] every kernel starts from: row i is query head hq[i] of
        token t[i], its columns offs_d (sq: Q's strides per token and head); rows outside row_ok
        read 0 (the caller casts to DOT)."""
        return tl.load(
            Q + t[:, None] * sq[0] + hq[:, None] * sq[1] + offs_d[None, :],
            mask=row_ok[:, None],
            other=0.0,
        )

    @triton.jit
    def softmax_start(BLOCK_M: tl.constexpr, D: tl.constexpr):
        """(m, l, acc) of BLOCK_M rows that have seen no key yet, for `softmax_update`: running
        max -inf (log2 units), sum of exp2 0, output accumulator 0 [BLOCK_M, D] (float32)."""
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        return m_i, l_i, acc

    @triton.jit
    def load_chunk_scales(KS, VS, c, h, ss):
        """fp8 KV: the (key, value) scales of chunk c of KV head h (ss: their strides per chunk
        and head), one factor each that folds into the scores and the probabilities
        (launch.chunk_scales lays them out)."""
        off = c * ss[0] + h * ss[1]
        return tl.load(KS + off), tl.load(VS + off)

    @triton.jit
    def store_rows(row_ptrs, o, row_ok, offs_d):
        """A tile o [BLOCK_M, D] to memory: row i at row_ptrs[i] + offs_d (tl.store converts to
        the pointers' type); rows outside row_ok are not written."""
        tl.store(row_ptrs[:, None] + offs_d[None, :], o, mask=row_ok[:, None])

    @triton.jit
    def store_split_rows(O, LSE, o, lse, t, hq, s, row_ok, offs_d, so, sl):
        """The split kernels' output of each row: O[t, hq, s, :] = o and LSE[t, hq, s] = lse
        (so, sl: their strides per token, head and split; split stride 0 when the kernel
        writes the final output); merged by combine.merge_splits."""
        store_rows(O + t * so[0] + hq * so[1] + s * so[2], o, row_ok, offs_d)
        tl.store(LSE + t * sl[0] + hq * sl[1] + s * sl[2], lse, mask=row_ok)

    @triton.jit
    def store_slot_partial(
        OP, LP, o, lse, ent, g, row_ok, offs_d, G: tl.constexpr, D: tl.constexpr
    ):
        """The routed kernels' partial of each row: OP[ent, g, :] = o (in OP's type) and
        LP[ent, g] = lse, ent the row's flat (token, KV head, slot) entry, g its member of the GQA
        group (64-bit ent: the partials can pass 2^31 elements); merged by combine.merge_slots."""
        store_rows(OP + (ent * G + g) * D, o, row_ok, offs_d)
        tl.store(LP + ent * G + g, lse, mask=row_ok)

else:  # pragma: no cover - no kernels without triton
    softmax_update = softmax_finish = load_kv = None
    load_q_rows = softmax_start = load_chunk_scales = store_rows = store_slot_partial = None
    store_split_rows = load_page_tile = None
