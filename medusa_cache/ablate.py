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

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .evaluate import evaluate_ranks, head_ranks, render_table, write_trees
from .export import export, load_heads, save_heads
from .progress import progress
from .store import Cache
from .train import TrainConfig, train


def variant_name(layers: int, lr: float, vocab: int | None = None) -> str:
    return (f"V{vocab}_" if vocab else "") + f"L{layers}_lr{lr:g}"


def parse_variant(name: str) -> tuple[int | None, int, float]:
    """'V8000_L1_lr0.003' -> (8000, 1, 0.003); 'L1_lr0.003' -> (None, 1, 0.003)."""
    vocab = None
    if name.startswith("V"):
        v, name = name.split("_", 1)
        vocab = int(v[1:])
    layers, lr = name[1:].split("_lr")
    return vocab, int(layers), float(lr)


def run_ablate(cfg: TrainConfig, heads: list[int], layers: list[int], lrs: list[float], budgets: list[int],
               topk: int = 10, verify_cost: float | None = None, speculate_prompts: str | None = None,
               speculate_tokens: int = 128, vocabs: list[int] | None = None) -> dict:
    """Train every variant once (each head count is a prefix of the largest), evaluate, choose, report.

    ``vocabs``: draft vocabulary sizes, each re-mapped from the one cache (``train --draft-vocab-size``): one
    training run per size (its variants side by side, head counts exact prefixes as without it), all in one report.
    """
    check_request(cfg, heads, layers, lrs, budgets, verify_cost, speculate_prompts, vocabs, topk, speculate_tokens)
    command = ablate_command(cfg, heads, layers, lrs, budgets, topk, verify_cost, speculate_prompts,
                             speculate_tokens, vocabs)
    kmax = max(heads)
    cfg = replace(cfg, num_heads=kmax, clip_per_head=True)
    out = Path(cfg.out)
    runs = []  # (vocab, train config, variant specs)
    if vocabs:
        from .rundir import claim

        claim(out, kind="ablate", overwrite=cfg.overwrite, inputs={"--cache": cfg.cache, "--val-cache": cfg.val_cache})
        for n in vocabs:
            runs.append((n, replace(cfg, draft_vocab_size=n, out=str(out / "runs" / f"V{n}"), overwrite=False),
                         [(variant_name(la, lr, n), la, lr) for la in layers for lr in lrs]))
    else:
        runs.append((None, cfg, [(variant_name(la, lr), la, lr) for la in layers for lr in lrs]))
    results = [train(c, specs, kind="train" if vocabs else "ablate") for _, c, specs in runs]
    from . import dist

    if dist.active() and torch.distributed.get_rank() != 0:
        return {}  # under torchrun the ranks train together; rank 0 evaluates and reports
    rows = []
    jobs = [(Path(c.out) / "variants" / name, name, res) for (_, c, specs), res in zip(runs, results, strict=True)
            for name, _, _ in specs]
    for d, name, result in progress(jobs, "ablate: evaluate", "variant"):
        hv, mapping, _ = load_heads(d)
        cache = Cache(cfg.val_cache) if cfg.val_cache else Cache(cfg.cache)
        if cache.mapping().fingerprint() != mapping.fingerprint():
            cache.remap(mapping)
        val = cache.usable_seqs(cfg.allow_partial, warn=False) if cfg.val_cache else result["val_seqs"]
        r = head_ranks(hv, cache, val, topk, cfg.device)
        cover = {"cache": round(Cache(cfg.cache).coverage([mapping.draft_size])[mapping.draft_size], 4),
                 "heldout": round(heldout_coverage(cache, mapping, val), 4)}
        for k in sorted(set(heads)):
            res = {"variant": name, "label": label(name), "dir": str(d), "draft_vocab_size": mapping.draft_size,
                   "coverage": cover, **evaluate_ranks(r, k, topk, budgets)}
            write_trees(res, out / "trees", f"{name}_heads{k}_tree")
            rows.append(res)
    return report(rows, cfg, out, budgets, verify_cost, speculate_prompts, speculate_tokens, command)


