"""Attention mass per shared chunk (citations): how much of each query's softmax fell on each
chunk of the shared KV, given the normalizer of the whole attention (shared + unique).

Blocked torch on every device: a block of whole chunks of keys at a time, dequantized per block
(16-bit or fp8 keys), GQA groups as the rows of one GEMM per KV head, so there is never a
[T, Hq, N] score matrix or a float32 copy of all keys. Contract: `reference.chunk_mass`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference
from .cpu_shared import block_size
from .reference import dequantize, twin_of


@twin_of(reference.chunk_mass)
def chunk_mass(q, k, lse, chunk_size, skip=0, k_scale=None):
    """[T, C] softmax mass of q[T, Hq, d] on each chunk of k[N, Hkv, d] (scale 1/sqrt(d)),
    summed over heads, with lse[T, Hq] the normalizer; the first `skip` keys count nothing.
    `k_scale` [Hkv] or [C, Hkv]: fp8 keys' scales. On CUDA one block holds every key; on the CPU
    blocks are sized like `cpu_shared`'s (scores of a block stay in cache)."""
    t, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    qh = (q.float() / math.sqrt(d)).view(t, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, t * g, d)
    norm = lse.float().view(t, hkv, g).permute(1, 0, 2).reshape(hkv, t * g, 1)
    block = n if k.is_cuda else block_size(t * g, hkv, chunk_size)
    block = max(chunk_size, block // chunk_size * chunk_size)
    out = []
    for s in range(0, n, block):
        ks = k_scale if k_scale is None or k_scale.dim() == 1 else k_scale[s // chunk_size :]
        kb = dequantize(k[s : s + block], ks, chunk_size).transpose(0, 1)  # [Hkv, B, d]
        p = torch.exp(torch.bmm(qh, kb.transpose(1, 2)) - norm)  # [Hkv, T*G, B]
        p = p.view(hkv, t, g, -1).sum(dim=(0, 2))  # [T, B]
        if s < skip:
            p[:, : skip - s] = 0
        pad = -p.shape[1] % chunk_size
        out.append(F.pad(p, (0, pad)).view(t, -1, chunk_size).sum(-1))
    return torch.cat(out, dim=1)
