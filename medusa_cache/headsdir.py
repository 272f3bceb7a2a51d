"""The heads directory ``train`` writes and every other command reads (the serving layouts are ``export``'s):

- ``config.json``: ``medusa_num_heads``, ``medusa_num_layers``, ``hidden_size``, ``vocab_size`` (target),
  ``draft_vocab_size``, ``base_model_name_or_path``, ``cache_fingerprint``, ``provenance``;
- ``medusa_lm_head.safetensors``: reference key names ``{h}.{l}.linear.weight|bias`` and ``{h}.{L}.weight``,
  the last being the draft-vocab output matrix [draft_vocab_size, H];
- ``vocab_mapping.safetensors``: ``d2t`` (int64) and ``t2d`` (bool).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file

from .config import flag
from .errors import UserError
from .heads import MedusaHeads
from .vocab import VocabMapping


def save_heads(heads: MedusaHeads, cache, cfg, out: Path, command: str | None = None) -> None:
    """The heads directory; ``command``: the command that produced the heads when it was not ``train cfg``
    (ablate), so the provenance names what ran."""
    write(out, heads, cache.mapping(), {
        "base_model_name_or_path": cfg.base_model_name_or_path or cache.meta.dump_args.get("model"),
        "cache_fingerprint": cache.meta.fingerprints,
        "provenance": provenance(cache, cfg, command),
    })


def write(out: Path, heads: MedusaHeads, mapping: VocabMapping, extra: dict) -> None:
    """The three files of a heads directory, written here only (``train``, ``ablate`` and the tests' heads alike):
    the sizes in ``config.json`` come from the heads and the mapping, ``extra`` adds provenance."""
    from .vocab import save_mapping

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(heads.reference_state_dict(), str(out / "medusa_lm_head.safetensors"))
    save_mapping(mapping, out / "vocab_mapping.safetensors")
    config = {"medusa_num_heads": heads.num_heads, "medusa_num_layers": heads.num_layers,
              "hidden_size": heads.hidden_size, "vocab_size": mapping.target_size,
              "draft_vocab_size": mapping.draft_size, **extra}
    (out / "config.json").write_text(json.dumps(config, indent=2))


def command_line(command: str, values: dict, defaults: dict, skip: tuple[str, ...] = ()) -> str:
    """The CLI call that gives ``values``: every setting that differs from its default, as a flag."""
    import shlex

    parts = ["medusa-cache", command]
    for k, v in values.items():
        if k in skip or v == defaults.get(k) or v is None:
            continue
        name = flag(k)
        if isinstance(v, bool):
            parts.append(name if v else f"--no-{name[2:]}")
        elif isinstance(v, list):
            parts += [name, *map(str, v)]
        else:
            parts += [name, str(v)]
    return shlex.join(parts)


def provenance(cache, cfg, command: str | None = None) -> dict:
    """What produced heads: the data (files, token counts, pipeline), the training settings, the commands."""
    import dataclasses

    from .dump import DumpConfig

    dump_args = cache.meta.dump_args
    dump_defaults = {f.name: f.default for f in dataclasses.fields(DumpConfig)}
    train_values = dataclasses.asdict(cfg)
    train_defaults = {f.name: f.default for f in dataclasses.fields(type(cfg))
                      if f.default is not dataclasses.MISSING}
    counts = cache.meta.counts
    return {
        "data": {"data_files": cache.meta.data_files, "tokens": counts.get("tokens"),
                 "assistant_tokens": counts.get("assistant_tokens"), "pipeline": cache.meta.pipeline},
        "train": {k: v for k, v in train_values.items() if k not in ("resume", "overwrite")},
        "commands": [command_line("dump", dump_args, dump_defaults, skip=("resume", "overwrite")),
                     command or command_line("train", train_values, train_defaults, skip=("resume", "overwrite"))],
    }


def load_heads(d: str | Path) -> tuple[MedusaHeads, VocabMapping, dict]:
    d = Path(d)
    for name in ("config.json", "medusa_lm_head.safetensors", "vocab_mapping.safetensors"):
        if not (d / name).exists():
            raise UserError(f"{d}: not a medusa-cache heads directory (missing {name})")
    config = json.loads((d / "config.json").read_text())
    sd = load_file(str(d / "medusa_lm_head.safetensors"))
    vm = load_file(str(d / "vocab_mapping.safetensors"))
    mapping = VocabMapping(vm["d2t"].numpy().astype(np.int64), vm["t2d"].numpy().astype(bool))
    heads = MedusaHeads(config["hidden_size"], config["draft_vocab_size"], config["medusa_num_heads"],
                        config["medusa_num_layers"])
    heads.load_reference_state_dict(sd)
    return heads, mapping, config
