"""The tier manager's policy: budgets, least recently used first, never pinned or in use; and
fp8 KV files round-tripping through the store."""

from __future__ import annotations

import pytest
import torch

from storage.kvstore import FP8, read_kv, read_kv_tensors, write_kv
from storage.tiers import Move, TierError, TierManager

UNIT = 400  # bytes of one test layout: 100 float32


def layout() -> list[torch.Tensor]:
    return [torch.ones(100)]


def manager(gpu_units: float, cpu_units: float) -> tuple[TierManager, list[Move]]:
    moves: list[Move] = []
    return TierManager(
        {"gpu": int(gpu_units * UNIT), "cpu": int(cpu_units * UNIT)}, "cpu", moves.append
    ), moves


def add(tm: TierManager, name: str, in_use=None, pinned: bool = False) -> str:
    tm.track(name, 0, in_use=in_use, pinned=pinned)
    tier = tm.put(name, layout())
    tm.touch(name)
    return tier


def tiers(tm: TierManager) -> dict[str, str]:
    return {e.name: e.tier for e in tm.lookup()}


def test_least_recently_used_moves_down_one_tier_at_a_time():
    tm, moves = manager(gpu_units=2, cpu_units=1)
    assert add(tm, "a") == "gpu" and add(tm, "b") == "gpu"
    tm.touch("a")  # b is now the least recently used
    assert add(tm, "c") == "gpu"
    assert tiers(tm) == {"a": "gpu", "b": "cpu", "c": "gpu"}
    assert Move("b", "gpu", "cpu") in moves
    assert add(tm, "d") == "gpu"  # a goes down; the host is full, so b goes on to disk
    assert tiers(tm) == {"a": "cpu", "b": "disk", "c": "gpu", "d": "gpu"}
    assert tm.get("b").tensors is None and tm.get("a").tensors is not None
    assert tm.used("gpu") == 2 * UNIT and tm.used("cpu") == UNIT
    assert tm.get("a").bytes_per_tier() == {"gpu": 0, "cpu": UNIT}


def test_an_entry_larger_than_the_device_budget_goes_to_host_memory():
    tm, _ = manager(gpu_units=0.5, cpu_units=4)
    assert add(tm, "big") == "cpu"
    with pytest.raises(TierError, match="no room"):
        tm.move("big", "gpu")


def test_pinned_entries_are_never_evicted():
    tm, _ = manager(gpu_units=2, cpu_units=0)
    add(tm, "a", pinned=True)
    add(tm, "b")
    tm.pin("b")
    assert add(tm, "c") == "disk"  # no room on the device or the host: nothing pinned moved
    assert tiers(tm)["a"] == "gpu" and tiers(tm)["b"] == "gpu"
    with pytest.raises(TierError, match="pinned"):
        tm.evict("a")
    tm.pin("b", False)
    tm.track("c", 0)
    assert tm.put("c", layout()) == "gpu"  # b, unpinned, made room
    assert tiers(tm) == {"a": "gpu", "b": "disk", "c": "gpu"}


def test_entries_in_use_are_never_evicted():
    busy = {"a": True}
    tm, _ = manager(gpu_units=1, cpu_units=1)
    add(tm, "a", in_use=lambda: busy["a"])
    assert add(tm, "b") == "cpu"  # a answers questions: b waits in host memory
    with pytest.raises(TierError, match="answering"):
        tm.evict("a")
    with pytest.raises(TierError, match="no room"):
        tm.move("b", "gpu")
    busy["a"] = False
    assert tm.move("b", "gpu") == Move("b", "cpu", "gpu")
    assert tiers(tm) == {"a": "cpu", "b": "gpu"}


def test_explicit_moves_and_evict():
    tm, moves = manager(gpu_units=4, cpu_units=4)
    add(tm, "a")
    assert tm.move("a", "cpu") == Move("a", "gpu", "cpu")
    assert tm.move("a", "gpu") == Move("a", "cpu", "gpu")
    assert tm.evict("a") == Move("a", "gpu", "disk")
    with pytest.raises(TierError, match="on disk"):
        tm.move("a", "gpu")  # the owner reloads it from its files
    with pytest.raises(TierError, match="unknown tier"):
        tm.move("a", "tape")
    assert [m.dst for m in moves] == ["gpu", "cpu", "gpu", "disk"]


@pytest.mark.parametrize("scale", [1e-3, 1.0, 300.0, 5e3])
def test_fp8_files_round_trip_within_e4m3_precision(tmp_path, scale):
    torch.manual_seed(0)
    # heads of very different ranges: each gets its own scale
    k = (
        torch.randn(3, 50, 4, 16)
        * torch.tensor([scale, scale * 20, scale / 50, scale])[None, None, :, None]
    )
    v = torch.randn(3, 50, 4, 16) * scale
    stored = write_kv(tmp_path / "seg.safetensors", k, v, dtype=FP8)
    raw = read_kv_tensors(stored.path, stored.checksum)
    assert raw["k"].dtype == FP8 and raw["k_scale"].shape == (3, 4)
    assert stored.nbytes < k.numel() * 2 + 4096  # one byte per element plus header and scales
    k2, v2 = read_kv(stored.path, stored.checksum, dequantize=True)
    assert k2.dtype in (torch.float16, torch.bfloat16)
    for x, y in ((k, k2), (v, v2)):
        amax = x.abs().amax(dim=(1, 3), keepdim=True)  # per layer and head
        err = ((y.float() - x) / amax).abs().max().item()
        assert err < 1 / 16, err  # e4m3: 3 mantissa bits, relative to each head's range


@pytest.mark.parametrize("n, chunk", [(50, 16), (64, 16), (7, 64)])
def test_fp8_chunk_scales_round_trip_through_the_attention_dequantize(n, chunk):
    """The serving layout of an fp8 corpus: one scale per (layer, chunk, head), which
    `attention.reference.dequantize` (the kernels' contract) undoes chunk by chunk."""
    from attention.reference import dequantize
    from storage.kvstore import quantize_fp8_chunks

    torch.manual_seed(1)
    ranges = torch.logspace(-3, 3, n)[None, :, None, None]  # tokens of very different sizes
    x = torch.randn(2, n, 3, 8) * ranges
    q, scale = quantize_fp8_chunks(x, chunk)
    c = -(-n // chunk)
    assert q.dtype == FP8 and scale.shape == (2, c, 3)
    for layer in range(2):
        y = dequantize(q[layer], scale[layer], chunk)
        for i in range(c):  # relative to each chunk's own range: finer than one scale per head
            a, b = i * chunk, min(n, (i + 1) * chunk)
            amax = x[layer, a:b].abs().amax(dim=(0, 2), keepdim=True)
            assert ((y[a:b] - x[layer, a:b]) / amax).abs().max() < 1 / 16


def test_fp8_without_scales_reads_as_a_plain_cast(tmp_path):
    k = torch.randn(1, 8, 2, 4)
    stored = write_kv(tmp_path / "seg.safetensors", k.to(FP8), k.to(FP8))
    k2, _ = read_kv(stored.path, stored.checksum, dequantize=True)
    torch.testing.assert_close(k2.float(), k.to(FP8).float())
