"""Admin tab (admins only): per corpus tokens, KV bytes per tier, hits, last use and state, with
pin, unpin, evict, move and rebuild; live engine figures with small plots.

The figures and operations come from `kb.cache_admin` (the tier manager's admin side) when it
is installed; without it they act on what the serving process has: the corpus cache (loaded =
on the serving device, evicted = on disk only) and the corpus's pinned and tier columns.
"""

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from kb.errors import Conflict, KBError, NotFound
from kb.service import KnowledgeBase
from ui.common import admin_of, fmt_bytes, shown_errors
from ui.corpora import Tracker, rebuild

CORPUS_COLUMNS = [
    "corpus",
    "state",
    "tokens",
    "GPU KV",
    "CPU KV",
    "disk KV",
    "hits",
    "last use",
    "tier",
    "pinned",
]
OPS = ("pin", "unpin", "evict", "move", "rebuild")
HISTORY = 120  # engine samples kept for the plots


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

    def cells(self) -> list:
        return [
            self.name,
            self.state,
            self.tokens,
            fmt_bytes(self.gpu_bytes),
            fmt_bytes(self.cpu_bytes),
            fmt_bytes(self.disk_bytes),
            self.hits,
            self.last_used,
            self.tier,
            "yes" if self.pinned else "",
        ]


def _files_bytes(paths: list[str | None]) -> int:
    total = 0
    for p in paths:
        if p:
            try:
                total += Path(p).stat().st_size
            except OSError:
                pass
    return total


def cache_admin():
    """The tier manager's admin module, or None where it is not installed."""
    try:
        import kb.cache_admin as m
    except ImportError:
        return None
    return m if hasattr(m, "lookup") and hasattr(m, "run_op") else None


def _when(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else ""


def corpus_rows(kb: KnowledgeBase) -> list[CorpusRow]:
    """Every corpus with where its KV is: per tier bytes, state, hits, last use."""
    m = cache_admin()
    if m is not None:
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
            for r in m.lookup(kb)
        ]
    device_tier = "gpu" if kb.settings.device.startswith("cuda") else "cpu"
    rows = []
    for c in kb.placements():
        loaded = kb.cache.loaded.get(c.name)
        dev = (
            sum(t.numel() * t.element_size() for t in (loaded.shared.k + loaded.shared.v))
            if loaded
            else 0
        )
        if c.status != "ready":
            state = c.status
        elif c.pinned:
            state = "pinned"
        else:
            state = "ready" if loaded else "evicted"
        gpu, cpu = (dev, 0) if device_tier == "gpu" else (0, dev)
        rows.append(
            CorpusRow(
                c.name,
                state,
                c.tokens,
                gpu,
                cpu,
                _files_bytes(c.kv_files),
                c.hits,
                _when(c.last_used_at),
                device_tier if loaded else "disk",
                c.pinned,
            )
        )
    return rows


def cache_op(
    kb: KnowledgeBase, tracker: Tracker, user, op: str, name: str, tier: str | None = None
) -> str:
    """Run one admin operation on a corpus's cache; returns what happened, in words."""
    if op not in OPS:
        raise KBError(f"unknown operation {op!r}: one of {', '.join(OPS)}")
    if not name:
        raise KBError("pick a corpus first")
    m = cache_admin()
    if m is not None:
        if (
            op == "rebuild"
        ):  # long: runs as a cache job; the Corpora tab shows its documents' progress
            return f"rebuilding {name} (event {m.submit(kb, 'rebuild', name)})"
        return f"{op} {name}: " + ", ".join(
            f"{k} {v}" for k, v in m.run_op(kb, op, name, tier).items()
        )
    device_tier = "gpu" if kb.settings.device.startswith("cuda") else "cpu"
    pinned = next((r.pinned for r in corpus_rows(kb) if r.name == name), None)
    if pinned is None:
        raise NotFound(f"corpus {name!r} does not exist")
    if op == "pin":
        kb.load_corpus(name)
        kb.set_placement(name, pinned=True, tier=device_tier)
        return f"pinned {name} on {device_tier}"
    if op == "unpin":
        kb.set_placement(name, pinned=False)
        return f"unpinned {name}"
    if op == "evict" or (op == "move" and tier == "disk"):
        if pinned:
            raise Conflict(f"corpus {name!r} is pinned; unpin it first")
        kb.cache.drop(name)  # refuses while it answers questions
        kb.set_placement(name, tier="disk")
        return f"evicted {name}: its KV is on disk only"
    if op == "move":
        if tier != device_tier:
            raise KBError(
                f"this server serves from {device_tier}; its tiers are {device_tier} and disk"
            )
        kb.load_corpus(name)
        kb.set_placement(name, tier=device_tier)
        return f"moved {name} to {device_tier}"
    return rebuild(kb, tracker, user, name)


@dataclass
class EngineSample:
    t: float
    waiting: int
    running: int
    batch: int
    max_batch: int
    tokens_per_s: float
    ttft_s: float | None


def engine_sample(kb: KnowledgeBase) -> EngineSample | None:
    """The engine's figures now (None until the engine has started)."""
    eng = kb.started_engine
    if eng is None:
        return None
    m = eng.metrics
    n = m.registry.get_sample_value("kb_time_to_first_token_seconds_count") or 0
    ttft = (
        (m.registry.get_sample_value("kb_time_to_first_token_seconds_sum") or 0) / n if n else None
    )
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
    def __init__(self, kb: KnowledgeBase, tracker: Tracker):
        self.kb, self.tracker = kb, tracker
        self.history: deque[EngineSample] = deque(
            maxlen=HISTORY
        )  # shared: every admin sees the same

    @shown_errors
    async def corpora(self, current: str | None, request: gr.Request):
        admin_of(self.kb, request)
        rows = await asyncio.to_thread(corpus_rows, self.kb)
        names = [r.name for r in rows]
        return (
            pd.DataFrame([r.cells() for r in rows], columns=CORPUS_COLUMNS),
            gr.Dropdown(
                choices=names, value=current if current in names else (names[0] if names else None)
            ),
        )

    @shown_errors
    async def op(self, op: str, name: str | None, tier: str | None, request: gr.Request):
        user = admin_of(self.kb, request)
        return await asyncio.to_thread(cache_op, self.kb, self.tracker, user, op, name, tier)

    @shown_errors
    async def engine(self, request: gr.Request):
        admin_of(self.kb, request)
        now = engine_sample(self.kb)
        if now is None:
            empty = pd.DataFrame({"time": [], "value": [], "series": []})
            return "engine not started: it starts with the first question", empty, empty
        if not self.history or now.t - self.history[-1].t >= 0.5:
            self.history.append(now)
        ttft = f"{now.ttft_s * 1000:.0f} ms" if now.ttft_s is not None else "–"
        figures = (
            f"**queue** {now.waiting} · **running** {now.running} · **batch** {now.batch} "
            f"(max {now.max_batch}) · **tokens/s** {now.tokens_per_s:.1f} "
            f"· **time to first token** {ttft}"
        )
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


def build_admin_tab(kb: KnowledgeBase, tracker: Tracker) -> dict[str, Any]:
    h = AdminHandlers(kb, tracker)
    table = gr.Dataframe(headers=CORPUS_COLUMNS, interactive=False, elem_id="admin-corpora")
    with gr.Row():
        corpus = gr.Dropdown(
            label="Corpus", choices=[], elem_id="admin-corpus", scale=2, allow_custom_value=True
        )
        tier = gr.Dropdown(
            ["gpu", "cpu", "disk"], value="cpu", label="Move to tier", elem_id="admin-tier", scale=1
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
