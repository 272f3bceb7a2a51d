"""``medusa-cache ablate``: every head count, layer count and learning rate from one pass over the cache.

Head counts cost one run. In Medusa-1 the heads share nothing but the global gradient-norm clip. Ablation
mode clips each head by its own norm (``clip_per_head``) and initialises head i from (seed, i) alone, so
head i's trajectory does not depend on how many heads train beside it: the K-head model is exactly the
first K heads of the largest run (a test checks it bit for bit; with ``--mix positions`` the batches are the same
for every head count up to 8, ``traindata.mix_reach``). Note the per-head clip differs from the
reference's global clip; with max_grad_norm 0.5 both rarely bind after warmup.

Other axes (layers, lr) are variants trained side by side on the same batches, so each batch is read
from the store once; draft vocabularies, data fractions and recipes are separate runs (``plan_runs``). Every variant x
head count is then scored by the tokens per step decoding realises (``acceptance``) on the held-out split or on the
model's own answers to ``--heldout-prompts``, and the best is chosen and reported (``ablate_report``).
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .ablate_plots import label
from .ablate_report import report
from .ablateconfig import AblateConfig
from .acceptance import write_trees
from .config import flag
from .errors import UserError
from .evaluate import evaluate_ranks, head_ranks
from .progress import progress
from .store import Cache, require_complete
from .train import TrainConfig, train
from .traindata import heldout_coverage
from .vocab import coverage


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
    train_cache = Cache(cfg.cache)
    counts = train_cache.stored("token_counts")
    heldout = None
    if a.heldout_prompts:
        from .heldout import answer_cache

        heldout = answer_cache(heldout_model(cfg, a), a.heldout_prompts, out / "heldout", cfg.cache, a.heldout_tokens,
                               device=cfg.device)
    held: dict[str, tuple[Cache, Cache | None]] = {}  # scored and tree-fitting caches, opened once per vocabulary
    for run, (name, la, lr), result in progress(jobs, "ablate: evaluate", "variant"):
        d = Path(run.cfg.out) / "variants" / name  # written there by train; evaluated from memory
        hv, mapping = result["heads"][name], result["mapping"]
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
        tokens = trained_tokens(train_cache, run.cfg)  # once per variant, not per head count
        for k in sorted(set(heads)):
            res = {"variant": name, "run": run.name, "layers": la, "lr": lr, "recipe": run.recipe,
                   "data_fraction": run.cfg.data_fraction, "train_tokens": tokens,
                   "dir": str(d), "draft_vocab_size": mapping.draft_size, "coverage": cover,
                   **evaluate_ranks(r, k, topk, budgets, categories=heldout and heldout.categories,
                                                       fit=fit, questions=heldout and heldout.questions)}
            res["label"] = label(res)
            write_trees(res, out / "trees", f"{name}_heads{k}_tree")
            rows.append(res)
    trained = {str(Path(run.cfg.out) / "variants" / name): (res["heads"][name], res["mapping"])
               for run, (name, _, _), res in jobs}
    return report(rows, cfg, a, out, command, {r.name: r.cfg for r in runs}, trained)


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
    c = np.concatenate([[0], np.cumsum(cache.array("loss_mask"), dtype=np.int64)])
    return int((c[cache.offsets[seqs + 1]] - c[cache.offsets[seqs]]).sum())


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
        require_complete(vc, cfg.allow_partial)
        if len(vc.usable_seqs(cfg.allow_partial, warn=False)) == 0:
            raise UserError(f"--val-cache: {cfg.val_cache} has no usable sequences to evaluate on")
    else:
        require_complete(c, cfg.allow_partial)
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


