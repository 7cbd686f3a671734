"""The checks and outputs every routed kernel starts from (scatter, union and grouped designs),
and the tiling of the CSR plans that the scatter and grouped designs build."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .launch import LOG2E, cdiv, check_device, chunk_scales, dot_dtype, strides


@dataclass
class RoutedCall:
    q: torch.Tensor  # contiguous inputs
    k: torch.Tensor
    v: torch.Tensor
    t: int
    hq: int
    d: int
    n: int
    hkv: int
    top_k: int
    g: int  # query heads per KV head
    scale: float
    num_chunks: int
    o: torch.Tensor  # [T, Hq, d], to be written
    lse: torch.Tensor  # [T, Hq] float32
    interp: bool  # running under Triton's interpreter

    def unpack(self) -> tuple:
        return (
            self.q,
            self.k,
            self.v,
            self.t,
            self.hq,
            self.d,
            self.n,
            self.hkv,
            self.top_k,
            self.g,
            self.scale,
            self.num_chunks,
            self.o,
            self.lse,
            self.interp,
        )


@dataclass
class Operands:
    """What every routed kernel is launched with around its own arguments (_triton.py's
    conventions): `io` first (q, k, v, the fp8 scales, the partial o and lse), then, after the
    kernel's own, `qk_scale` (log2 units) and `strides` (of q, k, v and the scales), and the
    constexprs of the operand types (`consts`: KV_SCALE, DOT)."""

    io: tuple[torch.Tensor, ...]
    qk_scale: float
    strides: tuple[tuple[int, ...], ...]
    consts: dict


def operands(
    call: RoutedCall,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
) -> Operands:
    """A routed kernel's operands writing its partials to (o_part, lse_part); without fp8
    scales `lse_part` stands in for them (never read)."""
    q, k, v = call.q, call.k, call.v
    ks, vs, ss = chunk_scales(k_scale, v_scale, call.num_chunks, call.hkv, lse_part)
    return Operands(
        (q, k, v, ks, vs, o_part, lse_part),
        call.scale * LOG2E,
        (*strides(q, k, v), ss),
        dict(KV_SCALE=k_scale is not None, DOT=dot_dtype(q.dtype, q.device, k.dtype)),
    )


def slot_partials(call: RoutedCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(o_part[T, Hkv, top_k, G, d] in q's dtype, lse_part[T, Hkv, top_k, G] float32): a partial
    per (token, KV head, slot, g), the scatter and grouped designs' output; padding slots are
    never written: their lse stays -inf and the merge skips them."""
    q = call.q
    o_part = torch.empty(
        call.t, call.hkv, call.top_k, call.g, call.d, dtype=q.dtype, device=q.device
    )
    lse_part = torch.full(
        (call.t, call.hkv, call.top_k, call.g), float("-inf"), dtype=torch.float32, device=q.device
    )
    return o_part, lse_part


def prepare_routed(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    chunk_idx: torch.Tensor,
    chunk_size: int,
    scale: float | None,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> tuple[RoutedCall, bool]:
    """Check a routed call's shapes and allocate its outputs; `done` is True when the outputs
    are already the answer (no query tokens, no keys, or no chunk chosen)."""
    check_device(q)
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    top_k = chunk_idx.shape[-1]
    assert chunk_idx.shape[:2] == (t, hkv), (chunk_idx.shape, q.shape, k.shape)
    assert hq % hkv == 0 and d in (16, 32, 64, 128, 256)
    assert (k_scale is None) == (v_scale is None)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    assert scale > 0, "the kernel takes row maxima of unscaled scores"
    o = torch.empty(t, hq, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(t, hq, dtype=torch.float32, device=q.device)
    call = RoutedCall(
        q.contiguous(),
        k.contiguous(),
        v.contiguous(),
        t,
        hq,
        d,
        n,
        hkv,
        top_k,
        hq // hkv,
        scale,
        cdiv(n, chunk_size),
        o,
        lse,
        q.device.type != "cuda",
    )
    if t == 0:
        return call, True
    if n == 0 or top_k == 0:
        o.zero_()
        lse.fill_(float("-inf"))
        return call, True
    return call, False


def group_tiles(
    sorted_group: torch.Tensor, num_groups: int, group_size: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR offsets and tiles of a plan's entries, on their device with no host sync.

    sorted_group[E]: each entry's group, sorted (num_groups: padding, last); an entry is
    group_size rows and a tile block_m rows of one group. Returns (offsets, tile_group,
    tile_start, tile_end):
      offsets[num_groups + 1]: group g's entries are [offsets[g], offsets[g + 1]);
      tile_group[max_tiles]: the group of each tile (num_groups past the live tiles), max_tiles a
        bound from shapes alone;
      tile_start[num_groups], tile_end[num_groups]: each group's first tile and one past its last
        (tile_end[-1]: the live tiles).
    """
    dev = sorted_group.device
    # offsets by binary search in the sorted keys (bincount would sync with the host)
    offsets = torch.searchsorted(sorted_group, torch.arange(num_groups + 1, device=dev))
    counts = offsets[1:] - offsets[:-1]
    tiles = (counts * group_size + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    tile_start = tile_end - tiles
    # sum_g ceil(rows_g / block_m) <= rows / block_m + (non-empty groups): a bound from shapes
    entries = sorted_group.numel()
    max_tiles = max(1, cdiv(entries * group_size, block_m) + min(num_groups, entries))
    tile_group = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev), right=True)
    return offsets, tile_group, tile_start, tile_end
