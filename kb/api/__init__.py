"""HTTP API: OpenAI-compatible chat over corpora, corpus and document endpoints, metrics."""
