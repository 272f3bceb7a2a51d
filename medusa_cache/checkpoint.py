"""A training run's checkpoint and ``--out``: claim it (fresh) or check the resume contract and load the state."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import rundir
from .config import to_dict
from .errors import UserError
from .trainconfig import TrainConfig
from .variant import Variant

CHECKPOINT = "checkpoint.pt"


def inputs(cfg: TrainConfig) -> dict:
    return {"--cache": cfg.cache, "--val-cache": cfg.val_cache, "--init-from-lm-head": cfg.init_from_lm_head,
            "--distill": cfg.distill}



class FreshClaim:
    """What a fresh run claimed: if it fails before its first checkpoint (a damaged chunk, a missing extra), what it
    wrote is removed, so the same command can simply be run again (neither "already exists" nor "no checkpoint to
    resume"). Released like a lock; only this run's claim is ever emptied."""

    def __init__(self, out: Path):
        self.out = out

    def release(self, failed: bool = False) -> None:
        if failed and self.out.is_dir() and not (self.out / CHECKPOINT).exists():
            from .store import empty_dir

            empty_dir(self.out)


def claim_or_resume(cfg: TrainConfig, settings: dict, group: int, lock: list, kind: str = "train",
                    locked: bool = False, command: str = "train") -> dict | None:
    """Lock and claim --out (rank 0; the lock is appended to ``lock`` and held until the run ends; ``locked``: the
    caller holds it already). Fresh: write the resolved config. Resume: check the contract, return the checkpoint."""
    from .store import WriterLock

    if not locked:
        lock.append(WriterLock(cfg.out, "train"))
    if cfg.resume and not (Path(cfg.out) / CHECKPOINT).exists():
        raise UserError(f"--resume: no checkpoint in {cfg.out}" + (
            "; without --resume the run starts afresh (add --overwrite if the directory holds files)"
            if command == "train" else ""))
    if not cfg.resume:
        out = rundir.claim(cfg.out, kind=kind, overwrite=cfg.overwrite, inputs=inputs(cfg))
        lock.append(FreshClaim(out))
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        return None
    out = Path(cfg.out)
    ck = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
    if ck.get("group", group) != group:
        raise UserError(f"--resume: {out} was trained with {ck['group']} micro-batches per step "
                        f"(processes x --grad-accum), this run has {group}; keep the product the same")
    stored, settings = upgrade_settings(ck.get("settings"), settings, out)
    rundir.check_resume(stored, settings, out, command)
    rundir.claim(out, kind=kind, resume=True, inputs=inputs(cfg))
    rundir.trim_metrics(out / "metrics.jsonl", ck["step"], ck["epoch"])
    return ck



def upgrade_settings(stored: dict | None, settings: dict, out: Path) -> tuple[dict, dict]:
    """(the checkpoint's resume settings, this run's) as today's contract compares them; older checkpoints' in one
    place: before ``--mix`` existed batches were pieces; before the contract, the config the run was started
    with; before ``--data-fraction``, all the sequences."""
    if stored is None:
        old = rundir.stored_train_config(out) or {}
        stored = {k: old.get(k) for k in rundir.RESUME_FIXED}
        settings = {k: settings[k] for k in rundir.RESUME_FIXED}
    elif "mix" not in stored:
        stored = {**stored, "mix": "pieces", "mix_tokens": settings["mix_tokens"]}
    if stored.get("data_fraction") is None:  # before --data-fraction every run trained on all its sequences
        stored = {**stored, "data_fraction": 1.0}
    if "split" not in stored and "split" in settings:  # before prompt groups every split was by sequence (the
        stored = {**stored, "split": "sequences"}  # same split wherever no prompt repeats)
    return stored, settings


def save(out: Path, vs: list[Variant], step: int, next_epoch: int, next_batch: int, group: int,
         settings: dict) -> None:
    """Write the checkpoint atomically: every variant's heads, optimizer and scheduler, and where to continue."""
    rundir.atomic_save({"variants": [{"heads": v.heads.state_dict(), "optimizer": v.opt.state_dict(),
                                      "scheduler": v.sched.state_dict()} for v in vs],
                        "step": step, "epoch": next_epoch, "next_batch": next_batch, "group": group,
                        "settings": settings}, out / CHECKPOINT)


def restore(out: Path, vs: list[Variant], device: str) -> tuple[int, int, int]:
    """Load every variant's state from the checkpoint; (step, epoch, next batch) to continue from."""
    ck = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
    for v, st in zip(vs, ck["variants"], strict=True):
        v.heads.load_state_dict(st["heads"])
        v.opt.load_state_dict(st["optimizer"])
        v.sched.load_state_dict(st["scheduler"])
    return ck["step"], ck["epoch"], ck["next_batch"]
