"""The tier manager: where each corpus's shared KV lives, under byte budgets.

Three tiers, fastest first: `gpu` (the serving device: the CPU itself on CPU-only machines),
`cpu` (host memory, page-locked with `pin_memory()` when CUDA exists, so promotion is one DMA),
and `disk` (only the stored KV files). Budgets bound the first two. Making room demotes the least
recently used entries one tier down (gpu -> cpu -> disk), never a pinned entry or one in use.

Pure policy and bookkeeping: torch only moves tensors between the device and host memory. The
owner (the corpus cache) hears of every move through `on_move`, so it can unregister a corpus
that left the device and record the tier; reading files back from disk is the owner's job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

TIERS = ("gpu", "cpu", "disk")  # fastest first


class TierError(RuntimeError):
    """An operation the policy refuses: the entry is pinned, in use, unknown, or does not fit."""


@dataclass
class TierEntry:
    """One corpus's shared KV: its size, where it lives, and what the policy needs to know."""

    name: str
    nbytes: int
    tier: str = "disk"
    pinned: bool = False
    hits: int = 0
    last_use: float = 0.0  # time.time() of the last touch; 0 = never
    tensors: list[torch.Tensor] | None = field(default=None, repr=False)  # on gpu/cpu; None on disk
    in_use: Callable[[], bool] = field(default=lambda: False, repr=False, compare=False)

    def bytes_per_tier(self) -> dict[str, int]:
        """Resident bytes per memory tier (disk holds the files whatever the tier)."""
        return {t: self.nbytes if self.tier == t else 0 for t in ("gpu", "cpu")}


@dataclass(frozen=True)
class Move:
    """What happened to an entry: `src` -> `dst` (a tier name)."""

    name: str
    src: str
    dst: str


