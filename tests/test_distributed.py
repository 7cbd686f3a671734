"""The shared KV sharded over gloo ranks on CPU: 2 and 3 processes answer exactly as one process,
dense and routed, and a shared rank that dies fails its requests with a clear error, never a hang.

Every process builds the same tiny random Llama from a fixed seed; rank 0 builds the corpora, runs
the single-process engine as the reference, registers the corpora through the link and runs the
distributed engine. Results come back through a queue and are checked here, in the test process.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from kb.engine.distributed.placement import place
from kb.model.config import ModelConfig
from tests.conftest import DigitTokenizer

TIMEOUT_S = 10.0  # the process group's timeout: a dead rank must surface within it
STALL_TIMEOUT_S = 5.0  # the hung-rank test waits it out: shorter
JOIN_S = 60.0


def _tiny_loaded(device: str = "cpu"):
    from kb.model.llama import Transformer
    from kb.model.loader import LoadedModel

    cfg = ModelConfig(
        model_type="llama",
        vocab_size=97,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = Transformer(cfg).eval().requires_grad_(False).to(device)
    return LoadedModel(model, DigitTokenizer(), cfg, Path("."), "tiny", "digits")


def _corpus(key: str, seed: int, routed: bool, device: str = "cpu"):
    """A random 200-token corpus in 16-token chunks (13 chunks); routed ones attend 4 per query."""
    from index import CorpusRouter
    from kb.engine.shared_kv import SharedKV

    g = torch.Generator().manual_seed(seed)
    k = [(torch.randn(200, 2, 16, generator=g) * 2).to(device) for _ in range(2)]
    v = [torch.randn(200, 2, 16, generator=g).to(device) for _ in range(2)]
    sh = SharedKV(key, k, v, chunk_size=16, pos_offset=200, preamble_len=10)
    if routed:
        sh.router = CorpusRouter(sh.k, 16, sh.always_chunks)
        sh.top_k = 4
        assert sh.routed
    return sh


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16], [3, 1, 4, 1, 5, 9]]


def _generate(engine, corpora, max_tokens: int = 6) -> list[list[int]]:
    from kb.engine.sequence import SamplingParams

    hs = [
        engine.add_request(
            p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), c.key, c.pos_offset
        )
        for p, c in zip(PROMPTS, corpora * len(PROMPTS))
    ]
    engine.run_until_done()
    return [h.seq.output_ids for h in hs]


def _cited(engine, corpora, max_tokens: int = 6) -> list[tuple[list[int], list]]:
    """Greedy tokens and the answer's chunk mass (`Finished.chunk_mass`: (chunk, mass), heaviest
    first, what the service's citations are built from) of each prompt."""
    from kb.engine.sequence import SamplingParams

    hs = [
        engine.add_request(
            p, SamplingParams(max_tokens=max_tokens, ignore_eos=True), c.key, c.pos_offset
        )
        for p, c in zip(PROMPTS, corpora * len(PROMPTS))
    ]
    engine.run_until_done()
    return [(h.seq.output_ids, h.result.chunk_mass) for h in hs]


def _cited_by(engine, corpora) -> list[tuple[list[int], list]]:
    """`_cited` over `corpora` once they are registered with `engine`."""
    for c in corpora:
        engine.register_corpus(c)
    return _cited(engine, corpora)


def _same_citations(got: list, want: list) -> None:
    """The same tokens and the same chunks in the same order, their masses within the 16-bit
    rounding the partials travel with (it moves the merged lse and the next layers' q)."""
    assert len(got) == len(want)
    for (tokens, mass), (want_tokens, want_mass) in zip(got, want):
        assert tokens == want_tokens
        assert [c for c, _ in mass] == [c for c, _ in want_mass], (mass, want_mass)
        a, b = torch.tensor([m for _, m in mass]), torch.tensor([m for _, m in want_mass])
        assert len(a) == 13 and (b > 0).all()  # every chunk of the corpus measured
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def _cite_config(cfg):
    """`cfg` with the tiny model's second half (its layer 1) measuring citation mass."""
    return dataclasses.replace(cfg, citation_layers=1)


