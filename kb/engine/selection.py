"""Attention retrieval: each request chooses, once at prefill, the passages of a corpus it reads.

A request's question tokens run through the first layers of the model (a *selection pass*, over
the preamble only, so its cost does not grow with the corpus); the model's retrieval heads
(kb/model/retrieval_heads.py; else every head of a few chosen layers) score every shared key,
position-neutrally: the stored keys are post-RoPE, so at load the
selecting layers' keys are *re-based* to chunk-local positions (rotated back by their chunk's
stored start) and each question token's query is rotated to sit right after a chunk. Every chunk
is then scored as if it sat just before the question, which removes the bias of stored position
and wrap-around (segments past the model's context restart their positions). Per head, token scores (the
softmax mass of the question's queries, averaged over its tokens) become phrase scores by a
window sum (InfiniRetri's 1-D convolution), chunk scores by their best phrase averaged over the
heads, calibrated against what neutral questions give each chunk (measured once per corpus layout: the
lift over it, so a chunk every question attends, a sink, scores ~0); the attention's best ten
chunks are then ordered by their exact token matches of the question (index/lexical.py: a soft
match confuses near-identical strings, an exact one does not); the best chunks and their
neighbours (passages) fill a token budget. In a conversation each of the last few earlier user
turns adds its own best passage, laid out before the question's, so a follow-up keeps reading
what the turns before it read (and worked examples stay next to their source). The preamble's
chunks (the attention sink) and the request's own tokens are always attended.

The selection is one list of chunk ids per request, the same for every layer and KV head (what
the batched kernels serve). Positions: the chosen chunks are attended at *virtual* positions,
laid out contiguously after the preamble, passage by passage in ascending score (the best
passage right before the question; `order="corpus"` keeps stored order), with the request after
them; that is a per-chunk position shift (`Selection.shift`) the attention applies by rotating
keys (or, equivalently, the query) by the shift, leaving the stored shared KV untouched.

docs/QUALITY.md has the measurements behind each choice (layers, window, neighbours, budget,
positions, calibration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from index.lexical import LexicalIndex, fuse_ranks, rerank
from kb.model.retrieval_heads import retrieval_heads
from kb.model.rope import apply_rope, cos_sin

Queries = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (q[T, Hq, d], positions[T])


POSITIONS = ("virtual", "stored")
LEXICAL = ("rerank", "rrf", "off")
ORDERS = ("corpus", "best_last")
CALIBRATIONS = ("ratio", "lift", "sub", "none")
# generic questions whose scores measure what every question attends (position, sinks, style)
NEUTRAL_QUESTIONS = (
    "What do the documents say?",
    "Summarize the documents.",
    "What is this about?",
    "Tell me something from the text.",
)


@dataclass(frozen=True)
class SelectionConfig:
    """How passages are chosen (defaults: docs/QUALITY.md, "Attention retrieval")."""

    budget: int = 192  # shared tokens a request reads besides the preamble's (docs/QUALITY.md)
    layers: tuple[int, ...] = (17, 18)  # layers whose question queries score the corpus
    # the query heads (layer, head) that score, all in `layers`: the model's retrieval heads
    # (kb/model/retrieval_heads.py); empty: every head of `layers`
    heads: tuple[tuple[int, int], ...] = ()
    window: int = 9  # phrase width of the score's window sum, in tokens
    neighbours: int = 1  # chunks taken on each side of a chosen chunk (one passage)
    positions: str = "virtual"  # "virtual" (contiguous after the preamble) or "stored"
    # the virtual layout's order: "corpus" (stored order) or "best_last" (passages by ascending
    # score, the best one right before the question; each passage keeps its own chunks' order)
    order: str = "best_last"
    # against the chunk scores b of neutral questions, m their mean: "lift" ((s - b) / (b + m):
    # the excess over what any question gives, so a sink chunk scores ~0), "ratio" (s / (b + m)),
    # "sub" (s - b), "none"
    calibrate: str = "lift"
    # earlier user turns of the conversation (most recent first) that each get their best passage
    # beside the budget, laid out before the question's own passages
    history: int = 2
    # the chunks' exact token matches of the question (index/lexical.py: IDF-weighted unigrams
    # and bigrams) where the corpus has a lexicon: "rerank" orders the attention's best
    # `rerank_top` chunks by them, "rrf" fuses both rankings by reciprocal rank, "off" ignores them
    lexical: str = "rerank"
    rerank_top: int = 10

    def __post_init__(self) -> None:
        assert self.positions in POSITIONS, f"positions must be one of {POSITIONS}"
        assert self.calibrate in CALIBRATIONS, f"calibrate must be one of {CALIBRATIONS}"
        assert self.order in ORDERS, f"order must be one of {ORDERS}"
        assert self.lexical in LEXICAL, f"lexical must be one of {LEXICAL}"
        assert self.budget > 0 and self.layers and self.window >= 1 and self.neighbours >= 0
        assert self.history >= 0
        assert all(layer in self.layers for layer, _ in self.heads), "heads outside `layers`"

    def heads_of(self, layer: int, num_heads: int) -> list[int]:
        """The query heads of `layer` that score (every head where `heads` names none)."""
        if not self.heads:
            return list(range(num_heads))
        return sorted(h for li, h in self.heads if li == layer)


@dataclass
class Selection:
    """One request's chosen chunks and how it attends them."""

    chunks: torch.Tensor  # [K] int64 ascending chunk ids, the preamble's first
    shift: torch.Tensor | None  # [K] int64 position shift per chunk (virtual positions) or None
    scores: torch.Tensor  # [C] float32 chunk scores (0 outside the selection), for citations


