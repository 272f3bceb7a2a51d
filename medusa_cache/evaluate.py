"""Head accuracy and acceptance length, measured position by position on cached data.

Positions. Every row t whose next token t+1 is an assistant token in the same sequence (the base model
is generating the assistant's text there; its own token t+1 is the "1" in every acceptance figure).

Per head i, the true token is t+2+i. ``rank[t, i]`` is its rank among head i's top-k draft predictions,
or -1 when it is not there, when it is outside the draft vocabulary, when it is not an assistant token,
or when the sequence ends first. Top-k accuracy counts, over positions whose token t+2+i is an assistant
token, the share with 0 <= rank < k (out-of-draft-vocabulary tokens are misses).

Acceptance, tree fitting and the decoding walk: ``acceptance``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from .acceptance import (
    accepted_lengths,
    bootstrap_ci,
    chain,
    chain_acceptance,
    fit_tree,
    load_tree,
    split_halves,
    tokens_per_step,
    tree_acceptance,
    write_trees,
)
from .config import check, check_common
from .errors import UserError
from .heads import MedusaHeads
from .loader import make_batches, make_blocks, targets_for
from .progress import progress
from .store import Cache, require_complete
from .stream import BatchStream, StreamSource
from .vocab import IGNORE


@dataclass
class EvalConfig:
    """medusa-cache eval --heads heads --cache heldout.zarr --tree-budget 16,32,64 --trees-out trees
    medusa-cache eval --heads heads --model M --heldout-prompts question.jsonl --out ev --tree-budget 16,32,64"""

    REQUIRED: ClassVar[tuple[str, ...]] = ("heads",)
    heads: str
    """heads directory written by train"""
    cache: str | None = None
    """store to evaluate on (ideally held out); or --heldout-prompts"""
    heldout_prompts: str | None = None
    """prompts or Spec-Bench / MT-Bench question file (instead of --cache): --model answers them greedily (every turn,
    as speculate decodes them), the answers are dumped into --out with the heads' draft vocabulary and scored there"""
    model: str | None = None
    """base model directory that answers --heldout-prompts"""
    max_new_tokens: int = 256
    """--heldout-prompts: tokens generated per prompt or turn (as speculate --max-new-tokens)"""
    max_prompts: int | None = None
    """--heldout-prompts: use only the first N prompts"""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """--heldout-prompts: model dtype for answering and dumping (as speculate --dtype)"""
    out: str | None = None
    """directory for results.json (and with --heldout-prompts the answers and their cache, in heldout/)"""
    topk: int = 10
    """top-k predictions considered per head"""
    tree: str | None = None
    """JSON file with a Medusa tree: a list of paths of top-k indices"""
    tree_budget: list[int] | None = None
    """fit trees of these node counts, e.g. 16,32,64"""
    base_model: str | None = None
    """score against this base model's own greedy tokens (from the cached states and its lm_head) instead of the
    data's tokens"""
    trees_out: str | None = None
    """directory to write the fitted trees (tree_N.json)"""
    device: str = "cpu"
    """device for the heads: cpu, cuda or cuda:N"""
    json: bool = False
    """print JSON"""
    threads: int | None = None
    """CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share"""

    def __post_init__(self) -> None:
        check_common(self)
        check(self.topk >= 1, "topk", f"must be >= 1, got {self.topk}")
        check(bool(self.cache) != bool(self.heldout_prompts), "cache", "give --cache STORE or --heldout-prompts FILE "
              "(with --model and --out), one of them")
        check(not self.heldout_prompts or bool(self.model), "model", "--heldout-prompts needs --model (the base model "
              "that answers them)")
        check(not self.heldout_prompts or bool(self.out), "out", "--heldout-prompts needs --out DIR (its answers and "
              "their cache go there)")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.max_prompts is None or self.max_prompts >= 1, "max_prompts", f"must be >= 1, got {self.max_prompts}")
        check(not (self.tree and self.tree_budget), "tree", "give --tree or --tree-budget, not both")
        check(all(b >= 1 for b in self.tree_budget or []), "tree_budget",
              f"tree sizes must be >= 1, got {self.tree_budget}")


