"""End-to-end decode throughput of the engine: shared-KV serving (ours) against per-request
attention over the same shared context.

One process, one run (GPU): random bf16 weights in the Llama-3.1-8B shape, a shared corpus of
N tokens (random keys/values after RoPE: timing does not depend on their values, so no model
prefill of the corpus), `--prompt` unique tokens per request and `--gen` generated tokens, for
1..256 concurrent requests. Modes, all through the engine's scheduler, runner and sampler:
  ours_dense   the engine as it serves: per layer, all requests' queries against the shared KV
               in one dense GEMM, merged by log-sum-exp with each request's paged unique KV
  ours_routed  the same with the corpus router (quest, chunk 64) at density `--density`
  ours_routed_req  per-request selections (what attention retrieval leaves on a sequence): each
               request reads its own `--select-budget` shared tokens (random chunks of 128,
               fixed for the whole run, the same for all layers and KV heads); the decode graphs
               build the routing plan once per step for all layers (kb/engine/routed_plan.py)
  per_request  the shared KV in pages of the same pool, at the head of every request's block
               table: the paged kernel reads it once per request (prefix caching)
  copies       like per_request, but every request owns a copy of the shared KV (no sharing);
               only as many requests as memory allows
plus N=512K with fp8 (e4m3) shared KV for the ours modes (per-request paging has no fp8 path,
and 512K bf16 pages do not fit beside the weights).

The unique prompt is not run through the model on the GPU (1K tokens x 256 requests against a
128K corpus is ~180 PFLOP of attention): its pages are filled with random values and the
sequences start decoding right after it ("synthetic" prefill). The CPU test runs the same
machinery with a real prefill and checks that all modes produce the same greedy tokens.

Per row: tokens/s = concurrency x timed steps / their wall time (each step = schedule + run +
sample + postprocess, ending with the sampler's host read of the tokens); inter-token latency
p50/p99 = per-step wall times; MFU = (2 x matmul params + attention FLOPs per token) x tokens/s /
the bf16 matmul peak measured in the same run (attention FLOPs: 4 x Hq x d x keys attended, per
layer; keys attended = shared (dense) or top_k x chunk (routed), plus the unique KV).

Usage (GPU): python3 bench/serve.py [--out DIR] [--quick]; `--plot JSON PNG` draws the figure.
"""

from __future__ import annotations

import argparse
import collections.abc
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from index import CorpusRouter  # noqa: E402
from kb.engine.block_manager import BlockManager  # noqa: E402
from kb.engine.runner import ModelRunner  # noqa: E402
from kb.engine.sampler import sample  # noqa: E402
from kb.engine.scheduler import Scheduler  # noqa: E402
from kb.engine.sequence import SamplingParams, SeqStatus, Sequence  # noqa: E402
from kb.engine.shared_kv import KVMeta, SharedKV  # noqa: E402
from kb.model.config import ModelConfig  # noqa: E402
from kb.model.llama import Transformer  # noqa: E402

SELECT_CHUNK = 128  # chunk of the per-request selections (the routed kernel's granularity)
MODES = ("ours_routed", "ours_dense", "per_request", "copies")
GIB = 1 << 30


def llama31_8b() -> ModelConfig:
    return ModelConfig(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )


def smollm2_135m() -> ModelConfig:
    """The demo model's shape (SmolLM2-135M-Instruct): random weights time its CPU decode where
    the weights cannot travel (the device machine)."""
    return ModelConfig(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )


