"""Chunk summaries, device routing and FAISS indexes of a corpus's shared keys (DESIGN.md, `index/`).

- `summaries`: `chunk_summaries(keys, chunk_size)` -> mean / min / max key per chunk and KV head.
- `router`: `Router.route(layer, q, top_k)` on the device with torch (no FAISS), `top_k_for`.
- `corpus_router`: `CorpusRouter`, one loaded corpus's routing (always-attended preamble chunks,
  dense leading layers, request-level selection for a prefill).
- `faiss_index`: flat or IVF inner-product indexes per (layer, KV head); faiss imported lazily.
- `store`: save / load summaries and indexes with a versioned manifest.
- `search`: corpus-wide "find passage" and document lookups.
- `lexical`: `LexicalIndex` of each chunk's token unigrams and bigrams (IDF-weighted), `rerank` and
  `fuse_ranks`: the exact matches that reorder attention retrieval's candidates.
"""

from index.corpus_router import CorpusRouter
from index.router import Router, top_k_for
from index.summaries import KINDS, ChunkSummaries, chunk_summaries

__all__ = ["KINDS", "ChunkSummaries", "CorpusRouter", "Router", "chunk_summaries", "top_k_for"]
