"""Model architecture settings read from a Hugging Face `config.json` (Llama family)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModelError(ValueError):
    """The folder holds no Llama-family model we can run."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_TYPES:
            raise UnsupportedModelError(
                f"model type {model_type!r} is not Llama-family (supported: {', '.join(SUPPORTED_TYPES)})"
            )
        rope = dict(cfg.get("rope_parameters") or {})
        scaling = cfg.get("rope_scaling") or None
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = (
            rope.get("rope_type") or (scaling or {}).get("rope_type") or (scaling or {}).get("type")
        )
        if rope_type in (None, "default"):
            scaling = None
        elif rope_type == "llama3":
            scaling = {**(scaling or {}), **rope, "rope_type": "llama3"}
        else:
            raise UnsupportedModelError(
                f"RoPE scaling {rope_type!r} is not supported (default and llama3 are)"
            )
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        heads = cfg["num_attention_heads"]
        return cls(
            model_type=model_type,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelConfig:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise UnsupportedModelError(f"no config.json in {folder}: not a model folder")
        return cls.from_dict(json.loads(path.read_text()))

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of keys and values per token over all layers, at 2 bytes per element."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2
