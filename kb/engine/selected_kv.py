"""Per-request copies of the shared chunks a request chose (CPU decode of attention retrieval).

A selecting request reads the same few passages at every step and layer (kb/engine/selection.py).
On the CPU the runner copies them once per layer, float32 and already at their virtual positions
(`attention.gather_chunks`), and each step attends the copy (`attention.attend_gathered`): no
per-step gather, rotation or dtype conversion of stored KV. The copies are bounded in bytes (a
request that does not fit is served by the per-step path, with the same result) and dropped when
the request ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import attention
from kb.engine.shared_kv import SharedKV

DEFAULT_MAX_BYTES = 2 << 30  # all live requests' copies together (2 GiB)


@dataclass
class GatheredRequest:
    """One request's rows within a corpus group and its copied passages, layer by layer."""

    offset: int  # first row of the request within the group's rows
    rows: int
    seq_id: int
    selection: object  # kb.engine.selection.Selection: its chunks and shifts


@dataclass
class SelectedKV:
    """The live copies, by request: filled on first use of each layer, freed by `release`."""

    max_bytes: int = DEFAULT_MAX_BYTES
    used: int = 0
    _kv: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    _bytes: dict[int, int] = field(default_factory=dict)
    # the current decode batch's copies stacked per layer (`_stacked`), and whose they are
    _stack: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _stack_ids: tuple[int, ...] = ()

    @staticmethod
    def footprint(shared: SharedKV, num_chunks: int) -> int:
        """Bytes of one request's copies over every layer (float32 K and V)."""
        _, hkv, d = shared.k[0].shape
        return 2 * 4 * len(shared.k) * num_chunks * shared.chunk_size * hkv * d

    def admit(self, seq_id: int, nbytes: int) -> bool:
        """Reserve room for a request's copies (True if it holds or now holds them)."""
        if seq_id in self._bytes:
            return True
        if self.used + nbytes > self.max_bytes:
            return False
        self._bytes[seq_id], self._kv[seq_id] = nbytes, {}
        self.used += nbytes
        return True

    def layer(
        self, req: GatheredRequest, layer: int, shared: SharedKV, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(k^T [Hkv, d, S], v [Hkv, S, d]) of an admitted request at `layer`, copied on first use."""
        per_layer = self._kv[req.seq_id]
        kv = per_layer.get(layer)
        if kv is None:
            selection = req.selection
            k_scale, v_scale = shared.meta.k_scale, shared.meta.v_scale
            kv = attention.gather_chunks(
                shared.k[layer],
                shared.v[layer],
                selection.chunks,
                shared.chunk_size,
                selection.shift,
                inv_freq,
                k_scale=None if k_scale is None else k_scale[layer],
                v_scale=None if v_scale is None else v_scale[layer],
            )
            per_layer[layer] = kv
        return kv

    def partial(
        self,
        requests: list[GatheredRequest],
        layer: int,
        shared: SharedKV,
        q: torch.Tensor,
        inv_freq: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Partial (o, lse) of the group's rows q[T_c, Hq, d] over each request's own copy."""
        if len(requests) == 1:
            return attention.attend_gathered(q, *self.layer(requests[0], layer, shared, inv_freq))
        if all(r.rows == 1 for r in requests):  # a decode step: one batched pass
            return attention.attend_gathered_batch(
                q, *self._stacked(requests, layer, shared, inv_freq)
            )
        o = torch.empty_like(q)
        lse = torch.empty(q.shape[:2], dtype=torch.float32)
        for r in requests:
            rows = slice(r.offset, r.offset + r.rows)
            o[rows], lse[rows] = attention.attend_gathered(
                q[rows], *self.layer(r, layer, shared, inv_freq)
            )
        return o, lse

    def _stacked(
        self, requests: list[GatheredRequest], layer: int, shared: SharedKV, inv_freq: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The decoding requests' copies at `layer` as one batch, kept while the same requests
        decode together (rebuilt when one joins or leaves); each request's own entry becomes a
        view into it, so the batch costs no second copy."""
        ids = tuple(r.seq_id for r in requests)
        if self._stack_ids != ids:
            self._stack_ids, self._stack = ids, {}
        batch = self._stack.get(layer)
        if batch is None:
            copies = [self.layer(r, layer, shared, inv_freq) for r in requests]
            batch = attention.stack_gathered(copies)
            kt, v, lengths = batch
            for i, (r, n) in enumerate(zip(requests, lengths.tolist())):
                self._kv[r.seq_id][layer] = (kt[i, :, :, :n], v[i, :, :n])
            self._stack[layer] = batch
        return batch

    def release(self, seq_id: int) -> None:
        """Free a finished request's copies (a no-op for one that had none)."""
        self._kv.pop(seq_id, None)
        self.used -= self._bytes.pop(seq_id, 0)
        if seq_id in self._stack_ids:  # the batch holds its copy: drop it with the request
            self._stack_ids, self._stack = (), {}
