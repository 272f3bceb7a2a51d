"""A training run's checkpoint and the resume contract, held here only: the settings a resumed run must keep
(``RESUME_FIXED``), how older checkpoints' settings read today (``upgrade_settings``), the check and its message,
the stored config ``train --resume`` continues with, and the checkpoint itself, loaded once on rank 0 when the
contract is checked and handed to ``restore`` (``--out`` itself, its marker and locks: ``rundir``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import rundir
from .config import flag, to_dict
from .errors import UserError
from .trainconfig import TrainConfig
from .variant import Variant

CHECKPOINT = "checkpoint.pt"


# Settings that fix the data order or the model: a resumed run must have exactly these values.
# (--grad-accum is checked as processes x --grad-accum, the micro-batches per optimizer step.)
RESUME_FIXED = ("num_heads", "num_layers", "epochs", "lr", "weight_decay", "batch_size", "batch_tokens",
                "warmup_ratio", "schedule", "max_grad_norm", "clip_per_head", "head_loss_weights",
                "init_from_lm_head", "distill", "distill_weight", "seed", "val_fraction", "allow_partial",
                "shuffle_buffer", "block_tokens", "mix", "mix_tokens", "draft_vocab_size", "data_fraction")


def resume_settings(cfg: Any, cache_fp: str, val_fp: str | None) -> dict[str, Any]:
    s = {k: getattr(cfg, k) for k in RESUME_FIXED}
    s["cache (fingerprint)"] = cache_fp
    s["val_cache (fingerprint)"] = val_fp
    return s


def rerun_hint(command: str) -> str:
    """How to continue an interrupted run, as the user types it: train reads its stored settings back; ablate is
    rerun as it was (its --cache and head counts are not stored in one place), plus --resume."""
    if command == "train":
        return "rerun with --resume"
    return f"rerun the same `medusa-cache {command}` command with --resume"


ABLATE_FLAGS = {"num_heads": "--heads", "num_layers": "--layers", "lr": "--lr"}  # ablate's names for train's settings


def check_resume(stored: dict[str, Any], now: dict[str, Any], out: Path, command: str = "train") -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming each flag (ablate's names for ablate)."""
    diff = [k for k in stored if stored[k] != now.get(k)]
    if "split" in diff:  # no flag changes it: the rule that draws the held-out split did
        raise UserError(f"--resume: {out} was started when the held-out split was drawn by sequence; this cache "
                        "repeats "
                        "prompts, which are now held out together (no answer to a held-out prompt is trained on), so "
                        "the run cannot continue as it began: start it again with --overwrite")
    if diff:
        names = ABLATE_FLAGS if command == "ablate" else {}
        parts = [f"{names.get(k) or flag(k.split(' ')[0])}{' ' + k.split(' ', 1)[1] if ' ' in k else ''}: checkpoint "
                 f"{stored[k]!r}, now {now.get(k)!r}" for k in diff]
        how = "Give the stored values, or just --resume" if command == "train" else \
            f"Give the stored values: rerun the `medusa-cache {command}` command as it was, with --resume"
        raise UserError(f"--resume: {out} cannot continue with changed settings (the run would differ from an "
                        f"uninterrupted one): {'; '.join(parts)}. {how}")


def trim_metrics(path: Path, step: int, epoch: int) -> None:
    """Drop records written after the checkpoint (train steps > ``step``, validations of epochs >= ``epoch``)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the kill
        if rec.get("split") == "val" and rec.get("epoch", -1) >= epoch:
            continue
        if rec.get("split") != "val" and rec.get("step", 0) > step:
            continue
        keep.append(line + "\n")
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def stored_train_config(out: str | Path) -> dict[str, Any] | None:
    """The settings a train directory was started with (what ``--resume`` alone continues with)."""
    p = Path(out) / "train_config.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"--resume: cannot read {p}: {e}") from None


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
    check_resume(stored, settings, out, command)
    rundir.claim(out, kind=kind, resume=True, inputs=inputs(cfg))
    trim_metrics(out / "metrics.jsonl", ck["step"], ck["epoch"])
    return ck



def upgrade_settings(stored: dict | None, settings: dict, out: Path) -> tuple[dict, dict]:
    """(the checkpoint's resume settings, this run's) as today's contract compares them; older checkpoints' in one
    place: before ``--mix`` existed batches were pieces; before the contract, the config the run was started
    with; before ``--data-fraction``, all the sequences."""
    if stored is None:
        old = stored_train_config(out) or {}
        stored = {k: old.get(k) for k in RESUME_FIXED}
        settings = {k: settings[k] for k in RESUME_FIXED}
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


def restore(out: Path, vs: list[Variant], device: str, ck: dict | None, resume: bool) -> tuple[int, int, int]:
    """Every variant's state from the checkpoint (``ck``: the one ``claim_or_resume`` loaded on rank 0; the other
    ranks load their own); (step, epoch, next batch) to continue from; (0, 0, 0) when not resuming."""
    if not resume:
        return 0, 0, 0
    if ck is None:
        ck = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
    for v, st in zip(vs, ck["variants"], strict=True):
        v.heads.load_state_dict(st["heads"])
        v.opt.load_state_dict(st["optimizer"])
        v.sched.load_state_dict(st["scheduler"])
    return ck["step"], ck["epoch"], ck["next_batch"]
