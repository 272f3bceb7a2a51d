"""ablate's choice and report: measured decoding (optional), the cost-aware choice of the best variant, ``best/`` and
its card, ``report.md``, ``results.json`` and the plots."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from .ablate_plots import curve_table, measured_table, plot, plot_curve, plot_vocab, vocab_table
from .ablateconfig import AblateConfig
from .acceptance import chain
from .backbone import model_parameters, timed_verify_cost
from .errors import UserError
from .evaluate import COLUMNS, category_table, render_table
from .export import export
from .headsdir import load_heads, save_heads
from .progress import progress
from .store import Cache
from .trainconfig import TrainConfig


def report(rows: list[dict], cfg: TrainConfig, a: AblateConfig, out: Path, command: str | None = None,
           run_cfgs: dict[str, TrainConfig] | None = None, trained: dict | None = None) -> dict:
    """Measured decoding (optional), the choice, best/, report.md, results.json, plots (``trained``: ``_Trained``)."""
    trained = _Trained(trained or {})
    train_cache = Cache(cfg.cache)
    model, H = train_cache.meta.dump_args.get("model"), train_cache.hidden_size
    verify_cost, cost_source = verification_cost(rows, cfg, a, model, out, trained)
    params = model_parameters(model)
    for r in rows:
        r["head_cost"] = round(r["num_heads"] * (r["layers"] * (H * H + H) + H * r["draft_vocab_size"]) / params, 5) \
            if params else 0.0
        r["options"] = options(r, verify_cost)
    best_row, best_opt = max(((r, o) for r in rows for o in r["options"]), key=lambda x: x[1]["expected_speedup"])
    write_best(best_row, best_opt, (run_cfgs or {}).get(best_row["run"], cfg), out, command, trained)
    table = render_table(rows, a.tree_budget)
    rule = (f"best = highest expected speedup = tokens per step / (1 + {verify_cost:.4g} x tree nodes + heads' weights "
            f"/ model's weights), the verification cost per node from {cost_source}; the heads' cost (ResBlocks and an "
            f"H x draft-vocabulary output layer each, read every step) "
            + (f"relative to the model's {params:,} parameters" if params else
               "not counted (the model is not at hand)"))
    summary = {"best": {"variant": best_row["variant"], "label": best_row["label"],
                        "num_heads": best_row["num_heads"], "tree": best_opt["name"], "nodes": best_opt["nodes"],
                        "tokens_per_step": best_opt["tokens_per_step"],
                        "tokens_per_step_ci": best_opt["tokens_per_step_ci"],
                        "per_position_acceptance": best_opt["per_position_acceptance"],
                        "per_position_acceptance_ci": best_opt["per_position_acceptance_ci"],
                        "expected_speedup": best_opt["expected_speedup"], "scored_on": scored_on(cfg, a),
                        "rule": rule,
                        **({"categories": best_row["categories"]} if best_row.get("categories") else {})},
               "verify_cost_per_node": verify_cost,
               "results": [{k: v for k, v in r.items() if k != "trees"} |
                           {"trees": {n: {kk: vv for kk, vv in t.items() if kk != "tree"}
                                      for n, t in r["trees"].items()}} for r in rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    caption = describe(cfg, rows)
    warning = separation_warning(rows, best_row, best_opt, bool(a.heldout_prompts))
    (out / "report.md").write_text(report_md(rows, cfg, a, (best_row, best_opt), (caption, table, rule, warning),
                                             run_cfgs or {}))
    plot_note = plot(rows, a.tree_budget, out / "acceptance.png", caption)
    if len({r["draft_vocab_size"] for r in rows}) > 1:
        plot_note = plot_vocab(rows, a.tree_budget, out / "vocab.png") or plot_note
    if a.data_fraction:
        plot_note = plot_curve(rows, a.tree_budget, out / "data.png") or plot_note
    from .card import write_card

    (out / "best" / "eval.json").write_text(json.dumps(summary["best"], indent=2))
    write_card(out / "best", fmt="heads", results=summary["best"])
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)  # again: its card now has the results
    print(table)
    if warning:
        print(f"warning: {warning}")
    print(f"\nbest: {best_row['label']}, {best_row['num_heads']} heads, {best_opt['name']} ({rule})")
    outputs = [out / n for n in ("report.md", "results.json", "acceptance.png", "best", "best-vllm", "trees")]
    outputs += [out / "vocab.png"] if len({r["draft_vocab_size"] for r in rows}) > 1 else []
    outputs += [out / "data.png"] if a.data_fraction else []
    outputs += [out / "heldout"] if a.heldout_prompts else []
    print("outputs: " + ", ".join(map(str, outputs)))
    if plot_note:
        print(plot_note)
    return summary


def report_md(rows: list[dict], cfg: TrainConfig, a: AblateConfig, best: tuple[dict, dict], text: tuple,
              run_cfgs: dict[str, TrainConfig]) -> str:
    """``report.md``: what was scored and how, the table, the sweeps' tables, measured decoding, the best and why."""
    (best_row, best_opt), (caption, table, rule, warning) = best, text
    budgets, H = a.tree_budget, Cache(cfg.cache).hidden_size
    return (
        f"# Ablation on {cfg.cache}\n\n{caption}\n\nScored on {scored_on(cfg, a)}. {COLUMNS}"
        + (" With --heldout-prompts, trees are fitted on the validation split of the training cache (when there is "
           "one) and reported on all held-out prompts." if a.heldout_prompts else "")
        + f"\n\n{table}\n\n"
        + (f"Per category (best variant, {best_row['num_heads']} heads, chain):\n\n"
           f"{category_table(best_row['categories'])}\n\n" if best_row.get("categories") else "")
        + (vocab_table(rows, H) + "\n\n" if len({r["draft_vocab_size"] for r in rows}) > 1 else "")
        + (curve_table(rows, budgets) + "\n\nSlope per doubling: the least-squares slope of tokens per step against "
           "log2(training tokens), 95% interval from the t distribution over the fractions; `data.png` plots the "
           "curve.\n\n" if a.data_fraction else "")
        + (recipe_table(a, run_cfgs, rows) + "\n\n" if a.recipe else "")
        + (measured_table(rows) + "\n\n" if a.speculate_prompts else "")
        + f"**Best: {best_row['label']}, {best_row['num_heads']} heads, {best_opt['name']}** "
        f"({best_opt['tokens_per_step']:.3f} tokens per step, per-position acceptance "
        f"{best_opt['per_position_acceptance']:.3f}, expected speedup {best_opt['expected_speedup']:.3f}). "
        f"Rule: {rule}.\n\n" + (f"> **Warning:** {warning}\n\n" if warning else "")
        + "Heads in `best/` (its tree in `best/tree.json`, model card `best/README.md`), vLLM layout in "
        "`best-vllm/`, all fitted trees in `trees/`, plot `acceptance.png`"
        + (", the held-out answers and their cache in `heldout/`" if a.heldout_prompts else "") + ".\n")


