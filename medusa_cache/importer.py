"""``medusa-cache import``: a cache from SpecForge's offline Eagle3 features, so one capture serves Medusa and Eagle3.

SpecForge's ``scripts/prepare_hidden_states.py`` writes one ``torch.save`` dict per sample, ``rows_{g}-{g+N}/
data_{i}.ckpt`` (``.ckpt.gz`` with ``--compress``): ``input_ids`` [T], ``loss_mask`` [T], ``hidden_state`` [1, T, H]
(the last layer after the final norm: what ``dump`` stores) and ``aux_hidden_state`` [1, T, 3H] (Eagle3's auxiliary
layers; Medusa does not read them, so they are checked for shape and left out). ``vocab_mapping.pt`` beside them
(``d2t``, ``t2d``) is the draft vocabulary unless ``--vocab-mapping`` or ``--draft-vocab-size`` says otherwise (then
built from the imported assistant tokens exactly as ``dump`` builds it).

Files are read in sample order (``data_{i}``), twice and one at a time (ids and masks first, then the states unit by
unit), never the whole corpus in memory; loaded with ``torch.load(weights_only=True)``: tensors only, since these
are files medusa-cache did not write. The result is an ordinary store (every command reads it), written under the same
lock as ``dump`` and resumable with ``--resume``.
"""

from __future__ import annotations

import gzip
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from . import store
from .config import check
from .errors import UserError
from .progress import progress

KEYS = ("input_ids", "loss_mask", "hidden_state")


@dataclass
class ImportConfig:
    """medusa-cache import SRC --format specforge --model PATH/TO/MODEL --out cache.zarr"""

    POSITIONAL: ClassVar[tuple[str, ...]] = ("src",)
    REQUIRED: ClassVar[tuple[str, ...]] = ("model", "out")
    src: str
    """directory of the peer's offline features (SpecForge: rows_*/data_*.ckpt[.gz])"""
    format: Literal["specforge"] = "specforge"
    """whose features: specforge (speculators' are not read yet)"""
    model: str | None = None
    """the model the features were captured with (its fingerprint, vocabulary and hidden size are checked and
    recorded, so eval and speculate know the heads' model)"""
    out: str | None = None
    """output store (a directory; created)"""
    vocab_mapping: str | None = None
    """draft vocabulary to use (ours .safetensors, SpecForge's vocab_mapping.pt, a store or heads directory); default:
    SRC/vocab_mapping.pt when present"""
    draft_vocab_size: int | None = None
    """build the draft vocabulary from the imported assistant tokens (Eagle3's top-N, as dump does) instead"""
    skip_bad_rows: bool = False
    """leave out samples that cannot be used (missing key, shape, NaN/Inf, unreadable) and count them, instead of
    refusing"""
    resume: bool = False
    """continue an interrupted import into --out"""
    overwrite: bool = False
    """replace an existing --out store"""

    def __post_init__(self) -> None:
        check(self.model is not None, "model", "is required")
        check(self.out is not None, "out", "is required")
        check(self.draft_vocab_size is None or self.draft_vocab_size >= 1, "draft_vocab_size",
              f"must be >= 1, got {self.draft_vocab_size}")
        check(not (self.vocab_mapping and self.draft_vocab_size), "vocab_mapping",
              "give --vocab-mapping or --draft-vocab-size, not both")
        check(not (self.resume and self.overwrite), "resume", "--resume and --overwrite exclude each other")


def feature_files(src: Path) -> list[Path]:
    """SpecForge's sample files in sample order (the number in ``data_{i}``), refused by name when there are none."""
    if not src.is_dir():
        raise UserError(f"SRC: {src} is not a directory of SpecForge features")
    files = [p for p in src.rglob("data_*.ckpt*") if re.fullmatch(r"data_\d+\.ckpt(\.gz)?", p.name)]
    if not files:
        raise UserError(f"SRC: {src} holds no SpecForge feature files (rows_*/data_*.ckpt or .ckpt.gz)")
    return sorted(files, key=lambda p: int(re.search(r"\d+", p.name)[0]))


def load_sample(path: Path) -> dict:
    """One sample, tensors only; any file that cannot be read so is refused by name."""
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


def check_sample(d: dict, path: Path, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [T], loss_mask bool [T]) of a sample whose keys, shapes, dtypes and values are usable."""
    missing = [k for k in KEYS if k not in d]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)} (has {', '.join(sorted(d))})")
    ids, mask, h = d["input_ids"], d["loss_mask"], d["hidden_state"]
    if ids.ndim != 1 or mask.shape != ids.shape or ids.dtype not in (torch.int64, torch.int32):
        raise UserError(f"{path}: input_ids {tuple(ids.shape)} {ids.dtype} and loss_mask {tuple(mask.shape)} must be "
                        "one integer id and one mask value per token")
    if h.shape != (1, len(ids), hidden) or not h.is_floating_point():
        raise UserError(f"{path}: hidden_state has shape {tuple(h.shape)} {h.dtype}, expected (1, {len(ids)}, "
                        f"{hidden}) floating point (the model's hidden size is {hidden})")
    aux = d.get("aux_hidden_state")
    if aux is not None and (aux.ndim != 3 or aux.shape[1] != len(ids) or aux.shape[2] % hidden):
        raise UserError(f"{path}: aux_hidden_state has shape {tuple(aux.shape)}, not (1, {len(ids)}, k x {hidden})")
    if not torch.isfinite(h).all():
        raise UserError(f"{path}: hidden_state holds NaN/Inf (SpecForge skips such samples; pass --skip-bad-rows)")
    m = mask.numpy().astype(np.int64)
    if ((m != 0) & (m != 1)).any():
        raise UserError(f"{path}: loss_mask holds values other than 0 and 1")
    return ids.numpy().astype(np.int32), m.astype(bool)


def run_import(cfg: ImportConfig) -> dict:
    """Read SRC's samples, check them, create the store and write its hidden states unit by unit."""
    from transformers import AutoConfig

    from .rundir import check_apart

    src, out = Path(cfg.src), Path(cfg.out)
    files = feature_files(src)
    check_apart(out, {"SRC": src, "--model": cfg.model, "--vocab-mapping": cfg.vocab_mapping})
    if not store.is_empty(out) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out: {out} already exists; pass --resume to continue it or --overwrite to replace it")
    try:
        mc = AutoConfig.from_pretrained(cfg.model)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model: cannot load {cfg.model}: {e}") from None
    lock = store.WriterLock(out, "import")
    try:
        res = _import(cfg, files, out, int(mc.hidden_size), int(mc.vocab_size))
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()
    return res