def heldout_coverage(cache: Cache, mapping, seqs: np.ndarray) -> float:
    """Fraction of the assistant tokens of sequences ``seqs`` that ``mapping``'s draft vocabulary holds."""
    ids, mask = cache.array("input_ids"), cache.array("loss_mask").astype(bool)
    rows = np.concatenate([np.arange(cache.offsets[s], cache.offsets[s + 1]) for s in seqs]) if len(seqs) else \
        np.zeros(0, dtype=np.int64)
    rows = rows[mask[rows]]
    return float(mapping.t2d[ids[rows]].mean()) if len(rows) else 0.0


def ablate_command(cfg: TrainConfig, heads: list[int], layers: list[int], lrs: list[float], budgets: list[int],
                   topk: int, verify_cost: float | None, speculate_prompts: str | None, speculate_tokens: int,
                   vocabs: list[int] | None = None) -> str:
    """The ``medusa-cache ablate`` call that gives these settings (the provenance of the heads it writes)."""
    import dataclasses
    import shlex

    from .export import command_line

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    base = command_line("ablate", dataclasses.asdict(cfg), defaults,
                        skip=("resume", "overwrite", "num_heads", "num_layers", "lr", "clip_per_head"))
    extra = ["--heads", ",".join(map(str, heads)), "--layers", ",".join(map(str, layers)),
             "--lr", ",".join(f"{x:g}" for x in lrs), "--tree-budget", ",".join(map(str, budgets)),
             "--topk", str(topk)]
    if vocabs:
        extra += ["--draft-vocab", ",".join(map(str, vocabs))]
    if verify_cost is not None:
        extra += ["--verify-cost", f"{verify_cost:g}"]
    if speculate_prompts:
        extra += ["--speculate-prompts", speculate_prompts, "--speculate-tokens", str(speculate_tokens)]
    return base + " " + shlex.join(extra)


def check_request(cfg: TrainConfig, heads: list[int], layers: list[int], lrs: list[float], budgets: list[int],
                  verify_cost: float | None, speculate_prompts: str | None, vocabs: list[int] | None = None,
                  topk: int = 10, speculate_tokens: int = 128) -> None:
    """Every refusal before any training (a mistake found after hours of training costs the hours)."""
    if topk < 1:
        raise UserError(f"--topk: must be >= 1, got {topk}")
    if speculate_tokens < 1:
        raise UserError(f"--speculate-tokens: must be >= 1, got {speculate_tokens}")
    if vocabs is not None:
        c = Cache(cfg.cache)
        if not vocabs or min(vocabs) < 1 or max(vocabs) > c.meta.vocab_size or len(set(vocabs)) != len(vocabs):
            raise UserError(f"--draft-vocab: give distinct sizes in 1..{c.meta.vocab_size} (the model's vocabulary), "
                            f"got {vocabs}")
        if cfg.draft_vocab_size is not None:
            raise UserError("--draft-vocab: pass the sizes to sweep there, not --draft-vocab-size as well")
    if not heads or min(heads) < 1:
        raise UserError(f"--heads: give head counts >= 1, got {heads}")
    if not layers or min(layers) < 1:
        raise UserError(f"--layers: give layer counts >= 1, got {layers}")
    if not lrs or min(lrs) <= 0:
        raise UserError(f"--lr: give positive learning rates, got {lrs}")
    if any(b < 1 for b in budgets):
        raise UserError(f"--tree-budget: budgets must be >= 1, got {budgets}")
    if verify_cost is not None and not verify_cost >= 0:
        raise UserError(f"--verify-cost: must be >= 0, got {verify_cost}")
    if speculate_prompts and not Path(speculate_prompts).is_file():
        raise UserError(f"--speculate-prompts: file not found: {speculate_prompts}")
    if cfg.val_fraction <= 0 and not cfg.val_cache:
        raise UserError("--val-fraction: ablate needs held-out data (a fraction > 0, or --val-cache)")
    Cache(cfg.cache).require_reach(max(heads), "--heads")
    if cfg.val_cache:  # something to hold out (else it would fail only after training)
        vc = Cache(cfg.val_cache)
        vc.require_reach(max(heads), "--heads")
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
    model = Cache(cfg.cache).meta.dump_args.get("model")
    if verify_cost is None and not speculate_prompts and not (model and Path(model, "config.json").exists()):
        raise UserError(f"--verify-cost: the expected speedup needs the verification cost per tree node, timed with "
                        f"the cache's model ({model!r}, not a model directory here): pass --verify-cost C (relative "
                        "to a one-token step) or --speculate-prompts FILE to measure it by real decoding")


