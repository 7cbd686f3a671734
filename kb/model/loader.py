"""Load a local Llama-family checkpoint folder (config.json, *.safetensors, tokenizer) into our decoder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kb.model.config import ModelConfig, UnsupportedModelError
from kb.model.identity import load_tokenizer, tokenizer_hash, weights_hash
from kb.model.llama import Transformer
from kb.model.rope import inv_frequencies
from kb.prompt import preamble_tokens

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    config: ModelConfig
    folder: Path
    weights_hash: str
    tokenizer_hash: str

    def preamble_tokens(self, system_prompt: str) -> list[int]:
        """The corpus preamble's tokens under `system_prompt` (kb/prompt.py)."""
        return preamble_tokens(self.tokenizer, system_prompt)


def load_state_dict(folder: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no *.safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                state[name] = f.get_tensor(name).to(dtype)
    return state


def load_model(
    folder: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> LoadedModel:
    """Build the decoder from a checkpoint folder; fails with UnsupportedModelError on anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UnsupportedModelError(f"model folder {folder} does not exist")
    cfg = ModelConfig.from_folder(folder)
    state = load_state_dict(folder, dtype)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=device).to(dtype)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=False)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise UnsupportedModelError(
            f"weights in {folder} do not fit a {cfg.model_type} decoder: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers were created on meta: recompute them on the target device
    model.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.eval().requires_grad_(False)
    tok = load_tokenizer(folder)
    return LoadedModel(
        model=model,
        tokenizer=tok,
        config=cfg,
        folder=folder,
        weights_hash=weights_hash(folder),
        tokenizer_hash=tokenizer_hash(folder),
    )
