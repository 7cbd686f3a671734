"""Decode throughput and communication of the distributed shared-KV path (kb/engine/distributed).

Launched with torchrun; rank 0 runs the model and the engine (`backend.distributed_engine`), ranks
1..S run the real shared-rank loop (`worker.run_shared_rank`):

    torchrun --standalone --nproc-per-node P bench/distributed.py --shared-ranks P-1 \\
        --shared-tokens 131072 --conc 1,8,32,128

Random bf16 weights in the Llama-3.1-8B shape (`--tiny`: the test's tiny shape, float32, for CPU/gloo
smoke runs) and random shared KV of `--shared-tokens` tokens (timing does not depend on its values),
registered through `ShardLink.register`, which places it over the shared ranks and sends each its slice.

`--shared-ranks 0` (world size 1): rank 0 is its own only shared rank. `LoopbackLink` keeps the
corpus on rank 0 and answers every ATTEND itself, after running the protocol's own exchange
(`ShardLink.shared_attention`: header, q and chunk-id broadcasts, gather of the partials)
over the process group (NCCL on a GPU), so the same collectives, copies and merge run as with
remote shared ranks, minus the wire. Its byte counts are those of one shared rank (S = 1).

Per configuration (B concurrent requests, `--prompt` random prompt tokens each, prefilled through
the model, then `--warmup` untimed and `--steps` timed decode steps, all through `Engine.step`):
  tokens_per_s          B x timed steps / their wall time (each step ends with the sampler's host read)
  itl_ms_p50 / p99      per-step wall time
  comm_bytes_per_step   bytes the ATTEND exchanges carried in the step, from the shapes sent
                        (`ShardLink.stats`): header + q (+ chunk ids) to each shared rank, plus the
                        partials each returns ([T, Hq, d + 2] in 16 bits: o, then the float32 lse
                        in two 16-bit words, `protocol.pack_partial`); per layer = / num_layers
  comm_ms_per_step      time inside those exchanges on rank 0 (CUDA events on the current stream from
                        before the header is made until the partials arrive, so it includes the
                        unique attention rank 0 overlaps with them; the wall clock on CPU)
  wait_ms_per_step      of that, the time rank 0 still waits for the partials after its own work
Writes `<out>/distributed.json` (merging rows of other runs already there) and prints a table;
`python bench/distributed.py --plot JSON PNG` draws tokens/s against concurrency.

`--plain-engine` (with `--shared-ranks 0`): the plain one-GPU `Engine`, no link: the single-GPU
baseline the sharded runs compare against.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from index import CorpusRouter  # noqa: E402
from kb.engine.distributed.backend import distributed_engine  # noqa: E402
from kb.engine.distributed.loopback import LoopbackLink  # noqa: E402
from kb.engine.distributed.protocol import ShardLink, World, init_world, leave_group  # noqa: E402
from kb.engine.distributed.worker import run_shared_rank  # noqa: E402
from kb.engine.engine import Engine, EngineConfig  # noqa: E402
from kb.engine.sequence import SamplingParams  # noqa: E402
from kb.engine.shared_kv import SharedKV  # noqa: E402
from kb.model.loader import LoadedModel  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "bench" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)

GIB = 1 << 30


class DigitTokenizer:
    """Token i decodes to str(i) and a space: random weights need no real tokenizer."""

    eos_token_id = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"{i} " for i in ids)


def random_corpus(
    cfg, n: int, device: str, dtype: torch.dtype, chunk: int, density: float
) -> SharedKV:
    """Random keys and values [n, Hkv, d] per layer (normal, never zeros); routed below density 1."""
    ks, vs = [], []
    # a corpus staged in host memory is still drawn on the GPU (a layer at a time): CPU randn of
    # tens of GiB would take minutes
    make = "cuda" if device == "cpu" and torch.cuda.is_available() else device
    for layer in range(cfg.num_layers):
        for out, s in ((ks, 2 * layer), (vs, 2 * layer + 1)):
            gen = torch.Generator(device=make).manual_seed(1000 + s)
            x = torch.randn(
                n, cfg.num_kv_heads, cfg.head_dim, device=make, dtype=dtype, generator=gen
            )
            out.append(x.to(device))
    sh = SharedKV("corpus", ks, vs, chunk_size=chunk, pos_offset=n)
    if density < 1.0:
        sh.router = CorpusRouter(sh.k, chunk, always=0)
        sh.top_k = sh.router.top_k(density)
    return sh


class LocalLink:
    """`--plain-engine`: no link at all. The plain one-GPU engine (`Engine`) serves the corpus from this
    rank's memory; its stats stay zero (no exchange happens)."""

    def __init__(self):
        from kb.engine.distributed.protocol import CommStats

        self.stats = CommStats()

    def register(self, shared: SharedKV, keep: bool = False) -> SharedKV:
        return shared

    def shutdown(self) -> None:
        pass


