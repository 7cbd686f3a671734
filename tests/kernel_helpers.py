"""Set-up shared by the kernel parity tests (test_attention.py, test_routed_kernel.py).

Without a GPU the kernels run under Triton's interpreter: TRITON_INTERPRET=1 must be set before
triton is first imported, so a test module imports this one before `attention`. If something
imported triton earlier in the process, the in-process kernel tests skip (`kernels`) and each
file's `run_interpreter_suite` test runs it again in a fresh interpreter-mode process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

try:
    from attention._triton import HAS_TRITON, interpreting
except ImportError:  # pragma: no cover
    HAS_TRITON = False
from attention import reference as ref  # noqa: E402  (after TRITON_INTERPRET is set)

KERNELS_RUN_HERE = HAS_TRITON and (CUDA or interpreting())
DEV = "cuda" if CUDA else "cpu"
kernels = pytest.mark.skipif(
    not KERNELS_RUN_HERE,
    reason="triton was imported before TRITON_INTERPRET=1 could be set: see the subprocess test",
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")

TOL = {torch.float16: dict(atol=1e-2, rtol=1e-2), torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
LSE_TOL = dict(atol=2e-3, rtol=1e-3)


def gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def make_kv(n, hkv, d, kv, dtype, chunk_size, seed):
    """Shared K/V in `kv` format: 'fp16'/'bf16' in q's dtype, 'fp8h' (e4m3, a scale per head),
    'fp8c' (e4m3, a scale per chunk and head). Returns k, v, k_scale, v_scale on DEV."""
    g = gen(seed)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    if not kv.startswith("fp8"):
        return k.to(DEV, dtype), v.to(DEV, dtype), None, None
    c = (n + chunk_size - 1) // chunk_size
    shape = (hkv,) if kv == "fp8h" else (c, hkv)
    ks = torch.rand(shape, generator=g) * 0.1 + 0.02
    vs = torch.rand(shape, generator=g) * 0.1 + 0.02
    # store x / scale so that dequantized values are of order 1
    k8 = (k / ref.dequantize(torch.ones_like(k), ks, chunk_size)).to(torch.float8_e4m3fn)
    v8 = (v / ref.dequantize(torch.ones_like(v), vs, chunk_size)).to(torch.float8_e4m3fn)
    return k8.to(DEV), v8.to(DEV), ks.to(DEV), vs.to(DEV)


def run_interpreter_suite(path: str) -> None:
    """Run the kernel tests of the test file `path` in a fresh interpreter-mode process, when
    this one could not interpret them (skips otherwise)."""
    if KERNELS_RUN_HERE or not HAS_TRITON:
        pytest.skip("kernel tests ran in this process" if HAS_TRITON else "no triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu"]
    res = subprocess.run([*cmd, path], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout


def check(o, lse, ro, rlse, dtype):
    """A kernel's (o, lse) against the reference's: o in q's dtype, lse in float32, both close."""
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(o).all()
    torch.testing.assert_close(lse, rlse, **LSE_TOL)
    torch.testing.assert_close(o.float(), ro.float(), **TOL[dtype])
