"""torchrun entry: rank 0 runs the model and the engine; ranks 1..N hold the corpus's shared KV.

    torchrun --standalone --nproc-per-node 3 -m kb.cli.distributed --shared-ranks 2 \\
        --doc handbook.txt --question "What is the access code?" --density 0.25

Rank 0 loads the model (the demo model or a folder, `--model`), prefills the documents into a
corpus KV, sends each shared rank its slice, and answers the questions through the distributed
engine, printing each answer and the decode rate. NCCL on GPUs (rank r uses cuda:r), gloo on CPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

from index import CorpusRouter
from kb.cache_key import corpus_settings
from kb.engine.distributed.backend import distributed_engine
from kb.engine.distributed.protocol import ShardLink, World, init_world
from kb.engine.distributed.worker import run_shared_rank
from kb.engine.engine import EngineConfig
from kb.engine.selection import attach_selector
from kb.engine.sequence import SamplingParams
from kb.engine.shared_kv import SharedKV
from kb.ingest.build import document_segments, place_segments, position_limit, prefill_corpus
from kb.ingest.precompute import prefill_preamble
from kb.model.demo import DEMO_NAME, ensure_demo_model
from kb.model.loader import LoadedModel, load_model
from kb.prompt import build_prompt, encode, question_span
from kb.settings import Settings

log = logging.getLogger("kb.distributed")


def build_corpus(lm: LoadedModel, docs: list[Path], settings: Settings, density: float) -> SharedKV:
    """The documents as one in-memory corpus, built as ingestion builds one (kb/ingest/build.py:
    the same parsing, segments, positions and prefill scheme), routed below density 1."""
    preamble = corpus_settings(settings, lm)["preamble"]
    segments = [
        plan.token_ids
        for path in docs
        for plan in document_segments(path.read_bytes(), path.name, lm.tokenizer, settings)
    ]
    starts = place_segments(
        [len(s) for s in segments],
        len(preamble),
        len(preamble),
        position_limit(lm.config.max_position_embeddings),
    )
    pk, pv = prefill_preamble(lm.model, preamble, settings.device)
    ks, vs, where = [pk], [pv], [torch.arange(len(preamble))]
    for j, k, v in prefill_corpus(lm.model, preamble, segments, starts, settings):
        ks.append(k)
        vs.append(v)
        where.append(torch.arange(starts[j], starts[j] + len(segments[j])))
    k_all, v_all = torch.cat(ks, 1), torch.cat(vs, 1)  # [L, N, Hkv, d]
    shared = SharedKV(
        "corpus",
        list(k_all.unbind(0)),
        list(v_all.unbind(0)),
        chunk_size=settings.chunk_size,
        pos_offset=max(s + len(seg) for s, seg in zip(starts, segments)),
        preamble_len=len(preamble),
        positions=torch.cat(where),
    )
    if density < 1.0 and shared.num_chunks > shared.always_chunks + 1:
        shared.router = CorpusRouter(shared.k, settings.chunk_size, shared.always_chunks)
        shared.top_k = shared.router.top_k(density)
    else:  # beyond the model's positions, each question chooses its passages (as served)
        usable = position_limit(lm.config.max_position_embeddings)
        ids = [t for seg in [[0] * len(preamble), *segments] for t in seg]  # the layout's tokens
        cs = settings.chunk_size
        chunks = [ids[i : i + cs] for i in range(0, len(ids), cs)]
        chunks[: shared.always_chunks] = [[] for _ in range(shared.always_chunks)]
        keys = [k.cpu() for k in shared.k]
        attach_selector(shared, keys, lm, settings, usable, lambda: chunks)
    return shared


def run_unique_rank(world: World, args: argparse.Namespace) -> int:
    """Rank 0: model, corpus, engine; answers each question and reports the decode rate."""
    dev = str(world.device)
    settings = Settings(segment_len=args.segment_len, chunk_size=args.chunk_size, device=dev)
    dtype = torch.bfloat16 if world.device.type == "cuda" else torch.float32
    folder = model_folder(args.model or settings.model, settings.resolved_models_dir)
    lm = load_model(folder, dtype, dev)
    shared = build_corpus(lm, [Path(p) for p in args.doc], settings, args.density)
    link = ShardLink(world)
    try:
        view = link.register(shared)
        del shared  # rank 0 keeps the router and shapes only
        engine = distributed_engine(
            lm, link, EngineConfig(device=dev, unique_kv_tokens=args.unique_kv_tokens)
        )
        engine.register_corpus(view)
        handles = []
        sel = view.selector
        pos = view.pos_offset if sel is None else sel.query_position(view.pos_offset)
        for q in args.question:
            suffix = build_prompt(lm.tokenizer, settings.system_prompt, [], q).suffix
            ids = encode(lm.tokenizer, suffix)
            span = None if sel is None else question_span(lm.tokenizer, suffix, q)
            handles.append(
                engine.add_request(
                    ids,
                    SamplingParams(max_tokens=args.max_tokens),
                    view.key,
                    pos,
                    select=sel is not None,
                    select_span=span,
                )
            )
        t0 = time.perf_counter()
        engine.run_until_done()
        dt = time.perf_counter() - t0
        failed = 0
        for q, h in zip(args.question, handles):
            r = h.result
            failed += r.reason == "error"
            print(
                f"Q: {q}\nA: {r.error if r.reason == 'error' else r.text}  [{r.reason}]\n",
                flush=True,
            )
        tokens = sum(h.result.completion_tokens for h in handles)
        print(
            f"{view.num_tokens} shared tokens on {len(world.shared_ranks)} shared ranks; {tokens} tokens in "
            f"{dt:.2f}s ({tokens / dt:.1f} tokens/s)",
            file=sys.stderr,
        )
        return 1 if failed else 0
    finally:
        link.shutdown()


def model_folder(name: str, models_dir: Path) -> Path:
    """The demo model (fetched on first use) or a local checkpoint folder."""
    if name == DEMO_NAME:
        return ensure_demo_model(models_dir)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise SystemExit(
            f"unknown model {name!r}: not the demo model ({DEMO_NAME}) and not a folder"
        )
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--shared-ranks", type=int, required=True, help="ranks holding shared KV (world size - 1)"
    )
    p.add_argument(
        "--model", default=None, help="model folder or the demo model's name (default: KB_MODEL)"
    )
    p.add_argument(
        "--doc", action="append", default=[], help="a text file of the corpus (repeatable)"
    )
    p.add_argument("--question", action="append", default=[], help="a question (repeatable)")
    p.add_argument(
        "--density", type=float, default=1.0, help="fraction of chunks each query attends"
    )
    p.add_argument("--chunk-size", type=int, default=64)
    p.add_argument("--segment-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--unique-kv-tokens", type=int, default=65536)
    p.add_argument(
        "--timeout", type=float, default=60.0, help="seconds before a silent rank counts as dead"
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s rank %(process)d %(name)s: %(message)s"
    )
    world = init_world("env://", timeout_s=args.timeout)
    if world.world_size != args.shared_ranks + 1:
        raise SystemExit(
            f"--shared-ranks {args.shared_ranks} needs a world of {args.shared_ranks + 1} "
            f"processes, torchrun started {world.world_size}"
        )
    if world.rank == 0:
        if not args.doc or not args.question:
            raise SystemExit("rank 0 needs --doc and --question")
        return run_unique_rank(world, args)
    run_shared_rank(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
