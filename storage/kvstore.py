"""The KV tensor store: one safetensors file per segment, written atomically, checked on read.

A file holds `k` and `v` as [layers, tokens, kv_heads, head_dim] in the stored dtype. Its sha256
is returned on write and must match on read, so a torn or corrupted file is never served.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save


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


def write_kv(path: str | os.PathLike, k: torch.Tensor, v: torch.Tensor, metadata: dict[str, str] | None = None
             ) -> StoredKV:
    """Write k, v [L, n, Hkv, d] to `path` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = st_save({"k": k.contiguous().cpu(), "v": v.contiguous().cpu()}, metadata=metadata or {})
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


def read_kv(path: str | os.PathLike, checksum: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Read k, v from `path`; raise KVCorruptError unless the bytes hash to `checksum`."""
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
    return tensors["k"], tensors["v"]
