"""Load a local Llama-family checkpoint folder (config.json, *.safetensors, tokenizer) into our decoder."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from kb.model.config import ModelConfig, UnsupportedModelError
from kb.model.llama import Transformer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: object  # a transformers PreTrainedTokenizerFast
    config: ModelConfig
    folder: Path
    weights_hash: str
    tokenizer_hash: str


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def weights_hash(folder: Path) -> str:
    """Content hash of the weight files, cached beside them (keyed by names, sizes and mtimes)."""
    files = sorted(folder.glob("*.safetensors"))
    stamp = json.dumps([(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    cache = folder / ".kb_weights_hash.json"
    try:
        cached = json.loads(cache.read_text())
        if cached["stamp"] == stamp:
            return cached["hash"]
    except (OSError, ValueError, KeyError):
        pass
    digest = _file_digest(files)
    try:
        cache.write_text(json.dumps({"stamp": stamp, "hash": digest}))
    except OSError:
        pass  # a read-only model folder still works; the hash is recomputed next time
    return digest


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


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise UnsupportedModelError(f"cannot read the tokenizer in {folder}: {e}") from e


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
    from kb.model.rope import inv_frequencies

    model.inv_freq = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(device)
    model.eval().requires_grad_(False)
    tok = load_tokenizer(folder)
    tok_files = [p for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    return LoadedModel(
        model=model,
        tokenizer=tok,
        config=cfg,
        folder=folder,
        weights_hash=weights_hash(folder),
        tokenizer_hash=_file_digest(tok_files),
    )
