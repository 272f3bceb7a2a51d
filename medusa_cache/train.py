"""``medusa-cache train``: Medusa heads trained from the cache alone (the backbone is never loaded).

Reference semantics (Medusa-1, as in FasterDecoding/Medusa's legacy trainer and our Eagle3 comparison):
AdamW (weight decay 0), lr 1e-4, linear warmup over ``warmup_ratio`` of the optimizer steps then cosine
decay (``transformers.get_scheduler``), global grad-norm clip 0.5, one sequence per micro-batch and 4
accumulation steps, 10 epochs. The loss of a micro-batch is the weighted sum over heads of each head's
cross-entropy averaged over its valid target tokens; accumulated micro-batches are averaged.

``--batch-tokens N`` packs pieces of sequences into batches of N tokens instead (heads are position-wise,
so this changes nothing but speed and the averaging unit). ``--clip-per-head`` clips each head by its own
norm, which makes heads fully independent (used by ``ablate``).

Restartable: a checkpoint (heads, optimizer, scheduler, epoch and batch position) is written atomically
every ``--checkpoint-every`` optimizer steps and at the end of each epoch. The data order is a function
of (seed, epoch), so ``--resume`` continues with exactly the batches an uninterrupted run would see and
ends with the same weights on the CPU.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from . import rundir
from .config import check, to_dict
from .errors import Interrupted, UserError
from .heads import MedusaHeads
from .loader import BatchStream, all_targets, epoch_order, make_batches, make_blocks, make_position_plan, trainable_rows
from .objective import head_losses, validate
from .store import Cache, int8_unpack
from .vocab import IGNORE


@dataclass
class TrainConfig:
    REQUIRED: ClassVar[tuple[str, ...]] = ('out',)  # shown and enforced as required by the CLI

    cache: str | None = None
    """The store written by `medusa-cache dump` (required, except with --resume: the stored one)."""
    out: str | None = None
    """Output directory: heads, config, metrics, checkpoint."""
    val_cache: str | None = None
    """A separate store for validation (same model and vocab mapping); default: hold out --val-fraction."""
    val_fraction: float = 0.02
    """Fraction of the cache's sequences held out for validation (ignored with --val-cache)."""
    num_heads: int = 4
    """Number of Medusa heads; head i predicts token t+2+i."""
    num_layers: int = 1
    """ResBlocks per head."""
    draft_transformer_layers: int = 0
    """Draft transformer layers (Eagle3 has 1; Medusa reads the backbone state directly): must be 0."""
    epochs: int = 10
    """Passes over the training sequences."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (the schedule still spans --epochs)."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 1
    """Sequences per micro-batch (per device)."""
    grad_accum: int = 4
    """Micro-batches per optimizer step."""
    batch_tokens: int | None = None
    """Token-count micro-batches of this many tokens instead of whole sequences (faster)."""
    mix: Literal["positions", "pieces"] = "positions"
    """--batch-tokens: what a batch holds. positions: --batch-tokens trainable positions (at least one head target)
    drawn from a window of --mix-tokens tokens of whole sequences; pieces: contiguous pieces of sequences through
    the shuffle buffer (neighbouring, correlated positions; untrainable rows included). README compares them."""
    mix_tokens: int = 65536
    """--mix positions: tokens per window whose positions are permuted together (memory: two windows of states)."""
    warmup_ratio: float = 0.015
    """Fraction of optimizer steps spent in linear warmup."""
    schedule: Literal["cosine", "constant", "linear"] = "cosine"
    """Learning-rate schedule after warmup."""
    max_grad_norm: float = 0.5
    """Gradient-norm clip (0 disables)."""
    clip_per_head: bool = False
    """Clip each head by its own gradient norm (heads become independent; ablate uses this)."""
    head_loss_weights: list[float] | None = None
    """Per-head loss weights; one value r means r**i (Medusa-2 uses 0.8). Default: all 1."""
    init_from_lm_head: str | None = None
    """Model directory: initialise every head's output layer from its lm_head rows of the draft vocabulary."""
    distill: str | None = None
    """Model directory: add KL(base model at t+1+i || head i at t), computed from cached states x its lm_head."""
    distill_weight: float = 1.0
    """Weight of the --distill KL term."""
    hidden_size: int | None = None
    """Expected hidden size (checked against the cache)."""
    vocab_size: int | None = None
    """Expected target vocabulary size (checked against the cache)."""
    draft_vocab_size: int | None = None
    """Draft vocabulary size to train with (default: the cache's). Another size re-maps the cache at train time: the
    top-N of its stored assistant-token counts by dump's rule, labels derived from the stored ids and mask, so the
    heads equal those trained on a cache dumped at N; the heads directory records the mapping."""
    data_pipeline: Literal["medusa-cache", "specforge"] | None = None
    """Expected `dump --pipeline` of the cache (checked; the reference configs require SpecForge's)."""
    base_model_name_or_path: str | None = None
    """Written into config.json for serving (default: the dumped model path)."""
    seed: int = 0
    """Seed for head init, split and data order."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    threads: int | None = None
    """CPU threads for torch (default: torch's own, one per core); lower it on a machine other jobs share."""
    resume: bool = False
    """Continue from the checkpoint in --out."""
    overwrite: bool = False
    """Replace an existing --out."""
    in_memory: bool = False
    """Read the whole cache into RAM once instead of streaming it."""
    allow_partial: bool = False
    """Train on an incomplete cache (its finished units only)."""
    shuffle_buffer: int = 64
    """Sequences in the shuffle buffer. Streaming holds at most this many sequences plus one block in RAM."""
    block_tokens: int = 16384
    """Tokens per contiguous read when streaming (blocks are shuffled, then mixed by the shuffle buffer)."""
    prefetch: int = 8
    """Batches prepared ahead by the reader thread."""
    log_every: int = 10
    """Optimizer steps between metrics.jsonl records."""
    checkpoint_every: int = 200
    """Optimizer steps between checkpoints (also one at each epoch end)."""
    report_to: list[str] | None = None
    """Also send metrics to: tensorboard (event files in OUT/runs) and/or wandb (optional extras)."""
    checkpoint_minutes: float = 0.0
    """Also checkpoint when this many minutes have passed since the last one (0: off)."""
    eval_tokens: int = 2048
    """Positions per validation batch: bounds validation memory (every head's logits for this many rows)."""

    def __post_init__(self) -> None:
        check(self.threads is None or self.threads >= 1, "threads", f"must be >= 1, got {self.threads}")
        check(self.cache is not None, "cache", "is required")
        check(self.out is not None, "out", "is required")
        check(1 <= self.num_heads <= 32, "num_heads", f"must be in 1..32, got {self.num_heads}")
        check(1 <= self.num_layers <= 16, "num_layers", f"must be in 1..16, got {self.num_layers}")
        check(self.draft_transformer_layers == 0, "draft_transformer_layers", "Medusa heads use none; must be 0")
        check(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        check(self.max_steps is None or self.max_steps >= 1, "max_steps", f"must be >= 1, got {self.max_steps}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        for name in ("hidden_size", "vocab_size", "draft_vocab_size"):
            v = getattr(self, name)
            check(v is None or v >= 1, name, f"must be >= 1, got {v}")
        check(self.lr > 0 and math.isfinite(self.lr), "lr", f"must be a positive number, got {self.lr}")
        check(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.grad_accum >= 1, "grad_accum", f"must be >= 1, got {self.grad_accum}")
        check(self.batch_tokens is None or self.batch_tokens >= 1, "batch_tokens",
              f"must be >= 1, got {self.batch_tokens}")
        check(0 <= self.warmup_ratio < 1, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        check(self.distill_weight >= 0, "distill_weight", f"must be >= 0, got {self.distill_weight}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")
        check(0 <= self.val_fraction < 1, "val_fraction", f"must be in [0, 1), got {self.val_fraction}")
        check(not (self.resume and self.overwrite), "resume", "--resume and --overwrite exclude each other")
        for r in self.report_to or []:
            check(r in ("tensorboard", "wandb", "none"), "report_to", f"unknown destination {r!r} (tensorboard, wandb)")
        check(self.checkpoint_minutes >= 0, "checkpoint_minutes", f"must be >= 0, got {self.checkpoint_minutes}")
        for name in ("shuffle_buffer", "block_tokens", "prefetch", "log_every", "checkpoint_every", "eval_tokens",
                     "mix_tokens"):
            check(getattr(self, name) >= 1, name, f"must be >= 1, got {getattr(self, name)}")
        w = self.head_loss_weights
        if w is not None:
            check(len(w) in (1, self.num_heads), "head_loss_weights",
                  f"give one decay value or {self.num_heads} weights, got {len(w)}")
            check(all(x >= 0 and math.isfinite(x) for x in w), "head_loss_weights", "weights must be >= 0")

    def loss_weights(self) -> list[float]:
        w = self.head_loss_weights
        if not w:
            return [1.0] * self.num_heads
        return [w[0] ** i for i in range(self.num_heads)] if len(w) == 1 and self.num_heads > 1 else list(w)


# --------------------------------------------------------------------------------------------------
def split(cache: Cache, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    seqs = cache.usable_seqs(cfg.allow_partial)
    if cfg.val_cache or cfg.val_fraction == 0 or len(seqs) < 2:
        return seqs, np.array([], dtype=np.int64)
    n_val = max(1, int(round(cfg.val_fraction * len(seqs))))
    perm = np.random.default_rng([cfg.seed, 12345]).permutation(seqs)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _inputs(cfg: TrainConfig) -> dict:
    return {"--cache": cfg.cache, "--val-cache": cfg.val_cache, "--init-from-lm-head": cfg.init_from_lm_head,
            "--distill": cfg.distill}


def check_cache_against(cache: Cache, cfg: TrainConfig) -> None:
    cache.require_reach(cfg.num_heads)
    for name, have in (("hidden_size", cache.hidden_size), ("vocab_size", cache.meta.vocab_size)):
        want = getattr(cfg, name)
        if want is not None and want != have:
            raise UserError(f"--{name.replace('_', '-')}: config says {want} but the cache {cache.path} has {have}")
    have = cache.meta.pipeline
    if cfg.data_pipeline and cfg.data_pipeline != have:
        raise UserError(f"--data-pipeline: the config expects a cache dumped with --pipeline {cfg.data_pipeline}, but "
                        f"{cache.path} was dumped with --pipeline {have} (for the Eagle3 comparison, dump with "
                        "--pipeline specforge)")


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


def _prepare_run(cfg: TrainConfig, settings: dict, group: int, lock: list, kind: str = "train") -> dict | None:
    """Lock and claim --out (rank 0; the lock is appended to ``lock`` and held until the run ends). Fresh: write the
    resolved config. Resume: check the contract, return the checkpoint."""
    from .store import WriterLock

    lock.append(WriterLock(cfg.out, "train"))
    if cfg.resume and not (Path(cfg.out) / "checkpoint.pt").exists():
        raise UserError(f"--resume: no checkpoint in {cfg.out}")
    if not cfg.resume:
        out = rundir.claim(cfg.out, kind=kind, overwrite=cfg.overwrite, inputs=_inputs(cfg))
        (out / "train_config.json").write_text(json.dumps(to_dict(cfg), indent=2))
        return None
    out = Path(cfg.out)
    ck = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
    if ck.get("group", group) != group:
        raise UserError(f"--resume: {out} was trained with {ck['group']} micro-batches per step "
                        f"(processes x --grad-accum), this run has {group}; keep the product the same")
    stored = ck.get("settings")
    if stored is not None and "mix" not in stored:  # written before --mix existed: batches were pieces
        stored = {**stored, "mix": "pieces", "mix_tokens": settings["mix_tokens"]}
    if stored is None:  # a checkpoint from before the contract: compare the config it was started with
        old = rundir.stored_train_config(out) or {}
        stored = {k: old.get(k) for k in rundir.RESUME_FIXED}
        settings = {k: settings[k] for k in rundir.RESUME_FIXED}
    rundir.check_resume(stored, settings, out)
    rundir.claim(out, kind=kind, resume=True, inputs=_inputs(cfg))
    rundir.trim_metrics(out / "metrics.jsonl", ck["step"], ck["epoch"])
    return ck


def _clip(v: Variant, cfg: TrainConfig) -> None:
    if cfg.max_grad_norm <= 0:
        return
    if cfg.clip_per_head:
        for hd in v.heads.heads:
            torch.nn.utils.clip_grad_norm_(hd.parameters(), cfg.max_grad_norm)
    else:
        torch.nn.utils.clip_grad_norm_(v.heads.parameters(), cfg.max_grad_norm)


def tune_allocator() -> None:
    """glibc: serve large tensors from the heap instead of a fresh mmap each time.

    A training step allocates and frees the same multi-MB tensors (logits, gradients) every step; above glibc's
    mmap threshold each one is a new mapping and its pages fault in again on every step. Measured on stories260K-
    sized heads (tools/bench_train.py (d)): ~50K tokens/s with the default, ~84K with the threshold raised, above a
    bare PyTorch loop that had raised it implicitly. The heap is also not trimmed back each step. No-op elsewhere.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 512 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):
        pass


MIX_REACH = 8


def mix_reach(num_heads: int) -> int:
    """--mix positions draws the rows with a target for any of the first R heads, R = max(num_heads, 8). R depends
    neither on a smaller head count nor on the store's layout, so a K-head run draws the same batches as the first
    K heads of a larger one (ablate's exactness, up to 8 heads) and a needed-rows store the same as a full one; the
    few rows without a target for the heads trained cost compute, not correctness (their loss terms are empty)."""
    return max(num_heads, MIX_REACH)


class _StopSignals:
    """SIGINT/SIGTERM set a flag instead of killing the run; the loop checks it after each optimizer step.

    Under torchrun every rank must stop at the same step, so the flag is agreed with an all-reduce (MAX).
    """

    def __init__(self) -> None:
        import signal
        import threading

        self.signum: int | None = None
        self.previous: dict = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self) -> bool:
        from . import dist

        if dist.active():
            t = torch.tensor([self.signum or 0])
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            self.signum = int(t.item()) or None
        return self.signum is not None

    def restore(self) -> None:
        import signal

        for sig, h in self.previous.items():
            signal.signal(sig, h)
        self.previous = {}


def train(cfg: TrainConfig, variants: list[tuple[str, int, float]] | None = None, kind: str = "train") -> dict:
    """Train heads on ``cfg.cache`` into ``cfg.out``; returns the final metrics. Three phases: ``Run.setup``
    (everything that can refuse the run, before ``--out`` is touched, then the claim of ``--out`` and the resume),
    ``Run.fit`` (epochs of optimizer steps, each epoch ending with ``Run.validate``), ``Run.finish`` (heads written).

    ``variants``: (name, num_layers, lr) triples trained side by side on the same batches, each read
    once; their heads go to ``out/variants/NAME/``. Default: one variant from ``cfg`` written to ``out/``.

    Data parallel (under torchrun, ``W`` processes): an optimizer step consumes a group of ``W x grad_accum``
    micro-batches of the epoch's order; rank r takes micro-batches r, r+W, ... of it, and DDP averages the
    gradients. Each micro-batch's loss is scaled by W / (micro-batches in the group), so W processes with
    accumulation A take the same steps as one process with accumulation W x A (tested with gloo).
    """
    locks: list = []  # rank 0's lock on --out, held from before the claim until the heads are written
    try:
        run = Run.setup(cfg, variants, locks, kind)
        try:
            run.fit()
        finally:
            run.close()
        return run.finish()
    except BaseException:
        for lk in locks:
            lk.release(failed=True)
        raise
    finally:
        for lk in locks:
            lk.release()


class Run:
    """The state of one training run and its phases (litgpt's setup / fit / validate, as methods)."""

    @classmethod
    def setup(cls, cfg: TrainConfig, variants: list[tuple[str, int, float]] | None, locks: list,
              kind: str = "train") -> Run:
        from . import dist

        r = cls()
        r.cfg, r.rank = cfg, torch.distributed.get_rank() if dist.active() else 0
        r.world = torch.distributed.get_world_size() if dist.active() else 1
        tune_allocator()
        torch.manual_seed(cfg.seed)
        r.cache, r.val_cache = open_caches(cfg)
        # everything that can refuse the run is read before --out is touched
        lm_init = draft_lm_head(cfg.init_from_lm_head, r.cache, "--init-from-lm-head") if cfg.init_from_lm_head \
            else None
        r.teacher_w = draft_lm_head(cfg.distill, r.cache, "--distill").to(cfg.device) if cfg.distill else None
        r.settings = rundir.resume_settings(cfg, r.cache.content_fingerprint(), r.val_cache.content_fingerprint()
                                            if r.val_cache is not None else None)
        r.group = r.world * cfg.grad_accum  # micro-batches per optimizer step, all ranks together
        dist.on_rank0(lambda: _prepare_run(cfg, r.settings, r.group, locks, kind), r.rank)
        r.out, r.device = Path(cfg.out), cfg.device
        r.on_cuda = r.device.startswith("cuda")
        r.train_seqs, r.val_seqs = split(r.cache, cfg)
        if len(r.train_seqs) == 0:
            raise UserError(f"--cache: {cfg.cache} has no finished sequences to train on")
        r.labels = r.cache.array("labels")
        r.blocks = make_blocks(r.train_seqs, r.cache.offsets, cfg.block_tokens)
        mixes = bool(cfg.batch_tokens) and cfg.mix == "positions"  # --mix only shapes token batches
        r.trainable = trainable_rows(r.labels, r.cache.offsets, mix_reach(cfg.num_heads)) if mixes else None
        n_batches = len(r.epoch_batches(0))
        r.total_steps = math.ceil(n_batches / r.group) * cfg.epochs
        specs = variants or [("", cfg.num_layers, cfg.lr)]
        r.vs = [make_variant(name, cfg, r.cache, r.total_steps, layers, lr, lm_init) for name, layers, lr in specs]
        r.step, r.epoch, r.start_group = 0, 0, 0
        if cfg.resume:
            ck = torch.load(r.out / "checkpoint.pt", map_location=r.device, weights_only=True)
            for v, st in zip(r.vs, ck["variants"], strict=True):
                v.heads.load_state_dict(st["heads"])
                v.opt.load_state_dict(st["optimizer"])
                v.sched.load_state_dict(st["scheduler"])
            r.step, r.epoch, r.start_group = ck["step"], ck["epoch"], ck["next_batch"] // r.group
        r.models = [v.heads for v in r.vs]
        if r.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            r.models = [DDP(v.heads, device_ids=[torch.device(r.device).index] if r.on_cuda else None) for v in r.vs]
        # int8 stores stay int8 until the training device (a quarter of float32's bytes in RAM and on the bus)
        r.packed = r.cache.codec == "int8"
        r.memory = r.cache.read_hidden(0, r.cache.n_tokens, r.packed) if cfg.in_memory else None
        r.targets = torch.from_numpy(all_targets(r.labels, r.cache.offsets, cfg.num_heads)) if cfg.in_memory else None
        r.weights = cfg.loss_weights()
        r.metrics_f = open(r.out / "metrics.jsonl", "a") if r.rank == 0 else None
        planned = min(r.total_steps, cfg.max_steps or r.total_steps)
        r.bar = tqdm(total=planned, initial=r.step, desc="train", unit="step", disable=None if r.rank == 0 else True)
        r.progress = _Progress(r.rank == 0 and not bar_shown(r.bar), planned, r.step)
        r.window_tokens, r.t_window = 0, time.perf_counter()
        r.tokens_seen, r.t_start, r.last_save = 0, time.perf_counter(), time.monotonic()
        r.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if r.on_cuda else \
            torch.autocast("cpu", enabled=False)
        r.last_val = {}
        r.stop = _StopSignals()
        r.reporters = open_reporters(cfg, r.out) if r.rank == 0 else []
        return r

    def epoch_batches(self, epoch: int):
        """The epoch's batches: a PositionPlan (--mix positions) or a list of pieces per batch; a pure function of
        (seed, epoch), so a resume recomputes it. Both have the same length every epoch."""
        cfg = self.cfg
        order = epoch_order(self.blocks, cfg.seed, epoch, cfg.shuffle_buffer)
        if self.trainable is not None:
            return make_position_plan(order, self.cache.offsets, self.trainable, cfg.mix_tokens, cfg.batch_tokens,
                                      cfg.seed, epoch)
        return make_batches(order, self.cache.offsets, cfg.batch_size, cfg.batch_tokens)

    # ---- fit ------------------------------------------------------------------------------------------
    def fit(self) -> None:
        from . import dist

        cfg = self.cfg
        done = cfg.max_steps is not None and self.step >= cfg.max_steps
        while self.epoch < cfg.epochs and not done:
            done, g = self.fit_epoch()
            if not done:
                self.epoch, self.start_group = self.epoch + 1, 0
                self.validate()
                self.save(self.epoch, 0)
                dist.barrier()
            else:  # stopped by --max-steps mid-epoch: validate the heads that will be written, not an older epoch's
                self.validate(mid_epoch=True)
                self.save(self.epoch, g + 1)

    def fit_epoch(self) -> tuple[bool, int]:
        """Optimizer steps over this epoch's groups; (stopped early by --max-steps, last group index)."""
        cfg, world, group = self.cfg, self.world, self.group
        batches = self.epoch_batches(self.epoch)
        n_groups = math.ceil(len(batches) / group)
        # rank r: micro-batches r, r+W, ... (its local batches); local group g = local batches g*A .. (g+1)*A - 1
        plan = batches if self.trainable is not None else None
        mine = None if plan is not None else batches[self.rank::world]
        n_mine = len(range(self.rank, len(batches), world))
        stream = BatchStream(self.cache, self.labels, mine, cfg.num_heads, self.blocks,
                             self.start_group * cfg.grad_accum, cfg.prefetch, self.memory,
                             lookahead=cfg.num_heads if self.teacher_w is not None else 0, targets=self.targets,
                             plan=plan, rank=self.rank, world=world, packed=self.packed)
        it = iter(stream)
        g = self.start_group
        try:
            for g in range(self.start_group, n_groups):
                local = range(g * cfg.grad_accum, min((g + 1) * cfg.grad_accum, n_mine))
                log_now = (self.step + 1) % cfg.log_every == 0 or g + 1 == n_groups
                scale = world / min(group, len(batches) - g * group)
                for j, _ in enumerate(local):
                    self.window_tokens += self.micro_step(next(it), scale, j == len(local) - 1, log_now)
                if world > 1 and len(local) == 0:
                    self.empty_step()
                self.optimizer_step()
                if log_now:
                    self.log_window()
                if self.stop.agreed():  # SIGINT/SIGTERM: this step is finished; keep it and leave
                    self.save(self.epoch, g + 1)
                    raise Interrupted(f"interrupted at step {self.step}; checkpoint written to "
                                      f"{self.out / 'checkpoint.pt'}; rerun with --resume", self.stop.signum)
                if self.step % cfg.checkpoint_every == 0 or (
                        cfg.checkpoint_minutes and time.monotonic() - self.last_save >= 60 * cfg.checkpoint_minutes):
                    self.save(self.epoch, g + 1)
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    return True, g
        finally:
            stream.close()
        return False, g

    def micro_step(self, b, scale: float, sync: bool, log_now: bool) -> int:
        device = self.device
        h = self.unpack(b.hidden.to(device, non_blocking=True))
        h = h.float() if not self.on_cuda else h
        tg = b.targets.to(device)
        teacher = None
        if self.teacher_w is not None:  # the base model's next-token distribution, from the cache alone
            with torch.no_grad():
                t_logp = (self.unpack(b.ahead.to(device)).float() @ self.teacher_w.T).log_softmax(-1)
            teacher = (t_logp, b.ahead_idx.to(device))
        n_valid = (tg != IGNORE).sum(0)  # per head, shared by every variant
        for v, m in zip(self.vs, self.models, strict=True):
            with m.no_sync() if (self.world > 1 and not sync) else contextlib.nullcontext():  # one all-reduce/step
                with self.autocast:
                    losses, stats = head_losses(m, h, tg, teacher, self.cfg.distill_weight, with_stats=log_now)
                    loss = sum(w * lo for w, lo in zip(self.weights, losses, strict=True)) * scale
                loss.backward()
            with torch.no_grad():  # window sums stay on the device: no host synchronisation inside a step
                v.window_loss += torch.stack([lo.detach() for lo in losses]) * n_valid
                v.window_n += n_valid
                if log_now:
                    v.window += torch.stack(stats)
        return len(h)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        """int8 stores: decode packed rows where they are (the training device); others pass through."""
        return int8_unpack(rows, self.cache.hidden_size, self.cache.int8_group) if self.packed else rows

    def empty_step(self) -> None:  # a rank with no micro-batch in the last group still joins the all-reduce
        for m in self.models:
            sum(lo.sum() for lo in m(torch.zeros(0, self.cache.hidden_size, device=self.device))).backward()

    def optimizer_step(self) -> None:
        for v in self.vs:
            _clip(v, self.cfg)
            v.opt.step()
            v.sched.step()
            v.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.bar.update(1)

    def log_window(self) -> None:
        dt = time.perf_counter() - self.t_window
        for v in self.vs:
            w, wl, wn = v.window.cpu().numpy(), v.window_loss.cpu().numpy(), v.window_n.cpu().numpy()
            n, n_last = np.maximum(wn, 1), np.maximum(w[:, 0], 1)
            rec = {"step": self.step, "epoch": self.epoch, **({"variant": v.name} if v.name else {}),
                   "lr": v.sched.get_last_lr()[0], "loss": round(float((wl / n).sum()), 4),
                   "head_loss": (wl / n).round(4).tolist(), "top1": (w[:, 1] / n_last).round(4).tolist(),
                   "top5": (w[:, 2] / n_last).round(4).tolist(),
                   "tokens_per_s": round(self.world * self.window_tokens / max(dt, 1e-9), 1)}
            self.log(rec)
            self.progress.line(rec)
            v.window.zero_(), v.window_loss.zero_(), v.window_n.zero_()
        self.bar.set_postfix(loss=rec["loss"], tok_s=rec["tokens_per_s"])
        self.tokens_seen += self.world * self.window_tokens
        self.window_tokens, self.t_window = 0, time.perf_counter()

    def log(self, rec: dict) -> None:
        if self.metrics_f is not None:
            self.metrics_f.write(json.dumps(rec) + "\n")
            self.metrics_f.flush()
        for r in self.reporters:
            r.scalars(rec)

    def save(self, next_epoch: int, next_group: int) -> None:
        self.last_save = time.monotonic()
        if self.rank == 0:
            rundir.atomic_save({"variants": [{"heads": v.heads.state_dict(), "optimizer": v.opt.state_dict(),
                                              "scheduler": v.sched.state_dict()} for v in self.vs],
                                "step": self.step, "epoch": next_epoch, "next_batch": next_group * self.group,
                                "group": self.group, "settings": self.settings}, self.out / "checkpoint.pt")

    # ---- validate -------------------------------------------------------------------------------------
    def validate(self, mid_epoch: bool = False) -> None:
        """Validation after an epoch, or where --max-steps stopped one (rank 0): the held-out split, or every usable
        sequence of --val-cache."""
        if self.rank != 0 or not (len(self.val_seqs) or self.val_cache is not None):
            return
        vc = self.val_cache or self.cache
        seqs = vc.usable_seqs(self.cfg.allow_partial, warn=False) if self.val_cache is not None else self.val_seqs
        for v in self.vs:
            self.last_val = {"epoch": self.epoch if mid_epoch else self.epoch - 1, "step": self.step,
                             **({"mid_epoch": True} if mid_epoch else {}), **({"variant": v.name} if v.name else {}),
                             **validate(v.heads, vc, seqs, self.device, self.cfg.block_tokens, self.cfg.eval_tokens)}
            self.log({"split": "val", **self.last_val})

    # ---- finish ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop.restore()
        self.bar.close()
        if self.metrics_f is not None:
            self.metrics_f.close()
        for r in self.reporters:
            r.close()

    def finish(self) -> dict:
        from . import dist
        from .export import save_heads

        if self.rank == 0:
            for v in self.vs:
                d = self.out / "variants" / v.name if v.name else self.out
                d.mkdir(parents=True, exist_ok=True)
                save_heads(v.heads.cpu(), self.cache, self.cfg, d)
        dist.barrier()
        c = self.cache
        vocab = {"draft_vocab_size": c.meta.draft_vocab_size, "remapped_from": c.remapped_from,
                 "distinct_assistant_tokens": int((c.array("token_counts") > 0).sum()),
                 "coverage": round(c.coverage([c.meta.draft_vocab_size])[c.meta.draft_vocab_size], 4)}
        return {**self.last_val, "val_step": self.last_val.get("step"), "step": self.step, "val_seqs": self.val_seqs,
                "out": str(self.out), "tokens_seen": self.tokens_seen + self.world * self.window_tokens, "vocab": vocab,
                "wall_s": round(time.perf_counter() - self.t_start, 1)}


def open_caches(cfg: TrainConfig) -> tuple[Cache, Cache | None]:
    """The training cache and the optional validation cache, checked against the config and each other."""
    cache = Cache(cfg.cache)
    cache.require_complete(cfg.allow_partial)
    check_cache_against(cache, cfg)
    if cfg.draft_vocab_size is not None and cfg.draft_vocab_size != cache.meta.draft_vocab_size:
        cache.remap(cache.top_mapping(cfg.draft_vocab_size))
    if not cfg.val_cache:
        return cache, None
    val = Cache(cfg.val_cache)
    val.require_complete(cfg.allow_partial)
    val.require_reach(cfg.num_heads)
    if cache.mapping().fingerprint() != val.mapping().fingerprint() and cfg.draft_vocab_size is not None:
        val.remap(cache.mapping())  # the training cache's re-mapped vocabulary, never one of its own
    if val.mapping().fingerprint() != cache.mapping().fingerprint():
        raise UserError(f"--val-cache: {cfg.val_cache} uses a different draft vocabulary than {cfg.cache}")
    if val.meta.fingerprints.get("model") != cache.meta.fingerprints.get("model"):
        raise UserError(f"--val-cache: {cfg.val_cache} was dumped with a different model than {cfg.cache}")
    if val.content_fingerprint() == cache.content_fingerprint():
        raise UserError(f"--val-cache: {cfg.val_cache} holds the same data as --cache {cfg.cache}; validating "
                        "on training data measures nothing: dump a held-out file, or drop --val-cache to hold "
                        "out --val-fraction of the sequences")
    return cache, val


class _Reporter:
    """Scalars per head, learning rate and tokens/s to TensorBoard or Weights & Biases (the names transformers'
    ``Trainer`` uses for ``report_to``)."""

    def __init__(self, kind: str, out: Path, cfg: TrainConfig):
        self.kind = kind
        try:
            if kind == "tensorboard":
                from torch.utils.tensorboard import SummaryWriter

                self.w = SummaryWriter(log_dir=str(out / "runs"))
            else:
                import wandb

                self.w = wandb.init(project="medusa-cache", dir=str(out), config=to_dict(cfg), reinit=True)
        except ImportError:
            raise UserError(f"--report-to {kind}: the package is not installed (pip install 'medusa-cache[{kind}]')"
                            ) from None

    def scalars(self, rec: dict) -> None:
        split = rec.get("split", "train")
        prefix = f"{rec['variant']}/" if rec.get("variant") else ""
        vals: dict[str, float] = {}
        for key, name in (("head_loss", "loss"), ("top1", "top1"), ("top5", "top5"), ("val_loss", "loss"),
                          ("val_top1", "top1"), ("val_top5", "top5")):
            for i, x in enumerate(rec.get(key, [])):
                vals[f"{prefix}{split}/{name}_head{i}"] = float(x)
        for key in ("lr", "tokens_per_s", "loss"):
            if key in rec:
                vals[f"{prefix}{split}/{key}"] = float(rec[key])
        if self.kind == "tensorboard":
            for k, v in vals.items():
                self.w.add_scalar(k, v, rec["step"])
        else:
            self.w.log(vals, step=rec["step"])

    def close(self) -> None:
        (self.w.close if self.kind == "tensorboard" else self.w.finish)()


def open_reporters(cfg: TrainConfig, out: Path) -> list[_Reporter]:
    return [_Reporter(k, out, cfg) for k in dict.fromkeys(cfg.report_to or []) if k != "none"]


def bar_shown(bar) -> bool:
    return not getattr(bar, "disable", True)


class _Progress:
    """Plain log lines when no progress bar is shown (nohup, a cluster log): step, loss and top-1 per head,
    tokens/s and an ETA from an exponentially smoothed step time."""

    def __init__(self, enabled: bool, total: int, start: int):
        self.enabled, self.total, self.last_step, self.t = enabled, total, start, time.perf_counter()
        self.step_s: float | None = None

    def line(self, rec: dict) -> None:
        if not self.enabled:
            return
        now, steps = time.perf_counter(), max(1, rec["step"] - self.last_step)
        per = (now - self.t) / steps
        self.step_s = per if self.step_s is None else 0.7 * self.step_s + 0.3 * per
        self.t, self.last_step = now, rec["step"]
        eta = self.step_s * max(0, self.total - rec["step"])
        name = f" [{rec['variant']}]" if "variant" in rec else ""
        print(f"step {rec['step']}/{self.total} epoch {rec['epoch']}{name} loss {rec['loss']:.4f} head loss "
              f"{' '.join(f'{x:.3f}' for x in rec['head_loss'])} top1 {' '.join(f'{x:.3f}' for x in rec['top1'])} "
              f"{rec['tokens_per_s']:.0f} tok/s ETA {int(eta // 60)}m{int(eta % 60):02d}s", file=sys.stderr, flush=True)


def render_summary(res: dict) -> str:
    """What `train` prints at the end: where everything is, what it measured, what to run next."""
    out = res["out"]
    lines = [f"trained {res['step']} steps in {res['wall_s']:.0f} s ({res['tokens_seen']:,} tokens) -> {out}"]
    v = res.get("vocab")
    if v and v["remapped_from"] is not None:
        fill = max(0, v["draft_vocab_size"] - v["distinct_assistant_tokens"])
        lines.append(f"draft vocabulary re-mapped from the cache's {v['remapped_from']} to {v['draft_vocab_size']} "
                     f"(top-N of the stored assistant-token counts, as dump builds it; covers {v['coverage']:.1%} of "
                     f"the cache's assistant tokens" + (f"; {fill} never-seen ids fill it, lowest first, as dump and "
                                                        "SpecForge do)" if fill else ")"))
    if "val_loss" in res:
        where = f"step {res['val_step']}, mid-epoch {res['epoch']}" if res.get("mid_epoch") else \
            f"epoch {res['epoch']}, step {res['val_step']}"
        lines.append(f"validation ({where}): loss per head {' '.join(map(str, res['val_loss']))}; "
                     f"top-1 per head {' '.join(map(str, res['val_top1']))}")
    else:
        lines.append("no validation (--val-fraction 0 and no --val-cache)")
    lines += [f"heads: {out}/medusa_lm_head.safetensors (+ config.json, vocab_mapping.safetensors); "
              f"checkpoint: {out}/checkpoint.pt; metrics: {out}/metrics.jsonl",
              f"next: medusa-cache eval --heads {out} --cache HELDOUT.zarr --tree-budget 16,32,64 --trees-out trees",
              f"      medusa-cache export {out} --format vllm --out {out}-vllm"]
    return "\n".join(lines)