def report(rows: list[dict], cfg: TrainConfig, out: Path, budgets: list[int], verify_cost: float | None,
           speculate_prompts: str | None, speculate_tokens: int, command: str | None = None) -> dict:
    """Measured decoding (optional), the cost-aware choice, best/ and its card, report.md, results.json, plot."""
    model = Cache(cfg.cache).meta.dump_args.get("model")
    if speculate_prompts:
        measure(rows, out, cfg, model, speculate_prompts, speculate_tokens, verify_cost)
        measured = [m["step_cost_ratio"] for r in rows for m in [r.get("measured")] if m and m["nodes"]]
        if verify_cost is None and measured:  # the cost per tree node this machine showed, median over runs
            verify_cost = max(0.0, float(np.median([(m["step_cost_ratio"] - 1) / m["nodes"] for r in rows
                                                     for m in [r["measured"]] if m and m["nodes"]])))
            cost_source = f"measured by speculate on this machine ({len(measured)} runs, median)"
    if verify_cost is None:
        verify_cost, cost_source = timed_verify_cost(model, cfg.device, max(budgets, default=16))
    elif not speculate_prompts or "cost_source" not in locals():
        cost_source = "--verify-cost"
    params = model_parameters(model)
    H = Cache(cfg.cache).hidden_size
    for r in rows:
        _, layers_r, _ = parse_variant(r["variant"])
        r["head_cost"] = round(r["num_heads"] * (layers_r * (H * H + H) + H * r["draft_vocab_size"]) / params, 5) \
            if params else 0.0
        r["options"] = options(r, verify_cost)
    best_row, best_opt = max(((r, o) for r in rows for o in r["options"]), key=lambda x: x[1]["expected_speedup"])
    hv, mapping, _ = load_heads(best_row["dir"])
    hv.heads = hv.heads[: best_row["num_heads"]]
    (out / "best").mkdir(exist_ok=True)
    vocab, layers, lr = parse_variant(best_row["variant"])
    chosen = replace(cfg, num_heads=best_row["num_heads"], num_layers=layers, lr=lr, draft_vocab_size=vocab)
    save_heads(hv, cache_for(cfg, mapping), chosen, out / "best",
               command=(command + f"  # best/: the first {best_row['num_heads']} heads of variant "
                        f"{best_row['variant']}") if command else None)
    (out / "best" / "tree.json").write_text(json.dumps(best_opt["tree"]))
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)
    table = render_table(rows, budgets)
    rule = (f"best = highest expected speedup = acceptance / (1 + {verify_cost:.4g} x tree nodes + heads' weights / "
            f"model's weights), the verification cost per node from {cost_source}; the heads' cost (ResBlocks and an "
            f"H x draft-vocabulary output layer each, read every step) "
            + (f"relative to the model's {params:,} parameters" if params else
               "not counted (the model is not at hand)"))
    summary = {"best": {"variant": best_row["variant"], "label": label(best_row["variant"]),
                        "num_heads": best_row["num_heads"], "tree": best_opt["name"], "nodes": best_opt["nodes"],
                        "acceptance": best_opt["acceptance"], "ci": best_opt["ci"],
                        "expected_speedup": best_opt["expected_speedup"], "rule": rule},
               "verify_cost_per_node": verify_cost,
               "results": [{k: v for k, v in r.items() if k != "trees"} |
                           {"trees": {n: {kk: vv for kk, vv in t.items() if kk != "tree"}
                                      for n, t in r["trees"].items()}} for r in rows]}
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    caption = describe(cfg, rows)
    warning = separation_warning(rows, best_row, best_opt, verify_cost)
    (out / "report.md").write_text(
        f"# Ablation on {cfg.cache}\n\n{caption}\n\nAcceptance = tokens per step (1 + accepted draft tokens), "
        "teacher forced, with a 95% interval from a bootstrap over held-out *sequences*. Trees are fitted on half "
        f"the held-out sequences and reported on the other half.\n\n{table}\n\n"
        + (vocab_table(rows, H) + "\n\n" if len({r["draft_vocab_size"] for r in rows}) > 1 else "")
        + (measured_table(rows) + "\n\n" if speculate_prompts else "")
        + f"**Best: {label(best_row['variant'])}, {best_row['num_heads']} heads, {best_opt['name']}** "
        f"(acceptance {best_opt['acceptance']:.3f}, expected speedup {best_opt['expected_speedup']:.3f}). "
        f"Rule: {rule}.\n\n" + (f"> **Warning:** {warning}\n\n" if warning else "")
        + "Heads in `best/` (its tree in `best/tree.json`, model card `best/README.md`), vLLM layout in "
        "`best-vllm/`, all fitted trees in `trees/`, plot `acceptance.png`.\n")
    plot_note = plot(rows, budgets, out / "acceptance.png", caption)
    if len({r["draft_vocab_size"] for r in rows}) > 1:
        plot_note = plot_vocab(rows, budgets, out / "vocab.png") or plot_note
    from .card import write_card

    (out / "best" / "eval.json").write_text(json.dumps(summary["best"], indent=2))
    write_card(out / "best", fmt="heads", results=summary["best"])
    export(out / "best", "vllm", out / "best-vllm", overwrite=True)  # again: its card now has the results
    print(table)
    if warning:
        print(f"warning: {warning}")
    print(f"\nbest: {label(best_row['variant'])}, {best_row['num_heads']} heads, {best_opt['name']} ({rule})")
    print(f"outputs: {out / 'report.md'}, {out / 'results.json'}, {out / 'acceptance.png'}, {out / 'best'}, "
          f"{out / 'best-vllm'}, {out / 'trees'}")
    if plot_note:
        print(plot_note)
    return summary


