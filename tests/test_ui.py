"""The web app through its own API with `gradio_client`: every named event, streaming chat with
citations, stop, retry, history, uploads with progress, admin operations, and 16 concurrent
chats served in shared engine batches."""

from __future__ import annotations

import time

import pytest

from tests.conftest import FACT_ANSWER, FACT_QUESTION, MODELS_DIR, planted_text, serve_in_thread

pytest.importorskip("gradio_client")


@pytest.fixture(scope="module")
def site(tmp_path_factory, demo_model_dir):
    """A served KB with auth on: admin `root`, user `ann`, the public corpus `handbook`."""
    from kb.auth import create_api_key, create_user
    from kb.server import create_app
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    root = tmp_path_factory.mktemp("ui")
    doc = root / "handbook.txt"
    doc.write_text(planted_text())
    kb = KnowledgeBase(
        Settings(home=root / "home", models_dir=MODELS_DIR, auth="on", max_tokens=20)
    )
    create_user(kb.db, "root", "pw-root-123", admin=True)
    create_user(kb.db, "ann", "pw-ann-1234")
    kb.create_corpus("handbook", visibility="public")
    assert kb.ingest("handbook", [doc])[0].status == "ready"
    with serve_in_thread(create_app(kb, warm=False)) as url:
        yield {
            "url": f"{url}/",
            "kb": kb,
            "root": root,
            "keys": {"root": create_api_key(kb.db, "root"), "ann": create_api_key(kb.db, "ann")},
        }
    kb.close()


def client(site, user: str):
    from gradio_client import Client

    return Client(
        site["url"], headers={"Authorization": f"Bearer {site['keys'][user]}"}, verbose=False
    )


def text_of(message: dict) -> str:
    content = message["content"]
    return "".join(p["text"] for p in content) if isinstance(content, list) else content


def answers(messages: list[dict]) -> list[dict]:
    return [
        m
        for m in messages
        if m["role"] == "assistant" and not (m.get("metadata") or {}).get("title")
    ]


def citations(messages: list[dict]) -> list[dict]:
    return [m for m in messages if (m.get("metadata") or {}).get("title")]


def wait_until(fn, what: str, tries: int = 600, pause: float = 0.5):
    for _ in range(tries):
        value = fn()
        if value:
            return value
        time.sleep(pause)
    pytest.fail(f"gave up waiting for {what}")


def test_whoami_and_pickers(site):
    root, ann = client(site, "root"), client(site, "ann")
    assert "root" in root.predict(api_name="/whoami") and "(admin)" in root.predict(
        api_name="/whoami"
    )
    assert "ann" in ann.predict(api_name="/whoami") and "admin" not in ann.predict(
        api_name="/whoami"
    )
    assert ann.predict(None, api_name="/chat_corpora")["value"] == "handbook"
    assert (
        ann.predict(None, api_name="/corpora")["choices"] == []
    )  # ann may read handbook, not change it
    assert [c[0] for c in root.predict(None, api_name="/corpora")["choices"]] == ["handbook"]


def test_chat_streams_cites_and_keeps_history(site):
    c = client(site, "ann")
    job = c.submit(FACT_QUESTION, [], "handbook", None, api_name="/send")
    messages, box = job.result()
    assert box == ""
    partial = [answers(out[0])[0] for out in job.outputs() if answers(out[0])]
    assert len({text_of(m) for m in partial}) > 3  # it streamed: the answer grew over many updates
    assert FACT_ANSWER in text_of(answers(messages)[-1])
    cites = citations(messages)
    assert cites and cites[0]["metadata"]["title"].startswith("[1] handbook.txt")
    assert "<mark>" in text_of(cites[0]) and "7341" in text_of(cites[0])

    # the conversation is stored for ann: listed for the corpus, and reopened from the database
    sessions = c.predict("handbook", api_name="/chat_sessions")["choices"]
    assert len(sessions) == 1 and FACT_QUESTION[:20] in sessions[0][0]
    reopened, _corpus = c.predict(sessions[0][1], api_name="/open_chat")
    assert [text_of(m) for m in answers(reopened)] == [text_of(m) for m in answers(messages)]
    assert len(citations(reopened)) == len(cites)
    assert (
        client(site, "root").predict("handbook", api_name="/chat_sessions")["choices"] == []
    )  # ann's only

    # retry replaces the last answer (same session, greedy decoding: the same text)
    again, _ = c.predict(messages, "handbook", None, api_name="/retry")
    assert sum(m["role"] == "user" for m in again) == 1 and FACT_ANSWER in text_of(
        answers(again)[-1]
    )
    messages_db, _ = c.predict(sessions[0][1], api_name="/open_chat")
    assert [m["role"] for m in messages_db if not (m.get("metadata") or {}).get("title")] == [
        "user",
        "assistant",
    ]

    cleared, box = c.predict(api_name="/new_chat")
    assert cleared == [] and box == ""


def test_chat_refuses_what_the_user_may_not_read(site):
    from gradio_client.exceptions import AppError

    kb = site["kb"]
    from kb.auth import get_user

    owner = get_user(kb.db, 1)
    kb.create_corpus("root-only", owner=owner.id, visibility="private")
    c = client(site, "ann")
    with pytest.raises(AppError, match="does not exist"):
        c.predict(FACT_QUESTION, [], "root-only", None, api_name="/send")
    with pytest.raises(AppError, match="admins only"):
        c.predict(None, api_name="/admin_corpora")
    with pytest.raises(AppError, match="admins only"):
        c.predict("handbook", "cpu", api_name="/admin_evict")