def _with_selector(sh, model):
    """Give a corpus a passage selector (layer 1, a 48-token budget: 3 of its 13 chunks)."""
    from kb.engine.selection import PassageSelector, SelectionConfig

    sh.positions = torch.arange(sh.num_tokens)
    sh.selector = PassageSelector.build(
        [k.cpu() for k in sh.k],
        sh.positions,
        sh.chunk_size,
        sh.always_chunks,
        model.inv_freq.cpu(),
        SelectionConfig(budget=48, layers=(1,)),
    )
    assert not sh.selector.covers_corpus
    return sh


def _generate_selecting(engine, corpus, max_tokens: int = 6) -> list[list[int]]:
    """Requests that choose their passages at prefill, attended at virtual positions."""
    from kb.engine.sequence import SamplingParams

    pos = corpus.selector.query_position(corpus.pos_offset)
    hs = [
        engine.add_request(
            p,
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            corpus.key,
            pos,
            select=True,
            select_span=(0, len(p)),
        )
        for p in PROMPTS
    ]
    engine.run_until_done()
    assert all(h.seq.selection is not None and h.seq.selection.shift is not None for h in hs)
    return [h.seq.output_ids for h in hs]


def _unique_rank_compare(world) -> dict:
    """Rank 0 of the equality test: single-process answers, then the same through the link."""
    import attention
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.protocol import ShardLink
    from kb.engine.engine import Engine, EngineConfig

    dev = str(world.device)
    lm = _tiny_loaded(dev)
    dense, routed = _corpus("dense", 1, False, dev), _corpus("routed", 2, True, dev)
    cfg = EngineConfig(device=dev, unique_kv_tokens=512, block_size=8, citation_layers=0)
    local = Engine(lm, cfg)
    local.register_corpus(dense)
    local.register_corpus(routed)
    want = _generate(local, [dense, routed])
    selecting = _with_selector(_corpus("selecting", 4, False, dev), lm.model)
    local.register_corpus(selecting)
    want += _generate_selecting(local, selecting)

    link = ShardLink(world)
    engine = distributed_engine(lm, link, cfg)
    views = [link.register(dense), link.register(routed)]
    for v in views:
        engine.register_corpus(v)
    got = _generate(engine, views)
    view_sel = link.register(selecting)
    engine.register_corpus(view_sel)
    got += _generate_selecting(engine, view_sel)

    g = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 16, generator=g).to(dev)
    idx = routed.router.route(1, q, routed.top_k)
    diffs = {}
    with torch.inference_mode():
        for name, sh, view, i in (
            ("dense", dense, views[0], None),
            ("routed", routed, views[1], idx),
        ):
            o_ref, lse_ref = attention.shared_attention(q, sh.k[1], sh.v[1], i, sh.chunk_size)
            o, lse = link.shared_attention(view, 1, q, i)
            diffs[name] = (float((o - o_ref).abs().max()), float((lse - lse_ref).abs().max()))
        # chunks at virtual positions: the shifts travel with the chunk ids
        chunks = torch.tensor([0, 3, 8, 12])
        i = chunks[None, None].expand(5, 2, -1).to(dev)
        shift = (torch.arange(4) * 16 - chunks * 16)[None, None].expand(5, 2, -1).to(dev)
        inv = lm.model.inv_freq
        o_ref, lse_ref = attention.shared_attention(
            q, dense.k[1], dense.v[1], i, 16, chunk_shift=shift, rope_inv_freq=inv
        )
        o, lse = link.shared_attention(views[0], 1, q, i, shift, inv)
        diffs["shifted"] = (float((o - o_ref).abs().max()), float((lse - lse_ref).abs().max()))
        # a selecting request's ids and shifts are the same at every layer: sent once a step
        link.begin_step()
        sent = []
        for _layer in range(2):
            before = link.stats.bytes_out
            o, lse = link.shared_attention(views[0], 1, q, i, shift, inv, steady=True)
            sent.append(link.stats.bytes_out - before)
            diffs[f"steady{_layer}"] = (
                float((o - o_ref).abs().max()),
                float((lse - lse_ref).abs().max()),
            )
    plain = (world.world_size - 1) * (8 * 8 + q.numel() * q.element_size())  # header and q

    # citations: dense and routed answers measure their chunk mass on the shared ranks (one
    # MASS exchange per citation layer and step) as one process measures it on all keys
    cite = _cite_config(cfg)
    want_cited = _cited_by(Engine(lm, cite), [dense, routed])
    before = dataclasses.replace(link.stats)
    got_cited = _cited_by(distributed_engine(lm, link, cite), views)
    mass_exchanges = link.stats.mass_exchanges - before.mass_exchanges
    link.shutdown()
    return {
        "want": want,
        "got": got,
        "diffs": diffs,
        "sent": sent,
        "plain": plain,
        "want_cited": want_cited,
        "got_cited": got_cited,
        "mass_exchanges": mass_exchanges,
    }


