"""Segments packed into one forward pass store the KV they get prefilled alone: whether the
segments of several documents share a pass (bench/ingest_batch.py) changes no stored value
beyond float rounding; and the prefill's attention is plain causal attention per segment."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kb.ingest.precompute import SegmentPrefill, prefill_segments


def test_segments_packed_together_equal_each_alone(demo_model):
    torch.manual_seed(0)
    vocab = demo_model.config.vocab_size
    preamble = torch.randint(0, vocab, (12,)).tolist()
    # three "documents" of 1, 2 and 1 segments, of uneven lengths
    segments = [torch.randint(0, vocab, (n,)).tolist() for n in (40, 17, 64, 5)]
    starts, pos = [], len(preamble)
    for s in segments:
        starts.append(pos)
        pos += len(s)
    alone = {
        j: (k, v)
        for j, k, v in prefill_segments(
            demo_model.model, preamble, segments, max_batch_tokens=64, starts=starts
        )
    }
    together = {
        j: (k, v)
        for j, k, v in prefill_segments(
            demo_model.model, preamble, segments, max_batch_tokens=4096, starts=starts
        )
    }
    assert sorted(alone) == sorted(together) == [0, 1, 2, 3]
    for j, s in enumerate(segments):
        (ka, va), (kt, vt) = alone[j], together[j]
        assert ka.shape == kt.shape == (demo_model.config.num_layers, len(s), 3, 64)
        torch.testing.assert_close(kt, ka, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(vt, va, rtol=1e-4, atol=1e-4)


def test_packed_attention_is_causal_attention_per_sequence():
    """SegmentPrefill.attend (4-D SDPA, the CPU's fast kernel) against the S x S scores written
    out, GQA heads repeated, for each packed sequence; and the kept rows are recorded."""
    torch.manual_seed(1)
    h, hkv, d, cu, keep = 6, 2, 16, [0, 7, 20, 21], [2, 0, 1]
    q, k, v = (torch.randn(cu[-1], n, d) for n in (h, hkv, hkv))
    attn = SegmentPrefill(cu_seqlens=cu, keep_from=keep)
    out = attn.attend(0, q, k, v)
    for b in range(len(cu) - 1):
        s, e = cu[b], cu[b + 1]
        qq = q[s:e].transpose(0, 1)
        kk = k[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        vv = v[s:e].transpose(0, 1).repeat_interleave(h // hkv, 0)
        scores = qq @ kk.transpose(1, 2) / d**0.5
        scores = scores.masked_fill(torch.ones(e - s, e - s).triu(1).bool(), float("-inf"))
        ref = (F.softmax(scores, -1) @ vv).transpose(0, 1)
        torch.testing.assert_close(out[s:e], ref, rtol=1e-5, atol=1e-5)
    kept = torch.cat([k[cu[b] + keep[b] : cu[b + 1]] for b in range(3)])
    torch.testing.assert_close(attn.k_out[0], kept)
