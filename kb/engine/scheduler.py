"""Continuous batching: which sequences run this step, and how many new tokens each brings.

Decoding sequences come first (one token each); new requests are admitted while the unique-KV
blocks and the step's token budget allow, their prompts prefilled in chunks mixed with decode
steps. When blocks run out, the most recently admitted sequence is preempted: its blocks are
freed and it waits to be recomputed from its tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from kb.engine.block_manager import BlockManager
from kb.engine.sequence import SeqStatus, Sequence


class RequestTooLong(ValueError):
    """A request's tokens can never fit the unique-KV cache."""


@dataclass
class Batch:
    seqs: list[Sequence]
    num_new: list[int]  # new tokens of each sequence this step

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def samples(self, i: int) -> bool:
        """Does sequence i produce a token this step (its prompt is complete after it)?"""
        s = self.seqs[i]
        return s.num_computed + self.num_new[i] >= s.num_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int = 64, max_batch_tokens: int = 2048):
        self.blocks = blocks
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0  # since start, for the engine's metrics

    def add(self, seq: Sequence) -> None:
        total = len(seq.prompt_ids) + seq.sampling.max_tokens
        if -(-total // self.blocks.block_size) > self.blocks.num_blocks:
            raise RequestTooLong(
                f"request needs {total} unique tokens; the unique-KV cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}"
            )
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def abort(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = seq.finish_reason or "abort"

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self.running.remove(seq)
        self.blocks.release(seq)  # its tokens (prompt and answer so far) are recomputed on return
        seq.status = SeqStatus.WAITING
        self.waiting.appendleft(seq)

    def schedule(self) -> Batch:
        seqs: list[Sequence] = []
        num_new: list[int] = []
        budget = self.max_batch_tokens
        # 1. running sequences: one decode token, or the next chunk of their prompt
        for seq in list(self.running):
            if seq not in self.running:
                continue  # preempted by an earlier iteration
            n = min(seq.num_pending, budget)
            if n <= 0:
                continue
            while not self.blocks.can_allocate(seq, seq.num_computed + n):
                victim = self.running[-1]
                if victim is seq and len(self.running) == 1:
                    raise RuntimeError("unique-KV cache too small for a single sequence")
                self._preempt(victim)
                if victim is seq:
                    break
            if seq not in self.running:
                continue
            self.blocks.allocate(seq, seq.num_computed + n)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        # 2. admit waiting sequences while blocks, slots and token budget last
        while self.waiting and budget > 0 and len(self.running) < self.max_running:
            seq = self.waiting[0]
            n = min(seq.num_pending, budget)
            if not self.blocks.can_allocate(seq, n):
                break
            self.waiting.popleft()
            self.blocks.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            num_new.append(n)
            budget -= n
        return Batch(seqs, num_new)

    def postprocess(self, batch: Batch) -> None:
        """Advance computed counts; drop finished sequences and free their blocks."""
        for seq, n in zip(batch.seqs, batch.num_new):
            seq.num_computed += n
        for seq in batch.seqs:
            if seq.is_finished and seq in self.running:
                self.running.remove(seq)
                self.blocks.release(seq)
