"""The web app through its own API with `gradio_client`: every named event, streaming chat with
[n] markers tied to its citations, the source viewer, stop, retry, stored conversations (list,
rename, delete), uploads with progress in words, admin operations in words, and 16 concurrent
chats served in shared engine batches. The drawing of answers (Markdown that cannot swallow
them, marker places, stop marks) is tested on its own, without a server."""

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
    return [m for m in messages if m["role"] == "assistant"]


def send(c, question: str, corpus: str, session_id=None):
    """Ask through the Send event; returns (drawn chat, session id, source choices). The session
    id is the client's session state (a gr.State: never sent by a client, so not returned)."""
    chat, box, sources, listed, _title = c.predict(question, corpus, session_id, api_name="/send")
    assert box == ""
    return chat, listed["value"], sources["choices"]


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
    job = c.submit(FACT_QUESTION, "handbook", None, api_name="/send")
    messages, box, sources, listed, title = job.result()
    sid = listed["value"]
    assert box == ""
    partial = [answers(out[0])[0] for out in job.outputs() if answers(out[0])]
    assert len({text_of(m) for m in partial}) > 3  # it streamed: the answer grew over many updates
    answer = text_of(answers(messages)[-1])
    assert FACT_ANSWER in answer
    # the citations the service returned, numbered: a marker [n] in the answer for each, the
    # same numbers in its list of sources and in the Sources picker
    choices = sources["choices"]
    assert choices and choices[0][0].startswith("[1] handbook.txt")
    for n, (label, ref) in enumerate(choices, 1):
        assert f'kb-ref-{ref}" title="open source [{n}]">[{n}]</sup>' in answer
        assert label.split(" · ")[0] in answer
    # the source viewer: the cited passage highlighted in the document's text
    viewer = c.predict(choices[0][1], api_name="/open_source")
    assert "handbook.txt" in viewer and '<mark id="kb-passage">' in viewer

    # the conversation is stored for ann: listed, and reopened from the database
    listed = c.predict(None, api_name="/conversations")["choices"]
    assert [x[1] for x in listed] == [sid] and FACT_QUESTION[:20] in listed[0][0]
    reopened, corpus, re_sources, _viewer, re_title = c.predict(sid, api_name="/open_chat")
    assert [text_of(m) for m in reopened] == [text_of(m) for m in messages]
    assert corpus == "handbook" and re_title == FACT_QUESTION
    assert re_sources["choices"] == choices
    assert client(site, "root").predict(None, api_name="/conversations")["choices"] == []

    # retry replaces the last answer (same session, greedy decoding: the same text)
    again, _box, _src, _l, _t = c.predict("handbook", api_name="/retry")
    assert [m["role"] for m in again] == ["user", "assistant"]
    assert FACT_ANSWER in text_of(answers(again)[-1])

    # rename, then delete
    renamed = c.predict("Velmora vault", api_name="/rename_chat")["choices"]
    assert renamed[0][0] == "Velmora vault · handbook"
    out = c.predict(api_name="/delete_chat")  # the open one (session state)
    assert out[0] == [] and out[4]["choices"] == []

    cleared, box, *_ = c.predict(api_name="/new_chat")
    assert cleared == [] and box == ""


def test_answers_are_drawn_as_written():
    from ui.render import (
        STOPPED,
        TOKEN_LIMIT,
        answer_markdown,
        marker_places,
        plain_markdown,
        split_mark,
    )

    # Markdown cannot swallow an answer: no empty headings, no code block, no HTML
    md = plain_markdown("is:\n\n#\n\n#")
    assert md == "is\\:\n\n\\#\n\n\\#"
    indented = plain_markdown("    ls -l\n\tfile")
    assert (
        indented.startswith("&nbsp;" * 4 + "ls \\-l") and "\n" + "&nbsp;" * 4 + "file" in indented
    )
    assert "<b>" not in plain_markdown("<b>bold</b>") and "&lt;b&gt;" in plain_markdown("<b>")
    # a marker after the sentence that shares the most words with its passage
    answer = "The vault is in the cellar. Its code is 7341."
    places = marker_places(answer, ["The access code of the Velmora vault is 7341.", "cellar"])
    assert places == [len(answer), answer.index(" Its")]
    cites = [{"document": "a.txt", "page": None, "text": "code 7341"}]
    drawn = answer_markdown(answer + TOKEN_LIMIT, cites, ["1-1"])
    assert "7341\\.<sup" in drawn and "[1] a.txt" in drawn
    assert "the answer reached the token limit" in drawn
    assert split_mark("so far" + STOPPED) == ("so far", "stopped: you stopped this answer")


def test_chat_refuses_what_the_user_may_not_read(site):
    from gradio_client.exceptions import AppError

    kb = site["kb"]
    from kb.auth import get_user

    owner = get_user(kb.db, 1)
    kb.create_corpus("root-only", owner=owner.id, visibility="private")
    c = client(site, "ann")
    with pytest.raises(AppError, match="does not exist"):
        c.predict(FACT_QUESTION, "root-only", None, api_name="/send")
    with pytest.raises(AppError, match="admins only"):
        c.predict(None, api_name="/admin_corpora")
    with pytest.raises(AppError, match="admins only"):
        c.predict("handbook", "cpu", api_name="/admin_evict")


def test_stop_aborts_the_engine_request(site):
    kb = site["kb"]
    reg = lambda: kb.engine.metrics.finished_count("abort")  # noqa: E731
    before = reg()
    c = client(site, "ann")
    job = c.submit("Summarise the logging package in detail.", "handbook", None, api_name="/send")
    wait_until(lambda: len(job.outputs()) >= 2, "the first streamed token")
    assert job.cancel()
    wait_until(lambda: reg() > before, "the aborted request to finish")