def _unique_rank_kill(world, stall: bool = False) -> dict:
    """Rank 0 of the failure tests: a few steps run, then shared rank 2 exits (or, with `stall`,
    stops: its sockets stay open and nothing answers); the step's requests fail, the link forms
    its next generation over rank 1 and places the corpus there, and a later request answers as
    the one-process engine does."""
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.protocol import ShardLink
    from kb.engine.engine import Engine, EngineConfig
    from kb.engine.sequence import SamplingParams

    lm = _tiny_loaded()
    cfg = EngineConfig(unique_kv_tokens=512, block_size=8, citation_layers=0)
    corpus = _corpus("dense", 1, False)
    local = Engine(lm, cfg)
    local.register_corpus(corpus)
    ref = local.add_request([1, 2], SamplingParams(max_tokens=3), corpus.key, corpus.pos_offset)
    local.run_until_done()
    link = ShardLink(world)
    engine = distributed_engine(lm, link, cfg)
    view = link.register(corpus)
    engine.register_corpus(view)
    before = [s.rank for s in link.placement(view).shards]
    hs = [
        engine.add_request(
            p, SamplingParams(max_tokens=40, ignore_eos=True), view.key, view.pos_offset
        )
        for p in PROMPTS[:2]
    ]
    for _ in range(3):
        engine.step()
    tokens_before = [len(h.seq.output_ids) for h in hs]
    world.store.set("kill/2", "1")
    world.store.wait(["dying/2"], timedelta(seconds=JOIN_S))
    t0 = time.monotonic()
    engine.run_until_done()
    failed_after = time.monotonic() - t0
    late = engine.add_request([1, 2], SamplingParams(max_tokens=3), view.key, view.pos_offset)
    engine.run_until_done()
    if stall:  # the stopped rank would outlive the test's joins: end it now
        os.kill(int(world.store.get("pid/2")), signal.SIGKILL)
    link.ping()  # the new generation answers
    results = [(h.result.reason, h.result.error) for h in hs]
    out = {
        "tokens_before": tokens_before,
        "results": results,
        "failed_after": failed_after,
        "late": (late.result.reason, late.seq.output_ids),
        "want": ref.seq.output_ids,
        "before": before,
        "after": [s.rank for s in link.placement(view).shards],
        "members": link.members,
        "degraded": link.degraded,
        "error": str(link.error),
    }
    link.shutdown()
    return out


def _unique_rank_mass_kill(world) -> dict:
    """Rank 0 of the citation fault test: a MASS of a citing ATTEND first equals one process's
    `attention.chunk_mass` summed per owner; then shared rank 2 dies between a citing ATTEND and
    its MASS: the MASS fails naming it, the link forms its next generation over rank 1, and a
    later answer cites as the one-process engine does."""
    import attention
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.protocol import Attend, ShardLink, SharedRankError
    from kb.engine.engine import Engine, EngineConfig

    lm = _tiny_loaded()
    cfg = _cite_config(EngineConfig(unique_kv_tokens=512, block_size=8))
    corpus = _corpus("dense", 1, False)
    local = Engine(lm, cfg)
    local.register_corpus(corpus)
    want = _cited(local, [corpus])
    link = ShardLink(world)
    engine = distributed_engine(lm, link, cfg)
    view = link.register(corpus)
    engine.register_corpus(view)
    q = torch.randn(5, 4, 16, generator=torch.Generator().manual_seed(3))
    owner = torch.tensor([0, 0, 1, 1, 1])
    with torch.inference_mode():
        with link.attention_batch() as batch:
            _, lse = batch.start(Attend(view, 1, q, cites=True)).wait()
            mass = batch.chunk_mass(view, 1, lse, owner, 2)
        per_row = attention.chunk_mass(q, corpus.k[1], lse, 16, skip=corpus.preamble_len)
        ref = torch.stack([per_row[:2].sum(0), per_row[2:].sum(0)])
        mass_err = float((mass - ref).abs().max() / ref.abs().max())
        world.store.wait(["pid/2"], timedelta(seconds=JOIN_S))
        pid = int(world.store.get("pid/2"))
        error, t0 = None, time.monotonic()
        try:
            with link.attention_batch() as batch:
                _, lse = batch.start(Attend(view, 1, q, cites=True)).wait()
                os.kill(pid, signal.SIGKILL)  # after its partial came, before the MASS
                deadline = time.monotonic() + JOIN_S
                while _proc_state(pid) not in ("Z", "X", None):
                    assert time.monotonic() < deadline, "rank 2 did not die"
                    time.sleep(0.01)
                t0 = time.monotonic()
                batch.chunk_mass(view, 1, lse, owner, 2)
        except SharedRankError as e:
            error = str(e)
        failed_after = time.monotonic() - t0
    late = _cited(engine, [view])
    out = {
        "mass_shape": tuple(mass.shape),
        "mass_err": mass_err,
        "error": error,
        "failed_after": failed_after,
        "members": link.members,
        "late": late,
        "want": want,
    }
    link.shutdown()
    return out


