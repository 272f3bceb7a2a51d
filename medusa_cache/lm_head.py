"""Read the base model's lm_head rows for the draft vocabulary, lazily, without loading the model.

Only one tensor is opened (``lm_head.weight``, or ``model.embed_tokens.weight`` when embeddings are
tied), through ``model.safetensors.index.json`` for sharded checkpoints. The model must be the one the
cache was dumped with (same fingerprint), or the rows would belong to another model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .fingerprint import model_fingerprint

LM_KEYS = ("lm_head.weight",)
EMBED_KEYS = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight")


def _weight_files(d: Path) -> dict[str, Path]:
    """tensor name -> safetensors file holding it."""
    index = d / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return {k: d / v for k, v in wm.items()}
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no safetensors weights (only safetensors checkpoints can be read lazily)")
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: f for k in h.keys()})  # noqa: SIM118 - safe_open has no __iter__
    return out


def read_lm_head(model_dir: str, rows: np.ndarray | None = None, expect_fingerprint: str | None = None,
                 flag: str = "--init-from-lm-head") -> torch.Tensor:
    d = Path(model_dir)
    if not (d / "config.json").exists():
        raise UserError(f"{flag}: {d} is not a model directory (no config.json)")
    if expect_fingerprint is not None and model_fingerprint(d) != expect_fingerprint:
        raise UserError(f"{flag}: {d} is not the model the cache was dumped with (fingerprint differs)")
    cfg = json.loads((d / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    files = _weight_files(d)
    tied = cfg.get("tie_word_embeddings", False)
    keys = (EMBED_KEYS if tied else LM_KEYS) + (LM_KEYS if tied else EMBED_KEYS)
    name = next((k for k in keys if k in files), None)
    if name is None:
        raise UserError(f"{flag}: {d} has neither lm_head.weight nor embed_tokens.weight")
    from safetensors import safe_open

    with safe_open(str(files[name]), "pt") as h:
        w = h.get_tensor(name)
    if rows is not None:
        w = w[torch.from_numpy(np.asarray(rows, dtype=np.int64))]
    return w
