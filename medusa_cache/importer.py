"""``medusa-cache import``: a cache from SpecForge's or speculators' offline Eagle3 features, so one capture serves
Medusa and Eagle3 (the peers' file layouts: ``peers.py``).

- SpecForge: ``hidden_state`` is the last layer after the final norm, what ``dump`` stores, taken as it is.
- speculators: the last slot of ``hidden_states`` is the last layer **before** the final norm: it goes through the
  model's own final norm module (built from ``--model``'s config, its weight read from the checkpoint: the model is
  never loaded whole), so the cache holds what ``dump`` would.

With ``--keep-aux`` the auxiliary layers are stored too (``aux_hidden``, format 6: SpecForge's three as
``--aux-layers`` names them, default Eagle3's 1, N/2-1, N-4; speculators' slots with N-1 last), so the imported cache
can be exported again. ``vocab_mapping.pt`` beside SpecForge's files is the draft vocabulary unless
``--vocab-mapping`` or ``--draft-vocab-size`` says otherwise (then built from the imported assistant tokens exactly as
``dump`` builds it).

Samples are read in sample order, twice and one at a time (ids and masks first, then the states unit by unit), never
the whole corpus in memory. The result is an ordinary store (every command reads it), written under the same lock as
``dump`` and resumable with ``--resume``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from . import peers, store
from .config import check, check_common
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
    format: Literal["specforge", "speculators"] = "specforge"
    """whose features: specforge (rows_*/data_*.ckpt[.gz]) or speculators (SRC: prepare_data.py's dataset
    directory, its states in SRC/hidden_states/hs_*.safetensors; needs `datasets`)"""
    model: str | None = None
    """the model the features were captured with (its fingerprint, vocabulary and hidden size are checked and
    recorded, so eval and speculate know the heads' model)"""
    out: str | None = None
    """output store (a directory; created)"""
    vocab_mapping: str | None = None
    """draft vocabulary to use (ours .safetensors, SpecForge's vocab_mapping.pt, a store or heads directory); default:
    SpecForge's SRC/vocab_mapping.pt or speculators' SRC/d2t.npy + t2d.npy when present, else the full vocabulary"""
    draft_vocab_size: int | None = None
    """build the draft vocabulary from the imported assistant tokens (Eagle3's top-N, as dump does) instead"""
    keep_aux: bool = False
    """also store the auxiliary layers (aux_hidden), so the cache can be exported again with export-features"""
    aux_layers: str | None = None
    """--keep-aux: which decoder layers the features' auxiliary states are (specforge default: eagle3, SpecForge's
    1, N/2-1, N-4; speculators default: speculators, those and N-1; or ids like 1,15,28)"""
    skip_bad_rows: bool = False
    """leave out samples that cannot be used (missing key, shape, NaN/Inf, unreadable) and count them, instead of
    refusing"""
    chunk_tokens: int | None = None
    """tokens per Zarr chunk (default: ~1 MiB of hidden states, as dump)"""
    shard_tokens: int | None = None
    """tokens per shard = per write unit (default: >= 16 x the longest sample, as dump); a multiple of
    --chunk-tokens"""
    resume: bool = False
    """continue an interrupted import into --out"""
    overwrite: bool = False
    """replace an existing --out store"""

    def __post_init__(self) -> None:
        check_common(self)
        check(self.draft_vocab_size is None or self.draft_vocab_size >= 1, "draft_vocab_size",
              f"must be >= 1, got {self.draft_vocab_size}")
        check(not (self.vocab_mapping and self.draft_vocab_size), "vocab_mapping",
              "give --vocab-mapping or --draft-vocab-size, not both")
        check(not self.aux_layers or self.keep_aux, "aux_layers", "names the stored auxiliary layers: give --keep-aux")


def check_sample(d: dict, path: Path, hidden: int) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [T], loss_mask bool [T]) of a SpecForge sample whose keys, shapes, dtypes and values are
    usable."""
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
    return ids.numpy().astype(np.int32), _mask(mask, path)


def _mask(mask, path: Path) -> np.ndarray:
    m = np.asarray(mask).astype(np.int64)
    if ((m != 0) & (m != 1)).any():
        raise UserError(f"{path}: loss_mask holds values other than 0 and 1")
    return m.astype(bool)


@dataclass
class Sample:
    ids: np.ndarray
    """int32 [T]"""
    mask: np.ndarray
    """bool [T]"""
    hidden: torch.Tensor
    """[T, H]: the last layer after the final norm"""
    aux: torch.Tensor | None
    """[T, A*H]: the auxiliary layers as the peer stored them, or None"""


class SpecForgeSource:
    """SpecForge's samples, ``data_{i}.ckpt[.gz]`` in sample order."""

    def __init__(self, src: Path, hidden: int, model: str):
        self.files, self.hidden = peers.specforge_files(src), hidden

    def __len__(self) -> int:
        return len(self.files)

    def name(self, i: int) -> Path:
        return self.files[i]

    def read(self, i: int, states: bool = True) -> Sample:
        f = self.files[i]
        d = peers.load_specforge(f)
        ids, mask = check_sample(d, f, self.hidden)
        aux = d.get("aux_hidden_state")
        return Sample(ids, mask, d["hidden_state"][0], None if aux is None else aux[0])


