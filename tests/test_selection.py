"""Attention retrieval (kb/engine/selection.py): the position math against plain torch, the
budget fill, and end to end over a corpus three times the demo model's context."""

from __future__ import annotations

import dataclasses

import torch

from attention import cpu_shared, reference
from kb.engine.selection import PassageSelector, SelectionConfig
from kb.model.rope import apply_rope, cos_sin, inv_frequencies
from tests.conftest import FACT_ANSWER, FACT_QUESTION, MODELS_DIR

INV = inv_frequencies(64, 10000.0)


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_sin(pos, INV)
    return apply_rope(x.float(), cos, sin)


def test_query_rotation_equals_re_rotated_keys():
    """Attending chunk c shifted by s (the CPU path rotates the query per chunk) equals attending
    a copy of its keys re-rotated to p + s (K' = R(s) K), and the reference agrees."""
    torch.manual_seed(0)
    t, hq, hkv, d, n, cs = 4, 9, 3, 64, 512, 64
    q = torch.randn(t, hq, d)
    k, v = torch.randn(n, hkv, d).half(), torch.randn(n, hkv, d).half()
    chunks = torch.tensor([0, 2, 5, 7])
    shifts = torch.tensor([0, -120, 300, -2000])
    idx = chunks.int()[None, None].expand(t, hkv, 4).contiguous()
    sh = shifts[None, None].expand(t, hkv, 4).contiguous()
    tok = (chunks[:, None] * cs + torch.arange(cs)).reshape(-1)
    tok_shift = shifts.repeat_interleave(cs)
    k_copy = reference.rope_rotate(k[tok].float(), tok_shift[:, None].expand(-1, hkv), INV)
    want_o, want_lse = reference.shared_attention(q, k_copy, v[tok].float(), None, cs)
    for o, lse in (
        cpu_shared.shared_attention(q, k, v, idx, cs, chunk_shift=sh, rope_inv_freq=INV, block=128),
        reference.shared_attention(q, k, v, idx, cs, chunk_shift=sh, rope_inv_freq=INV),
    ):
        torch.testing.assert_close(o, want_o, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-5)