@torch.no_grad()
def head_ranks(heads: MedusaHeads, cache: Cache, seqs: np.ndarray, topk: int = 10, device: str = "cpu",
               block_tokens: int = 65536, base_lm_head: torch.Tensor | None = None) -> dict[str, np.ndarray]:
    """rank [P, K] (int16, -1 = miss), has_target [P, K] (token t+2+i is an assistant token), seq [P], run [P].

    ``run``: the decoding run of each row (0, 1, ...): one per assistant turn, its rows consecutive from the turn's
    last prompt token (where decoding prefills) to its second-to-last token (``decoding_tokens_per_step``).

    With ``base_lm_head`` (the base model's full [V, H] lm_head), the true token for head i at t is the base
    model's greedy choice there instead of the data's: argmax of lm_head x hidden[t+1+i] (what acceptance
    under greedy decoding depends on); it exists while t+1+i is inside the sequence.
    """
    t2d_index = torch.from_numpy(cache.mapping().target_to_draft()) if base_lm_head is not None else None
    if base_lm_head is not None:
        base_lm_head = base_lm_head.to(device)  # it scores rows on the device (it was left on the CPU: a GPU run)
    K = heads.num_heads
    labels, mask = cache.array("labels"), cache.array("loss_mask").astype(np.int32)
    seqs = np.sort(np.asarray(seqs, dtype=np.int64))
    blocks = make_blocks(seqs, cache.offsets, block_tokens)
    batches = make_batches(seqs, cache.offsets, 1, None)
    out_rank, out_has, out_seq, out_start = [], [], [], []
    heads = heads.to(device).eval()
    for b in progress(BatchStream(StreamSource(cache, labels, K, blocks), batches), "eval", "seq", total=len(batches)):
        piece = batches[b.index][0]
        pos = targets_for(mask, cache.offsets, piece, 1, shift=1)[:, 0] == 1
        if not pos.any():
            continue
        # a decoding run (one prefill) starts at every row whose own token is not an assistant token: the last
        # prompt token of each assistant turn
        start = (targets_for(mask, cache.offsets, piece, 1, shift=0)[:, 0] != 1)[pos]
        start[0] = True
        if base_lm_head is None:
            tg = b.targets.numpy()[pos]
            has = targets_for(mask, cache.offsets, piece, K)[pos] == 1
        else:
            greedy = torch.cat([(c.to(device).float() @ base_lm_head.T).argmax(-1).cpu()
                                for c in b.hidden.split(256)])  # the base model's token after each row
            gd = t2d_index[greedy].numpy()
            n = len(gd)
            tg_all, has_all = np.full((n, K), IGNORE, dtype=np.int64), np.zeros((n, K), dtype=bool)
            for i in range(K):
                tg_all[: max(0, n - 1 - i), i] = gd[1 + i :]
                has_all[: max(0, n - 1 - i), i] = True
            tg, has = tg_all[pos], has_all[pos]
        h = b.hidden[torch.from_numpy(pos)].to(device).float()
        rank = np.full(tg.shape, -1, dtype=np.int16)
        for i, logits in enumerate(heads(h)):
            top = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.cpu().numpy()
            hit = (top == tg[:, i : i + 1]) & (tg[:, i : i + 1] != IGNORE)
            rank[:, i] = np.where(hit.any(1), hit.argmax(1), -1)
        out_rank.append(rank)
        out_has.append(has)
        out_seq.append(np.full(len(rank), piece[0]))
        out_start.append(start)
    if not out_rank:
        raise UserError(f"{cache.path}: no assistant positions to evaluate")
    return {"rank": np.concatenate(out_rank), "has_target": np.concatenate(out_has), "seq": np.concatenate(out_seq),
            "run": np.cumsum(np.concatenate(out_start)) - 1}


def topk_accuracy(rank: np.ndarray, has_target: np.ndarray, ks=(1, 5, 10)) -> dict[int, list[float]]:
    n = np.maximum(has_target.sum(0), 1)
    return {k: (((rank >= 0) & (rank < k) & has_target).sum(0) / n).round(4).tolist() for k in ks}


