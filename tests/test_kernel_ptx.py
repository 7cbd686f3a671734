"""Every attention kernel compiles for sm_90 (H100/H200) on a host without a GPU.

The interpreter parity tests run the kernels' Python, not Triton's compiler: a construct the
interpreter accepts and the compiler refuses (a tuple constexpr, a non-constexpr shape) would
pass them and fail on the first GPU. bench/kernel_ptx.py compiles each launch to PTX with the
wheel's own front end and ptxas, and compares two trees' PTX.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
# loaded by path: bench/ on sys.path would shadow the attention package with bench/attention.py
_spec = importlib.util.spec_from_file_location("kernel_ptx", ROOT / "bench" / "kernel_ptx.py")
kernel_ptx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_ptx)

KERNELS = {
    "_shared_dense_kernel",
    "_shared_routed_kernel",
    "_routed_grouped_kernel",
    "_routed_stationary_kernel",
    "_routed_union_kernel",
    "_paged_kernel",
    "_combine_kernel",
}


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    return kernel_ptx.run_tree(ROOT, quick=True)


def test_every_kernel_compiles_for_sm90(compiled):
    assert {row["kernel"] for row in compiled} == KERNELS
    for row in compiled:
        assert re.fullmatch(r"[0-9a-f]{16}", row["ptx_sha1"]), row
        assert row["num_warps"] >= 1
    # the attention kernels stage K/V tiles in shared memory; the combine kernel needs none
    assert all(r["shared_bytes"] > 0 for r in compiled if r["kernel"] != "_combine_kernel")


def test_ptx_digest_sees_a_changed_kernel_and_ignores_debug_lines():
    body = "\tmul.f32 \t%f1, %f2, 0f3F317218;\n\tret;\n"
    debug = '.file 1 "/a/attention/_triton.py"\n.loc 1 12 4\n$L__tmp3:\n'
    moved = '.file 1 "/b/attention/_triton.py"\n.loc 1 40 4\n$L__tmp9:\n'
    section = "\t.section\t.debug_info\n{ /a/attention }\n"
    assert kernel_ptx._ptx_without_debug(debug + body + section) == kernel_ptx._ptx_without_debug(
        moved + body
    )
    changed = body.replace("0f3F317218", "0f3F317000")
    assert kernel_ptx._ptx_without_debug(debug + body) != kernel_ptx._ptx_without_debug(
        debug + changed
    )
