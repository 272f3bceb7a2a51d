"""What heads are trained and validated on: the per-head losses, distillation, and the validation metrics.

Head i at position t is trained on the token at t+2+i (``loader.targets_for``): cross-entropy over the positions
whose target is an assistant token inside the draft vocabulary, averaged per head; with distillation, plus the
KL divergence from the base model's renormalised draft-vocabulary distribution at t+1+i.

Two accuracies exist and are named apart:
- ``val_top1`` / ``top1`` in metrics.jsonl (here): over positions whose target is in the draft vocabulary
  (what the loss sees);
- ``eval``'s ``top1`` (``evaluate.topk_accuracy``): over all assistant positions, an out-of-draft target
  counted as a miss (what decoding sees). The second is never higher than the first.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .heads import MedusaHeads
from .loader import make_batches, make_blocks
from .store import Cache
from .stream import BatchStream, StreamSource
from .vocab import IGNORE


def head_losses(heads: MedusaHeads, hidden: torch.Tensor, targets: torch.Tensor,
                teacher: tuple[torch.Tensor, torch.Tensor] | None = None, distill_weight: float = 0.0,
                with_stats: bool = True) -> tuple[list, list]:
    """Per head: loss, and (with ``with_stats``) a tensor [#valid, #top1-correct, #top5-correct].

    The loss is the mean cross-entropy over valid targets (0 if none), plus, with ``teacher`` =
    (teacher log-probs over the draft vocab for the rows of ``Batch.ahead``, ``Batch.ahead_idx``),
    ``distill_weight`` x KL(teacher at t+1+i || head i at t) averaged over the same positions.

    Lean by design (this runs every step): no boolean selection of rows (its backward is an accumulating
    index_put), no host synchronisation (counts stay tensors), top-k only when ``with_stats``.
    """
    losses, stats = [], []
    for i, logits in enumerate(heads(hidden)):
        t = targets[:, i]
        valid = t != IGNORE
        n = valid.sum()
        logits = logits.float()  # a no-op in float32; under bf16 autocast the loss is taken in float32
        loss = F.cross_entropy(logits, t, ignore_index=IGNORE, reduction="sum") / n.clamp_min(1)
        if teacher is not None:
            t_logp, idx = teacher
            rows = idx[:, i]
            keep = valid & (rows >= 0)
            p = t_logp[rows.clamp_min(0)]
            kl = (p.exp() * (p - logits.log_softmax(-1))).sum(-1)
            loss = loss + distill_weight * (kl * keep).sum() / keep.sum().clamp_min(1)
        losses.append(loss)
        if with_stats:
            with torch.no_grad():
                top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
                hit = (top == t[:, None]) & valid[:, None]
                stats.append(torch.stack([n, hit[:, 0].sum(), hit.any(-1).sum()]))
    return losses, stats


@torch.no_grad()
def validate(heads: MedusaHeads, cache: Cache, seqs: np.ndarray, device: str, block_tokens: int,
             eval_tokens: int = 2048) -> dict:
    """Validation loss/top-1/top-5 per head over ``seqs``.

    Reads in blocks of ``block_tokens`` but computes ``eval_tokens`` positions at a time, so at most
    heads x eval_tokens x draft-vocab logits are alive (a training step's worth), whatever --block-tokens is.
    """
    heads.eval()
    num = len(heads.heads)
    labels = cache.array("labels")
    tot = np.zeros((num, 3), dtype=np.int64)
    loss_sum = np.zeros(num)
    blocks = make_blocks(seqs, cache.offsets, block_tokens)
    batches = make_batches(np.concatenate(blocks) if blocks else seqs, cache.offsets, 1, eval_tokens)
    stream = BatchStream(StreamSource(cache, labels, num, blocks), batches)
    for b in stream:
        h = b.hidden.to(device).float()
        losses, stats = head_losses(heads, h, b.targets.to(device))
        for i, st in enumerate(stats):
            n, t1, t5 = st.tolist()
            tot[i] += (n, t1, t5)
            loss_sum[i] += float(losses[i]) * n
    heads.train()
    n = np.maximum(tot[:, 0], 1)
    # top-k over every assistant target, as eval counts it: a target outside the draft vocabulary is a miss
    m = np.maximum(assistant_targets(cache, seqs, num), 1)
    return {"val_tokens": tot[:, 0].tolist(), "val_loss": (loss_sum / n).round(4).tolist(),
            "val_top1": (tot[:, 1] / m).round(4).tolist(), "val_top5": (tot[:, 2] / m).round(4).tolist()}


def assistant_targets(cache: Cache, seqs: np.ndarray, num_heads: int) -> np.ndarray:
    """[num_heads]: positions t of ``seqs`` whose token t+2+i is an assistant token, in or out of the draft
    vocabulary (the denominator of top-k accuracy)."""
    c = np.concatenate([[0], np.cumsum(cache.array("loss_mask"), dtype=np.int64)])  # assistant tokens before row
    seqs = np.asarray(seqs, dtype=np.int64)
    a, b = cache.offsets[seqs], cache.offsets[seqs + 1]
    return np.array([int((c[b] - c[np.minimum(a + 2 + i, b)]).sum()) for i in range(num_heads)], dtype=np.int64)