RECIPE_KEYS = ("lr", "schedule", "warmup_ratio", "max_grad_norm", "head_loss_weights", "init_from_lm_head", "distill",
               "distill_weight", "epochs", "weight_decay")


def recipe_table(a: AblateConfig, run_cfgs: dict[str, TrainConfig], rows: list[dict]) -> str:
    """Every recipe's training options as they ran (the file's options over the flags), one row per recipe: the
    config of the run a result row of that recipe names (never parsed back from a run's name)."""
    from .recipes import recipe_path

    lines = ["Recipes (each one run; options as trained):", "", "| recipe | file | " + " | ".join(RECIPE_KEYS) + " |",
             "|---|---|" + "---|" * len(RECIPE_KEYS)]
    for name in a.recipe or []:
        stem = Path(name).stem
        c = next(run_cfgs[r["run"]] for r in rows if r["recipe"] == stem)
        lines.append(f"| {stem} | `{recipe_path(name)}` | "
                     + " | ".join(str(getattr(c, k)) if getattr(c, k) is not None else "-" for k in RECIPE_KEYS) + " |")
    return "\n".join(lines)


class _Trained:
    """The heads of a row: from memory when the ablation holds them, else read from the row's directory."""

    def __init__(self, held: dict):
        self.held = held

    def __call__(self, row: dict):
        hv, mapping = self.held[row["dir"]] if row["dir"] in self.held else load_heads(row["dir"])[:2]
        return hv.first(row["num_heads"]), mapping


