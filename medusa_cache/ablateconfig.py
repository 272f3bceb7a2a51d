"""``AblateConfig``: what ``medusa-cache ablate`` varies and how it chooses (every other flag is ``TrainConfig``'s),
with each flag's help as the field's docstring and its checks naming the flag."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import check


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
        if self.recipe is not None:  # `--recipe a,b` as well as `--recipe a b`
            self.recipe = [x.strip() for r in self.recipe for x in r.split(",") if x.strip()]
        f = self.data_fraction
        check(f is None or (bool(f) and len(set(f)) == len(f) and all(0 < x <= 1 for x in f)), "data_fraction",
              f"give distinct fractions in (0, 1], got {f}")
        check(self.recipe is None or (bool(self.recipe) and len(set(self.recipe)) == len(self.recipe)), "recipe",
              f"give distinct recipe names, got {self.recipe}")
