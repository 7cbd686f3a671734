"""Service settings: environment variables with the `KB_` prefix, then an optional TOML file.

The file is `$KB_CONFIG` if set, else `kb.toml` in the working directory if present. Environment
variables win over the file; the file wins over the defaults.
"""

from __future__ import annotations

import os
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from kb.model.demo import DEMO_NAME
from kb.model.retrieval_heads import parse_heads


class _TomlSource(PydanticBaseSettingsSource):
    def __call__(self) -> dict[str, Any]:
        path = os.environ.get("KB_CONFIG") or ("kb.toml" if Path("kb.toml").is_file() else None)
        if not path:
            return {}
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return data.get("kb", data)

    def get_field_value(self, field, field_name):  # pragma: no cover - required by the ABC
        return None, field_name, False


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="KB_", extra="ignore")

    home: Path = Field(default=Path("./data"), description="all state: database, KV files, models")
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default SQLite in home"
    )
    redis_url: str | None = Field(default=None, description="unset: in-process broker")
    redis_prefix: str = Field(
        default="kb:", description="prefix of every Redis key (one per deployment or test)"
    )
    model: str = Field(
        default=DEMO_NAME, description="the demo model's name or a local checkpoint folder"
    )
    models_dir: Path | None = Field(
        default=None, description="where converted models live; default home/models"
    )
    device: str = Field(default="cpu", description="cpu, cuda or cuda:N")
    dtype: str = Field(
        default="auto", description="model weights: auto (float32 on CPU, bfloat16 on GPU)"
    )
    kv_dtype: str = Field(
        default="float16", description="stored shared KV: float16, bfloat16 or float8"
    )
    gpu_cache_gb: float = Field(
        default=16.0,
        ge=0,
        description="shared KV held on the serving device (the CPU on CPU-only machines), GiB",
    )
    cpu_cache_gb: float = Field(
        default=32.0, ge=0, description="shared KV parked in (pinned) host memory, GiB"
    )

    segment_len: int = Field(default=1024, ge=16, description="max tokens per segment")
    pic: Literal["shared", "linked"] = Field(
        default="shared",
        description="how segments are prefilled: "
        "shared (after the preamble) or linked (also after the previous "
        "segment's last pic_link_tokens tokens); docs/QUALITY.md",
    )
    pic_link_tokens: int = Field(
        default=32,
        ge=1,
        description="tokens of the previous segment a linked segment is prefilled after",
    )
    chunk_size: int = Field(default=64, ge=1, description="shared tokens per routing chunk")
    prefill_batch_tokens: int = Field(default=4096, ge=64, description="tokens per prefill batch")
    density: float = Field(
        default=1.0, gt=0, le=1, description="fraction of chunks each query attends"
    )
    router: str = Field(default="quest", description="quest (min/max bound) or mean (MoBA)")
    routed_dense_layers: int = Field(
        default=0,
        ge=0,
        description="when routing (density < 1), the first N "
        "layers still attend every chunk (docs/QUALITY.md: it spends the "
        "density where routing loses most answers)",
    )

    selection_budget: int = Field(
        default=192,
        ge=0,
        description="attention retrieval: shared tokens each "
        "request reads (the passages its question chooses at prefill) over a corpus "
        "larger than this; 0 = off (dense); docs/QUALITY.md",
    )
    selection_layers: str = Field(
        default="17,18",
        description="layers whose question queries choose the "
        "passages (comma-separated; docs/QUALITY.md)",
    )
    selection_heads: str = Field(
        default="auto",
        description="the query heads (LAYER.HEAD, comma-separated) "
        "whose attention chooses the passages; auto = the model's measured retrieval heads "
        "(kb/model/retrieval_heads.py), all = every head of KB_SELECTION_LAYERS; docs/QUALITY.md",
    )
    selection_window: int = Field(
        default=9,
        ge=1,
        description="attention retrieval: the phrase width, in tokens, "
        "of the window sum that turns token scores into passage scores",
    )
    selection_positions: Literal["virtual", "stored"] = Field(
        default="virtual",
        description="where the chosen "
        "passages sit: contiguous after the preamble "
        "(virtual) or at their stored positions",
    )
    selection_order: Literal["best_last", "corpus"] = Field(
        default="best_last",
        description="the order of the chosen passages "
        "at virtual positions: by ascending score, the best right before the question "
        "(best_last), or as stored (corpus); docs/QUALITY.md",
    )
    selection_history: int = Field(
        default=2,
        ge=0,
        description="attention retrieval in a conversation: "
        "the most recent earlier user turns that each keep their best passage beside the "
        "question's (0 = the question alone); docs/QUALITY.md",
    )
    selection_lexical: Literal["rerank", "rrf", "off"] = Field(
        default="rerank",
        description="attention retrieval: the passages' exact "
        "token matches of the question (IDF-weighted unigrams and bigrams; index/lexical.py) "
        "reorder the attention's best ten (rerank), are fused with its ranking by reciprocal "
        "rank (rrf), or are ignored (off); docs/QUALITY.md",
    )
    serve_kv_dtype: Literal["auto", "stored"] = Field(
        default="auto",
        description="shared KV as served: auto "
        "(float32 on the CPU, which computes in it; stored "
        "dtype elsewhere) or stored (as kv_dtype)",
    )

    max_tokens: int = Field(default=256, ge=1, description="default answer length")
    repetition_penalty: float = Field(
        default=1.0,
        gt=0,
        le=10,
        description="default multiplicative penalty on tokens an answer already generated "
        "(HF/vLLM style; 1 = off), for requests that send none",
    )
    frequency_penalty: float = Field(
        default=0.3,
        ge=-2,
        le=2,
        description="default OpenAI frequency penalty (minus this times a token's count in the "
        "answer so far from its logit; 0 = off), for requests that send none: with DRY it stops "
        "the demo model's greedy loops without costing the quality harness an answer "
        "(docs/QUALITY.md)",
    )
    dry_multiplier: float = Field(
        default=0.8,
        ge=0,
        le=10,
        description="default DRY penalty multiplier (0 = off), for requests that send none: a "
        "token that would continue a repeat of an earlier run of the answer, the repeat L tokens "
        "long so far, loses multiplier * base ** (L - allowed length) when L >= allowed length "
        "(docs/QUALITY.md)",
    )
    dry_base: float = Field(default=1.75, ge=1, le=10, description="default DRY base")
    dry_allowed_length: int = Field(
        default=2,
        ge=1,
        le=256,
        description="default DRY allowed length: repeats of up to this many tokens go free",
    )
    dry_sequence_breakers: tuple[str, ...] = Field(
        default=("\n", ":", '"', "*"),
        description="default DRY sequence breakers (KB_DRY_SEQUENCE_BREAKERS as a JSON list of "
        "strings): a token whose text contains one ends a repeated run",
    )
    kv_block_size: int = Field(default=16, ge=1)
    unique_kv_tokens: int = Field(
        default=16384, ge=256, description="unique-KV budget, in tokens (all requests)"
    )
    max_running: int = Field(default=64, ge=1, description="requests stepped together at most")
    max_queue: int = Field(default=256, ge=1, description="waiting requests before 429")
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0,
        description="on shutdown, running requests get this long to finish before they are aborted",
    )

    shared_ranks: int = Field(
        default=0,
        ge=0,
        description="ranks holding the corpora's shared KV beside this one (kb serve under "
        "torchrun, world size shared_ranks + 1; 0: one process); docs/SCALING.md",
    )
    shared_rank_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="seconds a silent shared rank may stall a step before its requests fail",
    )
    shared_rank_restart_s: float = Field(
        default=1.0,
        ge=0,
        description="kb serve --shared-ranks started as one command: seconds before rank 0 "
        "starts a lost shared rank again (doubling while it keeps dying, at most 60)",
    )

    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_mb: float = Field(default=64.0, gt=0)
    # budgets of one document, checked while it is parsed, and token quotas (0: no quota)
    max_inflated_mb: float = Field(
        default=128.0,
        gt=0,
        description="decompressed size of a DOCX "
        "(ZIP-based) document, all parts, counted as it inflates",
    )
    max_inflated_xml_mb: float = Field(
        default=8.0,
        gt=0,
        description="of that, the XML parts (parsed into trees of ~100 times their size)",
    )
    max_document_pages: int = Field(default=5000, ge=1, description="pages of one PDF")
    max_document_tokens: int = Field(
        default=1_000_000, ge=1, description="tokens of one document's text"
    )
    corpus_token_quota: int = Field(
        default=4_000_000, ge=0, description="tokens of one corpus, all documents; 0: none"
    )
    user_token_quota: int = Field(
        default=8_000_000,
        ge=0,
        description="tokens of all corpora a user owns (anonymous: all unowned corpora); 0: none",
    )
    allowed_types: str = Field(
        default="pdf,docx,html,markdown,text",
        description="document kinds accepted, comma-separated",
    )
    auth: str = Field(
        default="off",
        pattern="^(on|off)$",
        description="on: sign-in and API keys required; off: anonymous use of public corpora",
    )
    system_prompt: str = (
        "You are a helpful assistant. Answer the question using only the documents below. Be brief."
    )

    @field_validator("selection_heads")
    @classmethod
    def _heads_parse(cls, value: str) -> str:
        """A malformed KB_SELECTION_HEADS fails at start, naming the entry (not at a corpus's load)."""
        if value.strip().lower() not in ("auto", "all", ""):
            parse_heads(value)
        return value

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return init_settings, env_settings, _TomlSource(settings_cls), file_secret_settings

    @property
    def resolved_home(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def resolved_models_dir(self) -> Path:
        return (self.models_dir or self.resolved_home / "models").expanduser().resolve()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'kb.sqlite3'}"

    @property
    def kv_dir(self) -> Path:
        return self.resolved_home / "kv"

    @property
    def files_dir(self) -> Path:
        return self.resolved_home / "files"

    @property
    def torch_dtype(self):
        import torch

        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return getattr(torch, self.dtype)

    @cached_property
    def torch_kv_dtype(self):
        import torch

        return {
            "float16": torch.float16,
            "bfloat16": torch.bfloat16,
            "float8": torch.float8_e4m3fn,
            "float32": torch.float32,
        }[self.kv_dtype]


def get_settings(**overrides: Any) -> Settings:
    return Settings(**overrides)
