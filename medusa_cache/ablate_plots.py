"""ablate's report figures and tables: tokens per step per head count, the draft-vocabulary sweep, measured
decoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def label(row: dict) -> str:
    """A variant in words, from its row: 'medusa1, data 1/4, draft 8000, 1 layer, lr 3e-3' (the axes it has)."""
    text = f"{row['layers']} layer{'s' if row['layers'] != 1 else ''}, lr {row['lr']:.0e}".replace("e-0", "e-")
    parts = [row.get("recipe"), _fraction(row.get("data_fraction")),
             f"draft {row['draft_vocab_size']}" if "_V" in f"_{row.get('run', '')}" else None]
    return ", ".join([p for p in parts if p] + [text])


def _fraction(f: float | None) -> str | None:
    if f is None or f >= 1:
        return None
    inv = 1 / f
    return f"data 1/{inv:.0f}" if abs(inv - round(inv)) < 1e-9 else f"data {f:g}"


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
    base = (rows[0]["layers"], rows[0]["lr"], rows[0].get("recipe"), rows[0].get("data_fraction"))
    big = str(max(budgets)) if budgets else None
    for n in sorted({r["draft_vocab_size"] for r in rows}):
        rs = [r for r in rows if r["draft_vocab_size"] == n and
              (r["layers"], r["lr"], r.get("recipe"), r.get("data_fraction")) == base]
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
        lines.append(f"| {r['label']} | {r['num_heads']} | {m['tree']} | {m['tokens_per_step']:.3f} | "
                     f"{m['step_cost_ratio']} | {m['speedup']} | {'yes' if m['identical_to_greedy'] else 'NO'} |")
    lines += ["", f"Most tokens per step measured: {top['label']}, {top['num_heads']} heads "
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
        ax.set_title(rs[0]["label"], fontsize=8)
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


def curve_key(r: dict) -> tuple:
    """Rows of one learning curve share everything but the data fraction and the head count."""
    return (r.get("recipe"), r["draft_vocab_size"], r["layers"], r["lr"])


def _figure(r: dict, budgets: list[int]) -> tuple[str, float, list[float]]:
    """(what, tokens per step, its interval) a curve plots: the largest fitted tree, else the chain."""
    if budgets:
        t = r["trees"][str(max(budgets))]
        return f"tree{max(budgets)}", t["tokens_per_step"], t["tokens_per_step_ci"]
    return "chain", r["chain_tokens_per_step"], r["chain_tokens_per_step_ci"]


def slope_per_doubling(tokens: list[int], tps: list[float]) -> tuple[float, list[float]] | None:
    """Least-squares slope of tokens per step against log2(training tokens), with its 95% interval (t distribution,
    n - 2 degrees of freedom); None below three points."""
    n = len(tokens)
    if n < 3:
        return None
    x, y = np.log2(np.asarray(tokens, dtype=float)), np.asarray(tps, dtype=float)
    xm = x - x.mean()
    sxx = float((xm**2).sum())
    if sxx == 0:
        return None
    b = float((xm * (y - y.mean())).sum() / sxx)
    resid = y - y.mean() - b * xm
    se = float(np.sqrt((resid**2).sum() / (n - 2) / sxx))
    from statistics import NormalDist

    t = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306}.get(
        n - 2, NormalDist().inv_cdf(0.975))
    return round(b, 4), [round(b - t * se, 4), round(b + t * se, 4)]


def curve_table(rows: list[dict], budgets: list[int]) -> str:
    """The learning curve: tokens per step per data fraction and head count, and the slope per doubling of data."""
    lines = []
    for key in dict.fromkeys(curve_key(r) for r in rows):
        rs = [r for r in rows if curve_key(r) == key]
        fr = sorted({r["data_fraction"] for r in rs})
        ks = sorted({r["num_heads"] for r in rs})
        what = _figure(rs[0], budgets)[0]
        tokens = {r["data_fraction"]: r["train_tokens"] for r in rs}
        lines += [f"Learning curve ({what} tokens per step; {label({**rs[0], 'data_fraction': 1.0})}):", "",
                  "| heads | " + " | ".join(f"{_fraction(f) or 'all'} ({tokens[f]:,} tokens)" for f in fr)
                  + " | slope per doubling [95%] |",
                  "|---|" + "---|" * (len(fr) + 1)]
        for k in ks:
            pts = sorted((r["train_tokens"], _figure(r, budgets)[1], _figure(r, budgets)[2]) for r in rs
                         if r["num_heads"] == k)
            sl = slope_per_doubling([p[0] for p in pts], [p[1] for p in pts])
            lines.append(f"| {k} | " + " | ".join(f"{p[1]:.3f} [{p[2][0]:.2f}, {p[2][1]:.2f}]" for p in pts) + " | "
                         + (f"{sl[0]:+.3f} [{sl[1][0]:+.3f}, {sl[1][1]:+.3f}]" if sl else "(3 fractions needed)")
                         + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def plot_curve(rows: list[dict], budgets: list[int], path: Path) -> str | None:
    """Tokens per step against training tokens (log scale), one line per head count (and curve), 95% intervals."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "data.png not written: matplotlib is missing (pip install 'medusa-cache[plot]')"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    keys = list(dict.fromkeys(curve_key(r) for r in rows))
    for key in keys:
        rs = [r for r in rows if curve_key(r) == key]
        for k in sorted({r["num_heads"] for r in rs}):
            pts = sorted((r["train_tokens"], *_figure(r, budgets)[1:]) for r in rs if r["num_heads"] == k)
            x = np.array([p[0] for p in pts])
            y = np.array([p[1] for p in pts])
            err = np.abs(np.array([p[2] for p in pts]).T - y)
            name = f"{k} heads" + (f" ({label({**rs[0], 'data_fraction': 1.0})})" if len(keys) > 1 else "")
            ax.errorbar(x, y, yerr=err, marker="o", ms=4, capsize=2, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training tokens (assistant tokens, log scale)")
    ax.set_ylabel(f"tokens per decoding step ({_figure(rows[0], budgets)[0]})")
    ax.set_title("learning curve: tokens per step against data")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
