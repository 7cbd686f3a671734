"""Where `kb ask` and `kb chat` get their answers: a running server when one answers, else
this process (which loads the model and the corpus first, as every call did before).

The server is `--server URL`, else $KB_SERVER (either must answer, or the command fails), else
the default address `kb serve` listens on, probed for a fraction of a second. The choice is said
on stderr. `--local` skips the server.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Protocol

from kb.cli.common import knowledge_base
from kb.cli.names import require_corpus, unknown_corpus
from kb.cli.server_client import DEFAULT_PROBE_S, ServerClient, default_url, explicit_url, listening
from kb.errors import KBError, NotFound


class Answerer(Protocol):
    where: str  # said on stderr: "the server at URL" or "this process"

    def answer(
        self, question: str, history: list[dict], on_text: Callable[[str], None] | None
    ) -> dict: ...

    def close(self) -> None: ...


class RemoteAnswerer:
    """Answers from a running server over `/v1/chat/completions` (streamed)."""

    def __init__(self, client: ServerClient, corpus: str, options: dict):
        self.client, self.corpus, self.options = client, corpus, options
        self.where = f"the server at {client.url}"

    def answer(
        self, question: str, history: list[dict], on_text: Callable[[str], None] | None
    ) -> dict:
        messages = [*history, {"role": "user", "content": question}]
        return self.client.chat(self.corpus, messages, self.options, on_text).to_dict()

    def close(self) -> None:
        self.client.close()


class LocalAnswerer:
    """Answers in this process: loads the model, the engine and the corpus's KV on first use."""

    where = "this process (no server answered; loading the model here)"

    def __init__(self, corpus: str, args):
        require_corpus(corpus)  # before the model loads: a typo is reported at once
        self.corpus = corpus
        self.kb = knowledge_base()
        if args.dense or args.density is not None:
            self.kb.settings.density = 1.0 if args.dense else args.density
        self.dense = bool(args.dense)  # also: no attention retrieval (kb/engine/selection.py)
        self.max_tokens = args.max_tokens or self.kb.settings.max_tokens
        self.temperature = args.temperature

    def answer(
        self, question: str, history: list[dict], on_text: Callable[[str], None] | None
    ) -> dict:
        from dataclasses import replace

        # the served penalties (KB_REPETITION_PENALTY, KB_FREQUENCY_PENALTY, KB_DRY_*), as a server's
        sp = replace(
            self.kb.default_sampling(), max_tokens=self.max_tokens, temperature=self.temperature
        )
        return self.kb.wait(
            self.kb.ask(self.corpus, question, sp, history, dense=self.dense), on_text
        )

    def close(self) -> None:
        self.kb.close()


def _server_options(args, accepted: set[str]) -> dict | None:
    """The request options for the server, or None when the user asked for one it lacks."""
    opts: dict = {"temperature": args.temperature}
    if args.max_tokens:
        opts["max_tokens"] = args.max_tokens
    if args.dense:
        if "dense" in accepted:
            opts["dense"] = True
        elif "density" in accepted:
            opts["density"] = 1.0
        else:
            return None
    elif args.density is not None:
        if "density" not in accepted:
            return None
        opts["density"] = args.density
    return opts


def find_server(args) -> ServerClient | None:
    """The server to ask: the one named (which must answer), else the default address if it
    answers within DEFAULT_PROBE_S; None to answer in this process."""
    if getattr(args, "local", False):
        return None
    url = explicit_url(args)
    timeout_s = 5.0 if url else DEFAULT_PROBE_S
    if listening(
        url or default_url(), timeout_s
    ):  # stdlib first: httpx loads only if something listens
        client = ServerClient(url or default_url())
        if client.healthy(timeout_s):
            return client
        client.close()
    if url:
        raise KBError(
            f"no kb server answers at {url} (from --server or KB_SERVER); "
            "start one with `kb serve`, or pass --local to answer in this process"
        )
    return None


def answerer(args, corpus: str) -> Answerer:
    """A server's answerer when one answers (the corpus checked there), else this process's."""
    client = find_server(args)
    if client is not None:
        try:
            names = client.corpus_names()
            if corpus not in names:
                raise NotFound(unknown_corpus(corpus, names))
            options = _server_options(args, client.chat_options())
        except BaseException:
            client.close()
            raise
        if options is not None:
            return RemoteAnswerer(client, corpus, options)
        client.close()
        print(
            f"kb: the server at {client.url} takes no --dense/--density option; answering in this process",
            file=sys.stderr,
        )
    local = LocalAnswerer(corpus, args)
    if getattr(args, "local", False):
        local.where = "this process (--local; loading the model here)"
    return local


def print_citations(citations: list[dict]) -> None:
    """One line per citation on stderr: [n] document, page: the passage's start."""
    for i, c in enumerate(citations, 1):
        page = f", page {c['page']}" if c.get("page") else ""
        text = " ".join(str(c.get("text", "")).split())
        print(f"[{i}] {c.get('document', '?')}{page}: {text[:160]}", file=sys.stderr)


def add_answer_options(c) -> None:
    """The options `kb ask` and `kb chat` share."""
    c.add_argument("--max-tokens", type=int, default=None)
    c.add_argument("--temperature", type=float, default=0.0)
    c.add_argument(
        "--density", type=float, default=None, help="fraction of chunks each query attends"
    )
    c.add_argument("--dense", action="store_true", help="attend every chunk")
    c.add_argument(
        "--server",
        default=None,
        help="a running server's URL (default: $KB_SERVER, else "
        "the default address if a server answers there)",
    )
    c.add_argument(
        "--local", action="store_true", help="answer in this process even if a server runs"
    )
