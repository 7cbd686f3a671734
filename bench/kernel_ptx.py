"""Compile every attention kernel for an H100/H200 (sm_90) on a host without a GPU, and compare
the PTX of two trees: a refactor of the kernels that leaves the PTX identical leaves their speed
unchanged, with no device run.

Triton's compiler front end and ptxas ship with the wheel; only the launch needs a GPU. A stub
driver names the target, and each launch compiles without running (`warmup`); the launcher's C
source is generated too (it checks the argument layout), not built. The launchers see
CPU tensors, so they choose the interpreter's launch configurations (small tiles, float32 dot
operands): every constexpr branch of every kernel, not the tuned GPU tiles. PTX is compared
without its debug information (DWARF sections, `.file`, `.loc` and the `$L__tmp` labels they
address: paths and lines).

    python bench/kernel_ptx.py                        # digests of this tree's kernels
    python bench/kernel_ptx.py --before build/before  # ... and of another tree's attention/
                                                      # (e.g. `git archive REV attention | tar -x
                                                      # -C build/before`), compared in order

    python bench/kernel_ptx.py --caches A B           # on a GPU host: the PTX two runs left in
                                                      # their TRITON_CACHE_DIRs (the tuned
                                                      # configurations), compared as multisets

Writes bench/results/kernel_ptx.json (--out; with --caches kernel_ptx_caches.json), the tree
comparison with the triton and torch versions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_MODULES = (
    "shared_dense",
    "shared_routed",
    "shared_routed_grouped",
    "shared_routed_union",
    "paged",
    "combine",
)


def _launches(quick: bool) -> None:
    """Call every launcher over shapes that reach each kernel's branches (splits, fp8, TMA
    loads, ragged keys, the four routed designs and their plan options, virtual positions)."""
    import torch

    from attention import paged
    from attention import shared_dense as dense
    from attention import shared_routed as routed
    from attention import shared_routed_grouped as grouped
    from attention import shared_routed_union as union

    torch.manual_seed(0)
    d, hq, hkv, n, chunk = 64, 8, 2, 256, 32
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    for t in (8,) if quick else (1, 8, 40):
        q = torch.randn(t, hq, d, dtype=torch.float16)
        k, v = torch.randn(2, n, hkv, d, dtype=torch.float16)
        ks, vs = torch.rand(2, n // chunk, hkv) + 0.5
        k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
        idx = torch.randint(0, n // chunk, (t, hkv, 3), dtype=torch.int32)
        dense.shared_attention_dense(q, k, v, chunk)
        dense.shared_attention_dense(q, k8, v8, chunk, k_scale=ks, v_scale=vs)
        for impl in ("scatter", "union", "grouped"):
            routed.shared_attention_routed(q, k, v, idx, chunk, impl=impl)
            routed.shared_attention_routed(q, k8, v8, idx, chunk, k_scale=ks, v_scale=vs, impl=impl)
        grouped.shared_attention_grouped(q, k, v, idx, chunk, config={"rt": 2, "BLOCK_N": chunk})
        kc, vc = torch.randn(2, 16, 16, hkv, d, dtype=torch.float16)
        block_table = torch.arange(16, dtype=torch.int32).view(2, 8)
        seq_lens = torch.tensor([100, 60], dtype=torch.int32)
        cu = torch.tensor([0, t // 2, t], dtype=torch.int32)
        paged.unique_attention_paged(q, kc, vc, block_table, seq_lens, cu)
        if quick:
            continue
        dense.shared_attention_dense(q, k, v, chunk, splits=1)
        dense.shared_attention_dense(q, k[:250], v[:250], chunk, splits=3)
        routed.shared_attention_routed(q, k[:250], v[:250], idx, chunk, impl="grouped")
        for cfg in ({"span": 2}, {"persist": True}):
            grouped.shared_attention_grouped(q, k, v, idx, chunk, config=cfg)
        union.shared_attention_routed_union(q, k, v, idx, chunk, contig=False)
        shift = torch.randint(0, 50, idx.shape)
        grouped.shared_attention_grouped(
            q, k, v, idx, chunk, chunk_shift=shift, rope_inv_freq=inv_freq
        )
        paged.unique_attention_paged(q, kc, vc, block_table, seq_lens, cu, splits=1)


def _ptx_without_debug(ptx: str) -> str:
    ptx = ptx.split("\t.section\t.debug")[0]
    return "\n".join(
        line
        for line in ptx.splitlines()
        if not line.lstrip().startswith((".loc", ".file", "$L__tmp"))
    )


def _digest(ptx: str) -> str:
    """What two compilations are compared by: the debug-free PTX's SHA-1 (16 hex digits)."""
    return hashlib.sha1(_ptx_without_debug(ptx).encode()).hexdigest()[:16]