def tensors_nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class TierManager:
    """Places entries on tiers under `budgets` (bytes per memory tier; None = unbounded)."""

    def __init__(
        self,
        budgets: dict[str, int | None],
        device: str = "cpu",
        on_move: Callable[[Move], None] | None = None,
    ):
        self.budgets = {"gpu": budgets.get("gpu"), "cpu": budgets.get("cpu"), "disk": None}
        self.device = torch.device(device)
        self.on_move = on_move or (lambda _m: None)
        self.entries: dict[str, TierEntry] = {}
        self._lock = threading.RLock()

    # -- bookkeeping ------------------------------------------------------------------------
    def used(self, tier: str) -> int:
        with self._lock:
            return sum(e.nbytes for e in self.entries.values() if e.tier == tier)

    def fits(self, tier: str, nbytes: int) -> bool:
        """Whether `nbytes` fit the tier's budget at all (an empty tier)."""
        budget = self.budgets[tier]
        return budget is None or nbytes <= budget

    def track(
        self, name: str, nbytes: int, in_use: Callable[[], bool] | None = None, pinned: bool = False
    ) -> TierEntry:
        """Start (or restart) bookkeeping of `name`, on disk; a previous entry's memory is freed."""
        with self._lock:
            self.entries.pop(name, None)
            entry = TierEntry(name, nbytes, pinned=pinned, in_use=in_use or (lambda: False))
            self.entries[name] = entry
            return entry

    def get(self, name: str) -> TierEntry:
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                raise TierError(f"{name!r} has no cached KV in this process")
            return entry

    def touch(self, name: str) -> TierEntry:
        """Record a use: one more hit, most recently used now."""
        with self._lock:
            entry = self.get(name)
            entry.hits += 1
            entry.last_use = time.time()
            return entry

    def lookup(self, name: str | None = None) -> list[TierEntry]:
        """Snapshots (without tensors) of one entry or all, most recently used first."""
        with self._lock:
            entries = [self.get(name)] if name is not None else list(self.entries.values())
            return [replace(e, tensors=None) for e in sorted(entries, key=lambda e: -e.last_use)]

    def remove(self, name: str) -> TierEntry | None:
        """Forget an entry (its corpus was deleted or rebuilt); its memory goes with it."""
        with self._lock:
            return self.entries.pop(name, None)

    def pin(self, name: str, pinned: bool = True) -> TierEntry:
        with self._lock:
            entry = self.get(name)
            entry.pinned = pinned
            return entry

    # -- policy -----------------------------------------------------------------------------
    def _evictable(self, e: TierEntry) -> bool:
        return not e.pinned and not e.in_use()

    def _make_room(self, tier: str, nbytes: int, keep: str) -> bool:
        """Free `nbytes` on `tier` by demoting least recently used evictable entries (never
        `keep`); all or nothing: if even demoting every candidate is not enough, demote none."""
        budget = self.budgets[tier]
        if budget is None:
            return True
        if nbytes > budget:
            return False
        free = budget - self.used(tier)
        if free >= nbytes:
            return True
        victims = sorted(
            (
                e
                for e in self.entries.values()
                if e.tier == tier and e.name != keep and self._evictable(e)
            ),
            key=lambda e: e.last_use,
        )
        if free + sum(e.nbytes for e in victims) < nbytes:
            return False
        for v in victims:
            if free >= nbytes:
                break
            below = TIERS[TIERS.index(tier) + 1]
            self._relocate(
                v, below if below == "disk" or self._make_room(below, v.nbytes, keep) else "disk"
            )
            free += v.nbytes
        return True

    def place(self, name: str, nbytes: int, want: str = "gpu") -> str:
        """The fastest tier at or below `want` where `nbytes` fit, making room there first."""
        with self._lock:
            for tier in TIERS[TIERS.index(want) :]:
                if tier == "disk" or self._make_room(tier, nbytes, keep=name):
                    return tier
            return "disk"

    def put(self, name: str, tensors: list[torch.Tensor], want: str = "gpu") -> str:
        """Hold `tensors` for a tracked entry on the best tier `place` finds; returns it."""
        with self._lock:
            entry = self.get(name)
            entry.nbytes = tensors_nbytes(tensors)
            entry.tensors = tensors
            src, entry.tier = entry.tier, "disk"  # counted nowhere while its place is chosen
            dst = self.place(name, entry.nbytes, want)
            self._relocate(entry, dst, announce_from=src)
            return dst

    def move(self, name: str, tier: str) -> Move:
        """Move an entry up or down. Down: refused while pinned or in use. Up: needs its tensors
        (in host memory) and room; moving up from disk is the owner's reload (see `put`)."""
        if tier not in TIERS:
            raise TierError(f"unknown tier {tier!r}: one of {', '.join(TIERS)}")
        with self._lock:
            entry = self.get(name)
            src = entry.tier
            if tier == src:
                return Move(name, src, tier)
            down = TIERS.index(tier) > TIERS.index(src)
            if down and entry.pinned:
                raise TierError(f"{name!r} is pinned: unpin it first")
            if down and src == "gpu" and entry.in_use():
                raise TierError(f"{name!r} is answering questions: try again when they finish")
            if not down and entry.tensors is None:
                raise TierError(f"{name!r} is on disk: load it to move it up")
            if not down:
                entry.tier = (
                    "disk"  # its old place counts as free: promotion may swap with a victim
                )
            room = tier == "disk" or self._make_room(tier, entry.nbytes, keep=name)
            entry.tier = src
            if not room:
                raise TierError(
                    f"no room for {name!r} ({entry.nbytes / 2**20:.1f} MiB) on {tier}: "
                    f"budget {self._budget_text(tier)}, the rest pinned or in use"
                )
            self._relocate(entry, tier)
            return Move(name, src, tier)

    def evict(self, name: str) -> Move:
        """Drop an entry's memory: it stays on disk and reloads on its next use."""
        return self.move(name, "disk")

    def _budget_text(self, tier: str) -> str:
        b = self.budgets[tier]
        return (
            "unbounded"
            if b is None
            else f"{b / 2**20:.1f} MiB, {self.used(tier) / 2**20:.1f} MiB used"
        )

    def _relocate(self, entry: TierEntry, dst: str, announce_from: str | None = None) -> None:
        """Move the tensors (torch) and the bookkeeping, then tell the owner."""
        src = entry.tier if announce_from is None else announce_from
        if dst == "disk":
            entry.tensors = None
        elif entry.tensors is not None:
            entry.tensors = [self._to_tier(t, dst) for t in entry.tensors]
        entry.tier = dst
        if src != dst:
            self.on_move(Move(entry.name, src, dst))

    def _to_tier(self, t: torch.Tensor, tier: str) -> torch.Tensor:
        if tier == "gpu":
            return t.to(self.device, non_blocking=True)
        t = t.to("cpu")
        if torch.cuda.is_available() and not t.is_pinned():
            t = t.pin_memory()  # page-locked: promotion back to the device is a single DMA
        return t
