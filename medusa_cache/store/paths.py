"""Where a store lives: local paths and fsspec URLs (s3://, memory://, ...), what is there, and emptying it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import UserError


def is_url(path: str | Path) -> bool:
    """An fsspec URL (s3://, gs://, memory://, file://...) rather than a local path."""
    return "://" in str(path)


def fs_of(path: str | Path):
    import fsspec

    return fsspec.core.url_to_fs(str(path))  # (filesystem, path inside it); credentials from its environment


def exists(path: str | Path) -> bool:
    if is_url(path):
        fs, p = fs_of(path)
        return fs.exists(p)
    return Path(path).exists()


def is_empty(path: str | Path) -> bool:
    """Missing, or a directory with nothing in it."""
    if is_url(path):
        fs, p = fs_of(path)
        return not fs.exists(p) or not fs.ls(p)
    p = Path(path)
    return not p.exists() or (p.is_dir() and not any(p.iterdir()))


def _read_text(path: str) -> str | None:
    try:
        if is_url(path):
            fs, p = fs_of(path)
            return fs.cat_file(p).decode()
        return Path(path).read_text()
    except (OSError, FileNotFoundError):
        return None


def is_store(path: str | Path, partial: bool = False) -> bool:
    """A medusa-cache store; with ``partial``, also one whose preparation was interrupted."""
    text = _read_text(f"{str(path).rstrip('/')}/zarr.json")
    if text is None:
        return False
    try:
        attrs = json.loads(text).get("attributes", {})
    except json.JSONDecodeError:
        return False
    return "medusa_cache" in attrs or (partial and "medusa_cache_preparing" in attrs)



def remove_store(path: str | Path) -> None:
    """--overwrite: remove an existing store, but never a directory that is not one of ours."""
    if is_empty(path):
        return
    if not is_store(path, partial=True):
        raise UserError(f"--overwrite: {path} exists and is not a medusa-cache store; refusing to delete it")
    if is_url(path):
        fs, p = fs_of(path)
        fs.rm(p, recursive=True)
    else:  # empty the directory but keep it: the dump's WriterLock is held on it
        empty_dir(Path(path))


def empty_dir(path: Path) -> None:
    """Remove everything inside ``path`` but keep the directory itself: a ``WriterLock`` held on it stays valid
    (deleting and recreating the directory would leave the lock on a removed inode)."""
    for child in path.iterdir():
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
