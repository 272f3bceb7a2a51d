"""Fingerprints that tie a cache to what made it: model, tokenizer, chat template, data, settings.

A resumed dump, ``--init-from-lm-head`` and ``--distill`` compare these and refuse a mismatch by name.
Weight files are fingerprinted by name, size and a hash of three 1 MiB samples (start, middle, end):
cheap on a 16 GB checkpoint, stable across copies (no mtimes), and it changes when the weights do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
SAMPLE = 1 << 20


def sha(data: bytes | str) -> str:
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()[:16]


def file_sample_hash(path: Path) -> str:
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for pos in sorted({0, max(0, size // 2 - SAMPLE // 2), max(0, size - SAMPLE)}):
            f.seek(pos)
            h.update(f.read(SAMPLE))
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def model_fingerprint(model_dir: str | Path) -> str:
    """Config plus weight files; the compute dtype is recorded separately."""
    d = Path(model_dir)
    parts = [sha((d / "config.json").read_bytes()) if (d / "config.json").exists() else "noconfig"]
    weights = sorted(list(d.glob("*.safetensors")) + list(d.glob("*.bin")))
    parts += [f"{w.name}:{file_sample_hash(w)}" for w in weights]
    return sha("|".join(parts))


def tokenizer_fingerprint(tok_dir: str | Path) -> str:
    d = Path(tok_dir)
    parts = [f"{n}:{sha((d / n).read_bytes())}" for n in TOKENIZER_FILES if (d / n).exists()]
    return sha("|".join(parts))


def data_fingerprint(files: list[str]) -> str:
    return sha("|".join(f"{Path(f).name}:{file_hash(Path(f))}" for f in files))
