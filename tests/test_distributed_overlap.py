"""Issue 21's speed work on gloo ranks on CPU: a layer's shared-rank exchange is sent before rank
0's unique attention and collected after it (overlap), and when shared ranks share a host other
than rank 0's, one leader rank there merges their partials so that one partial per host crosses
to rank 0. Both answer as one process; a rank that dies while an overlapped exchange is in flight
fails it with SharedRankError and the survivors serve on.

Hosts are simulated on this machine: each process sets KB_HOST_ID before joining the rendezvous
(`protocol.host_id`), which is what rank 0 groups the ranks by.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from datetime import timedelta

import torch

from tests.test_distributed import (
    JOIN_S,
    PROMPTS,
    STALL_TIMEOUT_S,
    TIMEOUT_S,
    _cite_config,
    _cited_by,
    _corpus,
    _generate,
    _generate_selecting,
    _proc_state,
    _report,
    _same_citations,
    _spawn,
    _tiny_loaded,
    _with_selector,
)

TWO_HOSTS = {0: "host-a", 1: "host-a", 2: "host-b", 3: "host-b"}  # rank 2 leads host-b


def _references(world):
    """The one-process answers (dense and routed requests, then selecting ones) and the corpora."""
    from kb.engine.engine import Engine, EngineConfig

    lm = _tiny_loaded()
    dense, routed = _corpus("dense", 1, False), _corpus("routed", 2, True)
    selecting = _with_selector(_corpus("selecting", 4, False), lm.model)
    cfg = EngineConfig(unique_kv_tokens=512, block_size=8, citation_layers=0)
    local = Engine(lm, cfg)
    for c in (dense, routed, selecting):
        local.register_corpus(c)
    want = _generate(local, [dense, routed]) + _generate_selecting(local, selecting)
    return lm, cfg, (dense, routed, selecting), want


def _served(lm, cfg, link, corpora):
    """The same requests through the distributed engine over `link`."""
    from kb.engine.distributed.backend import distributed_engine

    engine = distributed_engine(lm, link, cfg)
    views = [link.register(c) for c in corpora]
    for v in views:
        engine.register_corpus(v)
    return engine, views


def _answers(engine, views) -> list[list[int]]:
    return _generate(engine, views[:2]) + _generate_selecting(engine, views[2])


def _rank0_overlap(world) -> dict:
    """One host: greedy tokens with overlap on and off; two ATTENDs in flight at once, collected
    in the other order, equal the same ATTENDs one at a time; the exchange completes while rank 0
    is not waiting in it."""
    from kb.engine.distributed.protocol import Attend, ShardLink

    lm, cfg, corpora, want = _references(world)
    link = ShardLink(world)
    engine, views = _served(lm, cfg, link, corpora)
    assert link.overlap  # the default
    link.stats.timing = True
    got_on = _answers(engine, views)
    stats_on = link.stats.snapshot()
    link.overlap = False
    got_off = _answers(engine, views)
    link.overlap = True

    dense, routed = corpora[0], corpora[1]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 16, generator=g)
    idx = routed.router.route(1, q, routed.top_k)
    with torch.inference_mode():
        one_at_a_time = [
            link.shared_attention(views[0], 1, q, None),
            link.shared_attention(views[1], 1, q, idx),
        ]
        with link.attention_batch() as batch:
            a = batch.start(Attend(views[0], 1, q))
            b = batch.start(Attend(views[1], 1, q, idx))
            deadline = time.monotonic() + TIMEOUT_S
            while not all(w.is_completed() for w in a.works + b.works):  # rank 0 is free meanwhile
                assert time.monotonic() < deadline, "the exchange did not progress without a wait"
                time.sleep(0.01)
            in_flight = [b.wait(), a.wait()][::-1]
    same = [
        torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
        for x, y in zip(in_flight, one_at_a_time)
    ]
    import attention

    o_ref, _ = attention.shared_attention(q, dense.k[1], dense.v[1], None, 16)
    err = float((in_flight[0][0] - o_ref).abs().max())
    out = {
        "want": want,
        "on": got_on,
        "off": got_off,
        "same": same,
        "err": err,
        "routes": link.routes.to,
        "stats": stats_on,
    }
    link.shutdown()
    return out


def _rank0_hosts(world) -> dict:
    """Two hosts (ranks 0 and 1 on host-a, 2 and 3 on host-b): rank 2 merges rank 3's partial
    with its own; greedy tokens as one process, the shared attention within 16-bit rounding of
    one process's, and rank 0 receives two partials per exchange instead of three. Citation
    mass, which concatenates rather than merges, comes from every rank straight to rank 0 and
    equals one process's."""
    import attention
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.protocol import ShardLink
    from kb.engine.engine import Engine

    lm, cfg, corpora, want = _references(world)
    link = ShardLink(world)
    engine, views = _served(lm, cfg, link, corpora)
    got = _answers(engine, views)
    dense, routed = corpora[0], corpora[1]
    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 16, generator=g)
    idx = routed.router.route(1, q, routed.top_k)
    diffs, received = {}, []
    with torch.inference_mode():
        for name, sh, view, i in (
            ("dense", dense, views[0], None),
            ("routed", routed, views[1], idx),
        ):
            o_ref, lse_ref = attention.shared_attention(q, sh.k[1], sh.v[1], i, sh.chunk_size)
            before = link.stats.bytes_in
            o, lse = link.shared_attention(view, 1, q, i)
            received.append(link.stats.bytes_in - before)
            diffs[name] = (float((o - o_ref).abs().max()), float((lse - lse_ref).abs().max()))
    shards = [s.rank for s in link.placement(views[0]).shards if s.num_tokens]
    cite = _cite_config(cfg)
    want_cited = _cited_by(Engine(lm, cite), list(corpora[:2]))
    got_cited = _cited_by(distributed_engine(lm, link, cite), views[:2])
    out = {
        "want": want,
        "got": got,
        "want_cited": want_cited,
        "got_cited": got_cited,
        "mass_exchanges": link.stats.mass_exchanges,
        "diffs": diffs,
        "received": received,
        "partial_bytes": q.shape[0] * q.shape[1] * (q.shape[2] + 2) * 2,
        "routes": link.routes.to,
        "shards": shards,
    }
    link.shutdown()
    return out


