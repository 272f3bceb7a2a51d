"""``medusa-cache export-features``: Eagle3's offline features from a cache dumped with ``--aux-layers``, in the file
layout SpecForge's or speculators' trainer reads (``peers.py``), so one capture trains Medusa here and Eagle3 there.

- ``--format specforge``: per sequence ``input_ids``, ``loss_mask``, ``hidden_state`` = our ``hidden`` (post-norm last
  layer) and ``aux_hidden_state`` = the auxiliary layers other than a last layer N-1 (Eagle3's three), plus
  ``vocab_mapping.pt`` (the cache's ``d2t``/``t2d``).
- ``--format speculators``: the cache must hold the last layer before the norm (``--aux-layers speculators``):
  ``hidden_states`` [T, k+1, H] = the auxiliary layers, that one last, the ``datasets`` rows with ids and masks, and
  ``d2t.npy``/``t2d.npy`` (the cache's draft vocabulary, where speculators' trainer looks for it).

States are written as stored (bf16 or float32; an int8 cache decodes to bf16), one sequence at a time.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from . import peers, store
from .config import check, check_common
from .errors import UserError
from .progress import progress


@dataclass
class ExportFeaturesConfig:
    """medusa-cache export-features cache.zarr --format specforge --out features/"""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("cache",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("out",)
    cache: str
    """a complete cache dumped with --aux-layers (eagle3 for specforge, speculators for speculators)"""
    format: Literal["specforge", "speculators"] = "specforge"
    """whose trainer reads the files: specforge (rows_*/data_*.ckpt + vocab_mapping.pt) or speculators (a datasets
    directory + hidden_states/hs_*.safetensors)"""
    out: str | None = None
    """output directory (created; must not exist unless --overwrite)"""
    compress: bool = False
    """--format specforge: gzip each sample (.ckpt.gz), as prepare_hidden_states.py --compress"""
    overwrite: bool = False
    """replace --out when it holds a previous export-features output"""

    def __post_init__(self) -> None:
        check_common(self)
        check(not (self.compress and self.format != "specforge"), "compress", "only --format specforge compresses")


MARKER = ".medusa-cache-export"  # what --overwrite may delete


def export_features(cfg: ExportFeaturesConfig) -> dict:
    cache = store.Cache(cfg.cache)
    store.require_complete(cache, partial_flag=None)
    layers, hs = list(cache.meta.aux_layers), cache.hidden_size
    if not layers:
        raise UserError(f"{cfg.cache}: no auxiliary layers stored: Eagle3's features need them; re-dump with "
                        "`medusa-cache dump ... --aux-layers eagle3` (speculators: --aux-layers speculators)")
    last = _num_layers(cache) - 1
    if cfg.format == "speculators" and layers[-1] != last:
        raise UserError(f"--format speculators: {cfg.cache} stores layers {layers}; speculators' last slot is the last "
                        f"layer ({last}) before the final norm: re-dump with --aux-layers speculators")
    eagle = [j for j, x in enumerate(layers) if x != last or len(layers) == 1]
    out = _claim(Path(cfg.out), cfg.overwrite)
    ids, mask, off = cache.array("input_ids"), cache.array("loss_mask"), cache.offsets
    dtype = torch.float32 if cache.hidden_dtype == "float32" and cache.codec == "lossless" else torch.bfloat16

    def aux(s: int) -> torch.Tensor:
        a, b = int(off[s]), int(off[s + 1])
        return cache.read_aux(a, b).to(dtype).reshape(b - a, len(layers), hs)

    m = cache.mapping()
    if cfg.format == "specforge":
        for s in progress(range(cache.n_seqs), "export-features", "sequence"):
            a, b = int(off[s]), int(off[s + 1])
            peers.save_specforge(peers.specforge_path(out, s, cfg.compress), {
                "input_ids": torch.from_numpy(ids[a:b].astype(np.int64)),
                "loss_mask": torch.from_numpy(mask[a:b].astype(np.int64)),
                "hidden_state": cache.read_hidden(a, b).to(dtype)[None],
                "aux_hidden_state": aux(s)[:, eagle].reshape(1, b - a, -1)}, cfg.compress)
        peers.save_vocab_mapping(out / "vocab_mapping.pt", m.d2t, m.t2d)
        exported = [layers[j] for j in eagle]
    else:
        def rows():
            for a, b in zip(off[:-1], off[1:], strict=True):
                yield {"input_ids": ids[a:b].astype(np.int64), "loss_mask": mask[a:b].astype(np.int64),
                       "seq_len": int(b - a)}

        peers.save_speculators(out, rows, cache.n_seqs,  # speculators' slots are the aux layers alone
                               lambda s: (aux(s), torch.from_numpy(ids[off[s]:off[s + 1]]).long()))
        peers.save_speculators_mapping(out, m.d2t, m.t2d)
        exported = layers
    (out / MARKER).write_text(json.dumps({"cache": str(cfg.cache), "format": cfg.format, "aux_layers": exported}))
    return {"out": str(out), "format": cfg.format, "sequences": cache.n_seqs, "tokens": cache.n_tokens,
            "aux_layers": exported, "dtype": str(dtype).removeprefix("torch.")}


def _num_layers(cache: store.Cache) -> int:
    """The model's decoder layers, as the dump recorded them (the model directory need not be here)."""
    if not cache.meta.model_layers:
        raise UserError(f"{cache.path}: the model's layer count is not recorded (a store from before format 6): "
                        "re-dump it with --aux-layers")
    return cache.meta.model_layers


def _claim(out: Path, overwrite: bool) -> Path:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out: {out} already exists and is not empty; choose another --out or pass --overwrite")
        if not (out / MARKER).is_file():
            raise UserError(f"--overwrite: {out} does not hold an export-features output (no {MARKER}); it is "
                            "left alone: choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out
