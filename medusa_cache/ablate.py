"""``medusa-cache ablate``: every head count, layer count and learning rate from one pass over the cache.

Head counts cost one run. In Medusa-1 the heads share nothing but the global gradient-norm clip. Ablation
mode clips each head by its own norm (``clip_per_head``) and initialises head i from (seed, i) alone, so
head i's trajectory does not depend on how many heads train beside it: the K-head model is exactly the
first K heads of the largest run (a test checks it bit for bit; with ``--mix positions`` the batches are the same
for every head count up to 8, ``train.mix_reach``). Note the per-head clip differs from the
reference's global clip; with max_grad_norm 0.5 both rarely bind after warmup.

Other axes (layers, lr) are variants trained side by side on the same batches, so each batch is read
from the store once. Every variant x head count is then evaluated on the held-out split (chain and
fitted-tree acceptance, see ``evaluate``), and the best variant's heads are written out.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .ablate_plots import curve_table, label, measured_table, plot, plot_curve, plot_vocab, vocab_table
from .backbone import model_parameters, timed_verify_cost
from .config import check, flag
from .errors import UserError
from .evaluate import COLUMNS, category_table, evaluate_ranks, head_ranks, render_table, write_trees
from .export import export
from .headsdir import load_heads, save_heads
from .progress import progress
from .store import Cache
from .train import TrainConfig, train
from .traindata import heldout_coverage
from .vocab import coverage


@dataclass
class AblateConfig:
    """What ``medusa-cache ablate`` varies and how it chooses (every other flag is ``TrainConfig``'s), e.g.
    medusa-cache ablate --cache c.zarr --out abl --heads 1,2,3,4,5 --layers 1,2 --tree-budget 16,32,64 --epochs 2"""

    heads: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """head counts"""
    layers: list[int] | None = None
    """ResBlocks per head (default: the config's num_layers, else 1)"""
    lr: list[float] | None = None
    """learning rates (default: the config's lr, else 1e-4)"""
    tree_budget: list[int] = field(default_factory=lambda: [16, 32, 64])
    """tree sizes"""
    draft_vocab: list[int] | None = None
    """draft vocabulary sizes to sweep, e.g. 8000,16000,32000: each re-mapped from this one cache (train
    --draft-vocab-size), every size x head count in one report (default: the cache's)"""
    data_fraction: list[float] | None = None
    """fractions of the training sequences, e.g. 0.125,0.25,0.5,1: nested seeded subsets (train --data-fraction),
    each trained with the same recipe and epochs; the learning curve in data.png and the report"""
    recipe: list[str] | None = None
    """training recipes to compare, names in configs/recipes/ (reference, medusa1, distill) or JSON files of train
    options; one run each"""
    topk: int = 10
    """top-k predictions per head considered for trees"""
    verify_cost: float | None = None
    """cost of verifying one tree node relative to a one-token step, for the cost-aware choice of the best (default:
    measured by --speculate-prompts, else timed with the cache's model on --device)"""
    speculate_prompts: str | None = None
    """prompts file: also decode for real (speculate) with each head count's best tree and report measured tokens per
    step and speedup"""
    speculate_tokens: int = 128
    """new tokens per prompt for --speculate-prompts"""
    heldout_prompts: str | None = None
    """prompts or Spec-Bench / MT-Bench question file: the base model (--model) answers them greedily once, and every
    variant is scored by the tokens per step decoding realises on those answers (trees fitted on the validation split
    when there is one), instead of on the validation split of the training conversations"""
    model: str | None = None
    """base model for --heldout-prompts (default: the model the cache was dumped from)"""
    heldout_tokens: int = 256
    """--heldout-prompts: tokens generated per prompt or turn (as speculate --max-new-tokens)"""

    def __post_init__(self) -> None:
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        check(self.speculate_tokens >= 1, "speculate_tokens", f"must be >= 1, got {self.speculate_tokens}")
        check(self.heldout_tokens >= 1, "heldout_tokens", f"must be >= 1, got {self.heldout_tokens}")
        check(bool(self.heads) and min(self.heads) >= 1, "heads", f"give head counts >= 1, got {self.heads}")
        check(self.layers is None or (bool(self.layers) and min(self.layers) >= 1), "layers",
              f"give layer counts >= 1, got {self.layers}")
        check(self.lr is None or (bool(self.lr) and min(self.lr) > 0), "lr",
              f"give positive learning rates, got {self.lr}")
        check(all(b >= 1 for b in self.tree_budget), "tree_budget", f"budgets must be >= 1, got {self.tree_budget}")
        check(self.verify_cost is None or self.verify_cost >= 0, "verify_cost", f"must be >= 0, got {self.verify_cost}")
        check(self.draft_vocab is None or (bool(self.draft_vocab) and len(set(self.draft_vocab)) == len(
            self.draft_vocab) and min(self.draft_vocab) >= 1), "draft_vocab", f"give distinct sizes >= 1, got "
              f"{self.draft_vocab}")
        f = self.data_fraction
        check(f is None or (bool(f) and len(set(f)) == len(f) and all(0 < x <= 1 for x in f)), "data_fraction",
              f"give distinct fractions in (0, 1], got {f}")
        check(self.recipe is None or (bool(self.recipe) and len(set(self.recipe)) == len(self.recipe)), "recipe",
              f"give distinct recipe names, got {self.recipe}")


def run_ablate(cfg: TrainConfig, a: AblateConfig) -> dict:
    """Train every variant once (each head count is a prefix of the largest), evaluate, choose, report.

    ``a.draft_vocab``: draft vocabulary sizes, each re-mapped from the one cache (``train --draft-vocab-size``): one
    training run per size (its variants side by side, head counts exact prefixes as without it), all in one report.
    ``a.layers``/``a.lr`` default to the train config's one value.
    """
    lr_given = a.lr is not None
    layers, lrs = a.layers or [cfg.num_layers], a.lr or [cfg.lr]
    heads = a.heads
    a = replace(a, layers=layers, lr=lrs)
    check_request(cfg, a)
    command = ablate_command(cfg, a)
    cfg = replace(cfg, num_heads=max(heads), clip_per_head=True)
    runs = plan_runs(cfg, a, lr_given)
    from . import dist
    from .store import WriterLock

    rank0 = not dist.active() or torch.distributed.get_rank() == 0
    # one writer for the whole ablation: training, evaluation, report (rank 0 holds it, as train does)
    lock = WriterLock(cfg.out, "ablate") if rank0 else None
    try:
        summary = _ablate(cfg, a, runs, command, rank0, locked=lock is not None)
    except BaseException:
        if lock is not None:
            lock.release(failed=True)
        raise
    if lock is not None:
        lock.release()
    return summary


def _ablate(cfg: TrainConfig, a: AblateConfig, runs: list[AblationRun], command: str, rank0: bool,
            locked: bool) -> dict:
    """Train the runs, evaluate every variant x head count, report (``run_ablate`` holds the lock)."""
    heads, topk, budgets = a.heads, a.topk, a.tree_budget
    out = Path(cfg.out)
    separate = len(runs) > 1 or bool(a.draft_vocab or a.data_fraction or a.recipe)
    if separate and rank0:
        from .rundir import claim

        claim(out, kind="ablate", overwrite=cfg.overwrite, resume=cfg.resume,
              inputs={"--cache": cfg.cache, "--val-cache": cfg.val_cache})
    from .checkpoint import CHECKPOINT

    # --resume: each run continues from its checkpoint; a run that had not started yet starts now
    results = [train(replace(r.cfg, resume=r.cfg.resume and (Path(r.cfg.out) / CHECKPOINT).exists()), r.specs,
                     kind="train" if separate else "ablate", locked=locked and not separate, command="ablate")
               for r in runs]
    if not rank0:
        return {}  # under torchrun the ranks train together; rank 0 evaluates and reports
    rows = []
    jobs = [(run, spec, res) for run, res in zip(runs, results, strict=True) for spec in run.specs]
    counts = Cache(cfg.cache).stored("token_counts")
    heldout = None
    if a.heldout_prompts:
        from .heldout import answer_cache

        heldout = answer_cache(heldout_model(cfg, a), a.heldout_prompts, out / "heldout", cfg.cache, a.heldout_tokens,
                               device=cfg.device)
    held: dict[str, tuple[Cache, Cache | None]] = {}  # scored and tree-fitting caches, opened once per vocabulary
    train_cache = Cache(cfg.cache)
    for run, (name, la, lr), result in progress(jobs, "ablate: evaluate", "variant"):
        d = Path(run.cfg.out) / "variants" / name
        hv, mapping, _ = load_heads(d)
        key = mapping.fingerprint()
        if key not in held:
            held[key] = (_mapped(heldout.cache if heldout else cfg.val_cache or cfg.cache, mapping),
                         _mapped(cfg.cache, mapping) if heldout and len(result["val_seqs"]) else None)
        cache, fit_cache = held[key]
        if heldout or cfg.val_cache:
            val = cache.usable_seqs(cfg.allow_partial, warn=False)
        else:
            val = result["val_seqs"]
        r = head_ranks(hv, cache, val, topk, cfg.device)
        fit = head_ranks(hv, fit_cache, result["val_seqs"], topk, cfg.device) if fit_cache is not None else None
        n = mapping.draft_size
        cover = {"cache": round(coverage(counts, [n])[n], 4),
                 "heldout": round(heldout_coverage(cache, mapping, val), 4)}
        for k in sorted(set(heads)):
            res = {"variant": name, "run": run.name, "layers": la, "lr": lr, "recipe": run.recipe,
                   "data_fraction": run.cfg.data_fraction, "train_tokens": trained_tokens(train_cache, run.cfg),
                   "dir": str(d), "draft_vocab_size": mapping.draft_size, "coverage": cover,
                   **evaluate_ranks(r, k, topk, budgets, categories=heldout and heldout.categories,
                                                       fit=fit, questions=heldout and heldout.questions)}
            res["label"] = label(res)
            write_trees(res, out / "trees", f"{name}_heads{k}_tree")
            rows.append(res)
    return report(rows, cfg, a, out, command, {r.name: r.cfg for r in runs})


@dataclass
class AblationRun:
    """One training run of an ablation: its config (recipe, data fraction, draft vocabulary applied) and the
    variants (name, layers, lr) it trains side by side."""

    name: str
    cfg: TrainConfig
    specs: list[tuple[str, int, float]]
    recipe: str | None = None


def plan_runs(cfg: TrainConfig, a: AblateConfig, lr_given: bool) -> list[AblationRun]:
    """One run per recipe x data fraction x draft vocabulary (a single run without them), each in ``OUT/runs/NAME``
    when there are several; a recipe's own lr is used unless --lr was given."""
    from .recipes import apply_recipe, load_recipe

    out, runs = Path(cfg.out), []
    model = a.model or Cache(cfg.cache).meta.dump_args.get("model")
    for recipe in a.recipe or [None]:
        rc = apply_recipe(cfg, load_recipe(recipe), model) if recipe else cfg
        lrs = a.lr if (lr_given or not recipe) else [rc.lr]
        for f in a.data_fraction or [None]:
            for n in a.draft_vocab or [None]:
                name = "_".join(p for p in (recipe and f"R{Path(recipe).stem}", f and f"F{f:g}", n and f"V{n}") if p)
                c = replace(rc, draft_vocab_size=n or rc.draft_vocab_size, data_fraction=f or 1.0)
                if name:
                    c = replace(c, out=str(out / "runs" / name), overwrite=False)
                specs = [(f"{name + '_' if name else ''}L{la}_lr{lr:g}", la, lr) for la in a.layers for lr in lrs]
                runs.append(AblationRun(name or "main", c, specs, recipe and Path(recipe).stem))
    return runs


def trained_tokens(cache: Cache, cfg: TrainConfig) -> int:
    """Assistant tokens in the run's training sequences (its data fraction of what the held-out split leaves)."""
    from .traindata import split

    seqs, _ = split(cache, cfg)
    mask, off = cache.array("loss_mask"), cache.offsets
    return int(sum(int(mask[off[s]:off[s + 1]].sum()) for s in seqs))


def _mapped(path: str, mapping) -> Cache:
    c = Cache(path)
    return c if c.mapping().fingerprint() == mapping.fingerprint() else c.remap(mapping)


def heldout_model(cfg: TrainConfig, a: AblateConfig) -> str:
    """--model, else the model the cache was dumped from (refused by name when neither is a model directory)."""
    model = a.model or Cache(cfg.cache).meta.dump_args.get("model")
    if not model or not Path(model, "config.json").exists():
        raise UserError(f"--model: --heldout-prompts needs the base model that answers them; the cache was dumped "
                        f"from {model!r}, not a model directory here: pass --model PATH")
    return model


def ablate_command(cfg: TrainConfig, a: AblateConfig) -> str:
    """The ``medusa-cache ablate`` call that gives these settings (the provenance of the heads it writes)."""
    from .headsdir import command_line

    train_defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                      if f.default is not dataclasses.MISSING}
    base = command_line("ablate", dataclasses.asdict(cfg), train_defaults,
                        skip=("resume", "overwrite", "num_heads", "num_layers", "lr", "clip_per_head"))
    own = dataclasses.asdict(a)
    for name in ("draft_vocab", "verify_cost", "speculate_prompts", "heldout_prompts", "model", "data_fraction",
                 "recipe"):
        if own[name] is None:
            del own[name]
    if "speculate_prompts" not in own:
        del own["speculate_tokens"]
    if "heldout_prompts" not in own:
        del own["heldout_tokens"]
    words = [w for name, v in own.items() for w in (flag(name), ",".join(f"{x:g}" if isinstance(x, float) else str(x)
                                                                         for x in v) if isinstance(v, list) else
                                                      f"{v:g}" if isinstance(v, float) else str(v))]
    return base + " " + shlex.join(words)


def check_request(cfg: TrainConfig, a: AblateConfig) -> None:
    """Every refusal before any training (a mistake found after hours of training costs the hours); the flags alone
    are checked by ``AblateConfig``."""
    c = Cache(cfg.cache)
    if a.draft_vocab is not None:
        if max(a.draft_vocab) > c.meta.vocab_size:
            raise UserError(f"--draft-vocab: give distinct sizes in 1..{c.meta.vocab_size} (the model's vocabulary), "
                            f"got {a.draft_vocab}")
        if cfg.draft_vocab_size is not None:
            raise UserError("--draft-vocab: pass the sizes to sweep there, not --draft-vocab-size as well")
    if a.speculate_prompts and not Path(a.speculate_prompts).is_file():
        raise UserError(f"--speculate-prompts: file not found: {a.speculate_prompts}")
    if a.data_fraction is not None:
        if cfg.data_fraction != 1.0:
            raise UserError("--data-fraction: pass the fractions to sweep as a list there, not a single value as well")
        check_fractions(c, cfg, a.data_fraction)
    for name in a.recipe or []:  # every file read and checked now, not after the first recipe's training
        from .recipes import apply_recipe, load_recipe

        apply_recipe(cfg, load_recipe(name), a.model or c.meta.dump_args.get("model"))
    if a.heldout_prompts:
        from .heldout import read_prompts

        if cfg.val_cache:
            raise UserError("--heldout-prompts: give it or --val-cache, not both (both would be the held-out data)")
        read_prompts(a.heldout_prompts, flag="--heldout-prompts")  # a bad file is refused before training
        heldout_model(cfg, a)
    elif cfg.val_fraction <= 0 and not cfg.val_cache:
        raise UserError("--val-fraction: ablate needs held-out data (a fraction > 0, --val-cache or "
                        "--heldout-prompts)")
    c.require_reach(max(a.heads), "--heads")
    if cfg.val_cache:  # something to hold out (else it would fail only after training)
        vc = Cache(cfg.val_cache)
        vc.require_compatible(c.meta.fingerprints.get("model"), c.hidden_size, max(a.heads), f"--cache {cfg.cache}",
                              "--val-cache", "--heads")
        vc.require_complete(cfg.allow_partial)
        if len(vc.usable_seqs(cfg.allow_partial, warn=False)) == 0:
            raise UserError(f"--val-cache: {cfg.val_cache} has no usable sequences to evaluate on")
    else:
        c.require_complete(cfg.allow_partial)
        n = len(c.usable_seqs(cfg.allow_partial, warn=False))
        if n < 2 and not a.heldout_prompts:
            raise UserError(f"--val-fraction: {cfg.cache} has {n} usable sequences; holding out {cfg.val_fraction} "
                            "of them leaves none to evaluate on: give a larger --val-fraction or a --val-cache")
    model = c.meta.dump_args.get("model")
    if a.verify_cost is None and not a.speculate_prompts and not (model and Path(model, "config.json").exists()):
        raise UserError(f"--verify-cost: the expected speedup needs the verification cost per tree node, timed with "
                        f"the cache's model ({model!r}, not a model directory here): pass --verify-cost C (relative "
                        "to a one-token step) or --speculate-prompts FILE to measure it by real decoding")


def check_fractions(c: Cache, cfg: TrainConfig, fractions: list[float]) -> None:
    """Each data fraction must hold at least one batch (--batch-tokens tokens, else --batch-size sequences)."""
    from .traindata import split

    for f in sorted(fractions):
        seqs, _ = split(c, replace(cfg, data_fraction=f))
        tokens = int(sum(int(c.offsets[s + 1] - c.offsets[s]) for s in seqs))
        if (cfg.batch_tokens and tokens < cfg.batch_tokens) or (not cfg.batch_tokens and len(seqs) < cfg.batch_size):
            need = f"{cfg.batch_tokens} tokens (--batch-tokens)" if cfg.batch_tokens else \
                f"{cfg.batch_size} sequences (--batch-size)"
            raise UserError(f"--data-fraction: {f:g} of the training sequences is {len(seqs)} sequences, {tokens} "
                            f"tokens: less than one batch of {need}; give larger fractions")


def report(rows: list[dict], cfg: TrainConfig, a: AblateConfig, out: Path, command: str | None = None,
           run_cfgs: dict[str, TrainConfig] | None = None) -> dict:
    """Measured decoding (optional), the cost-aware choice, best/ and its card, report.md, results.json, plot."""
    train_cache = Cache(cfg.cache)
    model, H = train_cache.meta.dump_args.get("model"), train_cache.hidden_size
    budgets, speculate_prompts = a.tree_budget, a.speculate_prompts
    verify_cost, cost_source = verification_cost(rows, cfg, a, model, out)
    params = model_parameters(model)
    for r in rows:
        r["head_cost"] = round(r["num_heads"] * (r["layers"] * (H * H + H) + H * r["draft_vocab_size"]) / params, 5) \
            if params else 0.0
        r["options"] = options(r, verify_cost)
    best_row, best_opt = max(((r, o) for r in rows for o in r["options"]), key=lambda x: x[1]["expected_speedup"])
    write_best(best_row, best_opt, (run_cfgs or {}).get(best_row["run"], cfg), out, command)
    table = render_table(rows, budgets)
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
    (out / "report.md").write_text(
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
        + (recipe_table(a, run_cfgs or {}) + "\n\n" if a.recipe else "")
        + (measured_table(rows) + "\n\n" if speculate_prompts else "")
        + f"**Best: {best_row['label']}, {best_row['num_heads']} heads, {best_opt['name']}** "
        f"({best_opt['tokens_per_step']:.3f} tokens per step, per-position acceptance "
        f"{best_opt['per_position_acceptance']:.3f}, expected speedup {best_opt['expected_speedup']:.3f}). "
        f"Rule: {rule}.\n\n" + (f"> **Warning:** {warning}\n\n" if warning else "")
        + "Heads in `best/` (its tree in `best/tree.json`, model card `best/README.md`), vLLM layout in "
        "`best-vllm/`, all fitted trees in `trees/`, plot `acceptance.png`"
        + (", the held-out answers and their cache in `heldout/`" if a.heldout_prompts else "") + ".\n")
    plot_note = plot(rows, budgets, out / "acceptance.png", caption)
    if len({r["draft_vocab_size"] for r in rows}) > 1:
        plot_note = plot_vocab(rows, budgets, out / "vocab.png") or plot_note
    if a.data_fraction:
        plot_note = plot_curve(rows, budgets, out / "data.png") or plot_note
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


RECIPE_KEYS = ("lr", "schedule", "warmup_ratio", "max_grad_norm", "head_loss_weights", "init_from_lm_head", "distill",
               "distill_weight", "epochs", "weight_decay")


def recipe_table(a: AblateConfig, run_cfgs: dict[str, TrainConfig]) -> str:
    """Every recipe's training options as they ran (the file's options over the flags), one row per recipe."""
    from .recipes import recipe_path

    lines = ["Recipes (each one run; options as trained):", "", "| recipe | file | " + " | ".join(RECIPE_KEYS) + " |",
             "|---|---|" + "---|" * len(RECIPE_KEYS)]
    for name in a.recipe or []:
        stem = Path(name).stem
        c = next(c for n, c in run_cfgs.items() if n.split("_")[0] == f"R{stem}")
        lines.append(f"| {stem} | `{recipe_path(name)}` | "
                     + " | ".join(str(getattr(c, k)) if getattr(c, k) is not None else "-" for k in RECIPE_KEYS) + " |")
    return "\n".join(lines)


def write_best(best_row: dict, best_opt: dict, cfg: TrainConfig, out: Path, command: str | None) -> None:
    """``best/``: the first heads of the chosen variant, their provenance and tree; ``best-vllm/``: its export."""
    hv, mapping, _ = load_heads(best_row["dir"])
    hv.heads = hv.heads[: best_row["num_heads"]]
    (out / "best").mkdir(exist_ok=True)
    chosen = replace(cfg, num_heads=best_row["num_heads"], num_layers=best_row["layers"], lr=best_row["lr"],
                     draft_vocab_size=best_row["draft_vocab_size"])
    save_heads(hv, cache_for(cfg, mapping), chosen, out / "best",
               command=(command + f"  # best/: the first {best_row['num_heads']} heads of variant "
                        f"{best_row['variant']}") if command else None)
    (out / "best" / "tree.json").write_text(json.dumps(best_opt["tree"]))
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)


