"""Save and load a corpus's chunk summaries and FAISS indexes beside its KV files.

Layout of a corpus's index folder (e.g. `<corpus kv dir>/index`):
    manifest.json                 format version, shapes, router kinds, index settings, checksums
    summaries.safetensors         L{l}.mean / L{l}.kmin / L{l}.kmax, float32 [C, Hkv, d]
    faiss/{kind}.L{l}.H{h}.faiss  one faiss.write_index file per (kind, layer, KV head)
The folder is written under a temporary name and renamed into place, so readers see either the
old index or the complete new one. Summaries load without faiss (the GPU serving path).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from index.faiss_index import LayerIndex, faiss_has_gpu, is_ivf, load_index, save_index
from index.summaries import KINDS, ChunkSummaries

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SUMMARIES = "summaries.safetensors"


class IndexFormatError(RuntimeError):
    """A stored index this code cannot read: missing, another format version, or corrupt."""


@dataclass
class Manifest:
    """What a stored index holds; `files` maps each relative path to its sha256."""

    format_version: int
    chunk_size: int
    num_tokens: int
    num_layers: int
    num_chunks: int
    num_kv_heads: int
    head_dim: int
    kinds: list[str]  # router kinds with FAISS indexes stored
    index_types: dict[str, list[str]]  # kind -> per layer "flat" | "ivf"
    nprobe: dict[str, int]  # kind -> nprobe the IVF indexes were saved with (0: all flat)
    files: dict[str, str] = field(default_factory=dict)


@dataclass
class CorpusIndex:
    """A loaded index folder: per-layer summaries and, per kind, per-layer FAISS indexes."""

    manifest: Manifest
    summaries: list[ChunkSummaries]
    layers: dict[str, list]  # kind -> list[index.faiss_index.LayerIndex]


def save(
    folder: str | Path, summaries: Sequence[ChunkSummaries], layers: dict[str, list] | None = None
) -> Manifest:
    """Write summaries (and FAISS `layers` from `faiss_index.build_layers`, if given) to `folder`."""
    assert summaries, "no layers"
    folder = Path(folder)
    s0 = summaries[0]
    for s in summaries:
        assert (s.mean.shape, s.chunk_size, s.num_tokens) == (
            s0.mean.shape,
            s0.chunk_size,
            s0.num_tokens,
        ), "layers differ"
    layers = layers or {}
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "faiss").mkdir(parents=True)

    tensors = {}
    for li, s in enumerate(summaries):
        for name in ("mean", "kmin", "kmax"):
            tensors[f"L{li}.{name}"] = (
                getattr(s, name).detach().to("cpu", torch.float32).contiguous()
            )
    save_file(tensors, str(tmp / SUMMARIES), metadata={"format_version": str(FORMAT_VERSION)})

    index_types: dict[str, list[str]] = {}
    nprobe: dict[str, int] = {}
    for kind, per_layer in layers.items():
        assert kind in KINDS and len(per_layer) == len(summaries), f"bad indexes for {kind!r}"
        index_types[kind] = []
        nprobe[kind] = 0
        for li, layer in enumerate(per_layer):
            assert layer.num_chunks == s0.num_chunks and layer.num_kv_heads == s0.num_kv_heads
            index_types[kind].append("ivf" if is_ivf(layer.indexes[0]) else "flat")
            for h, ix in enumerate(layer.indexes):
                save_index(ix, tmp / _faiss_name(kind, li, h))
                nprobe[kind] = max(nprobe[kind], getattr(ix, "nprobe", 0))

    files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    manifest = Manifest(
        FORMAT_VERSION,
        s0.chunk_size,
        s0.num_tokens,
        len(summaries),
        s0.num_chunks,
        s0.num_kv_heads,
        s0.head_dim,
        sorted(layers),
        index_types,
        nprobe,
        {f: _sha256(tmp / f) for f in files},
    )
    (tmp / MANIFEST).write_text(json.dumps(asdict(manifest), indent=1))

    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def read_manifest(folder: str | Path) -> Manifest:
    """The manifest of a stored index; refuses a missing one or another format version."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise IndexFormatError(f"no index manifest at {path}; build the corpus index first")
    raw = json.loads(path.read_text())
    version = raw.get("format_version")
    if version != FORMAT_VERSION:
        raise IndexFormatError(
            f"index at {folder} has format version {version!r}; this code reads version "
            f"{FORMAT_VERSION}. Rebuild the corpus index (precompute) to upgrade it."
        )
    return Manifest(**raw)


def load_summaries(
    folder: str | Path, device: torch.device | str = "cpu", verify: bool = True
) -> list[ChunkSummaries]:
    """Per-layer summaries of a stored index, checked against the manifest; needs no faiss."""
    folder = Path(folder)
    m = read_manifest(folder)
    if verify:
        _verify(folder, m, [SUMMARIES])
    t = load_file(str(folder / SUMMARIES), device=str(device))
    out = []
    for li in range(m.num_layers):
        s = ChunkSummaries(
            t[f"L{li}.mean"], t[f"L{li}.kmin"], t[f"L{li}.kmax"], m.chunk_size, m.num_tokens
        )
        if s.mean.shape != (m.num_chunks, m.num_kv_heads, m.head_dim):
            raise IndexFormatError(
                f"layer {li} summaries have shape {tuple(s.mean.shape)}, "
                f"manifest says {(m.num_chunks, m.num_kv_heads, m.head_dim)}"
            )
        out.append(s)
    return out


def load(
    folder: str | Path,
    kinds: Sequence[str] | None = None,
    verify: bool = True,
    use_gpu: bool | None = None,
) -> CorpusIndex:
    """Summaries and FAISS indexes of `kinds` (None: all stored) from a stored index folder."""
    folder = Path(folder)
    m = read_manifest(folder)
    kinds = list(m.kinds if kinds is None else kinds)
    missing = [k for k in kinds if k not in m.kinds]
    if missing:
        raise IndexFormatError(
            f"index at {folder} has no FAISS indexes for {missing}; it stores {m.kinds}"
        )
    names = [
        _faiss_name(k, li, h)
        for k in kinds
        for li in range(m.num_layers)
        for h in range(m.num_kv_heads)
    ]
    if verify:
        _verify(folder, m, names)
    summaries = load_summaries(folder, verify=verify)
    gpu = faiss_has_gpu() if use_gpu is None else use_gpu
    layers = {
        k: [
            LayerIndex(
                k, [load_index(folder / _faiss_name(k, li, h)) for h in range(m.num_kv_heads)], gpu
            )
            for li in range(m.num_layers)
        ]
        for k in kinds
    }
    return CorpusIndex(m, summaries, layers)


def _faiss_name(kind: str, layer: int, head: int) -> str:
    return f"faiss/{kind}.L{layer}.H{head}.faiss"


def _verify(folder: Path, m: Manifest, names: Sequence[str]) -> None:
    for name in names:
        want = m.files.get(name)
        if want is None or not (folder / name).is_file():
            raise IndexFormatError(f"index at {folder} lacks {name}")
        if _sha256(folder / name) != want:
            raise IndexFormatError(f"index file {folder / name} does not match its checksum")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
