"""The KV tensor store: one safetensors file per segment, written atomically, checked on read.

A file holds `k` and `v` as [layers, tokens, kv_heads, head_dim] in the stored dtype. Its sha256
is returned on write and must match on read, so a torn or corrupted file is never served.

fp8 (e4m3) files also hold `k_scale` and `v_scale` [layers, kv_heads] float32: one scale per layer
and KV head of the segment, so that each head's largest magnitude maps to e4m3's largest finite
value. A file of fp8 tensors without scales (a plain cast) reads with scale 1. `read_kv(...,
dequantize=True)` gives float16: the serving layout is 16-bit (docs/CACHE.md says why).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class KVCorruptError(RuntimeError):
    """A stored KV file is missing, unreadable or does not match its checksum."""


@dataclass(frozen=True)
class StoredKV:
    path: Path
    checksum: str
    nbytes: int


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [L, n, Hkv, d] -> (e4m3 [L, n, Hkv, d], scale [L, Hkv] float32), x ~= q * scale.

    One scale per (layer, KV head): heads differ in range by orders of magnitude (a few carry the
    attention sink), layers too, while tokens of one head share a range."""
    xf = x.float()
    amax = xf.abs().amax(dim=(1, 3))  # [L, Hkv]
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (xf / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_fp8_chunks(x: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x [L, N, Hkv, d] -> (e4m3 [L, N, Hkv, d], scale [L, C, Hkv] float32), one scale per
    (layer, chunk of `chunk_size` tokens, KV head): the serving layout of an fp8 corpus, whose
    routing chunks may straddle segments (each file's own scales do not map onto them). Works a
    layer at a time: the float32 temporary is one layer, not the corpus."""
    layers, n, hkv, d = x.shape
    c = -(-n // chunk_size)
    q = torch.empty(x.shape, dtype=FP8, device=x.device)
    scale = torch.empty(layers, c, hkv, dtype=torch.float32, device=x.device)
    for i in range(layers):
        xf = torch.nn.functional.pad(x[i].float(), (0, 0, 0, 0, 0, c * chunk_size - n))
        amax = xf.view(c, chunk_size, hkv, d).abs().amax(dim=(1, 3))  # [C, Hkv]
        scale[i] = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        per_token = scale[i].repeat_interleave(chunk_size, dim=0)[:n]  # [N, Hkv]
        q[i] = (xf[:n] / per_token[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def dequantize_fp8(
    q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype = torch.float16
) -> torch.Tensor:
    """e4m3 [L, n, Hkv, d] with scale [L, Hkv] (None: 1) -> `dtype`; bfloat16 where float16 would overflow."""
    xf = q.float()
    if scale is not None:
        xf = xf * scale.float()[:, None, :, None]
    if dtype == torch.float16 and xf.numel() and xf.abs().max() > torch.finfo(torch.float16).max:
        dtype = torch.bfloat16
    return xf.to(dtype)


def write_kv(
    path: str | os.PathLike,
    k: torch.Tensor,
    v: torch.Tensor,
    metadata: dict[str, str] | None = None,
    dtype: torch.dtype | None = None,
) -> StoredKV:
    """Write k, v [L, n, Hkv, d] to `path` atomically (temporary file, fsync, rename).

    `dtype` converts first; float8_e4m3fn quantizes with per-(layer, head) scales stored beside."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor]
    if dtype == FP8 and k.dtype != FP8:
        (kq, ks), (vq, vs) = quantize_fp8(k), quantize_fp8(v)
        tensors = {"k": kq, "v": vq, "k_scale": ks, "v_scale": vs}
    else:
        tensors = {
            "k": k if dtype is None else k.to(dtype),
            "v": v if dtype is None else v.to(dtype),
        }
    data = st_save({n: t.contiguous().cpu() for n, t in tensors.items()}, metadata=metadata or {})
    checksum = hashlib.sha256(data).hexdigest()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)
    return StoredKV(path=path, checksum=checksum, nbytes=len(data))


def read_kv(
    path: str | os.PathLike, checksum: str | None, dequantize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read k, v from `path`; raise KVCorruptError unless the bytes hash to `checksum`.
    fp8 tensors come back as stored (e4m3) unless `dequantize`, which applies their scales and
    returns float16 (read_kv_tensors gives the scales themselves)."""
    tensors = read_kv_tensors(path, checksum)
    k, v = tensors["k"], tensors["v"]
    if dequantize and k.dtype == FP8:
        k = dequantize_fp8(k, tensors.get("k_scale"))
        v = dequantize_fp8(v, tensors.get("v_scale"))
    return k, v


def read_kv_tensors(path: str | os.PathLike, checksum: str | None) -> dict[str, torch.Tensor]:
    """All tensors of a verified KV file as stored (k, v and, for fp8, k_scale and v_scale)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise KVCorruptError(f"KV file {path.name} cannot be read: {e.strerror}") from e
    if checksum is not None and hashlib.sha256(data).hexdigest() != checksum:
        raise KVCorruptError(f"KV file {path.name} does not match its checksum")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise KVCorruptError(f"KV file {path.name} is not a valid safetensors file: {e}") from e
    if "k" not in tensors or "v" not in tensors:
        raise KVCorruptError(f"KV file {path.name} lacks its k or v tensor")
    return tensors