def _proc_state(pid: int) -> str | None:
    """A process's state letter (Z: exited, not yet reaped), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _unique_rank_load(world, folder: Path) -> dict:
    """Rank 0 of the load test: a corpus stored in two KV files is read by each shared rank from
    the files (only its slice), and answers as the one-process engine; with a checksum that no
    longer matches, the ranks refuse the files and the slices are sent from rank 0 instead."""
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.protocol import KVFile, ShardLink
    from kb.engine.engine import Engine, EngineConfig
    from storage.kvstore import KVCorruptError, write_kv

    lm = _tiny_loaded()
    sh = _corpus("stored", 5, False)
    sh.k = [k.half().float() for k in sh.k]  # what float16 files give back
    sh.v = [v.half().float() for v in sh.v]
    k, v = torch.stack(sh.k), torch.stack(sh.v)  # [L, N, Hkv, d]
    files = []
    for name, a, b in (("preamble", 0, 37), ("segment", 37, 200)):  # a cut inside a chunk
        stored = write_kv(folder / f"{name}.safetensors", k[:, a:b], v[:, a:b], dtype=torch.float16)
        files.append(KVFile(str(stored.path), stored.checksum, b - a))
    cfg = EngineConfig(unique_kv_tokens=512, block_size=8, citation_layers=0)
    local = Engine(lm, cfg)
    local.register_corpus(sh)
    want = _generate(local, [sh])
    link = ShardLink(world)
    engine = distributed_engine(lm, link, cfg)
    view, read = link.load(sh, files, torch.float16)
    engine.register_corpus(view)
    got = _generate(engine, [view])
    engine.unregister_corpus(view.key)
    link.drop(view)
    stale = [files[0], KVFile(files[1].path, "0" * 64, files[1].tokens)]
    view2, read2 = link.load(sh, stale, torch.float16)
    engine.register_corpus(view2)
    sent = _generate(engine, [view2])
    # rank 0 holding no layout (a view of meta tensors) reads refused slices from the files
    # itself: with the stale checksum it cannot either, the ranks forget the corpus and the
    # load raises the file's error, no rank failure
    meta = [torch.empty(x.shape, dtype=x.dtype, device="meta") for x in sh.k]
    unreadable = None
    try:
        link.load(dataclasses.replace(sh, k=meta, v=meta), stale, torch.float16, in_memory=False)
    except KVCorruptError as e:
        unreadable = type(e).__name__
    link.ping()
    healthy = not link.degraded
    link.shutdown()
    return {
        "want": want,
        "got": got,
        "read": read,
        "sent": sent,
        "read2": read2,
        "unreadable": unreadable,
        "healthy": healthy,
    }


def _unique_rank_loopback(world, folder: Path) -> dict:
    """A world of one (`LoopbackLink`): a corpus loaded from its KV file and one registered from
    memory, each attended by rank 0 as its own shared rank after the protocol's exchange over
    the group of one, answer as the one-process engine."""
    from kb.engine.distributed.backend import distributed_engine
    from kb.engine.distributed.loopback import LoopbackLink
    from kb.engine.distributed.protocol import KVFile
    from kb.engine.engine import Engine, EngineConfig
    from storage.kvstore import write_kv

    lm = _tiny_loaded()
    sh = _corpus("stored", 5, False)
    sh.k = [k.half().float() for k in sh.k]  # what float16 files give back
    sh.v = [v.half().float() for v in sh.v]
    routed = _corpus("routed", 2, True)
    stored = write_kv(
        folder / "kv.safetensors", torch.stack(sh.k), torch.stack(sh.v), dtype=torch.float16
    )
    cfg = EngineConfig(unique_kv_tokens=512, block_size=8, citation_layers=0)
    local = Engine(lm, cfg)
    local.register_corpus(sh)
    local.register_corpus(routed)
    want = _generate(local, [sh, routed])
    link = LoopbackLink(world)
    engine = distributed_engine(lm, link, cfg)
    view, read = link.load(sh, [KVFile(str(stored.path), stored.checksum, 200)], torch.float16)
    routed_view = link.register(routed)
    engine.register_corpus(view)
    engine.register_corpus(routed_view)
    got = _generate(engine, [view, routed])
    exchanges = link.stats.exchanges
    # citations: the MASS exchange over the group of one, rank 0 measuring the whole corpus
    cite = _cite_config(cfg)
    want_cited = _cited_by(Engine(lm, cite), [sh, routed])
    got_cited = _cited_by(distributed_engine(lm, link, cite), [view, routed_view])
    link.shutdown()
    return {
        "want": want,
        "got": got,
        "read": read,
        "exchanges": exchanges,
        "holders": link.holders,
        "want_cited": want_cited,
        "got_cited": got_cited,
        "mass_exchanges": link.stats.mass_exchanges,
    }


def _rank_main(
    rank: int, world_size: int, init: str, scenario: str, out, backend: str = "gloo"
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    from kb.engine.distributed.protocol import init_world
    from kb.engine.distributed.worker import run_shared_rank

    try:
        timeout = STALL_TIMEOUT_S if scenario == "stall" else TIMEOUT_S
        world = init_world(init, rank, world_size, backend=backend, timeout_s=timeout)
        if scenario == "loopback":
            folder = Path(init[len("file://") :]).parent
            _report(out, ("ok", _unique_rank_loopback(world, folder)))
            os._exit(0)
        if rank == 0 and scenario == "load":
            _report(out, ("ok", _unique_rank_load(world, Path(init[len("file://") :]).parent)))
            os._exit(0)
        if rank == 0:
            if scenario == "compare":
                result = _unique_rank_compare(world)
            elif scenario == "mass_kill":
                result = _unique_rank_mass_kill(world)
            else:
                result = _unique_rank_kill(world, stall=scenario == "stall")
            _report(out, ("ok", result))
            os._exit(0)  # peers may be dead: skip teardown that would wait for them
        if scenario in ("kill", "stall", "mass_kill") and rank == 2:
            _exit_when_told(world, stop=scenario == "stall")
        run_shared_rank(world)
    except BaseException:  # noqa: BLE001 - the test process reports it
        if rank == 0:
            _report(out, ("error", traceback.format_exc()))
        os._exit(1)
    os._exit(0)


def _report(out, item: tuple) -> None:
    """Put and flush before os._exit: the queue's feeder thread would die with the process."""
    out.put(item)
    out.close()
    out.join_thread()


