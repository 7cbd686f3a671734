"""Admin tab (admins; with sign-in off, the local user): per corpus tokens, KV bytes per tier,
hits, last use and state, with pin, unpin, evict, move and rebuild; live engine figures with
small plots. The figures and operations come from `KnowledgeBase.cache_admin` (the tier
manager's admin side); what they did is said in words. On a CPU-only host the two memory tiers
are one: "memory". With shared ranks (`kb serve --shared-ranks`) the engine figures say per rank
what it holds, and whether the ranks answer.
"""

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import gradio as gr
import pandas as pd

from kb.service import KBError, KnowledgeBase, SharedRanks
from ui.common import admin_of, fmt_bytes, shown_errors
from ui.corpora import rebuild

OPS = ("pin", "unpin", "evict", "move", "rebuild")
HISTORY = 120  # engine samples kept for the plots


def on_gpu(kb: KnowledgeBase) -> bool:
    return kb.settings.device.startswith("cuda")


def tier_names(kb: KnowledgeBase) -> dict[str, str]:
    """The tiers in words. The tier manager's fastest tier is the serving device's memory: on a
    CPU-only host that is host memory too, so its two memory tiers read "memory" (never "gpu"
    beside a GPU column of 0 B)."""
    if on_gpu(kb):
        return {"gpu": "GPU", "cpu": "CPU memory", "disk": "disk"}
    return {"gpu": "memory", "cpu": "memory", "disk": "disk"}


def corpus_columns(kb: KnowledgeBase) -> list[str]:
    kv = ["GPU KV", "CPU KV"] if on_gpu(kb) else ["memory KV"]
    return ["corpus", "state", "tokens", *kv, "disk KV", "hits", "last use", "tier", "pinned"]


@dataclass
class CorpusRow:
    name: str
    state: str  # ready | stale | building | evicted | pinned | empty | failed
    tokens: int
    gpu_bytes: int
    cpu_bytes: int
    disk_bytes: int
    hits: int
    last_used: str
    tier: str
    pinned: bool

    def cells(self, kb: KnowledgeBase) -> list:
        names = tier_names(kb)
        kv = (
            [fmt_bytes(self.gpu_bytes), fmt_bytes(self.cpu_bytes)]
            if on_gpu(kb)
            else [fmt_bytes(self.gpu_bytes + self.cpu_bytes)]
        )
        return [
            self.name,
            self.state,
            self.tokens,
            *kv,
            fmt_bytes(self.disk_bytes),
            self.hits,
            self.last_used,
            names.get(self.tier, self.tier),
            "yes" if self.pinned else "",
        ]


def shared_ranks_text(ranks: SharedRanks | None) -> str:
    """The shared ranks in words, for the engine figures ("" without them)."""
    if ranks is None:
        return ""
    if ranks.serving == "rank 0":
        return (
            f"**shared ranks** {ranks.ranks}: degraded, {ranks.error}; corpora are served from "
            "rank 0 until a shared rank is back"
        )
    held = " · ".join(
        f"**rank {r['rank']}** {fmt_bytes(r['bytes'])} ({r['tokens']:,} tokens, "
        f"{r['corpora']} corpora)"
        if r.get("state", "serving") == "serving"
        else f"**rank {r['rank']}** lost"
        for r in ranks.per_rank
    )
    if not ranks.healthy:
        return f"**shared ranks** {ranks.ranks}: degraded, {ranks.error}; answering: {held}"
    return f"**shared ranks** {ranks.ranks}, answering: {held}"


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else ""


def corpus_rows(kb: KnowledgeBase) -> list[CorpusRow]:
    """Every corpus with where its KV is: per tier bytes, state, hits, last use."""
    return [
        CorpusRow(
            r.name,
            r.state,
            r.tokens,
            r.bytes.get("gpu", 0),
            r.bytes.get("cpu", 0),
            r.bytes.get("disk", 0),
            r.hits,
            _when(r.last_used_at),
            r.tier,
            r.pinned,
        )
        for r in kb.cache_admin.lookup()
    ]


def cache_op(kb: KnowledgeBase, user, op: str, name: str, tier: str | None = None) -> str:
    """Run one admin operation on a corpus's cache; returns what happened, in words."""
    if op not in OPS:
        raise KBError(f"unknown operation {op!r}: one of {', '.join(OPS)}")
    if not name:
        raise KBError("pick a corpus first")
    if op == "rebuild":  # long: a cache job; the Corpora tab shows its documents' progress
        return rebuild(kb, user, name)
    if op == "move" and not on_gpu(kb) and tier == "cpu":
        tier = "gpu"  # one memory on a CPU-only host: the serving tier
    done = kb.cache_admin.run_op(op, name, tier)
    names = tier_names(kb)
    if op == "pin":
        return f"pinned {name}: it stays where it is until unpinned"
    if op == "unpin":
        return f"unpinned {name}: it may be evicted when room is needed"
    where = names.get(done.get("tier", ""), done.get("tier", ""))
    if op == "evict":
        return f"evicted {name}: its KV is on disk only"
    return f"moved {name}: its KV is in {where}" if where != "disk" else f"moved {name} to disk"


@dataclass
class EngineSample:
    t: float
    waiting: int
    running: int
    batch: int
    max_batch: int
    tokens_per_s: float
    ttft_s: float | None