def rotate(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x[T, H, d] rotated by RoPE through `shift[T]` more positions (R(a)R(b) = R(a + b))."""
    cos, sin = cos_sin(shift.to(torch.float64), inv_freq)
    return apply_rope(x.float(), cos.float(), sin.float())


def rotate_rows(x: torch.Tensor, shift: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """x[..., B, d] rotated per row by shift[..., B] positions (the head-major layout of attention)."""
    freqs = shift.to(torch.float64)[..., None] * inv_freq.to(torch.float64)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()
    xf = x.float()
    half = xf.shape[-1] // 2
    rot = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return xf * cos + rot * sin


@dataclass
class PassageSelector:
    """One loaded corpus's selection state: re-based keys of the selecting layers, and the layout."""

    keys: dict[int, torch.Tensor]  # layer -> [Hkv, N - P0, d] float32, chunk-local positions
    positions: torch.Tensor  # [N] int64 stored position of every shared token
    chunk_size: int
    always: int  # leading chunks (the preamble's) always attended, never scored
    inv_freq: torch.Tensor
    config: SelectionConfig
    calibration: torch.Tensor | None = None  # [C] chunk scores of neutral questions
    # the preamble's k, v per layer, kept here where the corpus's KV lives on other ranks (the
    # selection pass attends the preamble on the rank that serves the request)
    preamble: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None
    kv_heads: dict[int, list[int]] = field(default_factory=dict)  # layer -> KV heads of keys[layer]
    num_kv: int = 1  # the corpus's KV heads
    lexicon: LexicalIndex | None = None  # the chunks' token grams (config.lexical)

    @classmethod
    def build(
        cls,
        k: list[torch.Tensor],
        positions: torch.Tensor,
        chunk_size: int,
        always: int,
        inv_freq: torch.Tensor,
        config: SelectionConfig,
        num_heads: int | None = None,
    ) -> PassageSelector:
        """Re-base the selecting layers' keys k[layer][N, Hkv, d] to chunk-local positions, once
        (those of the KV heads that the scoring heads read; `num_heads` query heads, default Hkv)."""
        n = k[0].shape[0]
        p0 = always * chunk_size
        idx = torch.arange(p0, n)
        local = idx % chunk_size
        back = -(positions[p0:] - local)  # rotate key j from stored p_j to j mod chunk_size
        keys, kv_heads = {}, {}
        for layer in config.layers:
            kl = k[layer][p0:]
            hkv = kl.shape[1]
            g = (num_heads or hkv) // hkv  # GQA: query head h reads KV head h // g
            # only the KV heads that the scoring query heads read
            rows = sorted({h // g for h in config.heads_of(layer, hkv * g)})
            keys[layer] = rotate(kl[:, rows], back, inv_freq).transpose(0, 1).contiguous()
            kv_heads[layer] = rows  # keys[layer] is [len(rows), N', d]
        return cls(
            keys,
            positions.long(),
            chunk_size,
            always,
            inv_freq.float(),
            config,
            kv_heads=kv_heads,
            num_kv=k[0].shape[1],
        )

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def num_chunks(self) -> int:
        return -(-self.num_tokens // self.chunk_size)

    @property
    def budget_chunks(self) -> int:
        return min(self.num_chunks - self.always, -(-self.config.budget // self.chunk_size))

    @property
    def covers_corpus(self) -> bool:
        """The budget holds every chunk: selection would read the whole corpus (serve it dense)."""
        return self.budget_chunks >= self.num_chunks - self.always

    def layout_chunks(self, turns: int = 0) -> int:
        """Routed chunks of the virtual layout of a request with `turns` earlier user turns: the
        budget's, then one passage for each of up to `config.history` turns."""
        extra = min(turns, self.config.history) * (2 * self.config.neighbours + 1)
        return min(self.num_chunks - self.always, self.budget_chunks + extra)

    def query_position(self, stored_end: int, turns: int = 0) -> int:
        """Where a selecting request's own tokens start: after the virtual layout of a full budget
        (and its earlier turns' passages), or (stored positions) after the corpus's largest stored
        position, as dense requests."""
        if self.config.positions == "stored":
            return stored_end
        return (self.always + self.layout_chunks(turns)) * self.chunk_size

    def head_scores(self, layer: int, q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        """[H', N'] softmax mass of each scoring query head of q[T, Hq, d] (post-RoPE at q_pos[T])
        on every routed shared key, each chunk scored as if it sat right before the question;
        averaged over the question's tokens."""
        kr = self.keys[layer]  # [Hkv', N', d], the KV heads self.kv_heads[layer]
        t, hq, d = q.shape
        g = hq // self.num_kv  # GQA: query head h reads KV head h // g
        target = self.chunk_size + torch.arange(t)  # the question right after the chunk
        qn = rotate(q, target - q_pos.long().cpu(), self.inv_freq) / math.sqrt(d)
        out = []
        for row, kvh in enumerate(self.kv_heads[layer]):
            heads = [h for h in self.config.heads_of(layer, hq) if h // g == kvh]
            qh = qn[:, heads].transpose(0, 1).reshape(-1, d)  # [H'' * T, d]
            p = torch.softmax(qh @ kr[row].T, dim=-1)  # [H'' * T, N']
            out.append(p.view(len(heads), t, -1).mean(1))
        return torch.cat(out)

    def chunk_scores(self, queries: Queries) -> torch.Tensor:
        """[C] score of every chunk (0 for the preamble's): per scoring head the best phrase
        (window sum of its token scores) inside the chunk, averaged over the heads."""
        per_head = [
            self.phrase_chunks(self.head_scores(layer, q, pos))
            for layer, (q, pos) in queries.items()
            if self.kv_heads.get(layer)
        ]
        return torch.cat(per_head).mean(0)

    def phrase_chunks(self, s: torch.Tensor) -> torch.Tensor:
        """[..., C] chunk scores from token scores s[..., N'] of the routed keys: window sums (a
        phrase's), the best per chunk; the preamble's chunks 0."""
        lead = s.shape[:-1]
        s = s.reshape(-1, s.shape[-1])
        w = self.config.window
        if w > 1:
            s = F.avg_pool1d(s[:, None], w, stride=1, padding=w // 2, count_include_pad=True)[:, 0]
            s = s[:, : self.num_tokens - self.always * self.chunk_size] * w
        pad = -s.shape[-1] % self.chunk_size
        per_chunk = F.pad(s, (0, pad)).view(s.shape[0], -1, self.chunk_size).amax(-1)
        out = torch.cat([torch.zeros(s.shape[0], self.always), per_chunk], dim=-1)
        return out.view(*lead, -1)

    def calibrated(self, scores: torch.Tensor) -> torch.Tensor:
        """Chunk scores relative to what neutral questions give each chunk (`config.calibrate`)."""
        base, how = self.calibration, self.config.calibrate
        if base is None or how == "none":
            return scores
        if how == "sub":
            return scores - base
        scale = base + base[self.always :].mean()
        if how == "lift":  # the excess over neutral, relative: a sink's ~0 whatever is asked
            return (scores - base) / scale
        return scores / scale

    def ranked(self, queries: Queries, words: list[int] | None = None) -> torch.Tensor:
        """[C] the score that orders chunks for one span of the prompt: the calibrated attention
        score, combined (config.lexical) with the exact matches of the span's token ids `words`
        where the selector has a lexicon; the preamble's chunks -inf."""
        scores = self.calibrated(self.chunk_scores(queries))
        scores[: self.always] = float("-inf")
        how = self.config.lexical
        if self.lexicon is None or how == "off" or not words:
            return scores
        lex = self.lexicon.scores(words)
        lex[: self.always] = 0
        if how == "rrf":
            fused = fuse_ranks(scores, lex)
        else:
            fused = rerank(scores, lex, self.config.rerank_top)
        fused[: self.always] = float("-inf")
        return fused

    def choose(
        self, ranked: torch.Tensor, cap: int | None = None, taken: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[K] ascending chunk ids: the preamble's, then the best chunks by (calibrated) score
        `ranked[C]`, with their neighbours, until `cap` chunks (the budget's) are chosen; chunks
        already `taken` ([C] bool, updated) are neither chosen again nor counted."""
        c = ranked.shape[0]
        ranked = ranked.clone()
        ranked[: self.always] = float("-inf")
        chosen: list[int] = []
        if taken is None:
            taken = torch.zeros(c, dtype=torch.bool)
        ranked[taken] = float("-inf")
        nb = self.config.neighbours
        cap = self.budget_chunks if cap is None else cap
        for best in ranked.argsort(descending=True, stable=True).tolist():
            if len(chosen) >= cap or best < self.always or ranked[best] == float("-inf"):
                break
            for j in sorted(
                range(max(self.always, best - nb), min(c, best + nb + 1)),
                key=lambda j: abs(j - best),
            ):
                if len(chosen) < cap and not taken[j]:
                    taken[j] = True
                    chosen.append(j)
        return torch.tensor(list(range(self.always)) + sorted(chosen), dtype=torch.long)

    def shifts(
        self, chunks: torch.Tensor, scores: torch.Tensor | None = None, turns: int = 0
    ) -> torch.Tensor | None:
        """[K] position shift of each chosen chunk: the virtual layout puts the routed chunks one
        after another after the preamble's, in corpus order or (`config.order` "best_last", with
        the chunk scores) passage by passage in ascending score, the last one right before the
        question at `query_position(.., turns)` (None for stored positions)."""
        if self.config.positions == "stored":
            return None
        cs = self.chunk_size
        slot = torch.arange(chunks.shape[0])  # the preamble's chunks keep their place
        if self.config.order == "best_last" and scores is not None:
            slot = self.best_last_slots(chunks, scores)
        # fewer chunks than the layout holds (an earlier turn's passage already chosen): the gap
        # goes after the preamble, so the passages stay next to the question
        slot[self.always :] += self.layout_chunks(turns) - (chunks.shape[0] - self.always)
        start = self.positions[(chunks * cs).clamp_max(self.num_tokens - 1)]
        shift = slot * cs - start
        shift[: self.always] = 0
        return shift

    def best_last_slots(self, chunks: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """[K] virtual slot of each chosen chunk (ascending ids): the preamble's first, then the
        passages (runs of consecutive ids) by ascending best score, the best nearest the question."""
        ids = chunks.tolist()
        runs: list[list[int]] = []  # indices into chunks, one list per passage
        for i in range(self.always, len(ids)):
            if runs and ids[i] == ids[runs[-1][-1]] + 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        runs.sort(key=lambda r: (max(float(scores[ids[i]]) for i in r), ids[r[0]]))
        slot = torch.arange(chunks.shape[0])
        nxt = self.always
        for run in runs:
            for i in run:
                slot[i] = nxt
                nxt += 1
        return slot

    def select(
        self,
        queries: Queries,
        history: list[Queries] | tuple = (),
        words: list[list[int]] | None = None,
    ) -> Selection:
        """The selection of one request from its question's queries at the selecting layers
        ({layer: (q[T, Hq, d], positions[T])}) and those of its earlier user turns (`history`,
        oldest first): the budget's passages for the question, then the best passage of each of
        the `config.history` most recent turns that is not chosen yet. In the best-last layout
        the turns' passages come first (oldest first) and the question's last. `words`: the token
        ids of the turns (oldest first) and of the question, last, for the lexical fusion."""
        words = list(words) if words else [[] for _ in range(len(history) + 1)]
        scores = self.ranked(queries, words[-1])
        chunks = self.choose(scores)
        own = chunks[self.always :]
        taken = torch.zeros(scores.shape[0], dtype=torch.bool)
        taken[chunks] = True
        turns = list(zip(history, words[:-1]))[::-1][: self.config.history]  # most recent first
        order = scores.clone()  # the layout's order key of each chunk
        floor = float(scores[own].min()) if own.numel() else 0.0
        extra = []
        for age, (turn, turn_words) in enumerate(turns):
            best = self.ranked(turn, turn_words)
            if taken[int(best.argmax())]:  # a turn whose best chunk is read already adds nothing
                continue
            passage = self.choose(best, cap=2 * self.config.neighbours + 1, taken=taken)
            passage = passage[self.always :]
            order[passage] = floor - 1.0 - age  # before the question's own, the oldest first
            extra.append(passage)
        if extra:
            chunks = torch.cat([chunks, *extra]).sort().values
        cited = torch.zeros_like(scores)
        cited[own] = (scores[own] - floor).clamp_min(0) if own.numel() else 0
        return Selection(chunks, self.shifts(chunks, order, len(turns)), cited)


def selection_queries(
    model,
    ids: list[int],
    positions: list[int],
    spans: list[tuple[int, int]],
    preamble_k: list[torch.Tensor],
    preamble_v: list[torch.Tensor],
    layers: tuple[int, ...],
) -> list[Queries]:
    """The selection pass: `ids` (a request's prompt) through the model's layers up to the last
    selecting one, attending the preamble's KV and themselves (causal); returns, per span, the
    queries of its tokens ids[a:b] at each selecting layer, with their positions (one pass for
    the question and the earlier turns alike)."""
    from kb.model.rope import cos_sin as _cos_sin

    dev = model.inv_freq.device  # the preamble's copy may be elsewhere (a sharded corpus's)
    preamble_k = [x.to(dev) for x in preamble_k]
    preamble_v = [x.to(dev) for x in preamble_v]
    ids_t = torch.tensor(ids, device=dev)
    pos_t = torch.tensor(positions, device=dev)
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    attn = _PreambleAttention(preamble_k, preamble_v, (lo, hi), set(layers))
    x = model.model.embed_tokens(ids_t)
    cos, sin = _cos_sin(pos_t, model.inv_freq)
    for layer in model.model.layers[: max(layers) + 1]:
        x = layer(x, cos, sin, attn)
    pos = pos_t.cpu()
    return [
        {li: (q[a - lo : b - lo], pos[a:b]) for li, q in attn.queries.items()} for a, b in spans
    ]


@dataclass
class _PreambleAttention:
    """Attention of the selection pass: the preamble's KV, then the prompt itself, causally."""

    k: list[torch.Tensor]  # per layer [P, Hkv, d]
    v: list[torch.Tensor]
    span: tuple[int, int]
    layers: set[int]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if layer in self.layers:
            self.queries[layer] = q[self.span[0] : self.span[1]].float().cpu()
        p, t = self.k[layer].shape[0], q.shape[0]
        kk = torch.cat([self.k[layer].to(q.dtype), k]).transpose(0, 1)
        vv = torch.cat([self.v[layer].to(q.dtype), v]).transpose(0, 1)
        mask = torch.ones(t, p + t, dtype=torch.bool, device=q.device)
        mask[:, p:] = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1), kk, vv, attn_mask=mask, enable_gqa=True
        )
        return o.transpose(0, 1)


def preamble_kv(shared) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The preamble's k, v per layer [P, Hkv, d] of a SharedKV, dequantized where stored in fp8
    (the selector's own copy for the view of a corpus sharded over other ranks)."""
    from attention.reference import dequantize

    if shared.selector is not None and shared.selector.preamble is not None:
        return shared.selector.preamble
    p, cs = shared.preamble_len, shared.chunk_size
    ks, vs = shared.meta.k_scale, shared.meta.v_scale
    k = [x[:p] if ks is None else dequantize(x[:p], ks[i], cs) for i, x in enumerate(shared.k)]
    v = [x[:p] if vs is None else dequantize(x[:p], vs[i], cs) for i, x in enumerate(shared.v)]
    return k, v


@torch.inference_mode()
def select_for(
    shared,
    model,
    ids: list[int],
    span: tuple[int, int] | None,
    pos_offset: int,
    history: tuple[tuple[int, int], ...] = (),
) -> Selection:
    """The selection of one request over corpus `shared` (its `selector`): the selection pass over
    its prompt `ids` at positions pos_offset.., scored from the question tokens ids[span] and
    the earlier user turns' ids[a:b] of `history` (oldest first)."""
    sel: PassageSelector = shared.selector
    span = span or (0, len(ids))
    pk, pv = preamble_kv(shared)
    *turns, queries = selection_queries(
        model,
        ids,
        list(range(pos_offset, pos_offset + len(ids))),
        [*history, span],
        pk,
        pv,
        sel.config.layers,
    )
    return sel.select(queries, turns, [ids[a:b] for a, b in [*history, span]])


@torch.inference_mode()
def calibrate(shared, model, tokenizer, system_prompt: str) -> torch.Tensor:
    """[C] the chunk scores neutral questions give (measured once per corpus layout, at load):
    what every question attends whatever it asks; stored as the selector's `calibration`."""
    from kb.prompt import build_prompt, encode, question_span

    sel: PassageSelector = shared.selector
    pk, pv = preamble_kv(shared)
    pos0 = sel.query_position(shared.pos_offset)
    total = None
    for question in NEUTRAL_QUESTIONS:
        suffix = build_prompt(tokenizer, system_prompt, [], question).suffix
        ids = encode(tokenizer, suffix)
        span = question_span(tokenizer, suffix, question) or (0, len(ids))
        (queries,) = selection_queries(
            model, ids, list(range(pos0, pos0 + len(ids))), [span], pk, pv, sel.config.layers
        )
        scores = sel.chunk_scores(queries)
        total = scores if total is None else total + scores
    sel.calibration = total / len(NEUTRAL_QUESTIONS)
    return sel.calibration


def selection_config(
    settings, cfg, num_tokens: int, num_chunks: int, always: int, usable_positions: int
) -> SelectionConfig | None:
    """The passage selector's configuration for a corpus of `num_tokens` (`num_chunks`, the first
    `always` the preamble's) under kb's Settings and the model's config, or None when the corpus is
    read whole: within the model's usable positions, the budget off, or nothing to choose from."""
    budget = settings.selection_budget
    if budget <= 0 or num_tokens <= usable_positions or num_chunks <= always + 1:
        return None
    heads = retrieval_heads(settings.selection_heads, settings.model, cfg.num_layers, cfg.num_heads)
    chosen = tuple(int(x) for x in settings.selection_layers.split(",") if x.strip())
    chosen = tuple(x for x in chosen if 0 <= x < cfg.num_layers) or (cfg.num_layers // 2,)
    if heads:  # the model's retrieval heads score, at their own layers
        chosen = tuple(sorted({layer for layer, _ in heads}))
    return SelectionConfig(
        budget=budget,
        layers=chosen,
        heads=heads,
        window=settings.selection_window,
        positions=settings.selection_positions,
        order=settings.selection_order,
        history=settings.selection_history,
        lexical=settings.selection_lexical,
    )


def install_selector(
    shared,
    keys: list[torch.Tensor],
    lm,
    config: SelectionConfig,
    system_prompt: str,
    preamble: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    chunk_tokens: Callable[[], list[list[int]]] | None = None,
) -> bool:
    """Build the selector of corpus `shared` from the selecting layers' stored keys (indexable by
    layer, each [N, Hkv, d]), keep the `preamble`'s KV beside it where the corpus's own lives on
    other ranks, index the chunks' token ids (`chunk_tokens`, called only here: config.lexical)
    and calibrate it with the neutral questions; False (read whole) when the budget covers the
    corpus."""
    selector = PassageSelector.build(
        keys,
        shared.positions,
        shared.chunk_size,
        shared.always_chunks,
        lm.model.inv_freq.cpu(),
        config,
        num_heads=lm.config.num_heads,
    )
    if selector.covers_corpus:
        return False
    selector.preamble = preamble
    if config.lexical != "off" and chunk_tokens is not None:
        selector.lexicon = LexicalIndex.build(chunk_tokens(), lm.config.vocab_size)
    shared.selector = selector
    calibrate(shared, lm.model, lm.tokenizer, system_prompt)
    return True


def attach_selector(
    shared,
    keys: list[torch.Tensor],
    lm,
    settings,
    usable_positions: int,
    chunk_tokens: Callable[[], list[list[int]]] | None = None,
) -> bool:
    """Attention retrieval for a corpus beyond the model's usable positions (its segments'
    positions wrap) and the budget: re-based keys of the selecting layers (from `keys`, per layer
    [N, Hkv, d] as stored, with shared.positions) and the neutral questions' calibration, once per
    layout; `lm` the loaded model (config, decoder, tokenizer), `settings` kb's Settings (the
    selection budget, heads, positions and the system prompt). A corpus within the positions or
    the budget is read whole, as before. `chunk_tokens` gives the token ids of every chunk (the
    lexical index, config.lexical). Returns whether it now selects."""
    config = selection_config(
        settings,
        lm.config,
        shared.num_tokens,
        shared.num_chunks,
        shared.always_chunks,
        usable_positions,
    )
    if config is None:
        return False
    return install_selector(
        shared, keys, lm, config, settings.system_prompt, chunk_tokens=chunk_tokens
    )
