"""What a run trains and validates on: the caches (checked against the config and each other), the split into
training and held-out sequences, and the rows ``--mix positions`` draws from."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import flag
from .errors import UserError
from .loader import epoch_order, make_batches, make_blocks, make_position_plan, trainable_rows
from .store import Cache, require_complete
from .trainconfig import TrainConfig
from .vocab import coverage, top_mapping


def open_caches(cfg: TrainConfig) -> tuple[Cache, Cache | None]:
    """The training cache and the optional validation cache, checked against the config and each other."""
    cache = Cache(cfg.cache)
    require_complete(cache, cfg.allow_partial)
    check_cache_against(cache, cfg)
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size != cache.meta.draft_vocab_size:
        cache.remap(top_mapping(cache.stored("token_counts"), cfg.draft_vocab_size))
    if not cfg.val_cache:
        return cache, None
    val = Cache(cfg.val_cache)
    require_complete(val, cfg.allow_partial)
    val.require_compatible(cache.meta.fingerprints.get("model"), cache.hidden_size, cfg.num_heads,
                           f"--cache {cfg.cache}", "--val-cache")
    if val.data_fingerprint() == cache.data_fingerprint():  # before any re-mapping: the content, not the vocabulary
        raise UserError(f"--val-cache: {cfg.val_cache} holds the same data as --cache {cfg.cache}; validating "
                        "on training data measures nothing: dump a held-out file, or drop --val-cache to hold "
                        "out --val-fraction of the sequences")
    if cache.mapping().fingerprint() != val.mapping().fingerprint() and cfg.draft_vocab_size is not None:
        val.remap(cache.mapping())  # the training cache's re-mapped vocabulary, never one of its own
    if val.mapping().fingerprint() != cache.mapping().fingerprint():
        raise UserError(f"--val-cache: {cfg.val_cache} uses a different draft vocabulary than {cfg.cache}")
    return cache, val



def split(cache: Cache, cfg: TrainConfig, with_rule: bool = False):
    """(training, held-out) sequences: --val-fraction held out by a seeded permutation, then --data-fraction of the
    rest kept (``subset``). Sequences with the same prompt (several answers to one prompt, ``generate
    --num-answers``, or a prompt the data repeats) are held out together, never split; without repeated prompts
    the split is the plain permutation of sequences. ``with_rule``: also the rule used ("sequences" or
    "prompt-groups"), part of the resume contract."""
    seqs = cache.usable_seqs(cfg.allow_partial)
    groups = prompt_groups(cache, seqs) if not (cfg.val_cache or cfg.val_fraction == 0 or len(seqs) < 2) else None
    rule = "sequences" if groups is None else "prompt-groups"
    if cfg.val_cache or cfg.val_fraction == 0 or len(seqs) < 2:
        train, val = seqs, np.array([], dtype=np.int64)
    elif groups is None:
        n_val = max(1, int(round(cfg.val_fraction * len(seqs))))
        perm = np.random.default_rng([cfg.seed, 12345]).permutation(seqs)
        train, val = np.sort(perm[n_val:]), np.sort(perm[:n_val])
    else:
        n_val = max(1, int(round(cfg.val_fraction * len(seqs))))
        order = np.random.default_rng([cfg.seed, 12345]).permutation(int(groups.max()) + 1)
        sizes = np.bincount(groups)
        take = order[: int(np.searchsorted(np.cumsum(sizes[order]), n_val)) + 1]
        held = np.isin(groups, take)
        if held.all():  # one group holds nearly everything: keep the largest-but-one out
            held = np.isin(groups, take[:-1]) if len(take) > 1 else np.zeros(len(seqs), bool)
        train, val = seqs[~held], seqs[held]
    train = subset(train, cfg.data_fraction, cfg.seed)
    return (train, val, rule) if with_rule else (train, val)


def prompt_groups(cache: Cache, seqs: np.ndarray) -> np.ndarray | None:
    """A group id per sequence (sequences with the same non-empty prompt, the tokens before their first trained
    token, share one), or None when no prompt repeats."""
    import hashlib

    ids, mask, off = cache.array("input_ids"), cache.array("loss_mask"), cache.offsets
    keys: dict[bytes | int, int] = {}
    out = np.empty(len(seqs), dtype=np.int64)
    for i, s in enumerate(seqs):
        a, b = int(off[s]), int(off[s + 1])
        m = mask[a:b]
        first = int(np.argmax(m)) if m.any() else b - a
        key = hashlib.sha1(np.ascontiguousarray(ids[a : a + first]).tobytes()).digest() if first else int(s)
        out[i] = keys.setdefault(key, len(keys))  # no prompt (everything trained): a group of its own
    return None if len(keys) == len(seqs) else out


def subset(seqs: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The first ceil(fraction x n) sequences of one seeded order of ``seqs`` (sorted): the subsets of one seed are
    nested, each the prefix of every larger one, and fraction 1 is ``seqs`` itself."""
    if fraction >= 1:
        return seqs
    order = np.random.default_rng([seed, 54321]).permutation(seqs)
    return np.sort(order[: max(1, int(np.ceil(fraction * len(seqs))))])



