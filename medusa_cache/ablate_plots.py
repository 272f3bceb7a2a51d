"""ablate's report figures and tables: tokens per step per head count, the draft-vocabulary sweep, measured
decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np


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


def label(variant: str) -> str:
    """L1_lr0.003 -> '1 layer, lr 3e-3'; V8000_L1_lr0.003 -> 'draft 8000, 1 layer, lr 3e-3'."""
    vocab, layers, lr = parse_variant(variant)
    text = f"{layers} layer{'s' if layers != 1 else ''}, lr {lr:.0e}".replace("e-0", "e-")
    return f"draft {vocab}, {text}" if vocab else text


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
    """Tokens per step (the largest fitted tree and the chain) against head count, one line per draft vocabulary
    size."""
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
        line = ax.plot(ks, [r["chain_tokens_per_step"] for r in rs], ls="--", marker="o", ms=3, label=f"{n:,} chain")
        if big:
            ax.plot(ks, [r["trees"][big]["tokens_per_step"] for r in rs], marker="o", color=line[0].get_color(),
                    label=f"{n:,} tree {big}")
    ax.set_xlabel("heads")
    ax.set_ylabel("tokens per decoding step")
    ax.set_title("tokens per step by draft vocabulary size")
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
    """One panel per variant: tokens per decoding step of the chain and each tree budget against head count (the
    decoding walk over the held-out text), 95% intervals as error bars; measured tokens/step (``speculate``) as black
    stars."""
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
        series = [("chain", [r["chain_tokens_per_step"] for r in rs], [r["chain_tokens_per_step_ci"] for r in rs])]
        series += [(f"tree {n}", [r["trees"][str(n)]["tokens_per_step"] for r in rs],
                    [r["trees"][str(n)]["tokens_per_step_ci"] for r in rs]) for n in budgets]
        for j, (lab, ys, cis) in enumerate(series):
            ys = np.array(ys)
            err = np.abs(np.array(cis).T - ys)
            ax.errorbar(ks + 0.06 * (j - len(series) / 2), ys, yerr=err, marker="o", ms=4, capsize=2,
                        label=f"{lab} (from the cache)")
        meas = [(r["num_heads"], r["measured"]["tokens_per_step"]) for r in rs if r.get("measured")]
        if meas:
            ax.plot(*zip(*meas, strict=True), "k*", ms=11, label="measured (speculate)")
        ax.set_title(label(name))
        ax.set_xlabel("number of heads")
        ax.set_xticks(sorted(set(ks.tolist())))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("tokens per decoding step")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Medusa heads: tokens per decoding step by head count")
    fig.text(0.01, 0.01, caption, fontsize=7, wrap=True)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