def evaluate_ranks(r: dict[str, np.ndarray], num_heads: int, topk: int, budgets: list[int],
                   tree: list | None = None, categories: dict[int, str] | None = None,
                   fit: dict[str, np.ndarray] | None = None, questions: dict[int, int] | None = None) -> dict:
    """Every figure of ``eval`` from the ranks: tokens per decoding step first (the chain, each tree fitted on half
    the sequences and reported on the other half, or fitted on ``fit``'s ranks and reported on all of ``r``, and
    ``tree``), then per-position acceptance and top-k per head; with ``categories`` (sequence -> category) the tokens
    per step of each category (``questions``: sequence -> question, when a question has a sequence per turn)."""
    rank, has, seq = r["rank"][:, :num_heads], r["has_target"][:, :num_heads], r["seq"]
    run = r.get("run", seq)
    if fit is None:
        fit_rows, rep = split_halves(seq, run)
        fit_rank = rank[fit_rows]
    else:
        fit_rank, rep = fit["rank"][:, :num_heads], np.ones(len(rank), dtype=bool)
    tps, tps_ci = tokens_per_step(rank, run, seq, chain(num_heads))
    res = {
        "num_heads": num_heads,
        "chain_tokens_per_step": tps, "chain_tokens_per_step_ci": tps_ci,
        "positions": int(len(rank)),
        "sequences": int(len(np.unique(seq))),
        "decoding_runs": int(len(np.unique(run))),
        "top1": topk_accuracy(rank, has, (1,))[1],
        "top5": topk_accuracy(rank, has, (5,))[5],
        f"top{topk}": topk_accuracy(rank, has, (topk,))[topk],
        "chain_acceptance": round(chain_acceptance(rank), 4),
        "chain_ci": bootstrap_ci(1 + accepted_lengths(rank, chain(num_heads)), seq),
        "trees": {},
    }
    if tree is not None:
        res["tree_tokens_per_step"], res["tree_tokens_per_step_ci"] = tokens_per_step(rank, run, seq, tree)
        res["tree_acceptance"] = round(tree_acceptance(rank, tree), 4)
    for n in budgets:
        t = fit_tree(fit_rank, n, topk)
        tp, tp_ci = tokens_per_step(rank[rep], run[rep], seq[rep], t)
        res["trees"][str(n)] = {"tokens_per_step": tp, "tokens_per_step_ci": tp_ci,
                                "acceptance": round(tree_acceptance(rank[rep], t), 4),
                                "ci": bootstrap_ci(1 + accepted_lengths(rank[rep], t), seq[rep]),
                                "fit_acceptance": round(tree_acceptance(fit_rank, t), 4),
                                "nodes": len(t), "tree": [list(p) for p in t]}
    if categories:
        res["categories"] = by_category(rank, run, seq, categories, tree or chain(num_heads), questions)
    return res


def by_category(rank: np.ndarray, run: np.ndarray, seq: np.ndarray, categories: dict[int, str],
                tree: list[tuple[int, ...]], questions: dict[int, int] | None = None) -> dict[str, dict]:
    """{category: {tokens_per_step, ci, prompts (questions), turns (decoding runs)}} for ``tree``, in first-seen
    order; sequences without a category count as "(none)"; the interval resamples questions."""
    cat = np.array([categories.get(int(s), "(none)") for s in seq])
    group = np.array([questions.get(int(s), -1 - int(s)) for s in seq]) if questions else seq
    out = {}
    for c in dict.fromkeys(cat.tolist()):
        m = cat == c
        tp, ci = tokens_per_step(rank[m], run[m], group[m], tree)
        out[c] = {"tokens_per_step": tp, "tokens_per_step_ci": ci, "prompts": int(len(np.unique(group[m]))),
                  "turns": int(len(np.unique(run[m])))}
    return out