def test_requests_with_their_own_selections_match_the_reference():
    """Decode rows of different requests (each its own chunks and shifts, one the corpus's partial
    last chunk) are attended together as the reference attends them one by one."""
    torch.manual_seed(3)
    t, hq, hkv, d, n, cs = 6, 9, 3, 64, 1000, 64
    q = torch.randn(t, hq, d)
    k, v = torch.randn(n, hkv, d).half(), torch.randn(n, hkv, d).half()
    idx = torch.stack([torch.randperm(16)[:5] for _ in range(t)]).int()
    idx[2, 4] = 15 if 15 not in idx[2, :4] else idx[2, 4]
    idx = idx[:, None].expand(t, hkv, 5).contiguous()
    sh = torch.randint(-3000, 3000, (t, 5))[:, None].expand(t, hkv, 5).contiguous()
    for shift in (None, sh):
        want = reference.shared_attention(q, k, v, idx, cs, chunk_shift=shift, rope_inv_freq=INV)
        got = cpu_shared.shared_attention(q, k, v, idx, cs, chunk_shift=shift, rope_inv_freq=INV)
        torch.testing.assert_close(got[0], want[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(got[1], want[1], atol=2e-5, rtol=1e-5)


def test_rebased_keys_sit_at_chunk_local_positions():
    """Keys stored post-RoPE at scattered positions become keys at j mod chunk_size."""
    torch.manual_seed(1)
    n, hkv, d, cs = 256, 3, 64, 64
    raw = torch.randn(n, hkv, d)
    positions = torch.cat([torch.arange(64), torch.arange(5000, 5128), torch.arange(100, 164)])
    stored = _rope(raw, positions)
    sel = PassageSelector.build(
        [stored], positions, cs, 1, INV, SelectionConfig(layers=(0,), budget=64)
    )
    local = _rope(raw[64:], torch.arange(64, n) % cs)
    # float32 RoPE angles at position ~5000 carry ~1e-4 error: the rotations agree to that
    torch.testing.assert_close(sel.keys[0], local.transpose(0, 1), atol=2e-3, rtol=1e-3)


def test_scores_ignore_stored_position():
    """The same key content scores the same wherever it was stored (position-neutral)."""
    torch.manual_seed(2)
    cs, hkv, d = 64, 3, 64
    raw = torch.randn(cs, hkv, d)
    other = torch.randn(2 * cs, hkv, d)
    keys = torch.cat([other[:cs], raw, other[cs:], raw])  # chunks 1 and 3 hold the same content
    positions = torch.cat(
        [torch.arange(2 * cs), torch.arange(7000, 7000 + cs), torch.arange(300, 300 + cs)]
    )
    sel = PassageSelector.build(
        [_rope(keys, positions)],
        positions,
        cs,
        1,
        INV,
        SelectionConfig(layers=(0,), budget=64, window=1, calibrate="none"),
    )
    q = _rope(torch.randn(5, 9, d), torch.arange(6000, 6005))
    scores = sel.chunk_scores({0: (q, torch.arange(6000, 6005))})
    torch.testing.assert_close(scores[1], scores[3], atol=1e-6, rtol=1e-4)


def test_choose_fills_the_budget_with_passages_and_keeps_the_preamble():
    cs = 64
    positions = torch.arange(20 * cs)
    k = [torch.randn(20 * cs, 3, 64)]
    sel = PassageSelector.build(
        k, positions, cs, 2, INV, SelectionConfig(layers=(0,), budget=5 * cs, neighbours=1)
    )
    scores = torch.zeros(20)
    scores[10], scores[15] = 5.0, 3.0
    chosen = sel.choose(scores).tolist()
    assert chosen[:2] == [0, 1] and len(chosen) == 2 + 5
    assert {9, 10, 11, 15} <= set(chosen)  # the best chunk with both neighbours, then the next
    shift = sel.shifts(torch.tensor(chosen))
    virtual = torch.tensor(chosen) * cs + shift
    assert virtual.tolist() == [i * cs for i in range(len(chosen))]  # contiguous after the preamble
    assert sel.query_position(0) == (2 + 5) * cs


def test_best_last_puts_the_best_passage_right_before_the_question():
    """The "best_last" layout: passages (runs of consecutive chunks) by ascending score, each in
    its own order, contiguous after the preamble; the best passage takes the last slots."""
    cs = 64
    k = [torch.randn(20 * cs, 3, 64)]
    sel = PassageSelector.build(
        k,
        torch.arange(20 * cs),
        cs,
        1,
        INV,
        SelectionConfig(layers=(0,), budget=5 * cs, neighbours=1, order="best_last"),
    )
    scores = torch.zeros(20)
    scores[4], scores[12], scores[17] = 2.0, 9.0, 5.0
    chosen = torch.tensor([0, 3, 4, 12, 13, 17])
    virtual = chosen * cs + sel.shifts(chosen, scores)
    slots = (virtual // cs).tolist()
    assert slots == [0, 1, 2, 4, 5, 3]  # [3, 4] (2.0), then [17] (5.0), then [12, 13] (9.0)
    assert sorted(slots) == list(range(6))  # contiguous: no gaps, no overlaps
    corpus = dataclasses.replace(sel.config, order="corpus")
    sel.config = corpus
    assert ((chosen * cs + sel.shifts(chosen, scores)) // cs).tolist() == list(range(6))


def _pointing_query(sel: PassageSelector, chunk: int, t: int = 3) -> dict:
    """Queries of t tokens at positions chunk_size.. (no rotation in `token_scores`) aimed at one
    token of `chunk`: that chunk scores highest."""
    key = sel.keys[0][:, (chunk - sel.always) * sel.chunk_size + 5]  # [Hkv, d], chunk-local
    q = (8 * key).repeat_interleave(3, 0)[None].expand(t, -1, -1).contiguous()  # Hq = 3 Hkv
    return {0: (q, sel.chunk_size + torch.arange(t))}


def test_earlier_turns_keep_their_passage_before_the_question():
    """A conversation's earlier user turns each add their best passage beside the budget (none
    for a turn whose passage is read already), laid out before the question's passage, which
    stays right before the question; only the question's own chunks are cited."""
    torch.manual_seed(4)
    cs = 64
    k = [torch.randn(20 * cs, 3, 64)]
    cfg = SelectionConfig(
        layers=(0,), budget=cs, neighbours=0, window=1, calibrate="none", history=2
    )
    sel = PassageSelector.build(k, torch.arange(20 * cs), cs, 1, INV, cfg)
    question, older, newer = (_pointing_query(sel, c) for c in (12, 5, 9))
    alone = sel.select(question)
    assert alone.chunks.tolist() == [0, 12]
    got = sel.select(question, [older, newer])
    assert got.chunks.tolist() == [0, 5, 9, 12]
    slots = ((got.chunks * cs + got.shift) // cs).tolist()
    assert slots == [0, 1, 2, 3]  # oldest turn first, the question's passage last
    assert sel.query_position(0, 2) == 4 * cs  # right after the question's passage
    assert got.scores[12] == alone.scores[12] and got.scores[5] == got.scores[9] == 0
    again = sel.select(question, [older, _pointing_query(sel, 12)])  # already read: nothing new
    assert again.chunks.tolist() == [0, 5, 12]
    assert ((again.chunks * cs + again.shift) // cs).tolist() == [0, 2, 3]  # gap after the sink
    cut = dataclasses.replace(cfg, history=1)
    sel.config = cut  # only the most recent turn
    assert sel.select(question, [older, newer]).chunks.tolist() == [0, 9, 12]


def test_exact_token_match_breaks_a_near_tie_of_the_attention():
    """With a lexicon, a chunk second by attention but holding the question's exact token
    sequence is chosen first (index/lexical.py, rerank and rrf alike); without the question's
    token ids, with lexical off, or outside the attention's candidates, the attention ranking
    stands. The same inputs give the same selection."""
    from index.lexical import LexicalIndex

    torch.manual_seed(5)
    cs = 64
    k = [torch.randn(20 * cs, 3, 64)]
    cfg = SelectionConfig(layers=(0,), budget=cs, neighbours=0, window=1, calibrate="none")
    sel = PassageSelector.build(k, torch.arange(20 * cs), cs, 1, INV, cfg)
    q7 = _pointing_query(sel, 7)
    q11 = _pointing_query(sel, 11)
    # attention: chunk 7 first, chunk 11 (a near-identical key) second
    question = {0: (q7[0][0] + 0.9 * q11[0][0], q7[0][1])}
    attention_only = sel.select(question)
    assert attention_only.chunks.tolist() == [0, 7]
    words = [10, 11, 12]  # the question's tokens: the exact sequence is in chunk 11 only
    chunk_ids = [[] for _ in range(20)]
    for c in range(1, 20):
        chunk_ids[c] = [50 + c, 60 + c]
    chunk_ids[7] += [10, 11, 99]  # two of the three pieces, not in order
    chunk_ids[11] += [10, 11, 12]
    sel.lexicon = LexicalIndex.build(chunk_ids, 100)
    fused = sel.select(question, (), [words])
    assert fused.chunks.tolist() == [0, 11]
    assert sel.select(question, (), [words]).chunks.tolist() == [0, 11]  # deterministic
    assert sel.select(question).chunks.tolist() == [0, 7]  # no token ids: attention alone
    sel.config = dataclasses.replace(cfg, lexical="rrf")  # first in either; the tie to the exact
    assert sel.select(question, (), [words]).chunks.tolist() == [0, 11]
    sel.config = dataclasses.replace(cfg, lexical="off")
    assert sel.select(question, (), [words]).chunks.tolist() == [0, 7]
    sel.config = dataclasses.replace(cfg, rerank_top=1)  # only the attention's best is a candidate
    assert sel.select(question, (), [words]).chunks.tolist() == [0, 7]


def test_turn_spans_find_earlier_questions_in_order(demo_model):
    from kb.prompt import build_prompt, question_span, turn_spans

    tok = demo_model.tokenizer
    history = [
        {"role": "user", "content": "Where is the vault?"},
        {"role": "assistant", "content": "In the archive."},
        {"role": "user", "content": "Where is the vault?"},
        {"role": "assistant", "content": "Still there."},
    ]
    suffix = build_prompt(tok, "Answer.", history, "What is the code?").suffix
    ids = tok(suffix, add_special_tokens=False)["input_ids"]
    spans = turn_spans(tok, suffix, ["Where is the vault?", "Where is the vault?", "Not asked"])
    assert len(spans) == 2 and spans[0][1] <= spans[1][0]  # both turns, in order; one not found
    for a, b in spans:
        assert tok.decode(ids[a:b]).strip() == "Where is the vault?"
    a, b = question_span(tok, suffix, "What is the code?")
    assert spans[1][1] <= a and tok.decode(ids[a:b]).strip() == "What is the code?"


def _large_corpus(tmp_path_factory):
    """A KnowledgeBase with a corpus of ~25K tokens of real prose in 16 documents, one fact planted."""
    from bench.quality import gen_needle_docs
    from kb.service import KnowledgeBase
    from kb.settings import Settings

    root = tmp_path_factory.mktemp("selection")
    data = gen_needle_docs(3, 1, 96000, doc_chars=6000)
    kb = KnowledgeBase(Settings(home=root / "home", models_dir=MODELS_DIR, max_tokens=24))
    kb.create_corpus("big")
    paths = []
    for i, text in enumerate(data.docs):
        if i == data.questions[0].doc:
            text = (
                text + "\n\nThe archive of the Velmora Institute is kept in a vault. "
                "The access code of the Velmora vault is 7341."
            )
        paths.append(root / f"doc{i:02d}.txt")
        paths[-1].write_text(text)
    assert all(r.status == "ready" for r in kb.ingest("big", paths))
    return kb


def _decode_with_selections(model, max_bytes: int) -> tuple[list[list[int]], list, int]:
    """Two selecting requests (their own chunks, at virtual positions) decoded together over a
    random corpus; returns (their tokens, each step's logits, the copies' live bytes after)."""
    from kb.engine.engine import Engine, EngineConfig
    from kb.engine.selection import Selection
    from kb.engine.sequence import SamplingParams
    from kb.engine.shared_kv import SharedKV

    cfg = model.config
    g = torch.Generator().manual_seed(11)
    n, cs = 1000, 64
    k = [torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)]
    v = [torch.randn(n, cfg.num_kv_heads, cfg.head_dim, generator=g) for _ in range(cfg.num_layers)]
    engine = Engine(
        model, EngineConfig(unique_kv_tokens=1024, cuda_graphs=False, citation_layers=0)
    )
    engine.runner.selected_kv.max_bytes = max_bytes
    engine.register_corpus(
        SharedKV(key="c", k=k, v=v, chunk_size=cs, pos_offset=1000, preamble_len=20)
    )
    handles = []
    for chunks in ([0, 3, 4, 15], [0, 7, 9]):
        c = torch.tensor(chunks)
        sel = Selection(c, torch.arange(c.numel()) * cs - c * cs, torch.zeros(16))
        h = engine.add_request(
            list(range(200, 212)), SamplingParams(max_tokens=6, ignore_eos=True), "c", 300
        )
        h.seq.select, h.seq.selection = True, sel
        handles.append(h)
    steps, run = [], engine.runner.run

    def recorded(batch, corpora):  # the real step, its logits kept
        out = run(batch, corpora)
        steps.append(out[0].float().clone())
        return out

    engine.runner.run = recorded
    engine.run_until_done()
    return [h.seq.output_ids for h in handles], steps, engine.runner.selected_kv.used


def test_copied_passages_decode_as_the_per_step_path(demo_model):
    """On the CPU a selecting request attends its own copy of its passages (built once, freed when
    it ends); with no room for copies the per-step gather serves it with the same logits: at the
    prefill (each request's copy) and the first decode step (both copies stacked). Later steps
    are not compared: greedy tokens over random KV may part at a near-tie of float rounding."""
    copied, logits_c, live = _decode_with_selections(demo_model, 1 << 30)
    per_step, logits_p, _ = _decode_with_selections(demo_model, 0)
    tol = {"atol": 1e-2, "rtol": 1e-3}  # float32 sums in another order, through 30 layers
    torch.testing.assert_close(logits_c[0], logits_p[0], **tol)
    assert [t[0] for t in copied] == [t[0] for t in per_step]
    torch.testing.assert_close(logits_c[1], logits_p[1], **tol)
    assert all(len(t) == 6 for t in copied) and live == 0


def test_large_corpus_fact_answered_and_cited_first_with_defaults(tmp_path_factory, demo_model_dir):
    """Over a corpus of three times the model's context, the default (selection) answers the
    planted fact and cites its passage first; selection is deterministic; a one-document corpus
    (smaller than the budget) is served dense, as before."""
    torch.set_num_threads(2)
    kb = _large_corpus(tmp_path_factory)
    try:
        loaded = kb.load_corpus("big")
        context = kb.loaded.config.max_position_embeddings
        assert loaded.shared.num_tokens >= 3 * context
        assert loaded.shared.selector is not None
        out = kb.answer("big", FACT_QUESTION)
        assert FACT_ANSWER in out["answer"]
        assert "7341" in out["citations"][0]["text"]
        a1 = kb.ask("big", FACT_QUESTION)
        a2 = kb.ask("big", FACT_QUESTION)
        kb.wait(a1)
        kb.wait(a2)
        s1, s2 = a1.handle.seq.selection, a2.handle.seq.selection
        assert s1.chunks.tolist() == s2.chunks.tolist() and torch.equal(s1.shift, s2.shift)
        assert a1.citations() == a2.citations()
        shared_tokens = s1.chunks.numel() * loaded.shared.chunk_size
        assert (
            shared_tokens
            <= kb.settings.selection_budget + loaded.shared.always_chunks * loaded.shared.chunk_size
        )
        assert kb.engine.runner.selected_kv.used == 0  # the passages' copies freed at the end
        dense = kb.answer("big", FACT_QUESTION, dense=True)
        assert dense["citations"]  # dense keeps its attention-mass citations
        turn = [
            {"role": "user", "content": FACT_QUESTION},
            {"role": "assistant", "content": "7341"},
        ]
        follow = kb.ask("big", "Who keeps the archive?", history=turn)
        kb.wait(follow)
        kept = follow.handle.seq.selection.chunks.tolist()
        assert set(s1.chunks.tolist()) & set(kept) > set(range(loaded.shared.always_chunks))
        assert follow.handle.seq.pos_offset == loaded.shared.selector.query_position(0, 1)

        from tests.conftest import planted_text

        doc = tmp_path_factory.mktemp("one") / "handbook.txt"
        doc.write_text(planted_text())
        kb.create_corpus("one")
        assert kb.ingest("one", [doc])[0].status == "ready"
        assert kb.load_corpus("one").shared.selector is None  # within the budget: read whole
        default, dense = (
            kb.answer("one", FACT_QUESTION),
            kb.answer("one", FACT_QUESTION, dense=True),
        )
        assert default["answer"] == dense["answer"] and default["citations"] == dense["citations"]
    finally:
        kb.close()


def test_named_heads_score_alone_and_keep_only_their_keys():
    """With `heads` named (the model's retrieval heads) only those query heads score: the chunk
    their queries point at wins though every other head points elsewhere, and the selector
    re-bases only the KV heads they read (query head 4 of 9 reads KV head 1 of 3)."""
    torch.manual_seed(5)
    cs, hkv, hq, d = 64, 3, 9, 64
    k = [torch.randn(12 * cs, hkv, d)]
    base = dict(layers=(0,), budget=cs, neighbours=0, window=1, calibrate="none")
    every = PassageSelector.build(k, torch.arange(12 * cs), cs, 1, INV, SelectionConfig(**base))
    named = PassageSelector.build(
        k, torch.arange(12 * cs), cs, 1, INV, SelectionConfig(**base, heads=((0, 4),)), num_heads=hq
    )
    assert named.kv_heads[0] == [1] and named.keys[0].shape == (1, 11 * cs, d)
    torch.testing.assert_close(named.keys[0][0], every.keys[0][1])
    t = 3
    q = torch.zeros(t, hq, d)
    for h in range(hq):  # head 4 aims at chunk 3, the other eight at chunk 8
        chunk = 3 if h == 4 else 8
        q[:, h] = 8 * every.keys[0][h // 3, (chunk - 1) * cs + 5]
    queries = {0: (q, cs + torch.arange(t))}
    assert every.select(queries).chunks.tolist() == [0, 8]
    assert named.select(queries).chunks.tolist() == [0, 3]
    per_head = every.phrase_chunks(every.head_scores(0, q, cs + torch.arange(t)))
    torch.testing.assert_close(every.chunk_scores(queries), per_head.mean(0))


def test_selection_heads_setting_parses_and_names_a_bad_entry():
    import pytest

    from kb.model.retrieval_heads import RETRIEVAL_HEADS, retrieval_heads
    from kb.settings import Settings

    assert retrieval_heads("17.4, 18.6", "any", 30, 9) == ((17, 4), (18, 6))
    assert retrieval_heads("17.4,40.1,3.9", "any", 30, 9) == ((17, 4),)  # outside the model
    assert retrieval_heads("all", "SmolLM2-135M-Instruct", 30, 9) == ()
    assert (
        retrieval_heads("auto", "/models/SmolLM2-135M-Instruct", 30, 9)
        == RETRIEVAL_HEADS["SmolLM2-135M-Instruct"]
    )
    assert retrieval_heads("auto", "unknown-model", 30, 9) == ()
    with pytest.raises(ValueError, match="17.x"):
        Settings(selection_heads="17.x")