def timed_verify_cost(model: str | None, device: str, nodes: int, context: int = 256, repeats: int = 5
                      ) -> tuple[float, str]:
    """(cost per tree node relative to a one-token step, where it came from), timed on this device: forwards of
    1 and of ``nodes`` tokens over a KV cache of ``context`` tokens, median of ``repeats`` each. A constant would
    be a guess (0.005 suits a memory-bound GPU; on a CPU a node costs ~0.1); a model that is not at hand gives
    an error naming the ways to supply the cost."""
    import time

    from transformers import AutoModelForCausalLM, DynamicCache

    if not model or not Path(model, "config.json").exists():
        raise UserError(f"ablate: the expected speedup needs the verification cost of the model ({model!r} is not a "
                        "model directory here): pass --verify-cost C (per tree node, relative to a one-token step) "
                        "or --speculate-prompts FILE to measure it by real decoding")
    m = AutoModelForCausalLM.from_pretrained(model).to(device).eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randint(0, m.config.vocab_size, (1, context), generator=g).to(device)

    def step(n: int) -> float:
        times = []
        for _ in range(repeats + 1):  # the first is a warm-up
            with torch.inference_mode():
                kv = DynamicCache()
                m(ctx, cache=kv, use_cache=True)
                x = torch.randint(0, m.config.vocab_size, (1, n), generator=g).to(device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                m(x, cache=kv, use_cache=True)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    t1, tn = step(1), step(nodes)
    cost = max(0.0, (tn / t1 - 1) / nodes)
    return cost, (f"timed on this device ({device}): a 1-token step {t1 * 1e3:.2f} ms, a {nodes}-token step "
                  f"{tn * 1e3:.2f} ms over a {context}-token KV cache")


def model_parameters(model: str | None) -> int | None:
    """Parameters of the model directory's safetensors files (their headers only), or None when it is not here."""
    if not model or not Path(model).is_dir():
        return None
    from safetensors import safe_open

    total = 0
    for f in sorted(Path(model).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                total += int(np.prod(st.get_slice(k).get_shape()))
    return total or None


def label(variant: str) -> str:
    """L1_lr0.003 -> '1 layer, lr 3e-3'; V8000_L1_lr0.003 -> 'draft 8000, 1 layer, lr 3e-3'."""
    vocab, layers, lr = parse_variant(variant)
    text = f"{layers} layer{'s' if layers != 1 else ''}, lr {lr:.0e}".replace("e-0", "e-")
    return f"draft {vocab}, {text}" if vocab else text


def cache_for(cfg: TrainConfig, mapping) -> Cache:
    """The training cache read with ``mapping`` (re-mapped when the heads trained with another vocabulary)."""
    c = Cache(cfg.cache)
    return c if c.mapping().fingerprint() == mapping.fingerprint() else c.remap(mapping)


def options(r: dict, verify_cost: float) -> list[dict]:
    """The chain and each fitted tree of a row, with the expected speedup under the cost model."""
    opts = [{"name": "chain", "nodes": r["num_heads"], "acceptance": r["chain_acceptance"], "ci": r["chain_ci"],
             "tree": [[0] * d for d in range(1, r["num_heads"] + 1)]}]
    opts += [{"name": f"tree{n}", "nodes": t["nodes"], "acceptance": t["acceptance"], "ci": t["ci"], "tree": t["tree"]}
             for n, t in r["trees"].items()]
    for o in opts:
        o["expected_speedup"] = round(o["acceptance"] / (1 + verify_cost * o["nodes"] + r.get("head_cost", 0.0)), 4)
    return opts


MIN_HELDOUT_SEQUENCES = 10  # below this a bootstrap over sequences (trees: over half of them) says little


def separation_warning(rows: list[dict], best_row: dict, best_opt: dict, verify_cost: float) -> str | None:
    n = best_row["sequences"]
    if n < MIN_HELDOUT_SEQUENCES:
        return (f"the held-out set has only {n} sequences ({best_row['positions']} positions): its 95% intervals "
                "(resampled over sequences; trees are fitted on half and scored on the other half) are not "
                "meaningful; hold out more with --val-fraction or pass --val-cache")
    others = [(r, o) for r in rows for o in r["options"] if (r is not best_row or o is not best_opt)]
    if not others:
        return None
    r2, o2 = max(others, key=lambda x: x[1]["expected_speedup"])
    lo, hi = best_opt["ci"]
    if o2["ci"][1] >= lo:
        return (f"the held-out set ({best_row['sequences']} sequences, {best_row['positions']} positions) is too small "
                f"to separate the best ({label(best_row['variant'])}, {best_row['num_heads']} heads, "
                f"{best_opt['name']}: {best_opt['acceptance']:.3f} [{lo:.2f}, {hi:.2f}]) from the runner-up "
                f"({label(r2['variant'])}, {r2['num_heads']} heads, {o2['name']}: {o2['acceptance']:.3f} "
                f"[{o2['ci'][0]:.2f}, {o2['ci'][1]:.2f}]): their 95% intervals overlap")
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


def vocab_table(rows: list[dict], hidden_size: int) -> str:
    """Per draft vocabulary size: coverage (the ceiling of any head's top-1) and each head's output-layer size."""
    lines = ["Draft vocabularies, each re-mapped from this one cache (one backbone pass instead of one dump per "
             "size). Coverage = fraction of assistant tokens inside the vocabulary: of the whole cache (the counts it "
             "was built from) and of the held-out sequences; a head can never predict a token outside it.", "",
             "| draft vocabulary | coverage (cache) | coverage (held out) | output layer per head (H x N) |",
             "|---|---|---|---|"]
    for n in sorted({r["draft_vocab_size"] for r in rows}):
        c = next(r["coverage"] for r in rows if r["draft_vocab_size"] == n)
        lines.append(f"| {n:,} | {c['cache']:.4f} | {c['heldout']:.4f} | {hidden_size * n:,} |")
    return "\n".join(lines)


def plot_vocab(rows: list[dict], budgets: list[int], path: Path) -> str | None:
    """Acceptance (the largest fitted tree and the chain) against head count, one line per draft vocabulary size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "vocab.png not written: matplotlib is missing (pip install 'medusa-cache[plot]')"
    fig, ax = plt.subplots(figsize=(6, 4.4))
    base = parse_variant(rows[0]["variant"])[1:]
    big = str(max(budgets)) if budgets else None
    for n in sorted({r["draft_vocab_size"] for r in rows}):
        rs = [r for r in rows if r["draft_vocab_size"] == n and parse_variant(r["variant"])[1:] == base]
        ks = [r["num_heads"] for r in rs]
        line = ax.plot(ks, [r["chain_acceptance"] for r in rs], ls="--", marker="o", ms=3, label=f"{n:,} chain")
        if big:
            ax.plot(ks, [r["trees"][big]["acceptance"] for r in rs], marker="o", color=line[0].get_color(),
                    label=f"{n:,} tree {big}")
    ax.set_xlabel("heads")
    ax.set_ylabel("acceptance (tokens per step, teacher forced)")
    ax.set_title("acceptance by draft vocabulary size")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def measured_table(rows: list[dict]) -> str:
    top = max(rows, key=lambda r: r["measured"]["tokens_per_step"])
    lines = ["Measured by real decoding (`speculate`, greedy verification, this machine):", "",
             "| variant | heads | tree | tokens/step (measured) | step cost / greedy step | wall speedup | identical |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["measured"]
        lines.append(f"| {label(r['variant'])} | {r['num_heads']} | {m['tree']} | {m['tokens_per_step']:.3f} | "
                     f"{m['step_cost_ratio']} | {m['speedup']} | {'yes' if m['identical_to_greedy'] else 'NO'} |")
    lines += ["", f"Most tokens per step measured: {label(top['variant'])}, {top['num_heads']} heads "
                  f"({top['measured']['tokens_per_step']:.3f}). Wall-clock ratios on a shared CPU are noisy; "
                  "tokens per step are exact."]
    return "\n".join(lines)


def plot(rows: list[dict], budgets: list[int], path: Path, caption: str = "") -> str | None:
    """One panel per variant: chain and each tree budget against head count, 95% intervals as error bars;
    measured tokens/step (``speculate``) as black stars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "acceptance.png not written: matplotlib is missing (pip install 'medusa-cache[plot]')"
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants) + 0.6, 4.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], variants, strict=True):
        rs = [r for r in rows if r["variant"] == name]
        ks = np.array([r["num_heads"] for r in rs])
        series = [("chain", [r["chain_acceptance"] for r in rs], [r["chain_ci"] for r in rs])]
        series += [(f"tree {n}", [r["trees"][str(n)]["acceptance"] for r in rs],
                    [r["trees"][str(n)]["ci"] for r in rs]) for n in budgets]
        for j, (lab, ys, cis) in enumerate(series):
            ys = np.array(ys)
            err = np.abs(np.array(cis).T - ys)
            ax.errorbar(ks + 0.06 * (j - len(series) / 2), ys, yerr=err, marker="o", ms=4, capsize=2,
                        label=f"{lab} (teacher-forced)")
        meas = [(r["num_heads"], r["measured"]["tokens_per_step"]) for r in rs if r.get("measured")]
        if meas:
            ax.plot(*zip(*meas, strict=True), "k*", ms=11, label="measured (speculate)")
        ax.set_title(label(name))
        ax.set_xlabel("number of heads")
        ax.set_xticks(sorted(set(ks.tolist())))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens per step (acceptance)")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Medusa heads: acceptance by head count")
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