def tiny() -> ModelConfig:
    """The test's shape: same structure (GQA, llama3 RoPE scaling), tiny dims."""
    return ModelConfig(
        model_type="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=1 << 20,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )


def build_model(
    cfg: ModelConfig, device: str, dtype: torch.dtype, seed: int = 0, std: float = 0.02
) -> Transformer:
    """Random weights built directly on `device` in `dtype` (normal, never zeros)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Transformer(cfg)
    finally:
        torch.set_default_dtype(old)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.1, generator=gen)
            else:
                p.normal_(0.0, std, generator=gen)
    assert model.inv_freq.dtype == torch.float32
    return model.eval()


def matmul_params(model: Transformer) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def fill_(tensors: list[torch.Tensor], seed: int) -> None:
    """Deterministic random values per layer (the same seed gives the same KV on any runner)."""
    for i, t in enumerate(tensors):
        gen = torch.Generator(device=t.device).manual_seed(seed * 1000 + i)
        t.normal_(0.0, 1.0, generator=gen)


class _Dequantized(collections.abc.Sequence):
    """Per-layer bf16 view of fp8 keys, made on demand (the router summarises one layer at a time)."""

    def __init__(self, keys, scales):
        self.keys, self.scales = keys, scales

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        return (self.keys[i].float() * self.scales[i][None, :, None]).to(torch.bfloat16)


def fp8_shared(
    key: str, cfg: ModelConfig, n: int, device: str, chunk_size: int, seed: int
) -> SharedKV:
    """Random shared KV stored as e4m3 with one scale per layer and KV head."""
    ks, vs, kss, vss = [], [], [], []
    for layer in range(cfg.num_layers):
        for out, scales, s in ((ks, kss, 2 * layer), (vs, vss, 2 * layer + 1)):
            gen = torch.Generator(device=device).manual_seed(seed * 1000 + s)
            x = torch.randn(
                n,
                cfg.num_kv_heads,
                cfg.head_dim,
                device=device,
                dtype=torch.bfloat16,
                generator=gen,
            )
            scale = x.abs().amax(dim=(0, 2)).float() / 448.0
            out.append((x / scale[None, :, None]).to(torch.float8_e4m3fn))
            scales.append(scale)
            del x
    return SharedKV(key, ks, vs, chunk_size=chunk_size, pos_offset=n, meta=KVMeta(kss, vss))


def with_router(sh: SharedKV, density: float, kind: str = "quest") -> SharedKV:
    keys = _Dequantized(sh.k, sh.meta.k_scale) if sh.meta.k_scale is not None else sh.k
    router = CorpusRouter(keys, sh.chunk_size, always=0, kind=kind)
    return SharedKV(
        sh.key,
        sh.k,
        sh.v,
        sh.chunk_size,
        sh.pos_offset,
        router=router,
        top_k=router.top_k(density),
        meta=sh.meta,
    )


# -- one configuration ---------------------------------------------------------------------------
def _step(sched: Scheduler, runner: ModelRunner, corpora: dict[str, SharedKV]) -> tuple[int, float]:
    """Engine.step without the text side (no tokenizer: random weights): schedule, run, sample.
    Returns (tokens produced, seconds spent in the scheduler)."""
    t0 = time.perf_counter()
    batch = sched.schedule()
    sched_s = time.perf_counter() - t0
    logits, idx = runner.run(batch, corpora)
    tokens = sample(logits, [batch.seqs[i] for i in idx]) if idx else []
    for i, tok in zip(idx, tokens):
        seq = batch.seqs[i]
        seq.output_ids.append(tok)
        if len(seq.output_ids) >= seq.sampling.max_tokens:
            seq.status = SeqStatus.FINISHED
    t0 = time.perf_counter()
    sched.postprocess(batch)
    return len(tokens), sched_s + time.perf_counter() - t0


@dataclass
class ChosenChunks:
    """A request's chunk selection, as attention retrieval leaves it (`seq.selection.chunks`)."""

    chunks: torch.Tensor  # [K] int64, host


def run_config(
    runner: ModelRunner,
    blocks: BlockManager,
    corpora: dict[str, SharedKV],
    mode: str,
    keys: list[str],
    prompt_len: int,
    gen: int,
    prefill: str,
    warmup: int = 2,
    max_steps: int = 32,
    budget_s: float = 2.5,
    seed: int = 0,
    select: int = 0,
) -> dict:
    """Admit one request per entry of `keys` (its corpus), prefill, then time decode steps;
    `select` > 0: each request chooses that many random chunks of its corpus (per-request
    selection). Returns timing figures and every request's generated tokens."""
    runner.shared_mode = "per_request" if mode in ("per_request", "copies") else "moska"
    conc = len(keys)
    sched = Scheduler(blocks, max_running=conc, max_batch_tokens=max(conc, conc * prompt_len))
    rng = torch.Generator().manual_seed(seed)
    vocab = runner.model.config.vocab_size
    seqs = []
    for key in keys:
        prompt = torch.randint(0, vocab, (prompt_len,), generator=rng).tolist()
        seq = Sequence(
            prompt,
            SamplingParams(max_tokens=gen, ignore_eos=True),
            corpus_key=key,
            pos_offset=corpora[key].pos_offset
            if key in corpora
            else runner.shared_pages[key].shape[0] * runner.block_size,
        )
        if select:
            c = corpora[key].num_chunks
            seq.selection = ChosenChunks(torch.randperm(c, generator=rng)[:select].sort().values)
        sched.add(seq)
        seqs.append(seq)
    sync = torch.cuda.synchronize if runner.device.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    if prefill == "model":  # the prompts through the model (chunked into mixed steps)
        while any(not s.output_ids for s in seqs):
            _step(sched, runner, corpora)
    else:  # "synthetic": pages hold random KV; the last prompt token is the first decode input
        for seq in seqs:
            sched.waiting.remove(seq)
            blocks.allocate(seq, prompt_len)
            seq.num_computed = prompt_len - 1
            seq.status = SeqStatus.RUNNING
            sched.running.append(seq)
    sync()
    prefill_s = time.perf_counter() - t0
    for _ in range(warmup):
        _step(sched, runner, corpora)
    sync()
    times, sched_times, produced = [], [], 0
    while sched.running and len(times) < max_steps and (len(times) < 3 or sum(times) < budget_s):
        t = time.perf_counter()
        n, sched_s = _step(sched, runner, corpora)
        sync()
        times.append(time.perf_counter() - t)
        produced += n
        sched_times.append(sched_s)
    while sched.has_work:  # finish the answers (the test compares whole outputs)
        if prefill != "model":
            break
        _step(sched, runner, corpora)
    for seq in seqs:
        if seq in sched.running:
            sched.running.remove(seq)
        blocks.release(seq)
    st = sorted(times)
    pct = lambda p: st[min(len(st) - 1, int(round(p * (len(st) - 1))))] * 1e3  # noqa: E731
    graphs = getattr(runner, "graphs", None)
    return dict(
        concurrency=conc,
        steps=len(times),
        graph_replays=graphs.replays if graphs else 0,
        tokens_per_s=produced / sum(times) if times else 0.0,
        itl_ms_p50=pct(0.5) if st else None,
        itl_ms_p99=pct(0.99) if st else None,
        prefill_s=prefill_s,
        sched_ms_mean=1e3 * sum(sched_times) / max(1, len(sched_times)),
        outputs=[s.output_ids for s in seqs],
    )


def attended_keys(sh: SharedKV | None, shared_tokens: int, unique_len: float) -> float:
    """Keys one query attends per layer (shared part + unique part)."""
    if sh is not None and sh.routed:
        shared = min(shared_tokens, sh.top_k * sh.chunk_size)
    else:
        shared = shared_tokens
    return shared + unique_len


# -- the device run ------------------------------------------------------------------------------
def measure_peak(dev: str) -> float:
    import triton.testing as tt

    n = 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    ms = tt.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    return 2 * n**3 / ms / 1e9  # TFLOP/s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench/results"))
    ap.add_argument("--shared", type=int, default=128 * 1024)
    ap.add_argument("--shared-fp8", type=int, default=512 * 1024)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument(
        "--select-budget",
        default="0",
        help="shared tokens per request of ours_routed_req, comma-separated budgets "
        "(0: density x N); one row set per budget",
    )
    ap.add_argument("--modes", default="ours_dense,ours_routed,ours_routed_req,per_request,copies")
    ap.add_argument(
        "--modes-fp8", default=None, help="modes of the 512K fp8 part (default: --modes)"
    )
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--conc", default="1,4,16,64,128,256,2,8,32")
    ap.add_argument("--budget", type=float, default=2.5, help="timed seconds per row, at most")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--eager", action="store_true", help="no CUDA graphs (every mode steps eagerly)"
    )
    ap.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"))
    args = ap.parse_args()
    if args.plot:
        return plot(*args.plot)
    import triton

    dev = "cuda"
    os.makedirs(args.out, exist_ok=True)
    out_json = os.path.join(args.out, "serve.json")
    peak = measure_peak(dev)
    cfg = llama31_8b()
    model = build_model(cfg, dev, torch.bfloat16)
    params = matmul_params(model)
    bs = 16
    per_tok = cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2 * 2  # bf16 K+V bytes
    res = dict(
        device=torch.cuda.get_device_name(),
        torch=torch.__version__,
        triton=triton.__version__,
        peak_bf16_tflops=peak,
        model="Llama-3.1-8B shape, random bf16 weights",
        matmul_params=params,
        prompt_tokens=args.prompt,
        gen_tokens=args.gen,
        density=args.density,
        chunk_size=args.chunk,
        router="quest",
        block_size=bs,
        cuda_graphs=not args.eager,
        notes=(
            "Random weights and random shared KV (after-RoPE keys need no model prefill "
            "for timing); unique prompts prefilled synthetically (random pages), decode "
            "timed from the 3rd generated token for up to 32 steps or ~2.5 s per row. "
            "Steps run the engine's scheduler, runner and sampler (no detokenization). "
            "sched_ms_mean: host time in Scheduler.schedule+postprocess per step (inside the ITL). "
            "cuda_graphs: decode steps of one corpus replayed from CUDA graphs (kb/engine/"
            "cuda_graphs.py) in every mode alike (per_request and copies graph the block tables of "
            "their shared pages). MFU = (2*matmul_params + 4*Hq*d*layers*"
            "keys_attended) * tokens/s / measured bf16 matmul peak."
        ),
        rows=[],
    )
    print(
        f"{res['device']} peak bf16 {peak:.0f} TFLOP/s, {params / 1e9:.2f}B matmul params",
        flush=True,
    )

    def save():
        with open(out_json, "w") as f:
            json.dump(res, f, indent=1)

    def record(mode, shared_tokens, kv_dtype, sh, r, shared_keys=None, **extra):
        unique_len = args.prompt + 2 + r["steps"] / 2
        keys = (
            attended_keys(sh, shared_tokens, unique_len)
            if shared_keys is None
            else shared_keys + unique_len
        )
        flops_tok = 2 * params + 4 * cfg.num_heads * cfg.head_dim * cfg.num_layers * keys
        row = dict(
            mode=mode,
            shared_tokens=shared_tokens,
            concurrency=r["concurrency"],
            tokens_per_s=r["tokens_per_s"],
            itl_ms_p50=r["itl_ms_p50"],
            itl_ms_p99=r["itl_ms_p99"],
            mfu=flops_tok * r["tokens_per_s"] / (peak * 1e12),
            kv_dtype=kv_dtype,
            steps=r["steps"],
            keys_attended=keys,
            sched_ms_mean=r["sched_ms_mean"],
            graph_replays=r["graph_replays"],
            **extra,
        )
        res["rows"].append(row)
        save()
        print(
            f"{mode:12s} N={shared_tokens:>7d} {kv_dtype:5s} B={row['concurrency']:>3d} "
            f"{row['tokens_per_s']:9.1f} tok/s  itl p50 {row['itl_ms_p50']:8.2f} ms  "
            f"p99 {row['itl_ms_p99']:8.2f} ms  mfu {row['mfu']:.3f}  sched {row['sched_ms_mean']:.1f} ms "
            f"({row['steps']} steps)",
            flush=True,
        )

    concs = [int(c) for c in args.conc.split(",")]
    if args.quick:
        concs = [1, 16]
    unique_blocks_per_req = -(-(args.prompt + args.gen) // bs)
    headroom = 5 * GIB

    # 1. N=128K bf16: ours (dense, routed) and per_request over one pool (the shared pages in it)
    n = args.shared
    free = torch.cuda.mem_get_info()[0]
    max_c = int((free - headroom - n * per_tok) // (unique_blocks_per_req * bs * per_tok))
    cmax = min(max(concs), max_c)
    runner = ModelRunner(model, cmax * unique_blocks_per_req, bs, dev, shared_blocks=n // bs)
    if not args.eager:
        runner.enable_cuda_graphs()
    fill_(runner.k_cache + runner.v_cache, seed=1)
    k, v = runner.reserve_shared("corpus", n)
    dense = SharedKV("corpus", k, v, chunk_size=args.chunk, pos_offset=n)
    selected = SharedKV("corpus", k, v, chunk_size=SELECT_CHUNK, pos_offset=n)
    modes = set(args.modes.split(","))
    budgets = [int(x) for x in args.select_budget.split(",")]
    sel_ks = [max(1, (bud or int(args.density * n)) // SELECT_CHUNK) for bud in budgets]
    res["select_budget_tokens"] = [k * SELECT_CHUNK for k in sel_ks]
    t0 = time.perf_counter()
    routed = with_router(dense, args.density)
    res["router_build_s_128k"] = time.perf_counter() - t0
    blocks = BlockManager(cmax * unique_blocks_per_req, bs)
    res["max_concurrency_128k"] = cmax
    for c in concs:
        if c > cmax:
            continue
        plan = [("ours_dense", dense, 0), ("ours_routed", routed, 0)]
        plan += [("ours_routed_req", selected, k) for k in sel_ks] + [("per_request", dense, 0)]
        for mode, sh, sel_k in plan:
            if mode not in modes:
                continue
            r = run_config(
                runner,
                blocks,
                {"corpus": sh},
                mode,
                ["corpus"] * c,
                args.prompt,
                args.gen,
                "synthetic",
                budget_s=args.budget,
                select=sel_k,
            )
            req = mode == "ours_routed_req"
            record(
                mode,
                n,
                "bf16",
                sh if mode != "per_request" else None,
                r,
                shared_keys=sel_k * SELECT_CHUNK if req else None,
                select_tokens=sel_k * SELECT_CHUNK if req else None,
                top_k=sh.top_k if mode == "ours_routed" else (sel_k if req else None),
                chunk=SELECT_CHUNK if req else args.chunk,
            )
    del runner, blocks, dense, routed, selected, k, v, sh
    gc.collect()
    torch.cuda.empty_cache()

    # 2. copies: every request its own copy of the shared KV, as many as fit
    free = torch.cuda.mem_get_info()[0]
    per_req = n * per_tok + unique_blocks_per_req * bs * per_tok
    ncopy = int((free - headroom) // per_req)
    res["max_concurrency_copies_128k"] = ncopy
    if ncopy >= 1 and "copies" in modes:
        runner = ModelRunner(
            model, ncopy * unique_blocks_per_req, bs, dev, shared_blocks=ncopy * n // bs
        )
        if not args.eager:
            runner.enable_cuda_graphs()
        blocks = BlockManager(ncopy * unique_blocks_per_req, bs)
        fill_(runner.k_cache + runner.v_cache, seed=2)
        copies = {}
        for i in range(ncopy):
            ck, cv = runner.reserve_shared(f"copy{i}", n)
            if i:
                for a, b in zip(ck + cv, copies["copy0"].k + copies["copy0"].v):
                    a.copy_(b)
            copies[f"copy{i}"] = SharedKV(f"copy{i}", ck, cv, chunk_size=args.chunk, pos_offset=n)
        for c in sorted({c for c in concs if c <= ncopy} | {ncopy}):
            r = run_config(
                runner,
                blocks,
                copies,
                "copies",
                [f"copy{i}" for i in range(c)],
                args.prompt,
                args.gen,
                "synthetic",
                budget_s=args.budget,
            )
            record("copies", n, "bf16", None, r)
        del runner, blocks, copies, ck, cv
        gc.collect()
        torch.cuda.empty_cache()

    # 3. N=512K fp8: ours only (dense, routed)
    n8 = args.shared_fp8
    if n8:
        sh8 = fp8_shared("corpus8", cfg, n8, dev, args.chunk, seed=3)
        sel8 = SharedKV(
            "corpus8", sh8.k, sh8.v, chunk_size=SELECT_CHUNK, pos_offset=n8, meta=sh8.meta
        )  # per-head scales: any chunk size reads them
        sel_k8s = [max(1, (bud or int(args.density * n8)) // SELECT_CHUNK) for bud in budgets]
        res["select_budget_tokens_512k"] = [k * SELECT_CHUNK for k in sel_k8s]
        t0 = time.perf_counter()
        modes8 = set((args.modes_fp8 or args.modes).split(","))
        routed8 = with_router(sh8, args.density) if "ours_routed" in modes8 else sh8
        res["router_build_s_512k"] = time.perf_counter() - t0
        torch.cuda.empty_cache()
        free = torch.cuda.mem_get_info()[0]
        cmax8 = min(max(concs), int((free - headroom) // (unique_blocks_per_req * bs * per_tok)))
        res["max_concurrency_512k_fp8"] = cmax8
        runner = ModelRunner(model, cmax8 * unique_blocks_per_req, bs, dev)
        if not args.eager:
            runner.enable_cuda_graphs()
        blocks = BlockManager(cmax8 * unique_blocks_per_req, bs)
        fill_(runner.k_cache + runner.v_cache, seed=4)
        for c in sorted({c for c in concs if c <= cmax8} | {cmax8}):
            plan8 = [("ours_dense", sh8, 0), ("ours_routed", routed8, 0)]
            plan8 += [("ours_routed_req", sel8, k) for k in sel_k8s]
            for mode, sh, sel_k8 in plan8:
                if mode not in modes8:
                    continue
                req = mode == "ours_routed_req"
                r = run_config(
                    runner,
                    blocks,
                    {"corpus8": sh},
                    mode,
                    ["corpus8"] * c,
                    args.prompt,
                    args.gen,
                    "synthetic",
                    budget_s=args.budget,
                    select=sel_k8,
                )
                record(
                    mode,
                    n8,
                    "fp8",
                    sh,
                    r,
                    shared_keys=sel_k8 * SELECT_CHUNK if req else None,
                    select_tokens=sel_k8 * SELECT_CHUNK if req else None,
                    top_k=sh.top_k if mode == "ours_routed" else (sel_k8 if req else None),
                    chunk=SELECT_CHUNK if req else args.chunk,
                )
    save()
    summary(res)
    try:
        plot(out_json, os.path.join(args.out, "serve_throughput.png"))
    except ImportError:
        print("matplotlib missing: no plot")


def summary(res: dict) -> None:
    rows = res["rows"]
    print(
        f"\n{'mode':12s} {'N':>7s} {'kv':5s} {'B':>4s} {'tok/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'mfu':>6s}"
    )
    for r in sorted(
        rows, key=lambda r: (r["shared_tokens"], r["kv_dtype"], r["mode"], r["concurrency"])
    ):
        print(
            f"{r['mode']:12s} {r['shared_tokens']:>7d} {r['kv_dtype']:5s} {r['concurrency']:>4d} "
            f"{r['tokens_per_s']:9.1f} {r['itl_ms_p50']:8.2f} {r['itl_ms_p99']:8.2f} {r['mfu']:6.3f}"
        )
    lab = lambda r: (
        f"ours_routed_req({r['select_tokens']})" if r.get("select_tokens") else r["mode"]
    )  # noqa: E731
    tps = {
        (lab(r), r["shared_tokens"], r["kv_dtype"], r["concurrency"]): r["tokens_per_s"]
        for r in rows
    }
    n = 128 * 1024
    reqs = sorted({lab(r) for r in rows if r.get("select_tokens")})
    for mode in ("ours_routed", *reqs):
        for nn, kv, tgt in ((n, "bf16", 1.8), (4 * n, "fp8", 2.5)):
            a, b = tps.get((mode, nn, kv, 128)), tps.get(("ours_dense", nn, kv, 128))
            if a and b:
                print(f"{mode} / ours_dense at N={nn} {kv} B=128: {a / b:.2f}x (target >= {tgt}x)")
    for mode in ("ours_dense", "ours_routed", *reqs):
        a, b = tps.get((mode, n, "bf16", 128)), tps.get(("per_request", n, "bf16", 128))
        if a and b:
            print(f"{mode} / per_request at B=128: {a / b:.1f}x (target >= 20x)")
        cop = [r for r in rows if r["mode"] == "copies"]
        best = max(cop, key=lambda r: r["tokens_per_s"]) if cop else None
        ours = [r for r in rows if lab(r) == mode and r["shared_tokens"] == n]
        if best and ours:
            top = max(ours, key=lambda r: r["tokens_per_s"])
            print(
                f"{mode} best (B={top['concurrency']}) / copies best (B={best['concurrency']}): "
                f"{top['tokens_per_s'] / best['tokens_per_s']:.1f}x (target >= 50x)"
            )


def plot(json_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.load(open(json_path))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    series = {}
    for r in res["rows"]:
        series.setdefault((r["mode"], r["shared_tokens"], r["kv_dtype"]), []).append(r)
    for (mode, n, kv), rs in sorted(series.items()):
        rs.sort(key=lambda r: r["concurrency"])
        ax.plot(
            [r["concurrency"] for r in rs],
            [r["tokens_per_s"] for r in rs],
            marker="o",
            linestyle="--" if kv == "fp8" else "-",
            label=f"{mode}, {n // 1024}K {kv}",
        )
    finish_throughput_plot(
        fig,
        ax,
        f"Llama-3.1-8B shape, {res['device']}\n{res['prompt_tokens']} unique + "
        f"{res['gen_tokens']} generated tokens per request",
        png_path,
    )


def finish_throughput_plot(fig, ax, title: str, png_path: str) -> None:
    """Log-log tokens/s against concurrency, titled, gridded, saved (bench/distributed.py too)."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("concurrent requests")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


if __name__ == "__main__":
    main()
