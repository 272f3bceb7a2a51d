"""The heads a run trains: one ``Variant`` per (layers, lr) sharing the batch stream, built and clipped here."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .heads import MedusaHeads
from .store import Cache
from .trainconfig import TrainConfig


def draft_lm_head(model_dir: str, cache: Cache, flag: str) -> torch.Tensor:
    """The base model's lm_head rows of the cache's draft vocabulary [D, H], fingerprint-checked."""
    from .backbone import read_lm_head

    rows = cache.mapping().draft_to_target
    w = read_lm_head(model_dir, rows, cache.meta.fingerprints.get("model"), flag=flag)
    if w.shape != (len(rows), cache.hidden_size):
        raise UserError(f"{flag}: lm_head rows have shape {tuple(w.shape)}, expected {(len(rows), cache.hidden_size)}")
    return w.float()


def build_heads(cfg: TrainConfig, cache: Cache, lm_init: torch.Tensor | None = None) -> MedusaHeads:
    heads = MedusaHeads(cache.hidden_size, cache.meta.draft_vocab_size, cfg.num_heads, cfg.num_layers, cfg.seed)
    if lm_init is not None:
        heads.set_lm_head(lm_init)
    return heads


@dataclass
class Variant:
    """One set of heads trained on the shared batch stream (ablate trains several side by side)."""

    name: str
    heads: MedusaHeads
    opt: torch.optim.Optimizer
    sched: object
    window: torch.Tensor  # [K, 3] (#valid, #top1, #top5) of the log step's batches, on the device
    window_loss: torch.Tensor  # [K] sum of loss x #valid since the last log, on the device
    window_n: torch.Tensor  # [K] #valid since the last log

    def window_record(self) -> dict:
        """Loss, per-head loss, top-1 and top-5 since the last log (then the window starts over)."""
        w, wl, wn = self.window.cpu().numpy(), self.window_loss.cpu().numpy(), self.window_n.cpu().numpy()
        n, n_last = np.maximum(wn, 1), np.maximum(w[:, 0], 1)
        rec = {"loss": round(float((wl / n).sum()), 4), "head_loss": (wl / n).round(4).tolist(),
               "top1": (w[:, 1] / n_last).round(4).tolist(), "top5": (w[:, 2] / n_last).round(4).tolist()}
        self.window.zero_(), self.window_loss.zero_(), self.window_n.zero_()
        return rec


def make_variant(name: str, cfg: TrainConfig, cache: Cache, total_steps: int, num_layers: int, lr: float,
                 lm_init: torch.Tensor | None) -> Variant:
    heads = build_heads(replace(cfg, num_layers=num_layers), cache, lm_init).to(cfg.device)
    on_cuda = cfg.device.startswith("cuda")
    # fused kernels on CUDA, the multi-tensor (foreach) path elsewhere: one kernel per op, not one per tensor
    opt = torch.optim.AdamW(heads.parameters(), lr=lr, weight_decay=cfg.weight_decay, fused=on_cuda or None,
                            foreach=None if on_cuda else True)
    from transformers import get_scheduler

    sched = get_scheduler(cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup", opt,
                          num_warmup_steps=math.ceil(cfg.warmup_ratio * total_steps), num_training_steps=total_steps)
    k = cfg.num_heads
    dev = cfg.device
    return Variant(name, heads, opt, sched, torch.zeros(k, 3, dtype=torch.long, device=dev),
                   torch.zeros(k, device=dev), torch.zeros(k, dtype=torch.long, device=dev))



def clip(v: Variant, cfg: TrainConfig) -> None:
    if cfg.max_grad_norm <= 0:
        return
    if cfg.clip_per_head:
        for hd in v.heads.heads:
            torch.nn.utils.clip_grad_norm_(hd.parameters(), cfg.max_grad_norm)
    else:
        torch.nn.utils.clip_grad_norm_(v.heads.parameters(), cfg.max_grad_norm)


def parallel(heads: torch.nn.Module, world: int, device: str) -> torch.nn.Module:
    """The heads as the training step calls them: wrapped in DDP under torchrun (gradients averaged)."""
    if world == 1:
        return heads
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(heads, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)


def write_heads(vs: list[Variant], cache: Cache, cfg: TrainConfig, out: Path) -> None:
    """Each variant's heads to ``out`` (one variant) or ``out/variants/NAME``, in the heads directory format."""
    from .headsdir import save_heads

    for v in vs:
        d = out / "variants" / v.name if v.name else out
        d.mkdir(parents=True, exist_ok=True)
        save_heads(v.heads.cpu(), cache, cfg, d)
