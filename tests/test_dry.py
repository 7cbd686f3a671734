"""DRY ("don't repeat yourself") in the batched sampler: hand-checked penalties, breakers, the
allowed length, a direct reference over random answers, validation, and the served default's
path through the API, the service and the CLI (docs/QUALITY.md chose it)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient

from kb.api.chat import sampling
from kb.api.schemas import ChatRequest
from kb.engine.sampler import (
    DRY_MAX_PENALTY,
    BreakerMasks,
    apply_penalties,
    dry_match_lengths,
    sample_each,
)
from kb.engine.sequence import DRY_BREAKERS, SamplingParams, Sequence
from kb.settings import Settings

VOCAB = 12
NEWLINE = 3  # the token the fake tokenizer decodes to a newline


class Tokenizer:
    """Token i decodes to the letter i (token 3 to a newline, token 4 to a colon and a space)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join({NEWLINE: "\n", 4: ": "}.get(i, chr(ord("a") + i)) for i in ids)


def _seq(generated: list[int], **sp) -> Sequence:
    seq = Sequence([1, 2], SamplingParams(**sp))
    seq.output_ids = list(generated)
    return seq


def _penalty(generated: list[int], breakers=None, **sp) -> list[float]:
    """What DRY subtracted from each token's logit (all logits 0 before)."""
    params = {"dry_multiplier": 0.8, "dry_base": 1.75, "dry_allowed_length": 2, **sp}
    out = apply_penalties(torch.zeros(1, VOCAB), [_seq(generated, **params)], breakers)
    return (-out[0]).tolist()


def test_the_token_that_continues_a_repeat_gets_the_penalty():
    """5 6 7 8 5 6 7: choosing 8 would repeat the run 5 6 7 8, a match of L = 3 tokens (5 6 7)
    followed by 8: 0.8 * 1.75 ** (3 - 2) = 1.4; no other token continues a match."""
    pen = _penalty([5, 6, 7, 8, 5, 6, 7])
    assert pen[8] == pytest.approx(1.4)
    assert [p for t, p in enumerate(pen) if t != 8] == [0.0] * (VOCAB - 1)
    # the exponent is L - allowed length: allowed 3 costs the bare multiplier, 1 costs base ** 2
    assert _penalty([5, 6, 7, 8, 5, 6, 7], dry_allowed_length=3)[8] == pytest.approx(0.8)
    assert _penalty([5, 6, 7, 8, 5, 6, 7], dry_allowed_length=1)[8] == pytest.approx(0.8 * 1.75**2)
    # a loop that has turned twice: 1 2 5 6 1 2 5 6 1 2 5 -> 6 extends a match of L = 7
    pen = _penalty([1, 2, 5, 6, 1, 2, 5, 6, 1, 2, 5], dry_multiplier=1.0, dry_base=2.0)
    assert pen[6] == 2.0**5 and sum(pen) == 2.0**5


def test_no_penalty_under_the_allowed_length():
    """5 6 7 5 6: 7 continues a match of L = 2; allowed 2 penalises it, allowed 3 does not."""
    assert _penalty([5, 6, 7, 5, 6])[7] == pytest.approx(0.8)
    assert _penalty([5, 6, 7, 5, 6], dry_allowed_length=3) == [0.0] * VOCAB
    assert _penalty([5, 6, 7, 8, 9]) == [0.0] * VOCAB  # nothing repeats
    assert _penalty([5]) == [0.0] * VOCAB


def test_breakers_reset_the_match():
    """5 6 NL 7 8 9 5 6 NL 7 8: without breakers 9 extends a match of 5 tokens (5 6 NL 7 8);
    with the newline a breaker the match stops at it (7 8: L = 2). A breaker is never itself
    penalised, and an answer that ends on one is penalised nowhere."""
    out = [5, 6, NEWLINE, 7, 8, 9, 5, 6, NEWLINE, 7, 8]
    breakers = BreakerMasks(Tokenizer())
    assert _penalty(out)[9] == pytest.approx(0.8 * 1.75**3)
    assert _penalty(out, breakers)[9] == pytest.approx(0.8)
    assert breakers(DRY_BREAKERS, VOCAB).nonzero().flatten().tolist() == [NEWLINE, 4]
    # "5 NL 5": NL would repeat "5 NL" (L = 1 at allowed 1) unless it is a breaker
    assert _penalty([5, NEWLINE, 5], dry_allowed_length=1)[NEWLINE] == pytest.approx(0.8)
    assert _penalty([5, NEWLINE, 5], breakers, dry_allowed_length=1) == [0.0] * VOCAB
    assert _penalty([5, 6, 5, 6, NEWLINE], breakers, dry_allowed_length=1) == [0.0] * VOCAB
    # a request's own breakers: only the colon breaks, so the newline's match of 5 comes back
    assert _penalty(out, breakers, dry_sequence_breakers=(":",))[9] == pytest.approx(0.8 * 1.75**3)
    assert breakers((":",), VOCAB).nonzero().flatten().tolist() == [4]


