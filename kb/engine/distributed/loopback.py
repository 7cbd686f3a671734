"""World size 1: rank 0 is its own only shared rank (`LoopbackLink`).

A check of the protocol and of the sharded serving path on one device: every ATTEND still runs
the protocol's exchange over the process group (header, q and chunk-id broadcasts, gather of
the 16-bit partials; with no peer to answer, that merge gives o = 0, lse = -inf), then rank 0
attends the corpus itself exactly as a shared rank attends its slice (`worker.attend_slice`,
the same wire packing) when the exchange is collected, and merges. A citation layer's MASS runs
its exchange too, rank 0 measuring the whole corpus as a shared rank its slice
(`worker.slice_mass`, with the q of the layer's citing ATTEND) for its own entry in the gather.
`kb serve --shared-ranks 0` under torchrun (RANK set, one process) serves so;
`bench/distributed.py --shared-ranks 0` measures it.
"""

from __future__ import annotations

import torch

from kb.engine.distributed.placement import keep_preamble, place, read_slice, remote_view
from kb.engine.distributed.protocol import (
    DTYPES,
    HEADER_LEN,
    Attend,
    KVFile,
    PendingAttention,
    ShardLink,
    World,
    _Held,
    dtype_code,
    dtype_name,
)
from kb.engine.distributed.worker import ChunkRoute, CorpusSlice, attend_slice, slice_mass
from kb.engine.shared_kv import SharedKV


class LoopbackLink(ShardLink):
    """The link of a world of one: it holds each corpus's whole layout on rank 0's device (read
    from its KV files by `load`, or the registered tensors), runs each ATTEND's exchange over
    the group of one and merges its own partial. `stats` counts what one shared rank would be
    sent and return (the exchange itself has no receiver)."""

    def __init__(
        self, world: World, keepalive_s: float | None = None, rank_budget_bytes: int | None = None
    ):
        assert world.world_size == 1, "a loopback link is a world of one"
        super().__init__(world, keepalive_s, rank_budget_bytes)
        self._slices: dict[int, CorpusSlice] = {}
        self._kept: dict[int, tuple[int, torch.Tensor]] = {}  # cid -> the citing ATTEND's q

    @property
    def holders(self) -> list[int]:
        return [0]

    def _hold(self, shared: SharedKV, held: _Held, sl_k, sl_v) -> SharedKV:
        placement = place(shared.num_tokens, shared.chunk_size, [0])
        with self._lock:
            cid = self._new_id()
            self._slices[cid] = CorpusSlice(placement, placement.shard(0), sl_k, sl_v, held.dims[3])
            self._held[cid] = held
            self._placements[cid] = placement
        keep_preamble(shared)
        return remote_view(shared, placement, cid)

    def register(self, shared: SharedKV, keep: bool = True) -> SharedKV:
        k0 = shared.k[0]
        dims = (len(shared.k), k0.shape[0], k0.shape[1], k0.shape[2], shared.chunk_size)
        held = _Held(shared.key, dims, dtype_code(k0.dtype))
        return self._hold(shared, held, shared.k, shared.v)

    def load(
        self, shared: SharedKV, files: list[KVFile], via: torch.dtype, in_memory: bool = True
    ) -> tuple[SharedKV, bool]:
        """The whole layout read from `files` onto this rank's device, as a shared rank reads its
        slice (raises the file's error, KVCorruptError, when one is damaged)."""
        k0 = shared.k[0]
        dims = (len(shared.k), k0.shape[0], k0.shape[1], k0.shape[2], shared.chunk_size)
        spec = {"via": dtype_name(via), "files": [[f.path, f.checksum, f.tokens] for f in files]}
        held = _Held(shared.key, dims, dtype_code(k0.dtype), spec=spec)
        layers, n, hkv, d, chunk = dims
        kv = torch.empty(2, layers, n, hkv, d, dtype=DTYPES[held.code], device=self.world.device)
        read_slice(kv, place(n, chunk, [0]).shard(0), spec)
        return self._hold(shared, held, kv[0], kv[1]), True

    def drop(self, view: SharedKV) -> None:
        with self._lock:
            cid = view.meta.corpus_id
            self._held.pop(cid, None)
            self._placements.pop(cid, None)
            self._slices.pop(cid, None)
            self._kept.pop(cid, None)

    def _issue(self, a: Attend) -> PendingAttention:
        """The protocol's exchange over the group of one, and this rank's own partial over the
        whole corpus, computed when the exchange is collected (after the unique attention)."""
        p = super()._issue(a)
        view, layer, q, chunk_idx = a.view, a.layer, a.q, a.chunk_idx
        sl = self._slices[view.meta.corpus_id]
        route = ChunkRoute(chunk_idx, a.chunk_shift, a.rope_inv_freq)
        p.local = lambda: attend_slice(sl, layer, q, route)
        if a.cites:  # kept for the layer's MASS, as a shared rank keeps it
            self._kept[view.meta.corpus_id] = (layer, q)
        sent = HEADER_LEN * 8 + q.numel() * q.element_size()
        if chunk_idx is not None:
            sent += chunk_idx.numel() * 4
        p.bytes_out += sent
        t, hq, d = q.shape
        p.bytes_in += t * hq * (d + 2) * 2  # one 16-bit partial
        return p

    def _own_mass(
        self, view: SharedKV, layer: int, ask: torch.Tensor, owners: int, width: int
    ) -> torch.Tensor:
        """This rank's entry in the MASS gather: the whole corpus's mass, measured with the q of
        the layer's citing ATTEND, as a shared rank measures its slice."""
        cid = view.meta.corpus_id
        _, q = self._kept[cid]
        return slice_mass(self._slices[cid], layer, q, ask, owners, view.preamble_len, width)
