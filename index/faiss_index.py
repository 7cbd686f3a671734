"""FAISS indexes over chunk vectors, one per (layer, KV head): exact inner product for small
corpora, IVF for large ones (DESIGN.md, `index/`).

FAISS is imported lazily: faiss-cpu installs everywhere, the GPU build is used where it is
installed, and the device serving path (`index.router`) never needs either. Search takes the same
group-summed (and, for "quest", augmented) queries as the router, so an exact index and
`Router.route` select the same chunks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from index.summaries import ChunkSummaries, group_query, query_vectors

_GPU_RES: Any = None  # one faiss.StandardGpuResources per process, made on first GPU use


def faiss_module() -> Any:
    """Import faiss on first use, with an error that says who needs it."""
    try:
        import faiss
    except ImportError as e:  # the GPU serving machine has no faiss; only index building needs it
        raise ImportError(
            "index.faiss_index needs faiss (pip install faiss-cpu); "
            "routing on the device (index.router.Router) does not"
        ) from e
    return faiss


def faiss_has_gpu() -> bool:
    """True where the installed faiss is a GPU build and sees a GPU."""
    faiss = faiss_module()
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass(frozen=True)
class IndexSettings:
    """How to index a corpus: flat exact IP up to `ivf_threshold` chunks, IVF above it."""

    ivf_threshold: int = 100_000
    nlist: int | None = None  # IVF lists; None: round(sqrt(C)), at most C // 32
    nprobe: int = 32  # IVF lists searched per query
    train_per_list: int = 64  # k-means sample per list (faiss subsamples to nlist * this)
    use_gpu: bool | None = None  # None: use a GPU when the faiss build has one
    seed: int = 1234

    def nlist_for(self, num_chunks: int) -> int:
        if self.nlist is not None:
            return max(1, min(self.nlist, num_chunks))
        return max(1, min(round(math.sqrt(num_chunks)), num_chunks // 32))


def build_index(
    vectors: np.ndarray | torch.Tensor,
    settings: IndexSettings = IndexSettings(),
    ivf: bool | None = None,
) -> Any:
    """An inner-product index over vectors[C, D]: IVF when `ivf` (None: C > ivf_threshold)."""
    faiss = faiss_module()
    x = _as_f32(vectors)
    c, dim = x.shape
    if ivf is None:
        ivf = c > settings.ivf_threshold
    if not ivf:
        index = faiss.IndexFlatIP(dim)
        index.add(x)
        return index
    nlist = settings.nlist_for(c)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.max_points_per_centroid = settings.train_per_list
    index.cp.seed = settings.seed
    index.train(x)
    index.add(x)
    index.nprobe = min(settings.nprobe, nlist)
    return index


def set_nprobe(index: Any, nprobe: int) -> None:
    """Lists an IVF index searches per query (no-op for flat indexes)."""
    if hasattr(index, "nprobe"):
        index.nprobe = min(nprobe, index.nlist)


def is_ivf(index: Any) -> bool:
    return hasattr(index, "nlist")


@dataclass
class LayerIndex:
    """The FAISS indexes of one layer and router kind: `indexes[h]` covers KV head h."""

    kind: str
    indexes: list[Any]
    use_gpu: bool = False
    _gpu: list[Any] | None = field(default=None, repr=False)

    @property
    def num_chunks(self) -> int:
        return self.indexes[0].ntotal

    @property
    def num_kv_heads(self) -> int:
        return len(self.indexes)

    def search(self, q: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top chunks for q[T, Hq, d], like `Router.route`: (idx[T,Hkv,k] int32, score[T,Hkv,k])."""
        qv = query_vectors(group_query(q, self.num_kv_heads), self.kind)
        return self.search_vectors(qv, top_k)

    def search_vectors(self, qv: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Search with ready query vectors qv[T, Hkv, D]; k = min(top_k, C), best first, -1 = none."""
        t, hkv, _ = qv.shape
        assert hkv == self.num_kv_heads, f"query has {hkv} KV heads, index {self.num_kv_heads}"
        k = min(top_k, self.num_chunks)
        x = qv.detach().to("cpu", torch.float32).numpy()
        idx = np.empty((t, hkv, k), dtype=np.int64)
        score = np.empty((t, hkv, k), dtype=np.float32)
        for h, index in enumerate(self._searchers()):
            score[:, h], idx[:, h] = index.search(np.ascontiguousarray(x[:, h]), k)
        return torch.from_numpy(idx.astype(np.int32)), torch.from_numpy(score)

    def set_nprobe(self, nprobe: int) -> None:
        for index in self.indexes + (self._gpu or []):
            set_nprobe(index, nprobe)

    def _searchers(self) -> list[Any]:
        if not self.use_gpu:
            return self.indexes
        if self._gpu is None:  # copy to the GPU once; the CPU copies stay the ones saved
            global _GPU_RES
            faiss = faiss_module()
            if _GPU_RES is None:
                _GPU_RES = faiss.StandardGpuResources()
            self._gpu = [faiss.index_cpu_to_gpu(_GPU_RES, 0, ix) for ix in self.indexes]
        return self._gpu


def build_layer(
    summaries: ChunkSummaries,
    kind: str = "mean",
    settings: IndexSettings = IndexSettings(),
    ivf: bool | None = None,
) -> LayerIndex:
    """One index per KV head over a layer's `kind` vectors."""
    vectors = summaries.vectors(kind)  # [C, Hkv, D]
    indexes = [build_index(vectors[:, h], settings, ivf) for h in range(vectors.shape[1])]
    use_gpu = faiss_has_gpu() if settings.use_gpu is None else settings.use_gpu
    return LayerIndex(kind, indexes, use_gpu)


def build_layers(
    summaries: list[ChunkSummaries],
    kinds: tuple[str, ...] = ("mean",),
    settings: IndexSettings = IndexSettings(),
    ivf: bool | None = None,
) -> dict[str, list[LayerIndex]]:
    """Indexes of a whole corpus: per router kind, one `LayerIndex` per layer."""
    return {kind: [build_layer(s, kind, settings, ivf) for s in summaries] for kind in kinds}


def save_index(index: Any, path: str | Path) -> None:
    """Write one CPU index (faiss's own binary format)."""
    faiss_module().write_index(index, str(path))


def load_index(path: str | Path) -> Any:
    return faiss_module().read_index(str(path))


def _as_f32(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    return np.ascontiguousarray(x, dtype=np.float32)
