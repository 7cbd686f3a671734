"""`kb` answers fast: help and unknown names need no heavy import, unknown names get "did you
mean", and `kb ask` / `kb chat` use a running server when one answers (saying so on stderr)."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys

import pytest

from kb.cli import main
from kb.cli.answering import _server_options, find_server
from kb.cli.names import require_corpus, suggest, unknown_corpus
from kb.errors import KBError, NotFound
from tests.conftest import FACT_ANSWER, FACT_QUESTION, serve_in_thread

HEAVY = ("torch", "transformers", "gradio", "kb.service", "kb.engine.engine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def no_default_server(monkeypatch):
    """Nothing listens where `kb ask` looks for a server by default."""
    monkeypatch.delenv("KB_SERVER", raising=False)
    monkeypatch.setenv("KB_HOST", "127.0.0.1")
    monkeypatch.setenv("KB_PORT", str(_free_port()))


def _modules_loaded_by(argv: list[str], env: dict) -> tuple[int, set[str], str]:
    """Run `kb argv` in a fresh interpreter; its exit code, the heavy modules it imported, stderr."""
    code = (
        "import sys\nfrom kb.cli import main\ntry:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n"
        f"    rc = e.code\nprint('LOADED', ','.join(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(rc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120
    )
    loaded = done.stderr.strip().splitlines()[-1].removeprefix("LOADED").strip()
    return done.returncode, {m for m in loaded.split(",") if m}, done.stderr


def test_help_and_unknown_names_import_nothing_heavy(kb_env, no_default_server):
    from kb.service import KnowledgeBase

    kb = KnowledgeBase()
    kb.create_corpus("handbook")
    kb.close()
    env = os.environ.copy()
    rc, loaded, _ = _modules_loaded_by(["--help"], env)
    assert rc == 0 and not loaded, loaded
    for argv, expect in (
        [["ask", "handbok", "q?"], "did you mean 'handbook'?"],
        [["chat", "handbok"], "did you mean 'handbook'?"],
        [["ingest", "handbok", "x.txt"], "did you mean 'handbook'?"],
        [["corpus", "delete", "HandBook"], "did you mean 'handbook'?"],
        [["jobs", "list", "hand"], "does not exist"],
        [["jobs", "cancel", "no-such-job"], "job 'no-such-job' does not exist"],
        [["cache", "evict", "handbok"], "did you mean 'handbook'?"],
        [["cache", "status", "no-such-event"], "no cache event"],
        [["user", "key", "nobody"], "user 'nobody' does not exist"],
    ):
        rc, loaded, err = _modules_loaded_by(argv, env)
        assert rc == 1 and expect in err, (argv, err)
        assert not loaded, (argv, loaded)
    _modules_loaded_by(["corpus", "list"], env)  # the first use of a model remembers its preamble
    rc, loaded, _ = _modules_loaded_by(["corpus", "list"], env)
    assert rc == 0 and not loaded, loaded  # listings come from the catalog: no torch, no engine


def test_suggestions():
    assert suggest("handbok", ["handbook", "notes"]) == "; did you mean 'handbook'?"
    assert suggest("HANDBOOK", ["handbook"]) == "; did you mean 'handbook'?"
    assert suggest("zzz", ["handbook"]) == ""
    assert (
        unknown_corpus("zzz", [])
        == "corpus 'zzz' does not exist; there are no corpora yet: kb corpus create NAME"
    )
    assert "(corpora: a1, b2)" in unknown_corpus("zzz", ["b2", "a1"])


def test_require_corpus_reads_sqlite_and_postgresql(db_url):
    from storage.db import Database
    from storage.models import Corpus

    db = Database(db_url)
    with db.session() as s:
        s.add(Corpus(name="handbook", model="m", status="empty", settings={}))
    db.close()
    require_corpus("handbook", db_url)
    with pytest.raises(NotFound, match="did you mean 'handbook'"):
        require_corpus("handbok", db_url)


def test_only_options_the_server_accepts_are_forwarded():
    args = argparse.Namespace(temperature=0.0, max_tokens=16, dense=True, density=None)
    assert _server_options(args, {"dense", "temperature"}) == {
        "temperature": 0.0,
        "max_tokens": 16,
        "dense": True,
    }
    assert _server_options(args, {"density"})["density"] == 1.0
    assert _server_options(args, {"temperature"}) is None  # the caller answers in-process instead
    args.dense, args.density = False, 0.25
    assert _server_options(args, {"density"})["density"] == 0.25
    args.density = None
    assert _server_options(args, set()) == {"temperature": 0.0, "max_tokens": 16}


def test_no_server_means_this_process_and_a_named_dead_one_is_an_error(no_default_server):
    args = argparse.Namespace(server=None, local=False)
    assert find_server(args) is None
    args.server = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(KBError, match="no kb server answers"):
        find_server(args)


@pytest.fixture(scope="module")
def server_url(handbook):
    from kb.server import create_app

    with serve_in_thread(create_app(handbook, warm=False, ui=False)) as url:
        yield url


def test_ask_and_chat_through_a_running_server(server_url, capsys, monkeypatch):
    monkeypatch.setenv("KB_SERVER", server_url)
    assert main(["ask", "handbook", FACT_QUESTION, "--max-tokens", "24", "--json"]) == 0
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert FACT_ANSWER in answer["answer"] and answer["finish_reason"] in ("stop", "length")
    assert any("Velmora" in c["text"] for c in answer["citations"])
    assert f"answering from the server at {server_url}" in err

    assert main(["ask", "handbook", FACT_QUESTION, "--max-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert FACT_ANSWER in out and "[1] handbook.txt" in err  # streamed text, then citations

    assert main(["ask", "handbok", FACT_QUESTION]) == 1
    assert "did you mean 'handbook'?" in capsys.readouterr().err  # the server's names

    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{FACT_QUESTION}\nRepeat the code.\n"))
    assert main(["chat", "handbook", "--max-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert out.count(FACT_ANSWER) >= 1 and len(out.strip().splitlines()) >= 2, out
    assert f"the server at {server_url}" in err


def test_a_mistyped_command_gets_did_you_mean(capsys):
    for argv, hint in (
        (["corpsu", "list"], "did you mean 'corpus'?"),
        (["corpus", "lst"], "did you mean 'list'?"),
        (["cache", "evcit", "x"], "did you mean 'evict'?"),
    ):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and hint in capsys.readouterr().err
