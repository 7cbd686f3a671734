"""The HTTP client the CLI uses to act through a running `kb serve`: cache operations, corpus
names, and streamed chat answers. One client for every command given `--server` (or KB_SERVER).

The API key comes from `KB_API_KEY` when sign-in is on. httpx is imported on first use, so
commands that never talk to a server pay nothing for it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from kb.errors import KBError, NotFound

DEFAULT_PROBE_S = 0.3  # how long the default address may take to answer /healthz


@dataclass
class ChatReply:
    """A whole answer as the server streamed it: text, citations, usage, why it ended."""

    answer: str = ""
    citations: list[dict] = field(default_factory=list)
    usage: dict = field(default_factory=dict)
    finish_reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class ServerClient:
    """A running server's API (`kb serve`), for commands that act through it."""

    def __init__(self, url: str, timeout_s: float = 30.0):
        import httpx

        key = os.environ.get("KB_API_KEY")
        self.url = url.rstrip("/")
        self.client = httpx.Client(
            base_url=self.url,
            timeout=timeout_s,
            headers={"Authorization": f"Bearer {key}"} if key else {},
        )

    def close(self) -> None:
        self.client.close()

    @staticmethod
    def _error(r) -> str:
        try:
            body = r.json()
            return (body.get("error") or {}).get("message") or body.get("detail") or r.text
        except ValueError:
            return r.text

    def _json(self, method: str, path: str, **kw) -> dict:
        import httpx

        try:
            r = self.client.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise KBError(f"cannot reach the server at {self.url}: {e}") from e
        if r.status_code >= 400:
            raise (NotFound if r.status_code == 404 else KBError)(
                f"server said {r.status_code}: {self._error(r)}"
            )
        return r.json()

    # -- health and names ------------------------------------------------------------------------
    def healthy(self, timeout_s: float = DEFAULT_PROBE_S) -> bool:
        """Whether a kb server answers /healthz within `timeout_s`."""
        import httpx

        if not listening(self.url, timeout_s):
            return False
        try:
            r = self.client.get("/healthz", timeout=timeout_s)
            return r.status_code == 200 and r.json().get("status") == "ok"
        except (httpx.HTTPError, ValueError):
            return False

    def corpus_names(self) -> list[str]:
        return [c["name"] for c in self._json("GET", "/v1/corpora")]

    def chat_options(self) -> set[str]:
        """The fields the server's chat request accepts (from its OpenAPI schema), so the CLI
        forwards only options this server knows."""
        spec = self._json("GET", "/openapi.json")
        return set(
            spec.get("components", {})
            .get("schemas", {})
            .get("ChatRequest", {})
            .get("properties", {})
        )

    # -- cache operations ------------------------------------------------------------------------
    def submit(self, op: str, name: str, tier: str | None) -> str:
        params = {"tier": tier} if tier else {}
        return self._json("POST", f"/v1/cache/{name}/{op}", params=params)["event_id"]

    def event(self, event_id: str) -> dict:
        return self._json("GET", f"/v1/cache/events/{event_id}")

    def wait(self, event_id: str, timeout_s: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while True:
            ev = self.event(event_id)
            if ev["status"] in ("done", "failed", "cancelled") or time.monotonic() > deadline:
                return ev
            time.sleep(0.2)

    # -- chat ------------------------------------------------------------------------------------
    def _events(self, body: dict) -> Iterator[dict]:
        """The server-sent chunks of a streamed chat completion, parsed."""
        import httpx

        try:
            with self.client.stream(
                "POST",
                "/v1/chat/completions",
                json={**body, "stream": True, "stream_options": {"include_usage": True}},
                timeout=httpx.Timeout(30.0, read=None),
            ) as r:
                if r.status_code >= 400:
                    r.read()
                    raise (NotFound if r.status_code == 404 else KBError)(
                        f"server said {r.status_code}: {self._error(r)}"
                    )
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[len("data: ") :]
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as e:
            raise KBError(f"the server at {self.url} stopped answering: {e}") from e

    def chat(
        self,
        corpus: str,
        messages: list[dict],
        options: dict,
        on_text: Callable[[str], None] | None = None,
    ) -> ChatReply:
        """Stream one answer over `corpus` given the conversation `messages`; `on_text` gets
        each piece of text as it arrives."""
        reply = ChatReply()
        for ev in self._events(
            {"model": f"kb:{corpus}", "corpus": corpus, "messages": messages, **options}
        ):
            if "error" in ev:
                raise KBError(ev["error"].get("message", "generation failed"))
            choice = (ev.get("choices") or [{}])[0]
            text = (choice.get("delta") or {}).get("content") or ""
            if text:
                reply.answer += text
                if on_text is not None:
                    on_text(text)
            if choice.get("finish_reason"):
                reply.finish_reason = choice["finish_reason"]
                reply.citations = ev.get("citations") or []
            if ev.get("usage"):  # the last chunk, choices [] (asked for with include_usage)
                reply.usage = ev["usage"]
        return reply


def listening(url: str, timeout_s: float) -> bool:
    """Whether anything accepts a TCP connection at `url`'s host and port (stdlib only)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def explicit_url(args) -> str | None:
    """The server a command was pointed at: `--server URL`, else $KB_SERVER."""
    return getattr(args, "server", None) or os.environ.get("KB_SERVER") or None


def default_url() -> str:
    """Where `kb serve` listens by default (KB_HOST/KB_PORT, as it reads them)."""
    host = os.environ.get("KB_HOST", "127.0.0.1")
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://{host}:{os.environ.get('KB_PORT', '8000')}"
