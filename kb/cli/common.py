"""Helpers shared by the command modules."""

from __future__ import annotations


def knowledge_base():
    from kb.service import KnowledgeBase

    return KnowledgeBase()