def _summed(registry, sample: str) -> float:
    """A metric's sample summed over its labels (time to first token is kept per corpus)."""
    return sum(x.value for family in registry.collect() for x in family.samples if x.name == sample)


def engine_sample(kb: KnowledgeBase) -> EngineSample | None:
    """The engine's figures now (None until the engine has started)."""
    eng = kb.started_engine
    if eng is None:
        return None
    m = eng.metrics
    n = _summed(m.registry, "kb_time_to_first_token_seconds_count")
    ttft = _summed(m.registry, "kb_time_to_first_token_seconds_sum") / n if n else None
    return EngineSample(
        time.time(),
        len(eng.scheduler.waiting),
        len(eng.scheduler.running),
        m.last_batch_size,
        m.max_batch_size,
        round(m.tokens_per_s(), 2),
        ttft,
    )


class AdminHandlers:
    def __init__(self, kb: KnowledgeBase):
        self.kb = kb
        self.history: deque[EngineSample] = deque(
            maxlen=HISTORY
        )  # shared: every admin sees the same

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        admin_of(self.kb, request)
        rows = await asyncio.to_thread(corpus_rows, self.kb)
        names = [r.name for r in rows]
        return (
            pd.DataFrame([r.cells(self.kb) for r in rows], columns=corpus_columns(self.kb)),
            gr.Dropdown(
                choices=names, value=current if current in names else (names[0] if names else None)
            ),
        )

    @shown_errors
    async def op(self, op: str, name: str | None, tier: str | None, request: gr.Request):
        user = admin_of(self.kb, request)
        return await asyncio.to_thread(cache_op, self.kb, user, op, name, tier)

    @shown_errors
    async def engine(self, request: gr.Request):
        admin_of(self.kb, request)
        now = engine_sample(self.kb)
        ranks = shared_ranks_text(self.kb.shared_ranks())
        ranks = f"\n\n{ranks}" if ranks else ""
        if now is None:
            empty = pd.DataFrame({"time": [], "value": [], "series": []})
            return "engine not started: it starts with the first question" + ranks, empty, empty
        if not self.history or now.t - self.history[-1].t >= 0.5:
            self.history.append(now)
        ttft = f"{now.ttft_s * 1000:.0f} ms" if now.ttft_s is not None else "–"
        figures = (
            f"**queue** {now.waiting} · **running** {now.running} · **batch** {now.batch} "
            f"(max {now.max_batch}) · **tokens/s** {now.tokens_per_s:.1f} "
            f"· **time to first token** {ttft}"
        ) + ranks
        t0 = self.history[0].t
        load = pd.DataFrame(
            [
                {"time": round(x.t - t0, 1), "value": v, "series": k}
                for x in self.history
                for k, v in (("queue", x.waiting), ("running", x.running), ("batch", x.batch))
            ]
        )
        speed = pd.DataFrame(
            [
                {"time": round(x.t - t0, 1), "value": x.tokens_per_s, "series": "tokens/s"}
                for x in self.history
            ]
        )
        return figures, load, speed


def build_admin_tab(kb: KnowledgeBase) -> dict[str, Any]:
    h = AdminHandlers(kb)
    table = gr.Dataframe(headers=corpus_columns(kb), interactive=False, elem_id="admin-corpora")
    tiers = (
        [("GPU", "gpu"), ("CPU memory", "cpu"), ("disk", "disk")]
        if on_gpu(kb)
        else [("memory", "gpu"), ("disk", "disk")]
    )
    with gr.Row():
        corpus = gr.Dropdown(
            label="Corpus", choices=[], elem_id="admin-corpus", scale=2, allow_custom_value=True
        )
        tier = gr.Dropdown(  # API clients may name "cpu" on a CPU host: the same memory
            tiers,
            value="gpu",
            label="Move to",
            elem_id="admin-tier",
            scale=1,
            allow_custom_value=True,
        )
    with gr.Row():
        buttons = {op: gr.Button(op.capitalize(), elem_id=f"admin-{op}", size="sm") for op in OPS}
    status = gr.Markdown(elem_id="admin-status")
    gr.Markdown("### Engine")
    figures = gr.Markdown(elem_id="engine-figures")
    with gr.Row():
        load_plot = gr.LinePlot(
            x="time",
            y="value",
            color="series",
            title="Queue, running, batch size",
            x_title="seconds",
            height=220,
        )
        speed_plot = gr.LinePlot(
            x="time",
            y="value",
            color="series",
            title="Tokens per second",
            x_title="seconds",
            height=220,
        )
    for op, btn in buttons.items():  # one named event per operation, for API clients and tests
        btn.click(h.op, [gr.State(op), corpus, tier], [status], api_name=f"admin_{op}").then(
            h.corpora, [corpus], [table, corpus], api_name=False
        )
    gr.Timer(3.0).tick(h.corpora, [corpus], [table, corpus], api_name=False, show_progress="hidden")
    gr.Timer(2.0).tick(
        h.engine, None, [figures, load_plot, speed_plot], api_name=False, show_progress="hidden"
    )
    refresh = gr.Button("Refresh", size="sm", elem_id="admin-refresh")
    refresh.click(h.corpora, [corpus], [table, corpus], api_name="admin_corpora")
    refresh.click(h.engine, None, [figures, load_plot, speed_plot], api_name="engine_stats")
    return {"corpus": corpus, "load": h.corpora, "table": table, "figures": figures}