def _exit_when_told(world, stop: bool = False) -> None:
    """Test-only: a thread that kills this process (no cleanup, like a crash) once rank 0 asks;
    with `stop`, stops it instead (SIGSTOP: a hung rank whose sockets stay open)."""
    import threading

    def die() -> None:
        world.store.set("pid/2", str(os.getpid()))
        world.store.wait(["kill/2"], timedelta(seconds=JOIN_S))
        world.store.set("dying/2", "1")
        if stop:
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(1)

    threading.Thread(target=die, daemon=True).start()


def _spawn(
    world_size: int, scenario: str, tmp_path: Path, backend: str = "gloo", target=None
) -> dict:
    """Run `target` (default `_rank_main`: rank, world size, init, scenario, queue, backend) in
    `world_size` spawned processes; rank 0's report."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    init = f"file://{tmp_path / 'rendezvous'}"
    procs = [
        ctx.Process(
            target=target or _rank_main,
            args=(r, world_size, init, scenario, out, backend),
            daemon=True,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    try:
        status, payload = out.get(timeout=JOIN_S)
    except queue.Empty:
        payload, status = None, "timeout"
    finally:
        for p in procs:
            p.join(timeout=TIMEOUT_S * 2)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    assert status == "ok", f"rank 0 did not finish: {status}\n{payload}"
    return payload


def test_placement_balances_tokens_and_maps_chunks():
    p = place(num_tokens=200, chunk_size=16, ranks=[1, 2, 3])  # 13 chunks, the last holds 8 tokens
    assert [(s.chunk_start, s.chunk_end) for s in p.shards] == [(0, 4), (4, 8), (8, 13)]
    assert sum(s.num_tokens for s in p.shards) == 200
    assert p.locate(0) == (1, 0) and p.locate(5) == (2, 1) and p.locate(12) == (3, 4)
    idx = torch.tensor([[[0, 5, 12]]])
    assert p.local_chunk_idx(idx, 2).tolist() == [[[-1, 1, -1]]]
    assert p.local_chunk_idx(idx, 3).tolist() == [[[-1, -1, 4]]]
    few = place(num_tokens=20, chunk_size=16, ranks=[1, 2, 3])  # 2 chunks over 3 ranks
    assert [s.num_chunks for s in few.shards] == [0, 1, 1]  # an empty slice answers lse = -inf
    assert sum(s.num_tokens for s in few.shards) == 20


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_shared_kv_answers_and_cites_as_one_process(world_size, tmp_path):
    res = _spawn(world_size, "compare", tmp_path)
    # greedy tokens of dense, routed and selecting requests (their passages at virtual positions)
    assert res["got"] == res["want"]
    assert len(res["got"]) == 2 * len(PROMPTS) and all(len(t) == 6 for t in res["got"])
    # o travels in float16 (the lse in float32): within float16's rounding of the one-process o
    for name, (do, dlse) in res["diffs"].items():
        assert do < 2e-3 and dlse < 1e-5, (name, do, dlse)
    first, again = res["sent"]  # the ids, shifts and RoPE frequencies at the step's first layer
    assert again == res["plain"] and first > again
    # citation mass of dense and routed answers, measured by the shared ranks on their slices
    # (13 chunks as 6 + 7 over two ranks, 4 + 4 + 5 over three: uneven slices; the preamble's
    # 10 tokens on the first), equals one process's over all keys
    _same_citations(res["got_cited"], res["want_cited"])
    assert res["mass_exchanges"] > 0


def test_partials_travel_in_16_bits_and_merge_as_float32():
    """The wire format of a shared rank's partial: o in 16 bits (bfloat16 for a bfloat16
    computation, float16 otherwise), the float32 lse exact in the last two slots; two slices'
    packed partials merge to the one-process float32 result within 16-bit rounding."""
    import attention
    from kb.engine.distributed.protocol import (
        merge_partials,
        pack_partial,
        unpack_partial,
        wire_dtype,
    )

    g = torch.Generator().manual_seed(7)
    q = torch.randn(5, 4, 16, generator=g)
    k, v = torch.randn(200, 2, 16, generator=g) * 2, torch.randn(200, 2, 16, generator=g)
    o_ref, lse_ref = attention.shared_attention(q, k, v, None, 16)
    halves = [
        attention.shared_attention(q, k[a:b], v[a:b], None, 16) for a, b in ((0, 96), (96, 200))
    ]
    empty = (torch.zeros(5, 4, 16), torch.full((5, 4), float("-inf")))  # a rank with no chunks
    for dtype, wire, rel in (
        (torch.float32, torch.float16, 2**-10),
        (torch.bfloat16, torch.bfloat16, 2**-7),
    ):
        assert wire_dtype(dtype) == wire
        packed = [pack_partial(o, lse, wire) for o, lse in [*halves, empty]]
        for p, (o, lse) in zip(packed, [*halves, empty]):
            assert p.dtype == wire and p.element_size() == 2 and p.shape == (5, 4, 18)
            po, plse = unpack_partial(p)
            assert torch.equal(plse, lse) and torch.equal(po, o.to(wire))  # lse exact
        o, lse = merge_partials(packed, q.to(dtype))
        assert o.dtype == dtype and lse.dtype == torch.float32
        assert (lse - lse_ref).abs().max() < 1e-5
        err = (o.float() - o_ref).abs().max()
        assert 0 < err <= 2 * rel * o_ref.abs().max(), (dtype, float(err))


@pytest.mark.gpu
@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (run on a multi-GPU device kind)"
)
def test_sharded_shared_kv_over_nccl_answers_as_one_process(tmp_path):
    """The same over NCCL, rank r on cuda:r: greedy tokens equal the one-process engine on cuda:0."""
    res = _spawn(2, "compare", tmp_path, backend="nccl")
    assert res["got"] == res["want"]
    assert all(len(t) == 6 for t in res["got"])
    for name, (do, dlse) in res["diffs"].items():
        assert do < 2e-3 and dlse < 1e-5, (name, do, dlse)


def test_shared_ranks_read_their_slices_from_the_kv_store(tmp_path):
    res = _spawn(3, "load", tmp_path)
    assert res["read"] and res["got"] == res["want"]  # read from the files by ranks 1 and 2
    assert not res["read2"] and res["sent"] == res["want"]  # refused files: sent from rank 0
    assert res["unreadable"] == "KVCorruptError" and res["healthy"]  # no rank failed
    assert all(len(t) == 6 for t in res["got"])


def test_a_world_of_one_is_its_own_shared_rank(tmp_path):
    res = _spawn(1, "loopback", tmp_path)
    assert res["read"] and res["holders"] == [0] and res["exchanges"] > 0
    assert res["got"] == res["want"] and all(len(t) == 6 for t in res["got"])
    _same_citations(res["got_cited"], res["want_cited"])
    assert res["mass_exchanges"] > 0


def test_hung_shared_rank_fails_requests_within_the_timeout(tmp_path):
    """A rank that stops answering while its sockets stay open: the step fails within the process
    group's timeout, never later, and its requests fail naming the rank. The other shared rank's
    own collective may time out too (it waits on the same exchange) and it goes to the lobby;
    when its wait began before the step's (it waited on the previous exchange), its failure
    closes its sockets first and the step fails earlier than the timeout (2 s of 5 in one CI
    run). The next generation is rank 0 and rank 1, and a later request answers."""
    res = _spawn(3, "stall", tmp_path)
    assert all(n > 0 for n in res["tokens_before"])
    for reason, error in res["results"]:
        assert reason == "error" and re.match(r"shared rank [\d, ]*2 stopped responding", error)
    assert 0 < res["failed_after"] < STALL_TIMEOUT_S + 10, res["failed_after"]
    assert res["members"] == [1] and res["degraded"]
    assert res["late"] == ("length", res["want"]) and res["after"] == [1]


def test_shared_rank_lost_before_a_citation_mass_fails_it_then_survivors_cite(tmp_path):
    """The MASS exchange answers a citing ATTEND's rows per owner as one process's chunk mass;
    a shared rank killed between a citing ATTEND and its MASS fails that MASS at once, naming
    it (no hang); rank 1 then holds the corpus and the answers cite as one process."""
    res = _spawn(3, "mass_kill", tmp_path)
    assert res["mass_shape"] == (2, 13) and res["mass_err"] < 1e-5
    assert res["error"] is not None and "shared rank 2 stopped responding" in res["error"]
    assert "citation mass of layer 1 on corpus dense" in res["error"], res["error"]
    assert res["failed_after"] < TIMEOUT_S + 10, res["failed_after"]
    assert res["members"] == [1]
    _same_citations(res["late"], res["want"])


def test_dead_shared_rank_fails_requests_then_survivors_serve(tmp_path):
    """A shared rank killed mid-run: the step's requests fail naming it, at once (its socket
    closes); the link forms its next generation over rank 1, places the whole corpus there,
    and a later request gives the one-process greedy tokens."""
    res = _spawn(3, "kill", tmp_path)
    assert all(n > 0 for n in res["tokens_before"])  # it worked until the rank died
    for reason, error in res["results"]:
        assert reason == "error"
        assert "shared rank 2 stopped responding" in error, error
    assert res["before"] == [1, 2] and res["after"] == [1] and res["members"] == [1]
    assert res["late"] == ("length", res["want"]), res
    assert res["degraded"] and "shared rank 2" in res["error"]