class SpeculatorsSource:
    """speculators' dataset rows and their ``hidden_states/hs_{i}.safetensors``; the last slot through the model's
    final norm."""

    def __init__(self, src: Path, hidden: int, model: str):
        from .backbone import final_norm

        self.src, self.hidden = src, hidden
        self.rows = peers.speculators_dataset(src)
        self.norm = final_norm(model)

    def __len__(self) -> int:
        return len(self.rows)

    def name(self, i: int) -> Path:
        return peers.speculators_states(self.src, i)

    def read(self, i: int, states: bool = True) -> Sample:
        """``states`` False (the first pass: ids, masks, checks): ``hidden`` is the last slot before the norm, whose
        shape and dtype are all that pass reads; the norm runs only when the states are written."""
        f, row = self.name(i), self.rows[i]
        d = peers.load_speculators(f)
        ids, hs = np.asarray(row["input_ids"]), d["hidden_states"]
        if not np.array_equal(d["token_ids"].numpy(), ids):
            raise UserError(f"{f}: token_ids differ from dataset row {i}'s input_ids (speculators skips such samples)")
        if hs.ndim != 3 or hs.shape[0] != len(ids) or hs.shape[2] != self.hidden or not hs.is_floating_point():
            raise UserError(f"{f}: hidden_states has shape {tuple(hs.shape)} {hs.dtype}, expected ({len(ids)}, k+1, "
                            f"{self.hidden}) floating point (the model's hidden size is {self.hidden})")
        if not torch.isfinite(hs).all():
            raise UserError(f"{f}: hidden_states holds NaN/Inf (pass --skip-bad-rows)")
        h = hs[:, -1]
        if states:
            with torch.inference_mode():
                h = self.norm.to(hs.dtype)(h)
        return Sample(ids.astype(np.int32), _mask(row["loss_mask"], f), h, hs.reshape(len(ids), -1))


SOURCES = {"specforge": SpecForgeSource, "speculators": SpeculatorsSource}


def run_import(cfg: ImportConfig) -> dict:
    """Read SRC's samples, check them, create the store and write its hidden states unit by unit."""
    from transformers import AutoConfig

    from .rundir import check_apart

    src, out = Path(cfg.src), Path(cfg.out)
    if not src.is_dir():
        raise UserError(f"SRC: {src} is not a directory of {cfg.format} features")
    check_apart(out, {"SRC": src, "--model": cfg.model, "--vocab-mapping": cfg.vocab_mapping})
    if not store.is_empty(out) and not (cfg.resume or cfg.overwrite):
        raise UserError(f"--out: {out} already exists; pass --resume to continue it or --overwrite to replace it")
    try:
        mc = AutoConfig.from_pretrained(cfg.model)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"--model: cannot load {cfg.model}: {e}") from None
    mc = getattr(mc, "text_config", None) or mc
    source = SOURCES[cfg.format](src, int(mc.hidden_size), cfg.model)
    lock = store.WriterLock(out, "import")
    try:
        res = _import(cfg, source, out, mc)
    except BaseException:
        lock.release(failed=True)
        raise
    lock.release()
    return res