def _launcher_source(kernel) -> str:
    """The C source of the kernel's launcher, built as `CudaLauncher` builds it (that part
    needs no GPU): it refuses argument layouts the compiler takes, a TMA descriptor inside a
    tuple among them."""
    from triton.backends.nvidia.driver import make_launcher

    src = kernel.src
    names = src.fn.arg_names
    constants = {
        ((names.index(i),) if isinstance(i, str) else i): v for i, v in src.constants.items()
    }
    meta = getattr(kernel.metadata, "tensordesc_meta", None)
    return make_launcher(constants, dict(src.signature), meta)


def compile_tree(quick: bool) -> list[dict]:
    """In this process (the tree to compile first on sys.path): compile every launch for sm_90
    and return one row per compiled kernel, in compile order."""
    import triton
    import triton.runtime.jit as jit
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class _Sm90:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    import importlib

    for module in KERNEL_MODULES:  # built as JITFunctions before the interpreter flag is set
        importlib.import_module(f"attention.{module}")
    driver.set_active(_Sm90())
    order: list[tuple[str, object]] = []

    def compile_only(self, grid):
        def run(*args, **kwargs):
            kernel = self.run(*args, grid=grid, warmup=True, **kwargs)
            if all(kernel is not seen for _, seen in order):
                order.append((self.fn.__name__, kernel))

        return run

    jit.JITFunction.__getitem__ = compile_only
    # after the kernels were built as JITFunctions: the launchers' CPU checks now pass
    triton.knobs.runtime.interpret = True
    _launches(quick)
    for _, kernel in order:
        _launcher_source(kernel)
    return [
        dict(
            kernel=name,
            ptx_sha1=_digest(k.asm["ptx"]),
            num_warps=k.metadata.num_warps,
            shared_bytes=k.metadata.shared,
        )
        for name, k in order
    ]


def cache_digests(cache: Path) -> dict[str, int]:
    """{kernel name + PTX digest: how many} of every .ptx a run left in its Triton cache."""
    counts: dict[str, int] = {}
    for ptx in sorted(cache.rglob("*.ptx")):
        key = f"{ptx.stem} {_digest(ptx.read_text())}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def compare_caches(after: Path, before: Path) -> dict:
    """The PTX of two runs' caches: which kernels compiled the same, and which only in one."""
    a, b = cache_digests(after), cache_digests(before)
    only_a = sorted(set(a) - set(b))
    only_b = sorted(set(b) - set(a))
    return dict(
        compiled_after=sum(a.values()),
        compiled_before=sum(b.values()),
        identical=sum(min(n, b.get(k, 0)) for k, n in a.items()),
        only_after=only_a,
        only_before=only_b,
    )


def run_tree(tree: Path, quick: bool) -> list[dict]:
    """Compile `tree`'s attention/ in a fresh interpreter (the patches stay there)."""
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + (
        ["--quick"] if quick else []
    )
    done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"compiling {tree}/attention failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, help="another tree holding attention/ to compare")
    ap.add_argument("--label", help="what --before is, for the JSON (e.g. its git revision)")
    ap.add_argument("--quick", action="store_true", help="one shape per kernel family")
    ap.add_argument(
        "--out",
        type=Path,
        help="default bench/results/kernel_ptx.json, with --caches kernel_ptx_caches.json",
    )
    ap.add_argument("--caches", nargs=2, type=Path, metavar=("AFTER", "BEFORE"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    results = ROOT / "bench" / "results"
    if args.caches:
        result = compare_caches(*args.caches)
        print(json.dumps(result, indent=1))
        out = args.out or results / "kernel_ptx_caches.json"
        out.write_text(json.dumps(result, indent=1) + "\n")
        return
    if args.worker:
        # bench/ holds an attention.py of its own: the tree's package must win
        here = Path(__file__).resolve().parent
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
        print(json.dumps(compile_tree(args.quick)))
        return
    import torch
    import triton

    after = run_tree(ROOT, args.quick)
    result = dict(
        target="cuda sm_90 (compiled on a host without a GPU)",
        triton=triton.__version__,
        torch=torch.__version__,
        kernels=after,
    )
    print(f"{'kernel':<26} {'ptx sha1':<18} warps shared")
    for row in after:
        print(
            f"{row['kernel']:<26} {row['ptx_sha1']:<18} {row['num_warps']:>5} {row['shared_bytes']}"
        )
    if args.before is not None:
        before = run_tree(args.before.resolve(), args.quick)
        same = [a == b for a, b in zip(after, before)]
        result["before"] = args.label or str(args.before)
        result["identical"] = len(after) == len(before) and all(same)
        print(
            f"{sum(same)} of {len(after)} kernels identical to {args.before} "
            f"({len(before)} compiled there)"
        )
    out = args.out or results / "kernel_ptx.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
