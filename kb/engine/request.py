"""What a caller holds for one request: a stream of text deltas, then a final event."""

from __future__ import annotations

import asyncio
import queue
from dataclasses import dataclass, field

from kb.engine.sequence import Sequence


@dataclass
class Delta:
    text: str
    token_ids: list[int]


@dataclass
class Finished:
    reason: str  # stop | length | abort | error
    text: str
    prompt_tokens: int
    completion_tokens: int
    chunk_mass: list[tuple[int, float]] = field(
        default_factory=list
    )  # (chunk, mass), heaviest first
    error: str | None = None
    error_type: str | None = None  # the exception's class name of a failed step (reason error)


class RequestHandle:
    """Events of one request, readable as a blocking iterator or as an async iterator."""

    def __init__(self, seq: Sequence, loop: asyncio.AbstractEventLoop | None = None):
        self.seq = seq
        self._loop = loop
        self._q: queue.SimpleQueue | asyncio.Queue = (
            asyncio.Queue() if loop else queue.SimpleQueue()
        )
        self.text = ""
        self.result: Finished | None = None

    def push(self, event: Delta | Finished) -> None:
        """Called by the engine thread."""
        if isinstance(event, Finished):
            self.result = event
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._q.put_nowait, event)
        else:
            self._q.put(event)

    def drain(self) -> list[Delta | Finished]:
        """Events available now, without waiting (for callers that step the engine themselves)."""
        assert self._loop is None
        out = []
        while not self._q.empty():
            out.append(self._q.get_nowait())
        return out

    def get(self) -> Delta | Finished:
        """The next event, waiting for it."""
        assert self._loop is None
        return self._q.get()

    def __iter__(self):
        assert self._loop is None, "use `async for` on a handle created inside an event loop"
        while True:
            ev = self._q.get()
            yield ev
            if isinstance(ev, Finished):
                return

    async def __aiter__(self):
        assert self._loop is not None, "handle was not created for an event loop"
        while True:
            ev = await self._q.get()
            yield ev
            if isinstance(ev, Finished):
                return
