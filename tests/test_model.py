"""Our decoder's logits match transformers' own model: SmolLM2 (real weights), and small
random-weight Qwen2 (qkv bias) and Llama-3 (RoPE scaling) checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from kb.ingest.precompute import SegmentPrefill
from kb.model.config import ModelConfig, UnsupportedModelError
from kb.model.loader import load_model

# float32 on CPU: differences come from summation order only
ATOL = 2e-3


def _our_logits(lm, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        h = lm.model(ids, torch.arange(len(ids)), SegmentPrefill([0, len(ids)], [0]))
        return lm.model.logits(h)


def test_smollm2_matches_transformers(demo_model_dir, demo_model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(demo_model_dir), dtype=torch.float32).eval()
    ids = demo_model.tokenizer(
        "Paris is the capital of France. The capital of Italy is", return_tensors="pt"
    ).input_ids[0]
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
    ours = _our_logits(demo_model, ids)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)
    assert ours[-1].argmax() == ref[-1].argmax()


def _random_checkpoint(tmp_path, config) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("kind", ["qwen2", "llama3"])
def test_random_checkpoints_match_transformers(tmp_path, kind):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=4096,
    )
    if kind == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
    else:
        config = LlamaConfig(
            **common,
            tie_word_embeddings=False,
            rope_theta=5e5,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
        )
    hf = _random_checkpoint(tmp_path, config)
    lm = load_model(tmp_path)
    if kind == "qwen2":
        assert lm.config.attention_bias
        assert hf.model.layers[0].self_attn.q_proj.bias is not None
    else:
        assert lm.config.rope_scaling and lm.config.rope_scaling["factor"] == 8.0
    # long enough that llama3's low-frequency scaling matters
    ids = torch.randint(0, 256, (600,), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(_our_logits(lm, ids), ref, atol=ATOL, rtol=0)


def test_not_llama_family_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10}))
    with pytest.raises(UnsupportedModelError, match="not Llama-family"):
        ModelConfig.from_folder(tmp_path)
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        load_model(tmp_path / "missing")
