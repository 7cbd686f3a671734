"""Host-side helpers every kernel launch shares: the device check, grid arithmetic (cdiv, the
device's SM count), the dot operand type, stride tuples and the fp8 scales' layout the
routed kernels read. The kernels' own device-side helpers are in _triton.py."""

from __future__ import annotations

import functools

import torch

from ._triton import HAS_TRITON, interpreting, tl

LOG2E = 1.4426950408889634  # the kernels' softmax runs in log2 units: qk_scale = scale * LOG2E


def strides(*tensors: torch.Tensor, dims: int = 2) -> tuple[tuple[int, ...], ...]:
    """The first `dims` strides of each tensor, one tuple per tensor: the kernels' stride
    arguments (see _triton.py's conventions)."""
    return tuple(tuple(t.stride(i) for i in range(dims)) for t in tensors)


def chunk_scales(
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    num_chunks: int,
    hkv: int,
    unused: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(ks, vs, their strides per chunk and head) of fp8 KV's scales as the routed kernels read
    them: float32 [C, Hkv], a per-head scale broadcast over the chunks; without scales, `unused`
    (never read) twice and strides 0."""
    if k_scale is None:
        return unused, unused, (0, 0)
    ks, vs = k_scale.float(), v_scale.float()
    if ks.dim() == 1:  # per head: the same factor for every chunk
        ks, vs = ks.expand(num_chunks, hkv), vs.expand(num_chunks, hkv)
    assert vs.stride() == ks.stride()
    return ks, vs, (ks.stride(0), ks.stride(1))


def check_device(t: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed: use attention.reference")
    if t.device.type != "cuda" and not interpreting():
        raise RuntimeError(
            "Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 set before "
            "triton is imported (CPU interpreter)"
        )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sms(device: torch.device) -> int:
    """Streaming multiprocessors of `device`; a small stand-in under the interpreter, so the
    split paths are exercised with few programs."""
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def dot_dtype(q_dtype: torch.dtype, device: torch.device, kv_dtype: torch.dtype | None = None):
    """Operand type of every tl.dot: q's 16-bit type on the GPU, float32 under the interpreter
    (its tl.dot on bf16 is wrong in triton 3.6: numpy multiplies the raw 16-bit patterns).

    fp8 KV runs its products in fp16 whatever q's type: e4m3 -> fp16 is one exact conversion
    instruction per pair (-> bf16 takes a detour through fp32), and bf16 q converts to fp16
    exactly within fp16's range (|q| < 65504), with more mantissa for the probabilities."""
    if device.type != "cuda" or interpreting():
        return tl.float32
    if kv_dtype is not None and kv_dtype.itemsize == 1:
        return tl.float16
    return tl.bfloat16 if q_dtype == torch.bfloat16 else tl.float16