def test_stop_aborts_the_engine_request(site):
    kb = site["kb"]
    reg = lambda: (
        kb.engine.metrics.registry.get_sample_value(  # noqa: E731
            "kb_request_success_total", {"finished_reason": "abort"}
        )
        or 0
    )
    before = reg()
    c = client(site, "ann")
    job = c.submit(
        "Summarise the logging package in detail.", [], "handbook", None, api_name="/send"
    )
    wait_until(lambda: len(job.outputs()) >= 2, "the first streamed token")
    assert job.cancel()
    wait_until(lambda: reg() > before, "the aborted request to finish")


def test_corpora_upload_progress_delete_rebuild(site):
    c = client(site, "ann")
    msg, corpus, name_box = c.predict("anns-notes", "private", "", api_name="/create_corpus")
    assert "created corpus anns-notes" in msg and corpus["value"] == "anns-notes" and name_box == ""
    from gradio_client import handle_file

    a, b = site["root"] / "vault.txt", site["root"] / "garden.md"
    a.write_text("The Orlin vault is in the cellar.\n\nThe access code of the Orlin vault is 5521.")
    b.write_text("# Garden\n\nThe garden has eleven apple trees and a pond.")
    msg, _files = c.predict(
        "anns-notes", [handle_file(str(a)), handle_file(str(b))], api_name="/upload"
    )
    assert "2 file(s)" in msg

    def ready_rows():
        table, summary = c.predict("anns-notes", api_name="/documents")
        rows = table["data"]
        return rows if len(rows) == 2 and all(r[2] == "ready" for r in rows) else None

    rows = wait_until(ready_rows, "both documents to be ready")
    assert {r[1] for r in rows} == {"vault.txt", "garden.md"} and all(r[3] == 100.0 for r in rows)
    assert "anns-notes" in [x[0] for x in c.predict(None, api_name="/chat_corpora")["choices"]]
    # ann owns it and sees it (above); a user it is not shared with does not
    from kb.auth import create_api_key, create_user

    create_user(site["kb"].db, "cy", "pw-cy-12345")
    site["keys"]["cy"] = create_api_key(site["kb"].db, "cy")
    assert "anns-notes" not in [
        x[0] for x in client(site, "cy").predict(None, api_name="/chat_corpora")["choices"]
    ]

    garden = next(r[0] for r in rows if r[1] == "garden.md")
    assert "deleted garden.md" in c.predict("anns-notes", garden, api_name="/delete_document")
    table, summary = c.predict("anns-notes", api_name="/documents")
    assert [r[1] for r in table["data"]] == ["vault.txt"] and "1 documents" in summary

    assert "rebuilding anns-notes" in c.predict("anns-notes", api_name="/rebuild")
    wait_until(
        lambda: (
            lambda t: (
                t[0]["data"] and all(r[2] == "ready" for r in t[0]["data"]) and "ready" in t[1]
            )
        )(c.predict("anns-notes", api_name="/documents")),
        "the rebuild",
    )
    messages, _ = c.predict(
        "What is the access code of the Orlin vault?", [], "anns-notes", None, api_name="/send"
    )
    assert "5521" in text_of(answers(messages)[-1])


def test_admin_events(site):
    c = client(site, "root")
    c.predict(FACT_QUESTION, [], "handbook", None, api_name="/send")  # loads handbook's KV
    table, corpus = c.predict("handbook", api_name="/admin_corpora")
    row = next(r for r in table["data"] if r[0] == "handbook")
    assert row[1] == "ready" and row[2] > 0 and row[6] >= 1  # state, tokens, hits

    def state() -> str:
        return next(
            r
            for r in c.predict("handbook", api_name="/admin_corpora")[0]["data"]
            if r[0] == "handbook"
        )[1]

    assert "pin" in c.predict("handbook", "cpu", api_name="/admin_pin") and state() == "pinned"
    assert "unpin" in c.predict("handbook", "cpu", api_name="/admin_unpin") and state() == "ready"
    assert "evict" in c.predict("handbook", "cpu", api_name="/admin_evict") and state() == "evicted"
    assert "move" in c.predict("handbook", "cpu", api_name="/admin_move") and state() == "ready"
    assert "rebuild" in c.predict("handbook", "cpu", api_name="/admin_rebuild")
    wait_until(lambda: state() in ("ready", "evicted"), "the rebuild")
    figures, load, speed = c.predict(api_name="/engine_stats")
    assert "tokens/s" in figures and "time to first token" in figures


def test_sixteen_concurrent_chats_share_engine_batches(site):
    kb = site["kb"]
    kb.engine.metrics.max_batch_size = 0
    clients = [client(site, "ann") for _ in range(4)]
    jobs = [
        clients[i % 4].submit(FACT_QUESTION, [], "handbook", None, api_name="/send")
        for i in range(16)
    ]
    results = [j.result(timeout=600) for j in jobs]
    assert all(FACT_ANSWER in text_of(answers(m)[-1]) for m, _ in results)
    assert kb.engine.metrics.max_batch_size > 1  # the engine stepped several UI chats together