def render_table(rows: list[dict], budgets: list[int]) -> str:
    """Tokens per decoding step first (chain, each tree), then per-position acceptance, then top-1/top-5 per head."""
    hdr = (["variant", "heads", "chain tokens/step"] + [f"tree{n} tokens/step" for n in budgets]
           + ["chain per-position acceptance"] + [f"tree{n} per-position acceptance" for n in budgets]
           + ["top1 per head", "top5 per head"])
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for r in rows:
        trees = [r["trees"][str(n)] for n in budgets]
        cells = [r.get("label", r.get("variant", "")), str(r["num_heads"]),
                 _with_ci(r["chain_tokens_per_step"], r.get("chain_tokens_per_step_ci"))]
        cells += [_with_ci(t["tokens_per_step"], t.get("tokens_per_step_ci")) for t in trees]
        cells += [_with_ci(r["chain_acceptance"], r.get("chain_ci"))]
        cells += [_with_ci(t["acceptance"], t.get("ci")) for t in trees]
        cells += [" ".join(f"{x:.3f}" for x in r["top1"]), " ".join(f"{x:.3f}" for x in r["top5"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLUMNS = ("tokens/step: tokens per decoding step that greedy Medusa decoding realises on this text (the decoding "
           "walk: "
           "each assistant turn prefilled once, then steps of 1 + accepted draft tokens, every base-model forward "
           "counted as `speculate` counts it), 95% interval over sequences. per-position acceptance: 1 + accepted "
           "draft tokens averaged over every assistant position (an upper bound: decoding skips the positions "
           "inside each accepted run). top1/top5 per head: share of head i's targets (token t+2+i) in its top k. "
           "Trees are fitted on half the sequences and reported on the other half.")


def category_table(categories: dict[str, dict]) -> str:
    lines = ["| category | prompts | turns | tokens/step |", "|---|---|---|---|"]
    for c, v in categories.items():
        lines.append(f"| {c} | {v['prompts']} | {v['turns']} | "
                     f"{_with_ci(v['tokens_per_step'], v.get('tokens_per_step_ci'))} |")
    return "\n".join(lines)


def _with_ci(x: float, ci: list[float] | None) -> str:
    return f"{x:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{x:.3f}"


def run_eval(cfg: EvalConfig) -> dict:
    """Score the heads on every usable sequence of the cache (or of the answered --heldout-prompts): tokens per
    decoding step, per-position acceptance, top-k per head, fitted trees (written to ``trees_out``)."""
    from .dist import check_device
    from .headsdir import load_heads

    heads_dir = cfg.heads
    heads, mapping, config = load_heads(heads_dir)
    check_device(cfg.device)
    inputs = {"--heads": heads_dir, **({"--cache": cfg.cache} if cfg.cache else
                                       {"--heldout-prompts": cfg.heldout_prompts, "--model": cfg.model})}
    from .rundir import own_dir

    tree = load_tree(cfg.tree, heads.num_heads, cfg.topk) if cfg.tree else None
    # refused now, not after scoring: a file, an input, another command's output
    for d, flag_ in ((cfg.trees_out, "--trees-out"), (cfg.out, "--out")):
        if d:
            own_dir(d, "eval", inputs, flag_)
    categories, questions, cache_path = {}, None, cfg.cache
    if cfg.heldout_prompts:
        from .heldout import answer_cache

        out = Path(cfg.out)
        held = answer_cache(cfg.model, cfg.heldout_prompts, out / "heldout", heads_dir, cfg.max_new_tokens, cfg.dtype,
                            cfg.device, cfg.max_prompts)
        categories, questions, cache_path = held.categories, held.questions, held.cache
    cache = Cache(cache_path)
    require_complete(cache, partial_flag=None)  # eval scores whole caches only
    cache.require_compatible((config.get("cache_fingerprint") or {}).get("model"), heads.hidden_size, heads.num_heads,
                             f"the one the heads in {heads_dir} were trained on",
                             heads_flag=f"--heads {heads_dir}: num_heads", why="; their scores would mean nothing")
    if mapping.fingerprint() != cache.mapping().fingerprint():
        cache.remap(mapping)  # score against the heads' draft vocabulary: tokens outside it are misses
    base = None
    if cfg.base_model:
        from .backbone import read_lm_head

        base = read_lm_head(cfg.base_model, None, cache.meta.fingerprints.get("model"), flag="--base-model").float()
    r = head_ranks(heads, cache, cache.usable_seqs(), cfg.topk, cfg.device, base_lm_head=base)
    res = evaluate_ranks(r, heads.num_heads, cfg.topk, cfg.tree_budget or [], tree, categories,
                         questions=questions)
    if cfg.trees_out:
        write_trees(res, Path(cfg.trees_out))
    if cfg.out:
        (Path(cfg.out) / "results.json").write_text(json.dumps(res, indent=2))
    return res