def _import(cfg: ImportConfig, files: list[Path], out: Path, hidden: int, vocab: int) -> dict:
    kept, ids, masks, bad = [], [], [], []
    dtype = None
    for f in progress(files, "import: read ids", "file"):
        try:
            d = load_sample(f)
            i, m = check_sample(d, f, hidden)
            if i.max(initial=0) >= vocab:
                raise UserError(f"{f}: input_ids reach {int(i.max())}, beyond the model's vocabulary ({vocab})")
        except UserError as e:
            if not cfg.skip_bad_rows:
                raise
            bad.append(str(e))
            continue
        dtype = dtype or ("bfloat16" if d["hidden_state"].dtype == torch.bfloat16 else "float32")
        kept.append(f)
        ids.append(i)
        masks.append(m)
    if not kept:
        raise UserError(f"SRC: {cfg.src}: no usable samples ({len(bad)} bad; the first: {bad[0] if bad else '-'})")
    writer = _open_store(cfg, out, kept, ids, masks, (hidden, vocab, dtype), bad)
    done = writer.done_units()
    stream = _rows(kept)
    for k in progress(range(writer.n_units), "import: write states", "unit"):
        a, b = writer.unit_range(k)
        h = stream.take(a, b)
        if not done[k]:
            writer.write_unit(k, h)
            writer.mark_done(k)
    writer.set_attrs(complete=True)
    return {"store": str(out), "sequences": len(kept), "tokens": int(writer.n_tokens), "skipped": len(bad),
            "units": writer.n_units}


def _open_store(cfg: ImportConfig, out: Path, files: list[Path], ids: list, masks: list, shape: tuple,
                bad: list[str]) -> store.CacheWriter:
    """The store to write into: created (ids, masks, labels, vocabulary, attributes), or the one being resumed."""
    from . import fingerprint as fp
    from .vocab import build_mapping, load_mapping

    hidden, vocab, dtype = shape
    source = fp.sha("\n".join(f"{p.relative_to(cfg.src)}:{p.stat().st_size}" for p in files))
    if cfg.resume and store.is_store(out, partial=True):
        w = store.CacheWriter(out)
        if w.meta.fingerprints.get("data") != source:
            raise UserError(f"--resume: {out} was imported from other files than {cfg.src}: give the same SRC, or "
                            "--overwrite")
        return w
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    all_ids, all_mask = np.concatenate(ids), np.concatenate(masks)
    counts = np.bincount(all_ids[all_mask], minlength=vocab)[:vocab].astype(np.int64)
    default = Path(cfg.src) / "vocab_mapping.pt"
    if cfg.draft_vocab_size:
        mapping = build_mapping(counts, cfg.draft_vocab_size)
    else:
        path = cfg.vocab_mapping or (default if default.is_file() else None)
        if path is not None and store.is_store(path):
            mapping = store.Cache(path).mapping()
        else:
            mapping = load_mapping(path, vocab) if path else build_mapping(counts, vocab)
    layout = store.Layout.default(hidden, 2 if dtype == "bfloat16" else 4, int(np.diff(offsets).max()))
    sources = np.array([[0, int(re.search(r"\d+", p.name)[0])] for p in files], dtype=np.int64)
    contents = store.Contents(all_ids, all_mask, mapping.labels(all_ids, all_mask), offsets, sources, mapping, counts)
    fps = {"model": fp.model_fingerprint(cfg.model), "tokenizer": fp.tokenizer_fingerprint(cfg.model),
           "chat_template": "specforge-import", "data": source, "vocab": mapping.fingerprint(), "dtype": dtype}
    return store.create(out, store.HiddenFormat(hidden, dtype), layout, contents, {
        "vocab_size": vocab, "draft_vocab_size": mapping.draft_size, "data_files": [str(cfg.src)],
        "pipeline": "specforge", "fingerprints": fps,
        "dump_args": {"model": cfg.model, "import": str(cfg.src), "format": cfg.format},
        "counts": {"sequences": len(files), "tokens": int(offsets[-1]), "assistant_tokens": int(all_mask.sum()),
                   "assistant_tokens_in_draft_vocab": int((contents.labels != -100).sum()),
                   "skipped_input_rows": len(bad)},
        "bad_row_examples": bad[:20]})


class _rows:
    """The samples' hidden states as one token axis, read file by file as units ask for them."""

    def __init__(self, files: list[Path]):
        self.files, self.next, self.start, self.buf = list(files), 0, 0, torch.zeros(0)

    def take(self, a: int, b: int) -> torch.Tensor:
        while self.start + len(self.buf) < b:
            h = load_sample(self.files[self.next])["hidden_state"][0]
            self.next += 1
            self.buf = h if not len(self.buf) else torch.cat([self.buf, h])
        out = self.buf[a - self.start : b - self.start]
        self.buf, self.start = self.buf[b - self.start :], b
        return out
