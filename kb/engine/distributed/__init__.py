"""Shared KV sharded across ranks (DESIGN.md, Scale): rank 0 runs the model and each request's own
attention; ranks 1..N hold contiguous chunk slices of each corpus and return partial (o, lse).
Modules: placement (who holds which chunks), protocol (headers, rank 0's link, failures), worker
(the shared ranks' loop), backend (the serving step that asks the link), launch (torchrun entry)."""