def run_config(
    lm, link: ShardLink | LocalLink, view: SharedKV, conc: int, args, device: str
) -> dict:
    """B = conc requests through the distributed engine: prefill, warm up, time decode steps."""
    bs = 16
    per_seq = args.prompt + args.warmup + args.steps + 4 + conc * args.prompt // 2048 + 4
    # decode speed without citation mass (one MASS exchange per citation layer and step when on,
    # docs/SCALING.md "Citations"), on the sharded and the plain engine alike: the same work
    cfg = EngineConfig(
        device=device,
        block_size=bs,
        unique_kv_tokens=conc * bs * -(-per_seq // bs),
        max_running=conc,
        max_batch_tokens=max(conc, 2048),
        max_queue=max(256, conc),
        citation_layers=0,
    )
    engine = Engine(lm, cfg) if isinstance(link, LocalLink) else distributed_engine(lm, link, cfg)
    engine.register_corpus(view)
    rng = torch.Generator().manual_seed(conc)
    # requests admitted in the first prefill step decode while later ones prefill: room for that lead,
    # so that none finishes inside the timed steps
    lead = -(-conc * args.prompt // cfg.max_batch_tokens) + 2
    max_tokens = args.warmup + args.steps + lead + 2
    vocab = lm.config.vocab_size
    handles = [
        engine.add_request(
            torch.randint(0, vocab, (args.prompt,), generator=rng).tolist(),
            SamplingParams(max_tokens=max_tokens, ignore_eos=True),
            view.key,
            view.pos_offset,
        )
        for _ in range(conc)
    ]
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def check():
        bad = [h.seq.finish_reason for h in handles if h.seq.finish_reason not in (None, "length")]
        if bad:
            raise RuntimeError(f"requests failed in the engine: {bad[:3]} ({handles[0].result})")

    t0 = time.perf_counter()
    while any(not h.seq.output_ids for h in handles):  # prefill (chunked by max_batch_tokens)
        engine.step()
        check()
    sync()
    prefill_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        engine.step()
    check()
    stats = link.stats
    times, bytes_, comm_s, wait_s, exchanges = [], [], [], [], []
    for _ in range(args.steps):
        before_tok = sum(len(h.seq.output_ids) for h in handles)
        b = stats.snapshot()
        t = time.perf_counter()
        stepped = engine.step()
        sync()
        dt = time.perf_counter() - t
        a = stats.snapshot()
        check()
        made = sum(len(h.seq.output_ids) for h in handles) - before_tok
        if stepped != conc or made != conc:
            raise RuntimeError(
                f"a timed step ran {stepped} sequences and made {made} tokens, not {conc} "
                f"(running {len(engine.scheduler.running)}, waiting {len(engine.scheduler.waiting)}, "
                f"outputs {sorted({len(h.seq.output_ids) for h in handles})}, "
                f"free blocks {engine.blocks.num_free})"
            )
        times.append(dt)
        bytes_.append((a["bytes_out"] - b["bytes_out"], a["bytes_in"] - b["bytes_in"]))
        comm_s.append(a["seconds"] - b["seconds"])
        wait_s.append(a["wait_seconds"] - b["wait_seconds"])
        exchanges.append(a["exchanges"] - b["exchanges"])
    engine.run_until_done()
    check()
    st = sorted(times)
    pct = lambda p: st[min(len(st) - 1, int(round(p * (len(st) - 1))))] * 1e3  # noqa: E731
    L = lm.config.num_layers
    out_b = sum(x for x, _ in bytes_) / len(bytes_)
    in_b = sum(y for _, y in bytes_) / len(bytes_)
    comm_ms = 1e3 * sum(comm_s) / len(comm_s)
    del engine
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(
        concurrency=conc,
        tokens_per_s=conc * len(times) / sum(times),
        itl_ms_p50=pct(0.5),
        itl_ms_p99=pct(0.99),
        comm_bytes_per_step=int(out_b + in_b),
        comm_bytes_out_per_step=int(out_b),
        comm_bytes_in_per_step=int(in_b),
        comm_ms_per_step=comm_ms,
        comm_ms_per_layer=comm_ms / L,
        comm_frac_of_step=comm_ms / (1e3 * sum(times) / len(times)),
        wait_ms_per_step=1e3 * sum(wait_s) / len(wait_s),
        exchanges_per_step=sum(exchanges) / len(exchanges),
        steps=len(times),
        prefill_s=prefill_s,
    )


def engine_kind(row: dict) -> str:
    """local (plain one-GPU engine), loopback (world size 1, protocol without peers) or sharded."""
    return row.get("engine") or ("loopback" if row["world_size"] == 1 else "sharded")


def run_key(row: dict) -> str:
    return f"{engine_kind(row)}-w{row['world_size']}-n{row['shared_tokens']}"


def merge_rows(path: Path, res: dict) -> dict:
    """Keep the rows of other runs (engine, world size, corpus size) already in the file; this run
    replaces its own."""
    if not path.exists():
        return res
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return res
    mine = set(res["runs"])
    keep = [r for r in old.get("rows", []) if run_key(r) not in mine]
    old_runs = old.get("runs", {})
    runs = {}
    for r in keep:  # files written before rows had an engine key named their runs by world size
        k = run_key(r)
        if k in old_runs or str(r["world_size"]) in old_runs:
            runs[k] = old_runs.get(k) or old_runs[str(r["world_size"])]
    res["rows"] = sorted(
        keep + res["rows"],
        key=lambda r: (r["world_size"], engine_kind(r), r["shared_tokens"], r["concurrency"]),
    )
    res["runs"] = {**runs, **res["runs"]}
    return res


def run_bench_rank(world: World, args) -> int:
    dev = str(world.device)
    cuda = world.device.type == "cuda"
    cfg = serve.tiny() if args.tiny else serve.llama31_8b()
    # the prompts sit after the corpus: room for its positions (random weights, RoPE only)
    need = args.shared_tokens + args.prompt + args.warmup + args.steps + 64
    cfg = dataclasses.replace(cfg, max_position_embeddings=max(cfg.max_position_embeddings, need))
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = world.backend
    model = serve.build_model(cfg, dev, dtype)
    lm = LoadedModel(model, DigitTokenizer(), cfg, Path("."), "random", "digits")
    S = args.shared_ranks
    per_tok = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * torch.finfo(dtype).bits // 8
    corpus_dev = dev
    if cuda and S > 0 and args.shared_tokens * per_tok > torch.cuda.mem_get_info()[0] - 8 * GIB:
        corpus_dev = "cpu"  # rank 0 only stages the corpus before sending the slices
    t0 = time.perf_counter()
    shared = random_corpus(cfg, args.shared_tokens, corpus_dev, dtype, args.chunk, args.density)
    link = LocalLink() if args.local else LoopbackLink(world) if S == 0 else ShardLink(world)
    link.stats.timing = True
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    try:
        view = link.register(shared, keep=False)  # the corpus leaves rank 0's memory
        del shared
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        register_s = time.perf_counter() - t0
        print(
            f"rank 0: {torch.cuda.get_device_name() if cuda else 'cpu'}, {backend}, world {world.world_size}, "
            f"{view.num_tokens} shared tokens registered in {register_s:.1f}s",
            flush=True,
        )
        rows = []
        device = torch.cuda.get_device_name() if cuda else "cpu"
        out = Path(args.out) / "distributed.json"

        def write(rows: list[dict], partial: bool) -> None:
            run = dict(
                device=device,
                torch=torch.__version__,
                triton=triton_v,
                backend=backend,
                model=(
                    "tiny test shape, float32"
                    if args.tiny
                    else "Llama-3.1-8B shape, random bf16 weights"
                ),
                prompt_tokens=args.prompt,
                warmup_steps=args.warmup,
                timed_steps=args.steps,
                chunk_size=args.chunk,
                density=args.density,
                kv_dtype=str(dtype).replace("torch.", ""),
                register_s=register_s,
                partial=partial,
            )
            res = dict(
                device=device,
                torch=torch.__version__,
                triton=triton_v,
                world_size=world.world_size,
                backend=backend,
                rows=rows,
                runs={key: run},
                notes=(
                    "Rows keyed by (engine, world_size, shared_tokens); runs[engine-wW-nN] says how each was "
                    "made. engine: local = the plain one-GPU Engine, no link (the single-GPU baseline); "
                    "loopback = world size 1 through the protocol without peers; sharded = rank 0 runs the "
                    "model and unique KV, ranks 1..S hold the shared KV. Sharded steps go through "
                    "backend.distributed_engine; decode timed per step (wall clock, synchronised; ends with the "
                    "sampler's host read), after prefill of random prompts and warm-up steps. comm_bytes_per_step: "
                    "bytes of the ATTEND messages per step from the shapes sent: header (64 B) + q bf16 (+ chunk ids "
                    "int32 when routed) to each shared rank, plus each shared rank's 16-bit partial "
                    "[T, Hq, d+2] (o, and the float32 lse in two 16-bit words); "
                    "at world_size 1 (shared_ranks 0) rank 0 is its own shared rank (LoopbackLink) and the bytes "
                    "are those one shared rank would exchange, while the collectives run over the process group "
                    "with no peer. comm_ms_per_step: time inside ShardLink.shared_attention's exchange on rank 0 "
                    "(CUDA events on the current stream, from before the header is made until the gather "
                    "returns: header H2D copy with its stream sync, collective launches and kernels, waits for "
                    "the shared ranks' attention when S > 0). Random weights and KV: timing only."
                ),
            )
            out.parent.mkdir(parents=True, exist_ok=True)
            res = merge_rows(out, res)
            out.write_text(json.dumps(res, indent=1))

        kind = "local" if args.local else "loopback" if S == 0 else "sharded"
        key = run_key(dict(engine=kind, world_size=world.world_size, shared_tokens=view.num_tokens))
        for c in [int(x) for x in args.conc.split(",")]:
            r = run_config(lm, link, view, c, args, dev)
            row = dict(
                engine=kind,
                world_size=world.world_size,
                backend=backend,
                shared_ranks=S,
                shared_tokens=view.num_tokens,
                top_k=view.top_k if view.routed else None,
                **r,
            )
            rows.append(row)
            write(rows, partial=True)  # a later failure keeps the rows measured so far
            print(
                f"B={c:>4d} {row['tokens_per_s']:9.1f} tok/s  itl p50 {row['itl_ms_p50']:8.2f} ms  "
                f"comm {row['comm_bytes_per_step'] / 2**20:8.2f} MiB {row['comm_ms_per_step']:7.2f} ms/step "
                f"({100 * row['comm_frac_of_step']:.1f}%)",
                flush=True,
            )
    finally:
        link.shutdown()
    write(rows, partial=False)
    print(
        f"\n{device}  torch {torch.__version__}  triton {triton_v}  {backend}  world {world.world_size}  -> {out}"
    )
    print(
        f"{'S':>2s} {'N':>8s} {'B':>4s} {'tok/s':>9s} {'itl p50':>8s} {'MiB/step':>9s} {'KiB/layer':>9s} "
        f"{'comm ms':>8s} {'comm %':>6s}"
    )
    for r in rows:
        print(
            f"{r['shared_ranks']:>2d} {r['shared_tokens']:>8d} {r['concurrency']:>4d} {r['tokens_per_s']:9.1f} "
            f"{r['itl_ms_p50']:8.2f} {r['comm_bytes_per_step'] / 2**20:9.2f} "
            f"{r['comm_bytes_per_step'] / cfg.num_layers / 1024:9.1f} {r['comm_ms_per_step']:8.2f} "
            f"{100 * r['comm_frac_of_step']:6.1f}"
        )
    return 0


def plot(json_path: str, png_path: str) -> None:
    """Decode tokens/s against concurrency, one line per (engine, world size, corpus size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(json_path).read_text())
    series: dict[str, list[dict]] = {}
    for r in res["rows"]:
        series.setdefault(run_key(r), []).append(r)
    names = {
        "local": "one GPU, plain engine",
        "loopback": "one GPU, protocol loopback",
        "sharded": "2 GPUs: unique rank + shared rank",
    }
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _key, rs in sorted(series.items()):
        rs.sort(key=lambda r: r["concurrency"])
        r0 = rs[0]
        ax.plot(
            [r["concurrency"] for r in rs],
            [r["tokens_per_s"] for r in rs],
            marker="o",
            linestyle="-" if engine_kind(r0) == "sharded" else "--",
            label=f"{names[engine_kind(r0)]}, {r0['shared_tokens'] // 1024}K shared",
        )
    serve.finish_throughput_plot(
        fig, ax, f"Llama-3.1-8B shape, bf16, {res['device']}, NCCL", png_path
    )


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--plot":
        plot(sys.argv[2], sys.argv[3])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--shared-ranks", type=int, required=True, help="ranks holding shared KV (world size - 1)"
    )
    ap.add_argument("--shared-tokens", type=int, default=131072)
    ap.add_argument("--conc", default="1,8,32,128", help="concurrent requests per configuration")
    ap.add_argument("--prompt", type=int, default=32, help="random prompt tokens per request")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per configuration")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument(
        "--density", type=float, default=1.0, help="below 1: routed (quest) at this density"
    )
    ap.add_argument(
        "--tiny", action="store_true", help="tiny float32 model (CPU / gloo smoke runs)"
    )
    ap.add_argument(
        "--plain-engine",
        dest="local",
        action="store_true",
        help="with --shared-ranks 0: the plain one-GPU engine, no link (the single-GPU baseline)",
    )
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    ap.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if args.local and args.shared_ranks:
        raise SystemExit("--plain-engine is the one-GPU baseline: it needs --shared-ranks 0")
    world = init_world("env://", timeout_s=args.timeout)
    if world.world_size != args.shared_ranks + 1:
        raise SystemExit(
            f"--shared-ranks {args.shared_ranks} needs a world of {args.shared_ranks + 1} "
            f"processes, torchrun started {world.world_size}"
        )
    try:
        if world.rank == 0:
            with torch.inference_mode():
                return run_bench_rank(world, args)
        run_shared_rank(world)
        return 0
    finally:
        leave_group()


if __name__ == "__main__":
    sys.exit(main())