def verification_cost(rows: list[dict], cfg: TrainConfig, a: AblateConfig, model: str | None, out: Path
                      ) -> tuple[float, str]:
    """(cost per tree node relative to a one-token step, where it came from): --verify-cost, else measured by real
    decoding (--speculate-prompts: the median over runs), else timed with the cache's model."""
    if a.speculate_prompts:
        measure(rows, out, cfg, model, a.speculate_prompts, a.speculate_tokens, a.verify_cost)
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
             "per_position_acceptance_ci": r["chain_ci"], "tree": [[0] * d for d in range(1, r["num_heads"] + 1)]}]
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
            verify_cost: float | None) -> None:
    """Real decoding (``speculate``) of each variant x head count with its best tree under the cost model."""
    from .speculate import SpeculateConfig, run_speculate

    if not model:
        raise UserError("--speculate-prompts: the cache does not record the model it was dumped with")
    cost = verify_cost if verify_cost is not None else timed_verify_cost(model, cfg.device, 16)[0]
    for r in progress(rows, "ablate: speculate", "run"):
        o = max(options(r, cost), key=lambda x: x["expected_speedup"])
        d = out / "speculate" / f"{r['variant']}_heads{r['num_heads']}"
        hv, mapping, _ = load_heads(r["dir"])
        hv.heads = hv.heads[: r["num_heads"]]
        d.mkdir(parents=True, exist_ok=True)
        save_heads(hv, cache_for(cfg, mapping), cfg, d)
        (d / "tree.json").write_text(json.dumps(o["tree"]))
        res = run_speculate(SpeculateConfig(model=model, heads=str(d), prompts=prompts, tree=str(d / "tree.json"),
                                            max_new_tokens=tokens, device=cfg.device))
        r["measured"] = {"tree": o["name"], "nodes": o["nodes"], "tokens_per_step": res["tokens_per_step"],
                         "speedup": res["speedup"], "step_cost_ratio": res["step_cost_ratio"],
                         "identical_to_greedy": res["identical_to_greedy"]}