def _stop_rank3(world) -> int:
    """Tell rank 3 to SIGSTOP itself (`_stop_when_told`), wait until the kernel shows it stopped;
    its pid."""
    world.store.set("stop/3", "1")
    world.store.wait(["stopped/3"], timedelta(seconds=JOIN_S))
    pid = int(world.store.get("pid/3"))
    deadline = time.monotonic() + JOIN_S
    while _proc_state(pid) != "T":
        assert time.monotonic() < deadline, "rank 3 did not stop"
        time.sleep(0.01)
    return pid


def _rank0_fault(world) -> dict:
    """Two hosts; rank 3 (rank 2's follower on host-b) stops, an ATTEND is started (it cannot
    complete), rank 0 works meanwhile, then rank 3 is killed: the wait raises SharedRankError
    naming rank 3; the link re-forms over ranks 1 and 2 and a later request answers as one
    process."""
    from kb.engine.distributed.protocol import Attend, ShardLink, SharedRankError
    from kb.engine.engine import Engine
    from kb.engine.sequence import SamplingParams

    lm, cfg, corpora, _ = _references(world)
    local = Engine(lm, cfg)
    local.register_corpus(corpora[0])
    want = _generate(local, corpora[:1])  # every prompt over the dense corpus
    link = ShardLink(world, keepalive_s=3600)  # no keep-alive ping may meet the stopped rank
    routes_before = link.routes.to
    engine, views = _served(lm, cfg, link, corpora[:1])
    warm = _generate(engine, views)
    pid = _stop_rank3(world)
    q = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(3))
    started, error, t0 = False, None, time.monotonic()
    try:
        with torch.inference_mode(), link.attention_batch() as batch:
            pending = batch.start(Attend(views[0], 1, q))
            started = True
            local = torch.randn(64, 64) @ torch.randn(64, 64)  # rank 0's own work meanwhile
            os.kill(pid, signal.SIGKILL)
            pending.wait()
    except SharedRankError as e:
        error = str(e)
    failed_after = time.monotonic() - t0
    late = engine.add_request(
        PROMPTS[0], SamplingParams(max_tokens=6, ignore_eos=True), views[0].key, views[0].pos_offset
    )
    engine.run_until_done()
    out = {
        "warm": warm,
        "want": want,
        "started": started,
        "local": tuple(local.shape),
        "error": error,
        "failed_after": failed_after,
        "late": (late.result.reason, late.seq.output_ids),
        "routes_before": routes_before,
        "routes_after": link.routes.to,
        "members": link.members,
    }
    link.shutdown()
    return out


def _rank0_stall(world) -> dict:
    """Two hosts; rank 3 stops for good while requests decode (its sockets stay open): every
    overlapped wait of the step can only end at the process group's timeout (rank 2 waits for
    rank 3's partial, rank 0 for rank 2's and for its broadcasts to rank 3). The step's
    requests fail naming rank 3 within the timeout, and the survivors serve."""
    from kb.engine.distributed.protocol import ShardLink
    from kb.engine.engine import Engine
    from kb.engine.sequence import SamplingParams

    lm, cfg, corpora, _ = _references(world)
    local = Engine(lm, cfg)
    local.register_corpus(corpora[0])
    ref = local.add_request([1, 2], SamplingParams(max_tokens=3), "dense", corpora[0].pos_offset)
    local.run_until_done()
    link = ShardLink(world, keepalive_s=3600)
    engine, views = _served(lm, cfg, link, corpora[:1])
    view = views[0]
    hs = [
        engine.add_request(p, SamplingParams(max_tokens=40, ignore_eos=True), view.key, 200)
        for p in PROMPTS[:2]
    ]
    for _ in range(3):
        engine.step()
    tokens_before = [len(h.seq.output_ids) for h in hs]
    pid = _stop_rank3(world)
    t0 = time.monotonic()
    engine.run_until_done()
    failed_after = time.monotonic() - t0
    late = engine.add_request([1, 2], SamplingParams(max_tokens=3), view.key, view.pos_offset)
    engine.run_until_done()
    os.kill(pid, signal.SIGKILL)  # it would outlive the test's joins
    out = {
        "tokens_before": tokens_before,
        "results": [(h.result.reason, h.result.error) for h in hs],
        "failed_after": failed_after,
        "late": (late.result.reason, late.seq.output_ids),
        "want": ref.seq.output_ids,
        "members": link.members,
    }
    link.shutdown()
    return out


