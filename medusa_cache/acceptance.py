"""What greedy Medusa decoding accepts, from teacher-forced ranks: tree paths, accepted lengths, the decoding walk and
tokens per step, tree fitting, intervals.

Acceptance (tokens per decoding step), with no independence assumption:
- chain (top-1 of each head): 1 + the number of consecutive heads from head 0 whose rank is 0;
- tree (Medusa ``medusa_choices``: paths of top-k indices, prefix-closed): 1 + the length of the
  longest path p in the tree with rank[t, j] == p[j] for every depth j.

Tree fitting. Since heads are read at the same position, path p is accepted exactly when every
rank[t, j] == p[j]; in a prefix-closed tree at most one node per depth can be accepted, so the expected
acceptance is 1 + the sum over nodes of P(node accepted). The best tree of N nodes is therefore the N
nodes with the highest *empirical* acceptance frequency (a parent is never less frequent than its child,
so these N are prefix-closed when ties go to shorter paths). This is the Medusa authors' greedy
construction with measured joint frequencies in place of products of per-head accuracies. Trees are
fitted on one half of the sequences and reported on the other.

The decoding walk. Decoding does not visit every position: each assistant turn is prefilled once, then every step at
row t yields 1 + L(t) tokens and moves to row t + 1 + L(t). ``tokens_per_step`` walks every turn so and counts every
base-model forward as ``speculate`` counts them; on the model's own greedy text it equals speculate's measurement.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError


def chain_acceptance(rank: np.ndarray) -> float:
    ok = rank == 0
    return float(1 + np.cumprod(ok, axis=1).sum(1).mean()) if rank.shape[1] else 1.0


def _codes(rank: np.ndarray, base: int) -> list[np.ndarray]:
    """Integer code of the path rank[:, :d+1] for each depth d, -1 where some rank is a miss."""
    codes, cur, alive = [], np.zeros(len(rank), dtype=np.int64), np.ones(len(rank), dtype=bool)
    for d in range(rank.shape[1]):
        alive &= (rank[:, d] >= 0) & (rank[:, d] < base - 1)
        cur = cur * base + rank[:, d].astype(np.int64) + 1
        codes.append(np.where(alive, cur, -1))
    return codes


def _path_code(path, base: int) -> int:
    c = 0
    for r in path:
        c = c * base + int(r) + 1
    return c


def validate_tree(tree: list, num_heads: int, where: str = "--tree", topk: int | None = None
                  ) -> list[tuple[int, ...]]:
    """A Medusa tree (``medusa_choices``: a JSON list of paths of top-k indices), checked whole: a list of
    non-empty lists of non-negative integers, at most ``num_heads`` deep, prefix-closed, and (with ``topk``) every
    index below it. Anything else is refused by name, never read as something else (0.5 is not 0)."""
    if not isinstance(tree, list) or not tree:
        raise UserError(f"{where}: a tree is a non-empty JSON list of paths (lists of top-k indices), e.g. "
                        f"[[0], [1], [0, 0]]; got {type(tree).__name__}")
    for p in tree:
        if not isinstance(p, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            raise UserError(f"{where}: path {json.dumps(p)} is not a list of integer top-k indices")
    paths = [tuple(p) for p in tree]
    s = set(paths)
    for p in paths:
        if not p or len(p) > num_heads or min(p) < 0:
            raise UserError(f"{where}: path {list(p)} must have 1..{num_heads} non-negative top-k indices")
        if topk is not None and max(p) >= topk:
            raise UserError(f"{where}: path {list(p)} uses top-k index {max(p)}, but --topk is {topk} (indices "
                            f"0..{topk - 1}); raise --topk or use another tree")
        if len(p) > 1 and p[:-1] not in s:
            raise UserError(f"{where}: path {list(p)} has no parent {list(p[:-1])} (trees must be prefix-closed)")
    return sorted(s, key=lambda p: (len(p), p))


def load_tree(path: str, num_heads: int, topk: int | None = None, flag: str = "--tree") -> list[tuple[int, ...]]:
    """The one tree loader of eval, ablate and speculate: a JSON file read and validated (``validate_tree``)."""
    try:
        tree = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{flag}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{flag}: {path}:{e.lineno}: not JSON ({e.msg})") from None
    return validate_tree(tree, num_heads, f"{flag} {path}", topk)


def tree_path(out: Path, budget: int | str, prefix: str = "tree") -> Path:
    """Where a fitted tree of ``budget`` nodes is written (``eval --trees-out``: tree_N.json; ablate: one prefix per
    variant and head count, ``{variant}_heads{K}_tree_N.json``): the one place the name is spelled."""
    return Path(out) / f"{prefix}_{budget}.json"


def write_trees(res: dict, out: Path, prefix: str = "tree") -> None:
    """Every fitted tree of an evaluation (``res["trees"]``) as ``tree_path`` names it."""
    Path(out).mkdir(parents=True, exist_ok=True)
    for n, t in res["trees"].items():
        tree_path(out, n, prefix).write_text(json.dumps(t["tree"]))


def accepted_lengths(rank: np.ndarray, tree: list[tuple[int, ...]]) -> np.ndarray:
    """Per row: the depth of the longest tree path whose every top-k index matches ``rank`` (draft tokens accepted)."""
    length = np.zeros(len(rank), dtype=np.int64)
    if not tree:
        return length
    depth = max(len(p) for p in tree)
    base = max(max(p) for p in tree) + 2
    codes = _codes(rank[:, :depth], base)
    alive = np.ones(len(rank), dtype=bool)
    for d in range(min(depth, rank.shape[1])):
        in_tree = np.isin(codes[d], [_path_code(p, base) for p in tree if len(p) == d + 1])
        alive &= in_tree
        length += alive
    return length


def tree_acceptance(rank: np.ndarray, tree: list[tuple[int, ...]]) -> float:
    return float(1 + accepted_lengths(rank, tree).mean())


def decoding_walk(rank: np.ndarray, tree: list[tuple[int, ...]], max_new: int) -> tuple[int, int]:
    """(tokens, base forwards) that real decoding takes over one decoding run's rows, from teacher-forced ranks.

    Row 0 is the last prompt token. The prefill yields one token; each verification step at row t yields
    1 + L(t) tokens and moves to row t + 1 + L(t). Position-averaged acceptance (``tree_acceptance``) weighs
    every row; decoding visits only the rows it lands on, so the two differ; this walk is what ``speculate``
    measures on the same text (tested).
    """
    return _walk(accepted_lengths(rank, tree), max_new)


def _walk(lengths: np.ndarray, max_new: int) -> tuple[int, int]:
    tokens, steps, t = 1, 1, 0
    while tokens < max_new and t < len(lengths):
        tokens += 1 + int(lengths[t])
        steps += 1
        t += 1 + int(lengths[t])
    return min(tokens, max_new), steps


def walks(rank: np.ndarray, run: np.ndarray, tree: list[tuple[int, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [R], base forwards [R]) of every decoding run in ``run`` (rows of a run consecutive): the walk of
    ``decoding_walk`` over each, as long as the turn's answer (its rows), prefill counted as ``speculate`` counts it."""
    lengths = accepted_lengths(rank, tree)
    cut = np.flatnonzero(np.diff(run)) + 1
    out = [_walk(lg, len(lg)) for lg in np.split(lengths, cut)] if len(run) else []
    return np.array([t for t, _ in out], dtype=np.int64), np.array([s for _, s in out], dtype=np.int64)


