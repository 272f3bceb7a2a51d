"""The peers' offline feature files, written down once: SpecForge's Eagle3 capture and speculators' (vLLM) capture.

Read by ``import`` (into a cache), written by ``export-features`` (from a cache with ``--aux-layers``). The facts come
from the peers' own readers (checked again there before changing anything here):

- **SpecForge** (``scripts/prepare_hidden_states.py``; read by ``specforge/runtime/data_plane/offline_reader.py``
  ``list_feature_files`` + ``feature_store.load_feature_file``, normalised by
  ``specforge/algorithms/eagle3/data.py::normalize_offline_sample``): one ``torch.save`` dict per sample,
  ``rows_{g}-{g+2000}/data_{i}.ckpt`` (``.ckpt.gz`` when compressed) with ``input_ids`` [T] int64, ``loss_mask`` [T],
  ``hidden_state`` [1, T, H] (the last layer after the final norm: our ``hidden``) and ``aux_hidden_state``
  [1, T, 3H] (decoder layers 1, N/2-1, N-4, 0-based, before any norm, side by side); ``vocab_mapping.pt``
  (``d2t``, ``t2d``) beside them.
- **speculators** (``scripts/prepare_data.py`` writes a ``datasets`` directory with ``input_ids``, ``loss_mask``,
  ``seq_len``; ``scripts/data_generation_offline.py`` the states; ``src/speculators/train/data.py::ArrowDataset``
  reads ``load_from_disk(DIR)`` and ``DIR/hidden_states/hs_{i}.safetensors`` for dataset row i): ``hidden_states``
  [T, k+1, H] (vLLM's layers 2, N/2, N-3 = our 1, N/2-1, N-4, then N: the last layer **before** the final norm)
  and ``token_ids`` [T], which must equal the row's ``input_ids``; the draft vocabulary in ``DIR/d2t.npy`` and
  ``DIR/t2d.npy`` (what ``scripts/train.py`` reads by default; the same offsets and mask as SpecForge's).

Files are loaded as tensors only (``torch.load(weights_only=True)``, safetensors): these are files medusa-cache did
not write.
"""

from __future__ import annotations

import gzip
import io
import re
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

SPECFORGE_GROUP = 2000  # samples per rows_{g}-{g+2000} directory (prepare_hidden_states.py)


def specforge_path(root: Path, i: int, compress: bool = False) -> Path:
    g = i // SPECFORGE_GROUP * SPECFORGE_GROUP
    return root / f"rows_{g}-{g + SPECFORGE_GROUP}" / f"data_{i}.ckpt{'.gz' if compress else ''}"


def specforge_files(src: Path) -> list[Path]:
    """SpecForge's sample files in sample order (the number in ``data_{i}``), refused by name when there are none."""
    if not src.is_dir():
        raise UserError(f"SRC: {src} is not a directory of SpecForge features")
    files = [p for p in src.rglob("data_*.ckpt*") if re.fullmatch(r"data_\d+\.ckpt(\.gz)?", p.name)]
    if not files:
        raise UserError(f"SRC: {src} holds no SpecForge feature files (rows_*/data_*.ckpt or .ckpt.gz)")
    return sorted(files, key=sample_index)


def sample_index(path: Path) -> int:
    """i of ``data_{i}.ckpt[.gz]`` or ``hs_{i}.safetensors``."""
    return int(re.search(r"\d+", path.name)[0])


def load_specforge(path: Path) -> dict:
    """One SpecForge sample, tensors only; any file that cannot be read so is refused by name."""
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        d = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except (EOFError, OSError, gzip.BadGzipFile, RuntimeError) as e:
        raise UserError(f"{path}: cannot be read ({type(e).__name__}: {e}); truncated or not a torch.save file"
                        ) from None
    except Exception as e:  # noqa: BLE001 - weights_only refuses pickled objects that are not tensors
        raise UserError(f"{path}: holds more than tensors ({type(e).__name__}: {str(e).splitlines()[0]}); "
                        "medusa-cache loads only tensors from files it did not write") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a dict of tensors, got {type(d).__name__}")
    return d


def save_specforge(path: Path, sample: dict[str, torch.Tensor], compress: bool) -> None:
    """Write one sample as ``prepare_hidden_states.py`` does (``torch.save``; gzip with ``--compress``), atomically."""
    buf = io.BytesIO()
    torch.save(sample, buf)
    data = gzip.compress(buf.getvalue(), compresslevel=1) if compress else buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def save_vocab_mapping(path: Path, d2t: np.ndarray, t2d: np.ndarray) -> None:
    """SpecForge's ``vocab_mapping.pt``: ``d2t`` int64 offsets, ``t2d`` bool mask."""
    torch.save({"d2t": torch.from_numpy(d2t.astype(np.int64)), "t2d": torch.from_numpy(t2d.astype(bool))}, path)


