"""kb: a shared-context knowledge base. `from kb import KnowledgeBase, SamplingParams`."""

from __future__ import annotations

__all__ = ["KnowledgeBase", "SamplingParams", "Settings"]


def __getattr__(name: str):  # lazy: `kb --help` and `kb corpus list` should not import torch
    if name == "KnowledgeBase":
        from kb.service import KnowledgeBase

        return KnowledgeBase
    if name == "SamplingParams":
        from kb.engine.sequence import SamplingParams

        return SamplingParams
    if name == "Settings":
        from kb.settings import Settings

        return Settings
    raise AttributeError(name)
