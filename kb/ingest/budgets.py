"""Token budgets of a document once tokenized: the per-document limit and the per-corpus and
per-user quotas (KB_MAX_DOCUMENT_TOKENS, KB_CORPUS_TOKEN_QUOTA, KB_USER_TOKEN_QUOTA), each a
clear IngestError before any KV is computed (a 50 MB text was accepted as 12.2M tokens)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from kb.ingest.errors import IngestError
from storage.models import Corpus, Document


def check_token_budgets(
    session: Any, settings: Any, corpus_id: int, document_id: int, filename: str, tokens: int
) -> None:
    """Raise IngestError unless a document of `tokens` tokens fits every budget. The other
    documents counted are those already tokenized (num_tokens), this one excluded."""
    limit = getattr(settings, "max_document_tokens", 0) or 0
    if limit and tokens > limit:
        raise IngestError(
            "too_many_tokens",
            f"{filename} has {tokens} tokens; one document may have "
            f"{limit} (KB_MAX_DOCUMENT_TOKENS): split it.",
        )
    corpus = session.get(Corpus, corpus_id)
    quota = getattr(settings, "corpus_token_quota", 0) or 0
    if quota:
        used = (
            session.scalar(
                select(func.coalesce(func.sum(Document.num_tokens), 0)).where(
                    Document.corpus_id == corpus_id, Document.id != document_id
                )
            )
            or 0
        )
        if used + tokens > quota:
            raise IngestError(
                "corpus_quota",
                f"{filename} ({tokens} tokens) would take corpus {corpus.name!r} "
                f"past its quota of {quota} tokens ({used} used; KB_CORPUS_TOKEN_QUOTA).",
            )
    quota = getattr(settings, "user_token_quota", 0) or 0
    if quota:
        owner = (
            Corpus.owner_id.is_(None)
            if corpus.owner_id is None
            else Corpus.owner_id == corpus.owner_id
        )
        used = (
            session.scalar(
                select(func.coalesce(func.sum(Document.num_tokens), 0))
                .join(Corpus)
                .where(owner, Document.id != document_id)
            )
            or 0
        )
        if used + tokens > quota:
            who = "anonymous users" if corpus.owner_id is None else "this corpus's owner"
            raise IngestError(
                "user_quota",
                f"{filename} ({tokens} tokens) would take {who} past the quota of "
                f"{quota} tokens ({used} used; KB_USER_TOKEN_QUOTA).",
            )
