"""What identifies a model folder without loading its weights: the content hashes of its weight
and tokenizer files, and the corpus preamble's tokens. Torch-free, and after a folder's first
use free of transformers too (the preamble's tokens are remembered beside the model), so listing
corpora and telling stale ones answers in well under a second."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kb.model.config import UnsupportedModelError
from kb.prompt import preamble_tokens

PREAMBLE_CACHE = ".kb_preamble_tokens.json"  # beside the weights, like .kb_weights_hash.json


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
    """What a corpus's cache key needs of the model (hashes and the preamble), without its
    weights: listing corpora and telling stale ones never loads a model."""

    folder: Path
    weights_hash: str
    tokenizer_hash: str

    def preamble_tokens(self, system_prompt: str) -> list[int]:
        """The preamble's tokens under `system_prompt`, remembered beside the model by the
        tokenizer's hash and the prompt; the tokenizer is loaded only the first time."""
        key = hashlib.sha256(f"{self.tokenizer_hash}\0{system_prompt}".encode()).hexdigest()[:32]
        cache = self.folder / PREAMBLE_CACHE
        try:
            known = json.loads(cache.read_text())
        except (OSError, ValueError):
            known = {}
        if not isinstance(known, dict):
            known = {}
        if isinstance(known.get(key), list):
            return known[key]
        tokens = preamble_tokens(load_tokenizer(self.folder), system_prompt)
        known[key] = tokens
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
        try:  # written whole, then renamed: a reader never sees half a file
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            tmp.unlink(missing_ok=True)  # a read-only model folder still works
        return tokens


def model_identity(folder: Path) -> ModelIdentity:
    """The identity of the model in `folder`, hashed the way `load_model` hashes it."""
    return ModelIdentity(folder, weights_hash(folder), tokenizer_hash(folder))
