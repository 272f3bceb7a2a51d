"""``TrainConfig``: every option of ``medusa-cache train`` (and of ``ablate``, which trains with it), typed, with
its flag's help as the field's docstring and its checks naming the flag."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from .config import check, check_common


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
    data_fraction: float = 1.0
    """Train on this fraction of the training sequences (after the held-out split): a seeded subset, each smaller
    fraction a prefix of the larger ones (nested), for data-size curves from one cache."""
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
        check(self.cache is not None, "cache", "is required")  # not in REQUIRED: `train --resume` reads it from the run
        check_common(self)
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
        check(0 < self.data_fraction <= 1, "data_fraction", f"must be in (0, 1], got {self.data_fraction}")
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
