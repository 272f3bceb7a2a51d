"""Model cards: a ``README.md`` beside exported heads, in the Hugging Face model-card convention.

YAML front matter (``base_model``, ``library_name``, ``tags``) so ``huggingface-cli upload`` needs nothing more;
then what produced the heads (base model, data, draft vocabulary, head count and layers, training settings),
what they measured (held-out tokens per decoding step with intervals and the fitted tree, when known) and how to
load them in
vLLM and in the Medusa reference. Everything comes from the heads' own ``config.json``.
"""

from __future__ import annotations

import json
from pathlib import Path

LOAD = {
    "vllm": "```python\nfrom vllm import LLM, SamplingParams\nllm = LLM(model=\"{base}\", speculative_config={{"
            "\"method\": \"medusa\", \"model\": \"{path}\", \"num_speculative_tokens\": {k}}})\n```",
    "medusa": "```python\n# FasterDecoding/Medusa: it reads medusa_lm_head.pt and config.json from this directory\n"
              "from medusa.model.medusa_model import MedusaModel\nmodel = MedusaModel.from_pretrained(\"{path}\")\n"
              "# pass medusa_choices within {k} heads (its default tree is 4 deep), e.g. this card's tree\n```",
}


def _n(x) -> str:
    return f"{x:,}" if isinstance(x, int) else "?"


def write_card(out: Path, fmt: str, results: dict | None = None, config: dict | None = None) -> Path:
    """Write ``out/README.md`` for heads in layout ``fmt`` ("heads" = medusa-cache's own, "vllm", "medusa")."""
    out = Path(out)
    cfg = config or json.loads((out / "config.json").read_text())
    k = cfg.get("medusa_num_heads", cfg.get("num_heads"))
    layers = cfg.get("medusa_num_layers", cfg.get("num_hidden_layers"))
    base = cfg.get("base_model_name_or_path") or "UNKNOWN"
    prov = cfg.get("provenance", {})
    train = prov.get("train", {})
    data = prov.get("data", {})
    lines = ["---", f"base_model: {base}", "library_name: medusa-cache",
             "tags:", "- medusa", "- speculative-decoding", f"- {fmt if fmt != 'heads' else 'medusa-cache'}", "---", "",
             f"# Medusa heads for {base}", "",
             f"{k} Medusa heads of {layers} ResBlock{'s' if layers != 1 else ''} each, trained by medusa-cache from "
             "cached hidden states (after the final norm) of the base model. Head i at position t predicts token "
             "t+2+i.", "", "## Training", ""]
    lines += [f"- data files: {', '.join(data.get('data_files', [])) or 'unknown'}; "
              f"{_n(data.get('tokens'))} tokens, {_n(data.get('assistant_tokens'))} trained (assistant) tokens; "
              f"pipeline `{data.get('pipeline', 'medusa-cache')}`" if data else "- data: unknown"]
    lines += [f"- draft vocabulary: {cfg.get('draft_vocab_size', cfg.get('truncated_vocab_size'))} of "
              f"{cfg.get('vocab_size')} tokens (Eagle3 top-N by assistant-token frequency)"]
    if train:
        keys = ("epochs", "lr", "batch_size", "grad_accum", "batch_tokens", "warmup_ratio", "schedule",
                "max_grad_norm", "init_from_lm_head", "distill", "seed")
        lines.append("- settings: " + ", ".join(f"{kk}={train[kk]}" for kk in keys if train.get(kk) is not None))
    if prov.get("commands"):
        lines += ["", "## Commands that produced these heads", "", "```bash", *prov["commands"], "```"]
    if results:
        ci = results.get("tokens_per_step_ci") or [None, None]
        pci = results.get("per_position_acceptance_ci") or [None, None]
        lines += ["", "## Tokens per decoding step (held out)", "",
                  f"{results.get('tree', 'chain')} ({results.get('nodes', '?')} nodes): "
                  f"**{results.get('tokens_per_step', float('nan')):.3f} tokens per step**, 95% interval "
                  f"[{ci[0]}, {ci[1]}] (bootstrap over held-out sequences), on "
                  f"{results.get('scored_on', 'held-out data')}: greedy Medusa decoding walked over the text, every "
                  f"base-model forward counted including the prefill, as `medusa-cache speculate` counts them. "
                  f"Per-position acceptance (an upper bound: decoding skips the positions inside each accepted run): "
                  f"{results.get('per_position_acceptance', float('nan')):.3f} [{pci[0]}, {pci[1]}]. "
                  + (f"Chosen by: {results['rule']}." if results.get("rule") else "")]
        if results.get("categories"):
            lines += ["", "| category | prompts | turns | tokens/step (chain) |", "|---|---|---|---|"]
            lines += [f"| {c} | {v['prompts']} | {v['turns']} | {v['tokens_per_step']:.3f} |"
                      for c, v in results["categories"].items()]
        if (out / "tree.json").exists():
            lines += ["", "Tree (`tree.json`, medusa_choices):", "", "```json",
                      (out / "tree.json").read_text().strip(), "```"]
    lines += ["", "## Loading", ""]
    if fmt in LOAD:
        lines.append(LOAD[fmt].format(base=base, path=str(out), k=k))
    else:
        lines.append("This is medusa-cache's own layout: `medusa-cache export DIR --format vllm|medusa` writes "
                     "the serving layouts (each with its own card); `medusa-cache speculate` decodes with it.")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    return out / "README.md"
