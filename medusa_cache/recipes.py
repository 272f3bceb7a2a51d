"""Named training recipes: JSON files of ``train`` options in ``configs/recipes/`` (the name is the file's stem), or a
path to such a file. ``ablate --recipe`` trains one run per recipe from the one cache.

A recipe holds only how heads are trained (lr, schedule, warmup, clip, loss weights, initialisation, distillation);
never the data, the output or the head count, which the ablation sets. ``"MODEL"`` as the value of
``init_from_lm_head`` or ``distill`` stands for the base model (ablate ``--model``, else the cache's), so one file
serves every model. ``"command"`` and ``"about"`` are documentation.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .errors import UserError
from .trainconfig import TrainConfig

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "recipes"
NOT_A_RECIPE = ("cache", "out", "val_cache", "val_fraction", "data_fraction", "num_heads", "clip_per_head", "resume",
                "overwrite", "device", "threads", "draft_vocab_size", "hidden_size", "vocab_size", "report_to")
MODEL = "MODEL"


def recipe_path(name: str) -> Path:
    p = Path(name)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise UserError(f"--recipe: file not found: {p}")
        return p
    p = RECIPES / f"{name}.json"
    if not p.is_file():
        known = sorted(f.stem for f in RECIPES.glob("*.json")) if RECIPES.is_dir() else []
        raise UserError(f"--recipe: no recipe named {name!r} (known: {', '.join(known) or 'none here'}; or give a "
                        "JSON file's path)")
    return p


def load_recipe(name: str) -> dict:
    """The options of recipe ``name`` (a name in configs/recipes/ or a path), checked against ``TrainConfig``."""
    from .config import check_config_dict

    p = recipe_path(name)
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"--recipe: {p}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}") from None
    if isinstance(raw, dict):
        raw.pop("about", None)
        bad = sorted(set(raw) & set(NOT_A_RECIPE))
        if bad:
            raise UserError(f"--recipe: {p}: {', '.join(bad)} are not part of a recipe (the ablation sets them)")
    return check_config_dict(raw, TrainConfig, f"--recipe: {p}")


def apply_recipe(cfg: TrainConfig, opts: dict, model: str | None) -> TrainConfig:
    """``cfg`` with the recipe's options; ``"MODEL"`` resolved to ``model``."""
    resolved = {}
    for k, v in opts.items():
        if v == MODEL:
            if not model:
                raise UserError(f"--recipe: {k} needs the base model: pass --model")
            v = model
        resolved[k] = v
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(cfg, **{k: v for k, v in resolved.items() if k in fields})