def _aux_layers(cfg: ImportConfig, sample: Sample, name: Path, mc) -> tuple[int, ...]:
    """--keep-aux: the layer ids of the features' auxiliary states, checked against their width."""
    from .backbone import resolve_aux_layers

    if not cfg.keep_aux:
        return ()
    layers = resolve_aux_layers(cfg.aux_layers or ("eagle3" if cfg.format == "specforge" else "speculators"),
                                int(mc.num_hidden_layers))
    width = 0 if sample.aux is None else sample.aux.shape[1]
    if width != len(layers) * sample.hidden.shape[1]:
        raise UserError(f"--keep-aux: {name} holds {width // sample.hidden.shape[1]} auxiliary layers, not the "
                        f"{len(layers)} of {list(layers)} (give them with --aux-layers)")
    return layers


def _import(cfg: ImportConfig, source, out: Path, mc) -> dict:
    kept, ids, masks, bad = [], [], [], []
    first = None
    for i in progress(range(len(source)), "import: read ids", "sample"):
        try:
            smp = source.read(i, states=False)
            if smp.ids.max(initial=0) >= mc.vocab_size:
                raise UserError(f"{source.name(i)}: input_ids reach {int(smp.ids.max())}, beyond the model's "
                                f"vocabulary ({mc.vocab_size})")
            first = first or (smp, _aux_layers(cfg, smp, source.name(i), mc))
            if first[1] and smp.aux.shape[1] != first[0].aux.shape[1]:
                raise UserError(f"{source.name(i)}: {smp.aux.shape[1]} auxiliary columns, the first sample has "
                                f"{first[0].aux.shape[1]}")
        except UserError as e:
            if not cfg.skip_bad_rows:
                raise
            bad.append(str(e))
            continue
        kept.append(i)
        ids.append(smp.ids)
        masks.append(smp.mask)
    if not kept:
        raise UserError(f"SRC: {cfg.src}: no usable samples ({len(bad)} bad; the first: {bad[0] if bad else '-'})")
    dtype = "bfloat16" if first[0].hidden.dtype == torch.bfloat16 else "float32"
    hidden_format = store.HiddenFormat(int(mc.hidden_size), dtype, aux_layers=first[1])
    writer = _open_store(cfg, out, [source.name(i) for i in kept], (ids, masks), (hidden_format, mc), bad)
    done = writer.done_units()
    stream = _rows(source, kept, bool(first[1]))
    for k in progress(range(writer.n_units), "import: write states", "unit"):
        a, b = writer.unit_range(k)
        h, aux = stream.take(a, b)
        if not done[k]:
            writer.write_unit(k, h, aux)
            writer.mark_done(k)
    writer.set_attrs(complete=True)
    return {"store": str(out), "sequences": len(kept), "tokens": int(writer.n_tokens), "skipped": len(bad),
            "units": writer.n_units, "aux_layers": list(first[1])}


