"""``medusa-cache ablate``: every head count, layer count and learning rate from one pass over the cache.

Head counts cost one run. In Medusa-1 the heads share nothing but the global gradient-norm clip. Ablation
mode clips each head by its own norm (``clip_per_head``) and initialises head i from (seed, i) alone, so
head i's trajectory does not depend on how many heads train beside it: the K-head model is exactly the
first K heads of the largest run (a test checks it bit for bit). Note the per-head clip differs from the
reference's global clip; with max_grad_norm 0.5 both rarely bind after warmup.

Other axes (layers, lr) are variants trained side by side on the same batches, so each batch is read
from the store once. Every variant x head count is then evaluated on the held-out split (chain and
fitted-tree acceptance, see ``evaluate``), and the best variant's heads are written out.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import UserError
from .evaluate import evaluate_ranks, head_ranks, render_table, write_trees
from .export import export, load_heads, save_heads
from .store import Cache
from .train import TrainConfig, train


def variant_name(layers: int, lr: float) -> str:
    return f"L{layers}_lr{lr:g}"


def run_ablate(cfg: TrainConfig, heads: list[int], layers: list[int], lrs: list[float], budgets: list[int],
               topk: int = 10) -> dict:
    if not heads or min(heads) < 1:
        raise UserError(f"--heads: give head counts >= 1, got {heads}")
    if not layers or min(layers) < 1:
        raise UserError(f"--layers: give layer counts >= 1, got {layers}")
    if not lrs or min(lrs) <= 0:
        raise UserError(f"--lr: give positive learning rates, got {lrs}")
    if any(b < 1 for b in budgets):
        raise UserError(f"--tree-budget: budgets must be >= 1, got {budgets}")
    if cfg.val_fraction <= 0 and not cfg.val_cache:
        raise UserError("--val-fraction: ablate needs held-out data (a fraction > 0, or --val-cache)")
    # check before training that there is something to hold out (else it would fail only after training)
    if cfg.val_cache:
        vc = Cache(cfg.val_cache)
        vc.require_complete(cfg.allow_partial)
        if len(vc.usable_seqs(cfg.allow_partial, warn=False)) == 0:
            raise UserError(f"--val-cache: {cfg.val_cache} has no usable sequences to evaluate on")
    else:
        c = Cache(cfg.cache)
        c.require_complete(cfg.allow_partial)
        n = len(c.usable_seqs(cfg.allow_partial, warn=False))
        if n < 2:
            raise UserError(f"--val-fraction: {cfg.cache} has {n} usable sequences; holding out {cfg.val_fraction} "
                            "of them leaves none to evaluate on: give a larger --val-fraction or a --val-cache")
    kmax = max(heads)
    cfg = replace(cfg, num_heads=kmax, clip_per_head=True)
    specs = [(variant_name(la, lr), la, lr) for la in layers for lr in lrs]
    result = train(cfg, specs)
    from . import dist

    if dist.active() and torch.distributed.get_rank() != 0:
        return {}  # under torchrun the ranks train together; rank 0 evaluates and reports
    out = Path(cfg.out)
    cache = Cache(cfg.val_cache) if cfg.val_cache else Cache(cfg.cache)
    val = cache.usable_seqs(cfg.allow_partial, warn=False) if cfg.val_cache else result["val_seqs"]
    rows = []
    for name, _, _ in tqdm(specs, desc="ablate: evaluate", unit="variant", disable=None):
        hv, _, _ = load_heads(out / "variants" / name)
        r = head_ranks(hv, cache, val, topk, cfg.device)
        for k in sorted(set(heads)):
            res = {"variant": name, **evaluate_ranks(r, k, topk, budgets)}
            write_trees(res, out / "trees", f"{name}_heads{k}_tree")
            rows.append(res)
    key_budget = str(max(budgets)) if budgets else None

    def score(r: dict) -> float:
        return r["trees"][key_budget]["acceptance"] if key_budget else r["chain_acceptance"]

    best = max(rows, key=score)
    hv, _, _ = load_heads(out / "variants" / best["variant"])
    hv.heads = hv.heads[: best["num_heads"]]
    (out / "best").mkdir(exist_ok=True)
    save_heads(hv, Cache(cfg.cache), cfg, out / "best")
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)
    table = render_table(rows, budgets)
    summary = {"best": {"variant": best["variant"], "num_heads": best["num_heads"], "score": score(best)},
               "results": [{k: v for k, v in r.items() if k != "trees"} |
                           {"trees": {n: {kk: vv for kk, vv in t.items() if kk != "tree"}
                                      for n, t in r["trees"].items()}} for r in rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    (out / "report.md").write_text(
        f"# Ablation on {cfg.cache}\n\nHeld-out positions: {rows[0]['positions']}. Acceptance = tokens per step "
        f"(1 + accepted draft tokens). Trees fitted on half the held-out sequences, reported on the other half."
        f"\n\n{table}\n\nBest: {best['variant']} with {best['num_heads']} heads "
        f"({'tree' + key_budget if key_budget else 'chain'} acceptance {score(best):.3f}); heads in `best/`, "
        f"vLLM layout in `best-vllm/`, trees in `trees/`.\n")
    plot_note = plot(rows, budgets, out / "acceptance.png")
    print(table)
    print(f"\nbest: {best['variant']}, {best['num_heads']} heads; report: {out / 'report.md'}")
    if plot_note:
        print(plot_note)
    return summary


def plot(rows: list[dict], budgets: list[int], path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "acceptance.png not written: matplotlib is missing (pip install 'medusa-cache[plot]')"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(r["variant"] for r in rows):
        rs = [r for r in rows if r["variant"] == name]
        ks = [r["num_heads"] for r in rs]
        ax.plot(ks, [r["chain_acceptance"] for r in rs], marker="o", label=f"{name} chain")
        for n in budgets:
            ax.plot(ks, [r["trees"][str(n)]["acceptance"] for r in rs], marker="o", label=f"{name} tree {n}")
    ax.set_xlabel("number of heads")
    ax.set_ylabel("acceptance length (tokens / step)")
    ax.set_xticks(sorted({r["num_heads"] for r in rows}))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