def write_best(best_row: dict, best_opt: dict, cfg: TrainConfig, out: Path, command: str | None, trained: _Trained
               ) -> None:
    """``best/``: the first heads of the chosen variant, their provenance and tree; ``best-vllm/``: its export."""
    hv, mapping = trained(best_row)
    (out / "best").mkdir(exist_ok=True)
    chosen = replace(cfg, num_heads=best_row["num_heads"], num_layers=best_row["layers"], lr=best_row["lr"],
                     draft_vocab_size=best_row["draft_vocab_size"])
    save_heads(hv, cache_for(cfg, mapping), chosen, out / "best",
               command=(command + f"  # best/: the first {best_row['num_heads']} heads of variant "
                        f"{best_row['variant']}") if command else None)
    (out / "best" / "tree.json").write_text(json.dumps(best_opt["tree"]))
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)


def verification_cost(rows: list[dict], cfg: TrainConfig, a: AblateConfig, model: str | None, out: Path,
                      trained: _Trained) -> tuple[float, str]:
    """(cost per tree node relative to a one-token step, where it came from): --verify-cost, else measured by real
    decoding (--speculate-prompts: the median over runs), else timed with the cache's model."""
    if a.speculate_prompts:
        measure(rows, out, cfg, model, a.speculate_prompts, a.speculate_tokens, a.verify_cost, trained)
        measured = [m for r in rows for m in [r.get("measured")] if m and m["nodes"]]
        if a.verify_cost is None and measured:
            return (max(0.0, float(np.median([(m["step_cost_ratio"] - 1) / m["nodes"] for m in measured]))),
                    f"measured by speculate on this machine ({len(measured)} runs, median)")
    if a.verify_cost is not None:
        return a.verify_cost, "--verify-cost"
    return timed_verify_cost(model, cfg.device, max(a.tree_budget, default=16))


def cache_for(cfg: TrainConfig, mapping) -> Cache:
    """The training cache read with ``mapping`` (re-mapped when the heads trained with another vocabulary)."""
    c = Cache(cfg.cache)
    return c if c.mapping().fingerprint() == mapping.fingerprint() else c.remap(mapping)


def options(r: dict, verify_cost: float) -> list[dict]:
    """The chain and each fitted tree of a row, with the expected speedup under the cost model: tokens per decoding
    step over the cost of one step."""
    opts = [{"name": "chain", "nodes": r["num_heads"], "tokens_per_step": r["chain_tokens_per_step"],
             "tokens_per_step_ci": r["chain_tokens_per_step_ci"], "per_position_acceptance": r["chain_acceptance"],
             "per_position_acceptance_ci": r["chain_ci"], "tree": [list(p) for p in chain(r["num_heads"])]}]
    opts += [{"name": f"tree{n}", "nodes": t["nodes"], "tokens_per_step": t["tokens_per_step"],
              "tokens_per_step_ci": t["tokens_per_step_ci"], "per_position_acceptance": t["acceptance"],
              "per_position_acceptance_ci": t["ci"], "tree": t["tree"]} for n, t in r["trees"].items()]
    for o in opts:
        o["expected_speedup"] = round(o["tokens_per_step"] / (1 + verify_cost * o["nodes"] + r.get("head_cost", 0.0)),
                                      4)
    return opts