def save_speculators_mapping(out: Path, d2t: np.ndarray, t2d: np.ndarray) -> None:
    """speculators' draft vocabulary beside its data (``scripts/train.py`` reads ``DATA/d2t.npy`` and ``DATA/t2d.npy``
    by default): the same offsets and mask as SpecForge's, as numpy files."""
    np.save(out / "d2t.npy", d2t.astype(np.int64))
    np.save(out / "t2d.npy", t2d.astype(bool))


def load_speculators_mapping(src: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(d2t, t2d) from ``SRC/d2t.npy`` and ``SRC/t2d.npy`` when both are there (arrays only: no pickles)."""
    if not ((src / "d2t.npy").is_file() and (src / "t2d.npy").is_file()):
        return None
    try:
        return np.load(src / "d2t.npy").astype(np.int64), np.load(src / "t2d.npy").astype(bool)
    except (OSError, ValueError) as e:
        raise UserError(f"SRC: {src}/d2t.npy, t2d.npy: cannot be read as numpy arrays ({e})") from None


def _datasets():
    """The ``datasets`` package (speculators' data directories are its ``save_to_disk`` output), or one line saying how
    to install it."""
    try:
        import datasets
    except ImportError:
        raise UserError("--format speculators needs the `datasets` package (speculators' data format): "
                        "pip install 'medusa-cache[peers]'") from None
    return datasets


def speculators_dataset(src: Path):
    """speculators' dataset directory (``prepare_data.py``'s ``save_to_disk``): ids and masks per row."""
    load_from_disk = _datasets().load_from_disk
    try:
        ds = load_from_disk(str(src))
    except Exception as e:  # noqa: BLE001
        raise UserError(f"SRC: {src} is not a speculators dataset directory (prepare_data.py's output: "
                        f"{type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = {"input_ids", "loss_mask"} - set(ds.column_names)
    if missing:
        raise UserError(f"SRC: {src}: the dataset lacks column(s) {sorted(missing)} (has {ds.column_names})")
    return ds.with_format(None)


def speculators_states(src: Path, i: int) -> Path:
    return src / "hidden_states" / f"hs_{i}.safetensors"


def load_speculators(path: Path) -> dict:
    """One speculators sample (``hidden_states`` [T, k+1, H], ``token_ids`` [T]); refused by name when unreadable."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: missing (speculators' capture has no states for this dataset row)")
    try:
        d = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise UserError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {e})") from None
    for key in ("hidden_states", "token_ids"):
        if key not in d:
            raise UserError(f"{path}: missing key {key} (has {', '.join(sorted(d))})")
    return d


def save_speculators(out: Path, rows, n: int, states) -> None:
    """speculators' layout: ``datasets`` rows (``input_ids``, ``loss_mask``, ``seq_len``; ``rows()`` yields them one at
    a time, written through an Arrow cache in ``out``, never all in memory) saved to ``out``, and each row's states,
    ``states(i)`` -> (``hidden_states`` [T, k+1, H], ``token_ids`` [T]), in ``out/hidden_states/hs_{i}.safetensors``."""
    import shutil

    from safetensors.torch import save_file

    from .progress import progress

    datasets = _datasets()
    Dataset = datasets.Dataset  # noqa: N806 - the library's class
    hs = out / "hidden_states"
    hs.mkdir(parents=True, exist_ok=True)
    for i in progress(range(n), "export-features", "sequence"):
        h, ids = states(i)
        save_file({"hidden_states": h.contiguous(), "token_ids": ids.contiguous()}, str(speculators_states(out, i)))
    datasets.disable_progress_bars()  # ours counted the files
    arrow = Dataset.from_generator(rows, cache_dir=str(out / "arrow.tmp"), fingerprint="medusa-cache-export")
    # torch format, as prepare_data.py saves it: ArrowDataset compares the row's input_ids with torch.equal
    arrow.with_format("torch").save_to_disk(str(out / "dataset.tmp"))
    for f in (out / "dataset.tmp").iterdir():  # the dataset's files beside hidden_states/, as prepare_data.py has
        f.replace(out / f.name)
    (out / "dataset.tmp").rmdir()
    del arrow
    shutil.rmtree(out / "arrow.tmp", ignore_errors=True)
