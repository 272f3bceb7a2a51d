"""Output directories and files: when ``--out`` may be created, continued or replaced, and who holds it.

Every directory medusa-cache writes (a heads directory from ``train``/``ablate``, an ``export``) holds a
marker file, ``.medusa-cache``, naming the command; a cache store is recognised by its own format attribute.
``--overwrite`` replaces a directory only if the same command wrote it *and* it is not one of the command's inputs, nor
inside one, nor holding one. Anything else is a clear error, never a deletion.

Also here: atomic checkpoint files and the resume contract of ``train`` (every setting that fixes the data
order or the model is stored in the checkpoint; a resumed run must match it exactly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import store
from .config import flag
from .errors import UserError

MARKER = ".medusa-cache"


def written_by(path: Path) -> str | None:
    """Which medusa-cache command wrote ``path`` ("train", "export", "ablate", "dump"), or None."""
    try:
        return json.loads((path / MARKER).read_text())["written_by"].split()[-1]
    except (OSError, ValueError, KeyError, IndexError, AttributeError):
        pass
    if store.is_store(path, partial=True):
        return "dump"
    if (path / "train_config.json").exists():  # a train directory from before the marker
        return "train"
    return None


def _related(out: Path, inp: Path) -> bool:
    """``out`` is ``inp``, lies inside it, or holds it."""
    out, inp = out.resolve(), inp.resolve()
    return out == inp or out in inp.parents or inp in out.parents


def check_apart(out: str | Path, inputs: dict[str, str | Path | None] | None, out_flag: str = "--out") -> None:
    """Refuse an output that is, holds or lies inside one of the inputs (flag -> path)."""
    if store.is_url(out):
        return
    for name, inp in (inputs or {}).items():
        for one in ([inp] if isinstance(inp, (str, Path)) else inp or []):
            if one and not store.is_url(one) and _related(Path(out), Path(one)):
                raise UserError(f"{out_flag}: {out} is, holds or lies inside the input {name} {one}; "
                                "choose an output apart from the inputs")


def inside_output(path: Path) -> tuple[Path, str] | None:
    """(the directory, what wrote it) when ``path`` lies inside another command's output (a cache store or a marked
    directory), whose ``--overwrite`` would delete it; else None."""
    for parent in Path(path).resolve().parents:
        if store.is_store(parent, partial=True):
            return parent, "a cache store"
        by = written_by(parent)
        if by:
            return parent, f"the output of `medusa-cache {by}`"
    return None


def own_dir(out: str | Path, kind: str, inputs: dict[str, str | Path | None] | None = None,
            out_flag: str = "--out") -> Path:
    """An output directory of a command without --overwrite (speculate --out, eval --trees-out, demo --out): created
    and marked, or one this same command wrote (its files are replaced, nothing else is touched); a file, an input,
    another command's output or a foreign non-empty directory is refused by name."""
    out = _directory_apart(out, inputs, out_flag)
    if out.exists() and any(out.iterdir()) and written_by(out) != kind:
        by = written_by(out)
        what = f"the output of `medusa-cache {by}`" if by else "files medusa-cache did not write"
        raise UserError(f"{out_flag}: {out} holds {what}; {kind} writes only into a new directory or one it wrote: "
                        "choose another")
    return _mark(out, kind, out_flag)


def _directory_apart(out: str | Path, inputs: dict[str, str | Path | None] | None, out_flag: str) -> Path:
    """``out`` as a path, refused when it touches an input or is an existing file."""
    out = Path(out)
    check_apart(out, inputs, out_flag)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out_flag}: {out} exists and is not a directory")
    return out


def _mark(out: Path, kind: str, out_flag: str) -> Path:
    """Create ``out`` if needed and write the marker naming the command that owns it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / MARKER).write_text(json.dumps({"written_by": f"medusa-cache {kind}"}) + "\n")
    except OSError as e:
        raise UserError(f"{out_flag}: cannot create {out}: {e.strerror}") from None
    return out


def claim(out: str | Path, *, kind: str, overwrite: bool = False, resume: bool = False,
          inputs: dict[str, str | Path | None] | None = None, out_flag: str = "--out") -> Path:
    """Make ``out`` ready for a ``kind`` run (e.g. "train") and mark it as ours; returns its path.

    ``inputs``: flag -> path of everything the command reads; ``out`` may not be, hold or lie inside any.
    """
    out = _directory_apart(out, inputs, out_flag)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            by = written_by(out)
            if by is None:
                raise UserError(f"--overwrite: {out} was not written by medusa-cache (no {MARKER} marker); "
                                "refusing to delete it")
            if by != kind:
                raise UserError(f"--overwrite: {out} holds the output of `medusa-cache {by}`, not of {kind}; "
                                "refusing to delete it")
            store.empty_dir(out)  # in place: a lock held on the directory stays valid
        elif not resume:
            hint = "pass --resume to continue it or --overwrite to replace it" if kind == "train" else \
                "pass --overwrite to replace it"
            raise UserError(f"{out_flag}: {out} already exists; {hint}")
        elif written_by(out) not in (None, kind):
            raise UserError(f"--resume: {out} holds the output of `medusa-cache {written_by(out)}`, not of {kind}; "
                            "refusing to continue it")
    return _mark(out, kind, out_flag)


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file, fsync, then rename: a reader sees the old file or the new one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---- the resume contract ---------------------------------------------------------------------------
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


class FileLock:
    """One writer per output file, as ``store.WriterLock`` is per directory: an exclusive ``flock`` on the file (created
    empty if missing, and removed again if the command then refuses), held for the whole run."""

    def __init__(self, path: Path):
        import fcntl

        self.path, self.created = path, not path.exists()
        try:
            self.fd: int | None = os.open(path, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"--out: cannot create {path}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            raise UserError(f"--out: another medusa-cache command is writing {path} right now; wait for it to finish "
                            "(or stop it), then use --resume, or use another --out") from None

    def release(self, failed: bool = False) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if failed and self.created and self.path.exists() and self.path.stat().st_size == 0:
            self.path.unlink()