def ratio_ci(tokens: np.ndarray, steps: np.ndarray, group: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of sum(tokens) / sum(steps), resampling whole groups (sequences) with replacement."""
    ids, inv = np.unique(group, return_inverse=True)
    if len(ids) < 2:
        m = float(tokens.sum() / max(steps.sum(), 1))
        return [round(m, 4), round(m, 4)]
    t = np.bincount(inv, weights=tokens, minlength=len(ids))
    s = np.bincount(inv, weights=steps, minlength=len(ids))
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    return [round(float(x), 4) for x in np.quantile(t[pick].sum(1) / np.maximum(s[pick].sum(1), 1), [0.025, 0.975])]


def tokens_per_step(rank: np.ndarray, run: np.ndarray, seq: np.ndarray, tree: list[tuple[int, ...]]
                    ) -> tuple[float, list[float]]:
    """(tokens per decoding step over all runs, its 95% interval over sequences): what greedy Medusa decoding with
    ``tree`` realises on this text, counting every base-model forward including each turn's prefill."""
    tokens, steps = walks(rank, run, tree)
    if not len(tokens):
        return float("nan"), [float("nan"), float("nan")]
    first = np.r_[True, np.diff(run) != 0]
    return round(float(tokens.sum() / steps.sum()), 4), ratio_ci(tokens, steps, seq[first])


def chain(num_heads: int) -> list[tuple[int, ...]]:
    """The chain (top-1 of every head) as a tree: [(0,), (0, 0), ...]."""
    return [(0,) * d for d in range(1, num_heads + 1)]


def fit_tree(rank: np.ndarray, budget: int, topk: int) -> list[tuple[int, ...]]:
    """The ``budget`` paths with the highest empirical acceptance frequency (prefix-closed).

    Paths never accepted on the fit data are not added, so a tree can have fewer than ``budget`` nodes.
    """
    base = topk + 1
    cands: list[tuple[int, int, tuple[int, ...]]] = []
    for d, codes in enumerate(_codes(rank, base)):
        vals, counts = np.unique(codes[codes >= 0], return_counts=True)
        for v, c in zip(vals.tolist(), counts.tolist(), strict=True):
            path, x = [], v
            for _ in range(d + 1):
                path.append(x % base - 1)
                x //= base
            cands.append((c, d, tuple(reversed(path))))
    cands.sort(key=lambda t: (-t[0], t[1], t[2]))
    chosen: set[tuple[int, ...]] = set()
    for _, _, p in cands:
        if len(chosen) >= budget:
            break
        if len(p) == 1 or p[:-1] in chosen:
            chosen.add(p)
    return sorted(chosen, key=lambda p: (len(p), p))


def split_halves(seq: np.ndarray, run: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(fit, report) position masks: even and odd sequence ids (one sequence: its even and odd decoding runs, then
    its even and odd positions)."""
    for unit in (seq, run, np.arange(len(seq))):
        if unit is None:
            continue
        fit = unit % 2 == 0
        if fit.any() and not fit.all():
            return fit, ~fit
    return fit, ~fit


def bootstrap_ci(values: np.ndarray, seq: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the mean of per-position ``values``, resampling whole *sequences* (positions of one
    sequence are correlated, so resampling positions would understate the uncertainty)."""
    ids, inv = np.unique(seq, return_inverse=True)
    if len(ids) < 2:
        m = float(values.mean()) if len(values) else float("nan")
        return [round(m, 4), round(m, 4)]
    sums = np.bincount(inv, weights=values, minlength=len(ids))
    counts = np.bincount(inv, minlength=len(ids))
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(n, len(ids)))
    means = sums[pick].sum(1) / np.maximum(counts[pick].sum(1), 1)
    return [round(float(x), 4) for x in np.quantile(means, [0.025, 0.975])]