def _stop_when_told(world) -> None:
    """Test-only (rank 3 of the fault test): a thread that stops this process (SIGSTOP: its
    sockets stay open, nothing answers) once rank 0 asks; rank 0 kills it later."""
    import threading

    def stop() -> None:
        world.store.set("pid/3", str(os.getpid()))
        world.store.wait(["stop/3"], timedelta(seconds=JOIN_S))
        world.store.set("stopped/3", "1")
        os.kill(os.getpid(), signal.SIGSTOP)

    threading.Thread(target=stop, daemon=True).start()


SCENARIOS = {
    "overlap": _rank0_overlap,
    "hosts": _rank0_hosts,
    "fault": _rank0_fault,
    "stall": _rank0_stall,
}


def _rank_main(rank: int, world_size: int, init: str, scenario: str, out, backend: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if scenario != "overlap":
        os.environ["KB_HOST_ID"] = TWO_HOSTS[rank]
    torch.set_num_threads(1)
    from kb.engine.distributed.protocol import init_world
    from kb.engine.distributed.worker import run_shared_rank

    try:
        timeout = STALL_TIMEOUT_S if scenario == "stall" else TIMEOUT_S
        world = init_world(init, rank, world_size, backend=backend, timeout_s=timeout)
        if rank == 0:
            _report(out, ("ok", SCENARIOS[scenario](world)))
            os._exit(0)  # peers may be dead: skip teardown that would wait for them
        if scenario in ("fault", "stall") and rank == 3:
            _stop_when_told(world)
        run_shared_rank(world)
    except BaseException:  # noqa: BLE001 - the test process reports it
        if rank == 0:
            _report(out, ("error", traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def test_overlapped_exchange_answers_as_one_process(tmp_path):
    res = _spawn(3, "overlap", tmp_path, target=_rank_main)
    assert res["routes"] == {1: 0, 2: 0}  # one host: every partial goes to rank 0 (a gather)
    assert res["on"] == res["want"] and res["off"] == res["want"]
    assert len(res["want"]) == 2 * len(PROMPTS) and all(len(t) == 6 for t in res["want"])
    assert res["same"] == [True, True] and res["err"] < 2e-3
    stats = res["stats"]
    assert stats["exchanges"] > 0 and 0 < stats["wait_seconds"] <= stats["seconds"]


def test_partials_merge_per_host_before_rank_zero(tmp_path):
    res = _spawn(4, "hosts", tmp_path, target=_rank_main)
    assert res["routes"] == {1: 0, 2: 0, 3: 2}  # rank 3's partial goes to its host's leader
    assert res["shards"] == [1, 2, 3]  # every shared rank holds part of the corpus
    assert res["got"] == res["want"] and all(len(t) == 6 for t in res["got"])
    # o is rounded to float16 on rank 3 and again after rank 2's merge: within 2 roundings
    for name, (do, dlse) in res["diffs"].items():
        assert do < 3e-3 and dlse < 1e-5, (name, do, dlse)
    assert res["received"] == [2 * res["partial_bytes"]] * 2  # ranks 1 and 2, not 1, 2 and 3
    _same_citations(res["got_cited"], res["want_cited"])  # rank 3's slice reached rank 0 too
    assert res["mass_exchanges"] > 0


def test_rank_lost_during_an_overlapped_wait_fails_it_clearly(tmp_path):
    res = _spawn(4, "fault", tmp_path, target=_rank_main)
    assert res["warm"] == res["want"]
    assert res["routes_before"] == {1: 0, 2: 0, 3: 2}
    assert res["started"] and res["local"] == (64, 64)  # the ATTEND was in flight, rank 0 worked
    assert res["error"] is not None and "shared rank 3 stopped responding" in res["error"]
    assert "attention of layer 1 on corpus dense" in res["error"], res["error"]
    assert res["failed_after"] < TIMEOUT_S + 10, res["failed_after"]
    assert res["members"] == [1, 2] and res["routes_after"] == {1: 0, 2: 0}  # 2 alone on host-b
    assert res["late"] == ("length", res["want"][0])


def test_rank_hung_during_overlapped_waits_fails_the_step_within_the_timeout(tmp_path):
    res = _spawn(4, "stall", tmp_path, target=_rank_main)
    assert all(n > 0 for n in res["tokens_before"])
    for reason, error in res["results"]:
        assert reason == "error" and "shared rank 3 stopped responding" in error, error
    assert 0 < res["failed_after"] < STALL_TIMEOUT_S + 10, res["failed_after"]
    assert res["members"] == [1, 2]
    assert res["late"] == ("length", res["want"])
