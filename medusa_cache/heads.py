"""Medusa heads: ``num_layers`` ResBlocks (x + SiLU(Linear(x)), weight zero-initialised) then Linear(H, V).

Every ResBlock is its own module (the reference's ``[ResBlock(...)] * n`` shares one module n times;
we do not). Head i's parameters are initialised from a generator seeded with (seed, i) alone, so the
first K heads of a run with more heads start identical to a K-head run (what ``ablate`` relies on).
Head i at position t predicts the token at t+2+i; the base lm_head predicts t+1.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ResBlock(nn.Module):
    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def make_head(hidden_size: int, vocab: int, num_layers: int) -> nn.Sequential:
    return nn.Sequential(*[ResBlock(hidden_size) for _ in range(num_layers)], nn.Linear(hidden_size, vocab, bias=False))


def init_head(head: nn.Sequential, seed: int, index: int) -> None:
    """Deterministic init from (seed, index): zero ResBlock weights, torch-default bias and lm weights."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    with torch.no_grad():
        for block in head[:-1]:
            lin = block.linear
            lin.weight.zero_()
            bound = 1 / math.sqrt(lin.in_features)
            lin.bias.copy_(torch.rand(lin.bias.shape, generator=g) * 2 * bound - bound)
        nn.init.kaiming_uniform_(head[-1].weight, a=math.sqrt(5), generator=g)  # as nn.Linear initialises


class MedusaHeads(nn.Module):
    def __init__(self, hidden_size: int, vocab: int, num_heads: int, num_layers: int, seed: int = 0):
        super().__init__()
        self.hidden_size, self.vocab, self.num_layers = hidden_size, vocab, num_layers
        self.heads = nn.ModuleList([make_head(hidden_size, vocab, num_layers) for _ in range(num_heads)])
        for i, h in enumerate(self.heads):
            init_head(h, seed, i)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def first(self, k: int) -> MedusaHeads:
        """The first ``k`` heads (sharing their weights, nothing copied or allocated; ``self`` is unchanged): ablate's
        K-head variants are prefixes of the largest."""
        out = MedusaHeads.__new__(MedusaHeads)
        nn.Module.__init__(out)
        out.hidden_size, out.vocab, out.num_layers = self.hidden_size, self.vocab, self.num_layers
        out.heads = nn.ModuleList(list(self.heads)[:k])
        return out

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """[..., H] -> one [..., V] logits tensor per head."""
        return [h(hidden) for h in self.heads]

    def set_lm_head(self, weight: torch.Tensor) -> None:
        with torch.no_grad():
            for h in self.heads:
                h[-1].weight.copy_(weight)

    def reference_state_dict(self) -> dict[str, torch.Tensor]:
        """Keys of the Medusa reference: ``{h}.{l}.linear.weight|bias``, ``{h}.{L}.weight``."""
        return {k.removeprefix("heads."): v.detach().contiguous() for k, v in self.state_dict().items()}

    def load_reference_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.load_state_dict({f"heads.{k}": v for k, v in sd.items()})
