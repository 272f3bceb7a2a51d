"""``medusa-cache export``: trained heads (the heads directory of ``headsdir``) in the layouts serving engines load.

``export --format vllm``: vLLM's Medusa layout. ``config.json`` with ``model_type: medusa``,
``architectures: [MedusaModel]``, ``num_heads``, ``num_hidden_layers``, ``medusa_fc_bias: true``,
``vocab_size`` (target) and ``truncated_vocab_size`` (draft); weights ``blocks.{h}.layers.{l}.weight|bias``,
``lm_heads.{h}.weight`` [draft, H] and ``token_map`` (int64, draft id -> target id). vLLM scatters the draft
logits into a full-vocabulary row filled with -inf, so a draft head loses nothing there.

``export --format medusa``: the reference layout with full-vocabulary output matrices [V, H]: row
``token_map[d]`` holds draft row d and every other row is zero. The reference loader has no mask, so a
non-draft token scores logit 0 instead of -inf: it can only win when every draft logit is negative. The
cost is measured by ``full_vocab_agreement``; README "Export" gives the measured figure.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch
from safetensors.torch import save_file

from .config import check_common
from .errors import UserError
from .heads import MedusaHeads
from .headsdir import load_heads
from .vocab import VocabMapping


@dataclass
class ExportConfig:
    """medusa-cache export heads --format vllm --out heads-vllm --base-model meta-llama/Llama-3.1-8B-Instruct"""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("dir",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("format", "out")
    dir: str
    """output directory of `medusa-cache train` (or ablate's best/)"""
    format: Literal["vllm", "medusa"] | None = None
    """vllm: vLLM's Medusa layout; medusa: the FasterDecoding/Medusa reference layout"""
    out: str | None = None
    """directory to write (created)"""
    overwrite: bool = False
    """replace an existing --out (only a directory medusa-cache wrote, never an input)"""
    base_model: str | None = None
    """base_model_name_or_path to write (default: the model path used at dump time)"""
    safetensors: bool = False
    """--format medusa: also write medusa_lm_head.safetensors (the reference loader reads only medusa_lm_head.pt; each
    file holds full-vocabulary rows)"""

    def __post_init__(self) -> None:
        check_common(self)


def export(src: str | Path, fmt: str, out: str | Path, overwrite: bool = False,
           base_model: str | None = None, safetensors: bool = False) -> str | None:
    """Write ``src``'s heads in ``fmt`` layout to ``out``; returns the base_model_name_or_path written.

    ``fmt="medusa"`` writes the one file the reference's loader opens (``medusa_lm_head.pt``, full-vocabulary
    rows); ``safetensors=True`` adds the same tensors as ``medusa_lm_head.safetensors`` (each file is about
    heads x H x vocabulary x 4 bytes, larger than a small model)."""
    from .rundir import claim

    heads, mapping, config = load_heads(src)
    if fmt == "medusa" and heads.num_layers > 1:
        raise UserError(f"--format medusa: the heads in {src} have {heads.num_layers} ResBlocks each, but the Medusa "
                        "reference builds one shared ResBlock module repeated per layer ([ResBlock(H)] * L), so it "
                        "cannot hold them; use --format vllm (one module per layer)")
    if fmt not in ("vllm", "medusa"):
        raise UserError(f"--format: unknown format {fmt!r} (vllm or medusa)")
    if base_model:
        config = {**config, "base_model_name_or_path": base_model}
    out = claim(out, kind="export", overwrite=overwrite, inputs={"heads directory": src})
    base = config.get("base_model_name_or_path")
    if fmt == "vllm":
        tensors, cfg = vllm_layout(heads, mapping, base)
        save_file(tensors, str(out / "model.safetensors"))
    else:
        tensors, cfg = medusa_layout(heads, mapping, base)
        if safetensors:
            save_file(tensors, str(out / "medusa_lm_head.safetensors"))
        # The reference's loader (MedusaModel.from_pretrained) opens only medusa_lm_head.pt: a plain state dict
        torch.save({k: v.contiguous() for k, v in tensors.items()}, out / "medusa_lm_head.pt")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    from .card import write_card

    results = json.loads((Path(src) / "eval.json").read_text()) if (Path(src) / "eval.json").exists() else None
    if (Path(src) / "tree.json").exists():
        (out / "tree.json").write_text((Path(src) / "tree.json").read_text())
    write_card(out, fmt, results, {**cfg, "provenance": config.get("provenance", {}),
                                   "draft_vocab_size": mapping.draft_size})
    return config.get("base_model_name_or_path")


@torch.no_grad()
def vllm_layout(heads: MedusaHeads, mapping: VocabMapping, base: str | None) -> tuple[dict, dict]:
    """(tensors, config.json) of vLLM's Medusa layout: draft-vocabulary heads and ``token_map``."""
    sd = heads.reference_state_dict()
    H, L, K = heads.hidden_size, heads.num_layers, heads.num_heads
    tensors = {}
    for h in range(K):
        for layer in range(L):
            tensors[f"blocks.{h}.layers.{layer}.weight"] = sd[f"{h}.{layer}.linear.weight"]
            tensors[f"blocks.{h}.layers.{layer}.bias"] = sd[f"{h}.{layer}.linear.bias"]
        tensors[f"lm_heads.{h}.weight"] = sd[f"{h}.{L}.weight"]
    if mapping.draft_size < mapping.target_size:
        tensors["token_map"] = torch.from_numpy(mapping.draft_to_target).to(torch.int64)
    return tensors, {"model_type": "medusa", "architectures": ["MedusaModel"], "hidden_size": H,
                     "vocab_size": mapping.target_size, "truncated_vocab_size": mapping.draft_size, "num_heads": K,
                     "num_hidden_layers": L, "medusa_fc_bias": True, "base_model_name_or_path": base}


def medusa_layout(heads: MedusaHeads, mapping: VocabMapping, base: str | None) -> tuple[dict, dict]:
    """(tensors, config.json) of the Medusa reference: full-vocabulary output rows, zero outside the draft."""
    sd = heads.reference_state_dict()
    H, L, K = heads.hidden_size, heads.num_layers, heads.num_heads
    tensors = dict(sd)
    token_map = torch.from_numpy(mapping.draft_to_target)
    for h in range(K):
        full = torch.zeros(mapping.target_size, H, dtype=sd[f"{h}.{L}.weight"].dtype)
        full[token_map] = sd[f"{h}.{L}.weight"]
        tensors[f"{h}.{L}.weight"] = full
    return tensors, {"medusa_num_heads": K, "medusa_num_layers": L, "base_model_name_or_path": base,
                     "hidden_size": H, "vocab_size": mapping.target_size}


def full_vocab_agreement(heads: MedusaHeads, mapping: VocabMapping, hidden: torch.Tensor) -> list[float]:
    """Per head: share of positions whose top-1 is unchanged when the draft head becomes a zero-filled
    full-vocabulary matrix (the reference layout)."""
    out = []
    tm = torch.from_numpy(mapping.draft_to_target)
    for logits in heads(hidden.float()):
        draft_top = tm[logits.argmax(-1)]
        full = torch.zeros(*logits.shape[:-1], mapping.target_size)
        full[..., tm] = logits
        out.append(float((full.argmax(-1) == draft_top).float().mean()))
    return out