def scored_on(cfg: TrainConfig, a: AblateConfig) -> str:
    if a.heldout_prompts:
        return f"the base model's own greedy answers to {a.heldout_prompts} (--heldout-prompts)"
    if cfg.val_cache:
        return f"the held-out cache {cfg.val_cache}"
    return f"the held-out split (--val-fraction {cfg.val_fraction:g}) of {cfg.cache}"


MIN_HELDOUT_SEQUENCES = 10  # below this a bootstrap over sequences (trees: over half of them) says little


def separation_warning(rows: list[dict], best_row: dict, best_opt: dict, prompts: bool = False) -> str | None:
    n = best_row["sequences"]
    if n < MIN_HELDOUT_SEQUENCES:
        return (f"the held-out set has only {n} sequences ({best_row['positions']} positions): its 95% intervals "
                "(resampled over sequences) are not meaningful; "
                + ("give more prompts in --heldout-prompts" if prompts else
                   "hold out more with --val-fraction or pass --val-cache"))
    others = [(r, o) for r in rows for o in r["options"] if (r is not best_row or o is not best_opt)]
    if not others:
        return None
    r2, o2 = max(others, key=lambda x: x[1]["expected_speedup"])
    lo, hi = best_opt["tokens_per_step_ci"]
    lo2, hi2 = o2["tokens_per_step_ci"]
    if lo2 <= hi and lo <= hi2:  # the two intervals share a point
        return (f"the held-out set ({best_row['sequences']} sequences, {best_row['positions']} positions) is too small "
                f"to separate the best ({best_row['label']}, {best_row['num_heads']} heads, "
                f"{best_opt['name']}: {best_opt['tokens_per_step']:.3f} tokens per step [{lo:.2f}, {hi:.2f}]) from the "
                f"runner-up ({r2['label']}, {r2['num_heads']} heads, {o2['name']}: "
                f"{o2['tokens_per_step']:.3f} [{lo2:.2f}, {hi2:.2f}]): their 95% intervals overlap")
    return None


def describe(cfg: TrainConfig, rows: list[dict]) -> str:
    c = Cache(cfg.cache)
    counts = c.meta.counts
    return (f"Model {c.meta.dump_args.get('model')}; data {', '.join(c.meta.data_files)} "
            f"({counts.get('tokens', c.n_tokens):,} tokens, {counts.get('assistant_tokens', 0):,} trained); "
            f"{cfg.epochs} epochs; held out: {rows[0]['sequences']} sequences, {rows[0]['positions']:,} positions.")


def measure(rows: list[dict], out: Path, cfg: TrainConfig, model: str | None, prompts: str, tokens: int,
            verify_cost: float | None, trained: _Trained) -> None:
    """Real decoding (``speculate``) of each variant x head count with its best tree under the cost model."""
    from .speculate import SpeculateConfig, run_speculate

    if not model:
        raise UserError("--speculate-prompts: the cache does not record the model it was dumped with")
    cost = verify_cost if verify_cost is not None else timed_verify_cost(model, cfg.device, 16)[0]
    for r in progress(rows, "ablate: speculate", "run"):
        o = max(options(r, cost), key=lambda x: x["expected_speedup"])
        d = out / "speculate" / f"{r['variant']}_heads{r['num_heads']}"
        hv, mapping = trained(r)
        d.mkdir(parents=True, exist_ok=True)
        save_heads(hv, cache_for(cfg, mapping), cfg, d)
        (d / "tree.json").write_text(json.dumps(o["tree"]))
        res = run_speculate(SpeculateConfig(model=model, heads=str(d), prompts=prompts, tree=str(d / "tree.json"),
                                            max_new_tokens=tokens, device=cfg.device))
        r["measured"] = {"tree": o["name"], "nodes": o["nodes"], "tokens_per_step": res["tokens_per_step"],
                         "speedup": res["speedup"], "step_cost_ratio": res["step_cost_ratio"],
                         "identical_to_greedy": res["identical_to_greedy"]}