def check_cache_against(cache: Cache, cfg: TrainConfig) -> None:
    cache.require_reach(cfg.num_heads)
    for name, have in (("hidden_size", cache.hidden_size), ("vocab_size", cache.meta.vocab_size)):
        want = getattr(cfg, name)
        if want is not None and want != have:
            raise UserError(f"{flag(name)}: config says {want} but the cache {cache.path} has {have}")
    have = cache.meta.pipeline
    if cfg.data_pipeline and cfg.data_pipeline != have:
        raise UserError(f"--data-pipeline: the config expects a cache dumped with --pipeline {cfg.data_pipeline}, but "
                        f"{cache.path} was dumped with --pipeline {have} (for the Eagle3 comparison, dump with "
                        "--pipeline specforge)")



MIX_REACH = 8


def mix_reach(num_heads: int) -> int:
    """--mix positions draws the rows with a target for any of the first R heads, R = max(num_heads, 8). R depends
    neither on a smaller head count nor on the store's layout, so a K-head run draws the same batches as the first
    K heads of a larger one (ablate's exactness, up to 8 heads) and a needed-rows store the same as a full one; the
    few rows without a target for the heads trained cost compute, not correctness (their loss terms are empty)."""
    return max(num_heads, MIX_REACH)


def vocab_summary(cache: Cache) -> dict:
    """The draft vocabulary a run trained with, for its summary (re-mapped from which size, coverage)."""
    d = cache.meta.draft_vocab_size
    return {"draft_vocab_size": d, "remapped_from": cache.remapped_from,
            "distinct_assistant_tokens": int((cache.array("token_counts") > 0).sum()),
            "coverage": round(coverage(cache.stored("token_counts"), [d])[d], 4)}


def epoch_batches(cfg: TrainConfig, blocks: list[np.ndarray], offsets: np.ndarray, trainable: np.ndarray | None,
                  epoch: int):
    """The epoch's batches: a PositionPlan (``--mix positions``: ``trainable`` rows) or a list of pieces per batch;
    a pure function of (seed, epoch), so a resume recomputes it. Both have the same length every epoch."""
    order = epoch_order(blocks, cfg.seed, epoch, cfg.shuffle_buffer)
    if trainable is not None:
        return make_position_plan(order, offsets, trainable, cfg.mix_tokens, cfg.batch_tokens, cfg.seed, epoch)
    return make_batches(order, offsets, cfg.batch_size, cfg.batch_tokens)


@dataclass
class DataPlan:
    """What a run trains on, built once (``plan``) and handed to ``train.Run``: the labels, the blocks of the training
    sequences, the rows ``--mix positions`` draws from, and the batches per epoch (the same count every epoch)."""

    cfg: TrainConfig
    offsets: np.ndarray
    labels: np.ndarray
    blocks: list[np.ndarray]
    trainable: np.ndarray | None
    batches_per_epoch: int = 0

    def batches(self, epoch: int):
        """The epoch's batches (``epoch_batches``): a pure function of (seed, epoch)."""
        return epoch_batches(self.cfg, self.blocks, self.offsets, self.trainable, epoch)


def plan(cfg: TrainConfig, cache: Cache, train_seqs: np.ndarray) -> DataPlan:
    """The run's data plan; refuses a cache with nothing to train on."""
    if len(train_seqs) == 0:
        raise UserError(f"--cache: {cfg.cache} has no finished sequences to train on")
    labels = cache.array("labels")
    mixes = bool(cfg.batch_tokens) and cfg.mix == "positions"  # --mix only shapes token batches
    p = DataPlan(cfg, cache.offsets, labels, make_blocks(train_seqs, cache.offsets, cfg.block_tokens),
                 trainable_rows(labels, cache.offsets, mix_reach(cfg.num_heads)) if mixes else None)
    p.batches_per_epoch = len(p.batches(0))
    return p


def heldout_coverage(cache: Cache, mapping, seqs: np.ndarray) -> float:
    """Fraction of the assistant tokens of sequences ``seqs`` that ``mapping``'s draft vocabulary holds."""
    ids, mask = cache.array("input_ids"), cache.array("loss_mask").astype(bool)
    rows = np.concatenate([np.arange(cache.offsets[s], cache.offsets[s + 1]) for s in seqs]) if len(seqs) else \
        np.zeros(0, dtype=np.int64)
    rows = rows[mask[rows]]
    return float(mapping.t2d[ids[rows]].mean()) if len(rows) else 0.0
