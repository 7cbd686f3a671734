"""What identifies a model folder without loading its weights: the content hashes of its weight
and tokenizer files, and its tokenizer. Torch-free, so listing corpora never imports torch."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kb.model.config import UnsupportedModelError


def file_digest(paths: list[Path]) -> str:
    """sha256 over the files' names and bytes, in name order (16 hex digits)."""
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
    digest = file_digest(files)
    try:
        cache.write_text(json.dumps({"stamp": stamp, "hash": digest}))
    except OSError:
        pass  # a read-only model folder still works; the hash is recomputed next time
    return digest


def tokenizer_hash(folder: Path) -> str:
    """Content hash of the tokenizer's files (tokenizer*, special_tokens*)."""
    files = [p for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens"))]
    return file_digest(files)


def load_tokenizer(folder: Path):
    """The folder's tokenizer (a transformers PreTrainedTokenizerFast), from local files only."""
    from transformers import AutoTokenizer  # heavy: imported by the callers that need it

    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise UnsupportedModelError(f"cannot read the tokenizer in {folder}: {e}") from e


@dataclass(frozen=True)
class ModelIdentity:
    """What a corpus's cache key needs of the model (tokenizer and hashes), without its weights:
    listing corpora and telling stale ones never loads a model."""

    tokenizer: object
    weights_hash: str
    tokenizer_hash: str


def model_identity(folder: Path) -> ModelIdentity:
    """The identity of the model in `folder`, hashed the way `load_model` hashes it."""
    return ModelIdentity(load_tokenizer(folder), weights_hash(folder), tokenizer_hash(folder))