def test_corpora_upload_progress_delete_rebuild(site):
    c = client(site, "ann")
    msg, corpus, name_box = c.predict("anns-notes", "private", "", api_name="/create_corpus")
    assert msg.startswith("created corpus anns-notes: only you may read it")
    assert corpus["value"] == "anns-notes" and name_box == ""
    bad, _c, _n = c.predict("anns notes", "private", "", api_name="/create_corpus")
    assert bad.startswith("⚠️ a corpus name is")  # said in the status line, not a toast
    from gradio_client import handle_file

    a, b = site["root"] / "vault.txt", site["root"] / "garden.md"
    a.write_text("The Orlin vault is in the cellar.\n\nThe access code of the Orlin vault is 5521.")
    b.write_text("# Garden\n\nThe garden has eleven apple trees and a pond.")
    msg, _files = c.predict(
        "anns-notes", [handle_file(str(a)), handle_file(str(b))], api_name="/upload"
    )
    assert msg == "queued 2 files for anns-notes"

    def ready_rows():
        table, summary = c.predict("anns-notes", api_name="/documents")
        rows = table["data"]
        return rows if len(rows) == 2 and all(r[2] == "ready" for r in rows) else None

    rows = wait_until(ready_rows, "both documents to be ready")
    assert {r[1] for r in rows} == {"vault.txt", "garden.md"}
    assert all(r[3] == "100%" and r[4] == "" for r in rows)  # ready: no ETA
    assert all(r[6].endswith(" B") and r[9] == "delete" for r in rows)  # size; a delete cell
    assert "anns-notes" in [x[0] for x in c.predict(None, api_name="/chat_corpora")["choices"]]
    # ann owns it and sees it (above); a user it is not shared with does not
    from kb.auth import create_api_key, create_user

    create_user(site["kb"].db, "cy", "pw-cy-12345")
    site["keys"]["cy"] = create_api_key(site["kb"].db, "cy")
    assert "anns-notes" not in [
        x[0] for x in client(site, "cy").predict(None, api_name="/chat_corpora")["choices"]
    ]

    garden = next(r[0] for r in rows if r[1] == "garden.md")
    status, pending = c.predict("anns-notes", garden, api_name="/delete_document")
    assert status == "deleted garden.md from anns-notes" and pending is None
    table, summary = c.predict("anns-notes", api_name="/documents")
    assert [r[1] for r in table["data"]] == ["vault.txt"] and "1 document ·" in summary

    assert c.predict("anns-notes", api_name="/rebuild").startswith("rebuilding anns-notes")
    wait_until(
        lambda: (
            lambda t: (
                t[0]["data"] and all(r[2] == "ready" for r in t[0]["data"]) and "ready" in t[1]
            )
        )(c.predict("anns-notes", api_name="/documents")),
        "the rebuild",
    )
    messages, _sid, _choices = send(c, "What is the access code of the Orlin vault?", "anns-notes")
    assert "5521" in text_of(answers(messages)[-1])


def test_unsupported_files_are_refused_naming_the_accepted_kinds(site):
    from kb.auth import get_user
    from ui.corpora import start_ingest

    png = site["root"] / "photo.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(Exception, match=r"photo\.png.*accepted: PDF \(\.pdf\)"):
        start_ingest(site["kb"], get_user(site["kb"].db, 1), "handbook", [str(png)])


def test_admin_events(site):
    c = client(site, "root")
    send(c, FACT_QUESTION, "handbook")  # loads handbook's KV
    table, corpus = c.predict("handbook", api_name="/admin_corpora")
    row = dict(zip(table["headers"], next(r for r in table["data"] if r[0] == "handbook")))
    assert row["state"] == "ready" and row["tokens"] > 0 and row["hits"] >= 1
    assert row["tier"] != "gpu" and "True" not in str(row)  # in words, never Python values

    def state() -> str:
        return next(
            r
            for r in c.predict("handbook", api_name="/admin_corpora")[0]["data"]
            if r[0] == "handbook"
        )[1]

    said = c.predict("handbook", "gpu", api_name="/admin_pin")
    assert said.startswith("pinned handbook:") and state() == "pinned"
    said = c.predict("handbook", "gpu", api_name="/admin_unpin")
    assert said.startswith("unpinned handbook:") and state() == "ready"
    said = c.predict("handbook", "gpu", api_name="/admin_evict")
    assert said == "evicted handbook: its KV is on disk only" and state() == "evicted"
    said = c.predict("handbook", "gpu", api_name="/admin_move")
    assert said.startswith("moved handbook") and state() == "ready"
    assert "rebuild" in c.predict("handbook", "cpu", api_name="/admin_rebuild")
    wait_until(lambda: state() in ("ready", "evicted"), "the rebuild")
    figures, load, speed = c.predict(api_name="/engine_stats")
    assert "tokens/s" in figures and "time to first token" in figures


def test_sixteen_concurrent_chats_share_engine_batches(site):
    kb = site["kb"]
    kb.engine.metrics.max_batch_size = 0
    clients = [client(site, "ann") for _ in range(4)]
    jobs = [
        clients[i % 4].submit(FACT_QUESTION, "handbook", None, api_name="/send") for i in range(16)
    ]
    results = [j.result(timeout=600) for j in jobs]
    assert all(FACT_ANSWER in text_of(answers(r[0])[-1]) for r in results)
    assert kb.engine.metrics.max_batch_size > 1  # the engine stepped several UI chats together