def _open_store(cfg: ImportConfig, out: Path, files: list[Path], rows: tuple[list, list], shape: tuple,
                bad: list[str]) -> store.CacheWriter:
    """The store to write into: created (ids, masks, labels, vocabulary, attributes), or the one being resumed."""
    from . import fingerprint as fp
    from .vocab import VocabMapping, build_mapping, load_mapping

    ids, masks = rows
    hidden, mc = shape
    vocab = int(mc.vocab_size)
    source = fp.sha("\n".join(f"{p.relative_to(cfg.src)}:{p.stat().st_size}" for p in files) +
                    f"|{cfg.format}|aux:{list(hidden.aux_layers)}")
    if cfg.resume and store.is_store(out, partial=True):
        w = store.CacheWriter(out)
        if w.meta.fingerprints.get("data") != source:
            raise UserError(f"--resume: {out} was imported from other files (or other --keep-aux) than {cfg.src}: "
                            "give the same SRC and flags, or --overwrite")
        return w
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])]).astype(np.int64)
    all_ids, all_mask = np.concatenate(ids), np.concatenate(masks)
    counts = np.bincount(all_ids[all_mask], minlength=vocab)[:vocab].astype(np.int64)
    default = Path(cfg.src) / "vocab_mapping.pt"
    beside = peers.load_speculators_mapping(Path(cfg.src)) if cfg.format == "speculators" else None
    if cfg.draft_vocab_size:
        mapping = build_mapping(counts, cfg.draft_vocab_size)
    elif beside is not None and not cfg.vocab_mapping:
        mapping = VocabMapping(*beside)
        if mapping.target_size != vocab:
            raise UserError(f"SRC: {cfg.src}/t2d.npy covers {mapping.target_size} target ids, the model has {vocab}")
        mapping.validate(f"SRC: {cfg.src}/d2t.npy, t2d.npy")
    else:
        path = cfg.vocab_mapping or (default if default.is_file() and cfg.format == "specforge" else None)
        if path is not None and store.is_store(path):
            mapping = store.Cache(path).mapping()
        else:
            mapping = load_mapping(path, vocab) if path else build_mapping(counts, vocab)
    layout = store.Layout.choose(hidden.size, 2 if hidden.dtype == "bfloat16" else 4, int(np.diff(offsets).max()),
                                 cfg.chunk_tokens, cfg.shard_tokens)
    sources = np.array([[0, peers.sample_index(p)] for p in files], dtype=np.int64)
    contents = store.Contents(all_ids, all_mask, mapping.labels(all_ids, all_mask), offsets, sources, mapping, counts)
    fps = {"model": fp.model_fingerprint(cfg.model), "tokenizer": fp.tokenizer_fingerprint(cfg.model),
           "chat_template": f"{cfg.format}-import", "data": source, "vocab": mapping.fingerprint(),
           "dtype": hidden.dtype}
    return store.create(out, hidden, layout, contents, {
        "vocab_size": vocab, "draft_vocab_size": mapping.draft_size, "data_files": [str(cfg.src)],
        "pipeline": "specforge", "fingerprints": fps, "model_layers": int(mc.num_hidden_layers),
        "dump_args": {"model": cfg.model, "import": str(cfg.src), "format": cfg.format},
        "counts": {"sequences": len(files), "tokens": int(offsets[-1]), "assistant_tokens": int(all_mask.sum()),
                   "assistant_tokens_in_draft_vocab": int((contents.labels != -100).sum()),
                   "skipped_input_rows": len(bad)},
        "bad_row_examples": bad[:20]})


class _rows:
    """The samples' states as one token axis (hidden, and aux when kept), read sample by sample as units ask."""

    def __init__(self, source, kept: list[int], aux: bool):
        self.source, self.kept, self.aux = source, list(kept), aux
        self.next, self.start, self.buf = 0, 0, None

    def take(self, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        parts = [] if self.buf is None else [self.buf]
        have = self.start + (0 if self.buf is None else len(self.buf[0]))
        while have < b:
            smp = self.source.read(self.kept[self.next])
            self.next += 1
            parts.append((smp.hidden, smp.aux if self.aux else smp.hidden[:, :0]))
            have += len(smp.hidden)
        buf = parts[0] if len(parts) == 1 else tuple(torch.cat(x) for x in zip(*parts, strict=True))
        h, aux = (x[a - self.start : b - self.start] for x in buf)
        self.buf, self.start = tuple(x[b - self.start :] for x in buf), b
        return h, aux if self.aux else None