def _reference(generated: list[int], sp: SamplingParams, breakers: set[int]) -> dict[int, float]:
    """text-generation-webui's DRY loop, one earlier occurrence of the last token at a time."""
    pen: dict[int, float] = {}
    if len(generated) < 2 or generated[-1] in breakers:
        return pen
    longest: dict[int, int] = {}
    for i in range(len(generated) - 1):
        if generated[i] != generated[-1]:
            continue
        nxt = generated[i + 1]
        if nxt in breakers:
            continue
        length = 1
        while i - length >= 0:
            prev = generated[-(length + 1)]
            if generated[i - length] != prev or prev in breakers:
                break
            length += 1
        longest[nxt] = max(length, longest.get(nxt, 0))
    for t, length in longest.items():
        if length >= sp.dry_allowed_length:
            pen[t] = sp.dry_multiplier * sp.dry_base ** (length - sp.dry_allowed_length)
    return pen


def test_batched_dry_matches_the_reference_row_by_row():
    """Random answers over a small vocabulary (so runs repeat), of different lengths, with and
    without DRY and other penalties, in one batch."""
    rng = random.Random(3)
    masks = BreakerMasks(Tokenizer())
    breaker_ids = set(masks(DRY_BREAKERS, VOCAB).nonzero().flatten().tolist())
    seqs = []
    for r in range(24):
        alphabet = rng.choice([2, 3, 5, VOCAB - 3])
        generated = [rng.randrange(alphabet) + (r % 2) * 3 for _ in range(rng.randrange(0, 40))]
        if r % 3 == 0 and len(generated) > 4:  # a loop: repeat a piece
            generated += generated[2:] * 2
        seqs.append(
            _seq(
                generated,
                dry_multiplier=rng.choice([0.0, 0.8, 1.5]),
                dry_base=rng.choice([1.0, 1.75, 3.0]),
                dry_allowed_length=rng.choice([1, 2, 4]),
            )
        )
    torch.manual_seed(0)
    logits = torch.randn(len(seqs), VOCAB) * 3
    before = logits.clone()
    got = apply_penalties(logits, seqs, masks)
    assert torch.equal(logits, before)
    for i, seq in enumerate(seqs):
        want = before[i].tolist()
        if seq.sampling.dry_multiplier:
            for t, p in _reference(seq.output_ids, seq.sampling, breaker_ids).items():
                want[t] -= min(p, DRY_MAX_PENALTY)
        assert got[i].tolist() == pytest.approx(want, rel=1e-5, abs=1e-5), (i, seq.output_ids)
    lengths = [len(s.output_ids) for s in seqs]
    assert max(lengths) > 40 and min(lengths) == 0  # right-aligned rows of unequal length


