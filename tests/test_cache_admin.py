"""Cache administration end to end with the demo model: tiers under budgets in the serving path,
admin operations as events, stale corpora and resumable rebuilds, fp8 storage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kb import cache_admin
from kb.engine.sequence import SamplingParams
from kb.errors import NotReady, TooBusy
from storage.models import Segment
from tests.conftest import FACT_ANSWER, FACT_QUESTION, MODELS_DIR, planted_text

GREEDY = SamplingParams(max_tokens=16)


def run(kb, op: str, name: str, tier: str | None = None) -> cache_admin.CacheEvent:
    ev = kb.cache_admin.wait(kb.cache_admin.submit(op, name, tier), timeout_s=600)
    assert ev.finished, ev
    return ev


def row(kb, name: str) -> cache_admin.CacheRow:
    return kb.cache_admin.lookup(name)[0]


def db_tier(kb, name: str) -> str:
    with kb.db.session() as s:
        return kb._corpus(s, name).tier


@pytest.fixture(scope="module")
def notes(handbook, tmp_path_factory):
    """A second, small corpus beside the handbook, in the same knowledge base."""
    doc = tmp_path_factory.mktemp("notes") / "notes.txt"
    doc.write_text("The cafeteria opens at eight.\n\nThe library closes at six on Fridays.")
    handbook.create_corpus("notes")
    assert handbook.ingest("notes", [doc])[0].status == "ready"
    return "notes"


def test_evicted_corpus_answers_the_same_after_reload(handbook):
    before = handbook.answer("handbook", FACT_QUESTION, GREEDY)
    assert FACT_ANSWER in before["answer"]
    key = handbook.cache.loaded["handbook"].shared.key
    r = row(handbook, "handbook")
    assert r.tier == "gpu" and r.bytes["gpu"] > 0 and r.bytes["disk"] > 0 and r.hits >= 1

    ev = run(handbook, "evict", "handbook")
    assert ev.status == "done" and ev.result == {"tier": "disk"}
    assert key not in handbook.engine.corpora  # unregistered from the engine
    r = row(handbook, "handbook")
    assert (r.state, r.tier, r.bytes["gpu"], r.bytes["cpu"]) == ("evicted", "disk", 0, 0)
    assert db_tier(handbook, "handbook") == "disk"

    after = handbook.answer("handbook", FACT_QUESTION, GREEDY)  # reloads from its verified files
    assert after["answer"] == before["answer"]
    assert row(handbook, "handbook").tier == "gpu" and key in handbook.engine.corpora


def test_device_budget_moves_the_least_recently_used_corpus_to_host_and_back(handbook, notes):
    handbook.load_corpus("handbook")
    handbook.load_corpus(notes)
    tm = handbook.cache.tiers
    both = tm.get("handbook").nbytes + tm.get(notes).nbytes
    old = dict(tm.budgets)
    tm.budgets.update(gpu=max(tm.get("handbook").nbytes, tm.get(notes).nbytes) + 1, cpu=both)
    try:
        handbook.answer("handbook", FACT_QUESTION, GREEDY)  # handbook most recent...
        assert run(handbook, "move", notes, "cpu").status == "done"
        assert handbook.answer(notes, "When does the cafeteria open?", GREEDY)["answer"]
        # ...notes came back to the device, so the handbook (least recently used) went to host memory
        assert (row(handbook, "handbook").tier, row(handbook, notes).tier) == ("cpu", "gpu")
        assert db_tier(handbook, "handbook") == "cpu" and row(handbook, "handbook").bytes["cpu"] > 0
        assert FACT_ANSWER in handbook.answer("handbook", FACT_QUESTION, GREEDY)["answer"]
        assert (row(handbook, "handbook").tier, row(handbook, notes).tier) == ("gpu", "cpu")

        # pinned: the handbook stays, so notes cannot come to the device
        assert run(handbook, "pin", "handbook").status == "done"
        assert row(handbook, "handbook").state == "pinned"
        with pytest.raises(TooBusy, match="no room"):
            handbook.load_corpus(notes)
        failed = run(handbook, "evict", "handbook")
        assert failed.status == "failed" and "pinned" in failed.error
        assert run(handbook, "unpin", "handbook").status == "done"
        handbook.load_corpus(notes)
        assert row(handbook, "handbook").tier == "cpu"
    finally:
        tm.budgets.update(old)
        run(handbook, "unpin", "handbook")


def test_a_corpus_in_use_is_never_evicted(handbook):
    ans = handbook.ask(
        "handbook", FACT_QUESTION, SamplingParams(max_tokens=4)
    )  # queued, not stepped
    ev = run(handbook, "evict", "handbook")
    assert ev.status == "failed" and "answering" in ev.error
    assert row(handbook, "handbook").tier == "gpu"
    handbook.engine.run_until_done()
    assert ans.handle.result is not None and ans.handle.result.completion_tokens > 0
    assert run(handbook, "evict", "handbook").status == "done"


def test_events_and_list_through_the_cli(handbook, capsys, monkeypatch):
    from kb.cli import cache as cli

    # the command checks names in the database its settings name before loading anything
    monkeypatch.setenv("KB_DATABASE_URL", handbook.settings.resolved_database_url)

    ev_id = handbook.cache_admin.submit("pin", "handbook")
    handbook.cache_admin.wait(ev_id)
    args = type("A", (), {"event_id": ev_id, "json": True})()
    cli._kb = lambda: handbook  # the command module's knowledge base, here the module's one
    assert cli.cmd_cache_status(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "done" and shown["op"] == "pin" and shown["corpus"] == "handbook"
    assert cli.cmd_cache_list(type("A", (), {"name": None, "json": True})()) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert listed["handbook"]["pinned"] and listed["handbook"]["tokens"] > 1000
    run(handbook, "unpin", "handbook")


def test_cli_evicts_in_a_running_server(handbook, capsys, monkeypatch):
    """`kb cache evict --server URL` frees the server's KV (a CLI process holds none of its own)."""
    from kb.cli import main
    from kb.server import create_app
    from tests.conftest import serve_in_thread

    handbook.answer("handbook", FACT_QUESTION, GREEDY)  # loaded in the server's process
    assert row(handbook, "handbook").bytes["gpu"] > 0
    monkeypatch.delenv("KB_SERVER", raising=False)
    with serve_in_thread(create_app(handbook, warm=False, ui=False)) as url:
        assert main(["cache", "evict", "handbook", "--server", url, "--wait"]) == 0
        assert capsys.readouterr().out.strip() == 'evict handbook: done {"tier": "disk"}'
        r = row(handbook, "handbook")
        assert (r.state, r.bytes["gpu"], r.bytes["cpu"]) == ("evicted", 0, 0)
        monkeypatch.setenv("KB_SERVER", url)  # the environment names the server too
        assert main(["cache", "pin", "handbook"]) == 0
        event_id = capsys.readouterr().out.strip()
        handbook.cache_admin.wait(event_id)
        assert main(["cache", "status", event_id, "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["status"] == "done"
        assert main(["cache", "evict", "nosuch", "--wait"]) == 1
        assert "server said 404" in capsys.readouterr().err
    assert main(["cache", "unpin", "handbook", "--server", url]) == 1  # the server is gone
    assert "cannot reach the server" in capsys.readouterr().err
    monkeypatch.delenv("KB_SERVER")
    run(handbook, "unpin", "handbook")
    assert FACT_ANSWER in handbook.answer("handbook", FACT_QUESTION, GREEDY)["answer"]  # reloads


# -- stale and rebuild ---------------------------------------------------------------------------
def two_docs(tmp_path: Path) -> list[Path]:
    paras = planted_text().split("\n\n")
    half = len(paras) // 2
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("\n\n".join(paras[:half]))
    b.write_text("\n\n".join(paras[half:]))
    return [a, b]


def make_kb(home: Path, **settings):
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    return KnowledgeBase(Settings(home=home, models_dir=MODELS_DIR, segment_len=256, **settings))


def segments_per_doc(kb, name: str) -> list[int]:
    with kb.db.session() as s:
        return [len(d.segments) for d in kb._corpus(s, name).documents]


def test_stale_after_a_settings_change_and_a_resumable_rebuild(tmp_path, demo_model_dir):
    home = tmp_path / "home"
    kb = make_kb(home)
    kb.create_corpus("c")
    assert all(r.status == "ready" for r in kb.ingest("c", two_docs(tmp_path)))
    assert kb.corpus_info("c").stale is False
    per_doc = segments_per_doc(kb, "c")
    assert all(n > 1 for n in per_doc)
    built = kb.load_corpus("c").shared
    k0, v0 = built.k[3].clone(), built.v[3].clone()
    kb.close()

    for changed in ({"chunk_size": 32}, {"kv_dtype": "bfloat16"}):
        other = make_kb(home, **changed)
        info = other.corpus_info("c")
        assert info.stale and info.status == "stale" and info.to_dict()["stale"]
        assert [c.status for c in other.list_corpora()] == ["stale"]
        assert row(other, "c").state == "stale"
        other.close()

    kb2 = make_kb(home, chunk_size=32)
    with kb2.db.session() as s:
        first_doc = kb2._corpus(s, "c").documents[0].id
    # an interrupted rebuild: only the first document got through
    kb2.ingestor.build(first_doc)
    ev = run(kb2, "rebuild", "c")
    assert ev.status == "done", ev.error
    # the chunk size is part of every segment's key, so only the unfinished document's segments ran
    assert ev.result["prefilled"] == per_doc[1] and ev.result["reused"] == per_doc[0]
    info = kb2.corpus_info("c")
    assert info.status == "ready" and not info.stale
    rebuilt = kb2.load_corpus("c").shared
    assert rebuilt.chunk_size == 32
    # the chunk size only regroups the layout: the recomputed keys and values are the same
    torch.testing.assert_close(rebuilt.k[3].float(), k0.float(), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(rebuilt.v[3].float(), v0.float(), atol=2e-2, rtol=1e-2)
    assert kb2.answer("c", FACT_QUESTION, GREEDY)["usage"]["completion_tokens"] > 0

    # nothing changed: a rebuild computes nothing
    ev = run(kb2, "rebuild", "c")
    assert ev.result["prefilled"] == 0 and ev.result["reused"] == sum(per_doc)
    kb2.close()


def test_a_damaged_kv_file_marks_the_corpus_stale_and_rebuild_repairs_only_it(
    tmp_path, demo_model_dir
):
    kb = make_kb(tmp_path / "home")
    kb.create_corpus("c")
    kb.ingest("c", two_docs(tmp_path))
    with kb.db.session() as s:
        path = Path(s.scalars(select_segments()).first().kv_file)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(NotReady, match="damaged"):
        kb.load_corpus("c")
    assert kb.corpus_info("c").status == "stale" and row(kb, "c").state == "stale"
    ev = run(kb, "rebuild", "c")
    assert ev.status == "done", ev.error
    assert ev.result["damaged"] == 1 and ev.result["prefilled"] == 1
    assert ev.result["reused"] == sum(segments_per_doc(kb, "c")) - 1
    assert kb.corpus_info("c").status == "ready"
    assert kb.load_corpus("c").shared.num_tokens > 0
    kb.close()


def select_segments():
    from sqlalchemy import select

    return select(Segment).order_by(Segment.id)


def test_fp8_kv_keeps_the_planted_fact(tmp_path, demo_model_dir):
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    kb = KnowledgeBase(
        Settings(home=tmp_path / "home", models_dir=MODELS_DIR, kv_dtype="float8")
    )  # as `handbook`
    doc = tmp_path / "handbook.txt"
    doc.write_text(planted_text())
    kb.create_corpus("h")
    assert kb.ingest("h", [doc])[0].status == "ready"
    with kb.db.session() as s:
        assert kb._corpus(s, "h").settings["kv_dtype"] == "float8"
        seg_file = Path(s.scalars(select_segments()).first().kv_file)
    from storage.kvstore import FP8, read_kv_tensors

    assert read_kv_tensors(seg_file, None)["k"].dtype == FP8  # stored as e4m3 ...
    shared = kb.load_corpus("h").shared
    assert shared.k[0].dtype == FP8 and shared.v[-1].dtype == FP8  # ... and served as e4m3,
    c = shared.num_chunks  # with one scale per (layer, chunk, KV head)
    assert (
        shared.meta.k_scale[0].shape == (c, shared.k[0].shape[1]) == shared.meta.v_scale[-1].shape
    )
    tokens = shared.num_tokens
    per_token_16 = 2 * len(shared.k) * shared.k[0].shape[1] * shared.k[0].shape[2] * 2
    assert row(kb, "h").bytes["gpu"] < 0.6 * tokens * per_token_16  # half the memory of 16-bit
    out = kb.answer("h", FACT_QUESTION, SamplingParams(max_tokens=24))
    assert FACT_ANSWER in out["answer"]
    assert (
        out["citations"] and out["citations"][0]["document"] == "handbook.txt"
    )  # mass from fp8 keys
    kb.close()


def test_linked_segments_follow_their_predecessor_and_a_rebuild_links_them_alike(
    tmp_path, demo_model_dir
):
    """KB_PIC=linked: each segment is prefilled after the last tokens of the document's previous
    segment (read back from the database, so rebuilding one segment alone gives what the whole
    build gave); only the segments' own tokens are stored."""
    from kb.ingest.precompute import prefill_segments
    from storage.kvstore import read_kv

    kb = make_kb(tmp_path / "home", pic="linked", pic_link_tokens=24)
    doc = tmp_path / "handbook.txt"
    doc.write_text(planted_text())
    kb.create_corpus("h")
    assert kb.ingest("h", [doc])[0].status == "ready"
    with kb.db.session() as s:
        segs = [
            (g.token_ids, g.pos_start, g.kv_file, g.kv_checksum)
            for g in s.scalars(select_segments())
        ]
    assert len(segs) >= 3
    model, pre = kb.ingestor.model.model, kb.ingestor.corpus_settings()["preamble"]

    def alone(j: int, **scheme) -> torch.Tensor:
        [(_, k, _)] = list(
            prefill_segments(model, pre, [segs[j][0]], starts=[segs[j][1]], **scheme)
        )
        return k.to(torch.float16).float()

    stored = read_kv(segs[1][2], segs[1][3])[0].float()
    linked = alone(1, pic="linked", link_tokens=24, links=[segs[0][0][-24:]])
    assert (stored - linked).abs().max() < 2e-2  # batch composition changes the float rounding only
    assert (stored - alone(1)).abs().max() > 0.1  # the shared scheme's KV is another one
    path = Path(segs[2][2])
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    ev = run(kb, "rebuild", "h")
    assert ev.status == "done" and ev.result["damaged"] == 1 and ev.result["prefilled"] == 1, ev
    with kb.db.session() as s:
        seg2 = s.scalars(select_segments()).all()[2]
        rebuilt = read_kv(seg2.kv_file, seg2.kv_checksum)[0].float()
    assert (
        rebuilt - alone(2, pic="linked", link_tokens=24, links=[segs[1][0][-24:]])
    ).abs().max() < 2e-2
    shared = kb.load_corpus("h").shared  # served as laid out: the segments' own tokens only
    assert shared.num_tokens == len(pre) + sum(len(t) for t, *_ in segs)
    kb.close()
