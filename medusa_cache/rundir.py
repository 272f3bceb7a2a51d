"""Output directories and files: when ``--out`` may be created, continued or replaced, and who holds it.

Every directory medusa-cache writes (a heads directory from ``train``/``ablate``, an ``export``) holds a
marker file, ``.medusa-cache``, naming the command; a cache store is recognised by its own format attribute.
``--overwrite`` replaces a directory only if the same command wrote it *and* it is not one of the command's inputs, nor
inside one, nor holding one. Anything else is a clear error, never a deletion.

Also here: atomic file writes (checkpoints use them) and the one-writer lock of an output file. The resume contract
of ``train`` (every setting that fixes the data order or the model, checked against the checkpoint) is
``checkpoint.py``'s.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from . import store
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