def test_match_lengths_of_right_aligned_rows():
    ids = torch.tensor([[-1, -1, 1, 1, 1], [5, 6, 7, 8, 5], [-1, 7, 7, 3, 7]])
    brk = (ids < 0) | (ids == 3)
    assert dry_match_lengths(ids, brk).tolist() == [
        [0, 0, 0, 1, 2],
        [0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
    ]


def test_a_long_loop_is_capped_and_other_rows_are_untouched():
    """A loop of 300 tokens at base 10 would overflow float32: it is capped, finite; and greedy
    choice moves off the token that continues the loop."""
    loop = _seq([7] * 300, dry_multiplier=2.0, dry_base=10.0)
    plain = _seq([7] * 300)
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 5.0
    out = apply_penalties(logits, [loop, plain])
    assert torch.isfinite(out).all()
    assert out[0, 7] == 5.0 - DRY_MAX_PENALTY and torch.equal(out[1], logits[1])
    assert sample_each(logits, [loop, plain]) == [0, 7]


def test_dry_is_validated():
    for bad in (
        {"dry_multiplier": -0.1},
        {"dry_multiplier": float("nan")},
        {"dry_base": 0.5},
        {"dry_allowed_length": 0},
        {"dry_sequence_breakers": ("",)},
        {"dry_sequence_breakers": ("x",) * 17},
        {"dry_sequence_breakers": "\n:"},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
    SamplingParams(dry_multiplier=0.8, dry_base=1.0, dry_allowed_length=1).validate()
    assert not SamplingParams().penalised and SamplingParams(dry_multiplier=0.5).penalised


def test_the_served_default_and_where_it_applies(tmp_path, monkeypatch):
    """KB_DRY_* are what a request that sends none gets, from the API (chat and legacy
    completions share `sampling`), the service's default sampling (the web app's answers) and
    `kb ask` in-process; the engine's own default stays off."""
    from kb.cli import answering
    from kb.service import KnowledgeBase

    for var in ("MULTIPLIER", "BASE", "ALLOWED_LENGTH", "SEQUENCE_BREAKERS"):
        monkeypatch.delenv(f"KB_DRY_{var}", raising=False)
    served = Settings(home=tmp_path)
    assert (served.dry_multiplier, served.dry_base, served.dry_allowed_length) == (0.8, 1.75, 2)
    assert served.dry_sequence_breakers == DRY_BREAKERS
    assert SamplingParams().dry_multiplier == 0.0
    monkeypatch.setenv("KB_DRY_MULTIPLIER", "1.25")
    monkeypatch.setenv("KB_DRY_SEQUENCE_BREAKERS", '["\\n", ";"]')
    s = Settings(home=tmp_path)
    ask = {"model": "kb:x", "messages": [{"role": "user", "content": "hi"}]}
    sp = sampling(SimpleNamespace(settings=s), ChatRequest(**ask), 16)
    assert (sp.dry_multiplier, sp.dry_base, sp.dry_allowed_length) == (1.25, 1.75, 2)
    assert sp.dry_sequence_breakers == ("\n", ";")
    sent = ChatRequest(
        **ask, dry_multiplier=0.0, dry_base=2.0, dry_allowed_length=4, dry_sequence_breakers=["."]
    )
    sp = sampling(SimpleNamespace(settings=s), sent, 16)  # what a request sends wins
    assert (sp.dry_multiplier, sp.dry_base, sp.dry_allowed_length) == (0.0, 2.0, 4)
    assert sp.dry_sequence_breakers == (".",)

    kb = KnowledgeBase.__new__(KnowledgeBase)
    kb.settings = s
    assert kb.default_sampling().dry_multiplier == 1.25
    asked = []
    kb.ask = lambda corpus, q, sp, history, dense=False: asked.append(sp)
    kb.wait = lambda answer, on_text: {}
    local = answering.LocalAnswerer.__new__(answering.LocalAnswerer)
    local.kb, local.corpus, local.dense, local.max_tokens, local.temperature = kb, "c", False, 9, 0
    local.answer("q", [], None)
    assert [(a.max_tokens, a.dry_multiplier, a.dry_sequence_breakers) for a in asked] == [
        (9, 1.25, ("\n", ";"))
    ]


def test_the_engine_step_applies_it_with_the_tokenizer_breakers(monkeypatch):
    """The engine hands its tokenizer's breaker masks to the sampler each step."""
    from kb.engine import engine as engine_module

    got = []

    def fake_sample_each(logits, seqs, breakers=None):
        got.append(breakers)
        return [0] * len(seqs)

    fake = SimpleNamespace(
        tokenizer=Tokenizer(),
        config=SimpleNamespace(num_layers=2, eos_token_ids=[], max_position_embeddings=64),
        model=None,
    )
    runner = SimpleNamespace(release=lambda seq: None)
    monkeypatch.setattr(engine_module, "ModelRunner", lambda *a, **k: runner)
    eng = engine_module.Engine(
        fake, engine_module.EngineConfig(unique_kv_tokens=256, cuda_graphs=False)
    )
    assert isinstance(eng.breakers, BreakerMasks) and eng.breakers.tokenizer is eng.tokenizer
    h = eng.add_request([1, 2, 3], SamplingParams(max_tokens=1, dry_multiplier=0.8))
    eng.runner.run = lambda batch, corpora: (torch.zeros(len(batch.seqs), VOCAB), [0])
    monkeypatch.setattr(engine_module, "sample_each", fake_sample_each)
    eng.step()
    assert got == [eng.breakers] and h.seq.sampling.dry_multiplier == 0.8


@pytest.fixture
def api(tmp_path):
    """The API over a KB whose engine never loads: requests get as far as `kb.ask`."""
    from kb.api.app import create_api
    from kb.errors import NotFound
    from kb.service import KnowledgeBase

    kb = KnowledgeBase(Settings(home=tmp_path / "home"))
    kb._engine = SimpleNamespace(
        start=lambda: None, shutdown=lambda grace_s=0: None, reopen=lambda: None
    )
    asked: list[SamplingParams] = []

    def ask(name, question, sp, *args, **kwargs):
        asked.append(sp)
        raise NotFound(f"corpus {name!r} does not exist")

    kb.ask = ask
    with TestClient(create_api(kb, warm=False)) as client:
        yield client, asked


@pytest.mark.parametrize(
    "field,value",
    [
        ("dry_multiplier", -1),
        ("dry_multiplier", 11),
        ("dry_multiplier", "much"),
        ("dry_base", 0.9),
        ("dry_base", float("nan")),
        ("dry_allowed_length", 0),
        ("dry_allowed_length", 1.5),
        ("dry_sequence_breakers", [""]),
        ("dry_sequence_breakers", ["x"] * 17),
        ("dry_sequence_breakers", "\n"),
    ],
)
def test_the_api_refuses_bad_dry_values_naming_them(api, field, value):
    client, asked = api
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi"}),
    ):
        payload = json.dumps({"model": "kb:x", **body, field: value})  # NaN as JSON's NaN
        r = client.post(path, content=payload, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"].split(".")[0] == field and err["type"] == "invalid_request_error"
    assert asked == []


def test_the_api_takes_dry_fields(api):
    client, asked = api
    body = {
        "model": "kb:x",
        "messages": [{"role": "user", "content": "hi"}],
        "dry_multiplier": 1.1,
        "dry_base": 2,
        "dry_allowed_length": 3,
        "dry_sequence_breakers": ["\n", "."],
    }
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    [sp] = asked
    assert (sp.dry_multiplier, sp.dry_base, sp.dry_allowed_length) == (1.1, 2.0, 3)
    assert sp.dry_sequence_breakers == ("\n", ".")


def _bench(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}_dry", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_the_benches_take_dry_settings(tmp_path):
    """bench/quality.py's --dry-* flags (None: the service's KB_DRY_*), and bench/loops.py keeping
    the rows of settings it did not measure again (rows from before DRY count as multiplier 0)."""
    quality, loops = _bench("quality"), _bench("loops")
    args = quality.parse_args(
        ["--dry-multiplier", "0.8", "--dry-base", "2", "--dry-allowed-length", "3"]
    )
    assert (args.dry_multiplier, args.dry_base, args.dry_allowed_length) == (0.8, 2.0, 3)
    assert quality.parse_args([]).dry_multiplier is None
    out = tmp_path / "loops.json"
    old = [
        {"repetition_penalty": 1.0, "frequency_penalty": 0.3, "looping": 3},
        {"repetition_penalty": 1.2, "frequency_penalty": 0.0, "looping": 0},
    ]
    out.write_text(json.dumps({"rows": old}))
    new = [
        {"repetition_penalty": 1.0, "frequency_penalty": 0.3, "dry_multiplier": 0.0, "looping": 2},
        {
            "repetition_penalty": 1.0,
            "frequency_penalty": 0.3,
            "dry_multiplier": 0.8,
            "dry_base": 1.75,
            "dry_allowed_length": 2,
            "looping": 0,
        },
    ]
    assert loops.kept_rows(out, new) == [old[1], *new]
    assert loops.kept_rows(tmp_path / "none.json", new) == new
