"""Time to first token on the CPU with the demo model over a ~100K-token shared corpus.

The corpus KV is real: a few pages of prose are prefilled once (after the preamble, as
ingestion does) and their segment KV is tiled to the target size, so keys and values have the
model's real statistics; the tiling repeats content, which changes no timing. One request's
question is then prefilled against the whole shared KV and its first token sampled; we time
that, dense and routed (request- and token-level prefill routing), with and without the
citation measurement, at each thread count asked for. The machine's load average is recorded
beside the figures (another process on the cores changes them a lot).

    python bench/ttft_cpu.py [--tokens 100000] [--repeats 3] [--threads 2 1]

Writes bench/results/ttft_cpu.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from index import CorpusRouter  # noqa: E402
from kb.engine.engine import Engine, EngineConfig  # noqa: E402
from kb.engine.sequence import SamplingParams  # noqa: E402
from kb.engine.shared_kv import SharedKV  # noqa: E402
from kb.ingest.precompute import prefill_preamble, prefill_segments  # noqa: E402
from kb.model.demo import ensure_demo_model  # noqa: E402
from kb.model.loader import load_model  # noqa: E402
from kb.prompt import build_prompt, encode, preamble_text  # noqa: E402
from kb.settings import Settings  # noqa: E402


def corpus_kv(lm, tokens: int, segment_len: int = 1024) -> tuple[SharedKV, list[int]]:
    import inspect
    import json as js
    import logging

    text = "\n\n".join(inspect.getdoc(m) for m in (js, argparse, logging))
    tok = lm.tokenizer
    system = Settings().system_prompt
    preamble = encode(tok, preamble_text(tok, system))
    ids = encode(tok, text)
    segs = [ids[i : i + segment_len] for i in range(0, len(ids), segment_len)]
    pk, pv = prefill_preamble(lm.model, preamble)
    parts = [(k, v) for _, k, v in prefill_segments(lm.model, preamble, segs)]
    seg_k = torch.cat([k for k, _ in parts], 1)
    seg_v = torch.cat([v for _, v in parts], 1)
    reps = -(-(tokens - len(preamble)) // seg_k.shape[1])
    k = torch.cat([pk, seg_k.repeat(1, reps, 1, 1)], 1)[:, :tokens].to(torch.float16)
    v = torch.cat([pv, seg_v.repeat(1, reps, 1, 1)], 1)[:, :tokens].to(torch.float16)
    shared = SharedKV(
        "bench",
        list(k.unbind(0)),
        list(v.unbind(0)),
        chunk_size=64,
        pos_offset=len(preamble) + min(tokens, 6144),
        preamble_len=len(preamble),
    )
    parts_q = build_prompt(tok, system, [], "What is the access code of the Velmora vault?")
    return shared, encode(tok, parts_q.suffix)


def ttft(engine: Engine, shared: SharedKV, question: list[int]) -> float:
    t0 = time.perf_counter()
    h = engine.add_request(question, SamplingParams(max_tokens=1), shared.key, shared.pos_offset)
    while not h.seq.output_ids:
        engine.step()
    return time.perf_counter() - t0


# (mode, density, citation layers, prefill routing)
CASES = (
    ("dense", 1.0, 4, "request"),
    ("dense", 1.0, 0, "request"),
    ("routed", 0.5, 0, "request"),
    ("routed", 0.25, 0, "request"),
    ("routed", 0.1, 0, "request"),
    ("routed", 0.25, 4, "request"),
    ("routed", 0.25, 0, "token"),
)


def load() -> list[float]:
    """1, 5 and 15-minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    p.add_argument("--note", default="", help="what else ran on the machine, for the record")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttft_cpu.json"))
    args = p.parse_args()
    torch.manual_seed(0)
    models = Path(os.environ.get("KB_MODELS_DIR", Path.home() / ".cache" / "kb-moska" / "models"))
    lm = load_model(ensure_demo_model(models))
    shared, question = corpus_kv(lm, args.tokens)
    router = CorpusRouter(shared.k, shared.chunk_size, shared.always_chunks, "quest")
    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for mode, density, cite, prefill in CASES:
            engine = Engine(
                lm,
                EngineConfig(unique_kv_tokens=1024, citation_layers=cite, prefill_routing=prefill),
            )
            shared.router = router if density < 1 else None
            shared.top_k = router.top_k(density) if density < 1 else None
            engine.register_corpus(shared)
            before = load()
            ttft(engine, shared, question)  # warm-up
            times = [ttft(engine, shared, question) for _ in range(args.repeats)]
            rows.append(
                {
                    "mode": mode,
                    "density": density,
                    "prefill_routing": prefill if density < 1 else None,
                    "citation_layers": cite,
                    "threads": threads,
                    "shared_tokens": args.tokens,
                    "question_tokens": len(question),
                    "ttft_s_median": round(statistics.median(times), 3),
                    "ttft_s_all": [round(t, 3) for t in times],
                    "load_before": before,
                    "load_after": load(),
                }
            )
            r = rows[-1]
            print(
                f"{threads} thr {mode:6s} density {density:4.2f} {r['prefill_routing'] or '':7s} "
                f"citations {cite}: first token in {r['ttft_s_median']:6.2f} s (median of {args.repeats}; "
                f"load {before[0]:.2f})",
                flush=True,
            )
    out = {
        "host": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "model": "SmolLM2-135M-Instruct",
        "notes": "corpus KV: real prefilled prose tiled to the size; fp16 stored, each block of keys "
        "dequantized to float32 as it is attended (attention/cpu_shared.py). " + args.note,
        "rows": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
