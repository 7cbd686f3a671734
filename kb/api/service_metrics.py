"""Figures of the service beside the engine's, read from the database and the cache at scrape
time: shared-KV bytes per tier per corpus, the corpus cache's hits, ingestion jobs by state, and
the prefill rate of the ingestion jobs running now."""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from sqlalchemy import func, select

from kb.service import KnowledgeBase
from storage.models import Job

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
TIERS = ("gpu", "cpu", "disk")


def _seconds_since(t: datetime | None) -> float:
    if t is None:
        return 0.0
    now = datetime.now(UTC) if t.tzinfo else datetime.now(UTC).replace(tzinfo=None)
    return max(0.0, (now - t).total_seconds())


class ServiceCollector:
    """A Prometheus collector over one KnowledgeBase (collected on each scrape)."""

    def __init__(self, kb: KnowledgeBase):
        self.kb = kb

    def collect(self):
        kv = GaugeMetricFamily(
            "kb_shared_kv_bytes",
            "Shared-KV bytes of a corpus per tier (gpu/cpu: resident layout, disk: stored files)",
            labels=["corpus", "tier"],
        )
        hits = CounterMetricFamily(
            "kb_corpus_cache_hits", "Questions served from a corpus's cached KV", labels=["corpus"]
        )
        for row in self.kb.cache_admin.lookup():
            for tier in TIERS:
                kv.add_metric([row.name, tier], float(row.bytes.get(tier, 0)))
            hits.add_metric([row.name], float(row.hits))
        yield kv
        yield hits
        ranks = self.kb.shared_ranks()
        if ranks is not None:
            yield GaugeMetricFamily(
                "kb_shared_ranks_healthy",
                "1 while every shared rank answers, 0 while one is missing (survivors or rank 0 serve)",
                value=float(ranks.healthy),
            )
            held = GaugeMetricFamily(
                "kb_shared_rank_kv_bytes",
                "Shared-KV bytes a shared rank holds (its slices of the loaded corpora)",
                labels=["rank"],
            )
            for r in ranks.per_rank:
                held.add_metric([str(r["rank"])], float(r["bytes"]))
            yield held
        with self.kb.db.session() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
        jobs = GaugeMetricFamily("kb_ingest_jobs", "Jobs by state", labels=["state"])
        for state in JOB_STATES:
            jobs.add_metric([state], float(counts.get(state, 0)))
        yield jobs
        running = [j for j in self.kb.jobs.queue.list() if j.status == "running"]
        rate = sum(j.tokens_done / max(1.0, _seconds_since(j.started_at)) for j in running)
        yield GaugeMetricFamily(
            "kb_ingest_prefill_tokens_per_second",
            "Prefill rate of the running ingestion jobs (KV tokens stored per second, summed)",
            value=rate,
        )


def service_registry(kb: KnowledgeBase) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(kb))
    return registry
