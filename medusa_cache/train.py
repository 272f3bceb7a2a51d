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
import math
import time
from pathlib import Path

import torch

from . import checkpoint
from .errors import Interrupted
from .loader import all_targets
from .objective import head_losses, validate
from .reporting import RunLog, render_summary
from .runtime import StopSignals, tune_allocator
from .store import int8_unpack
from .stream import BatchStream, StreamSource
from .trainconfig import TrainConfig
from .traindata import open_caches, plan, split, vocab_summary
from .variant import clip, draft_lm_head, make_variant, parallel, write_heads
from .vocab import IGNORE

__all__ = ["Run", "TrainConfig", "render_summary", "split", "train"]


def train(cfg: TrainConfig, variants: list[tuple[str, int, float]] | None = None, kind: str = "train",
          locked: bool = False, command: str = "train") -> dict:
    """Train heads on ``cfg.cache`` into ``cfg.out``; returns the final metrics. Three phases: ``Run(...)``
    (everything that can refuse the run, before ``--out`` is touched, then the claim of ``--out`` and the resume),
    ``Run.fit`` (epochs of optimizer steps, each epoch ending with ``Run.validate``), ``Run.finish`` (heads written).

    ``variants``: (name, num_layers, lr) triples trained side by side on the same batches, each read
    once; their heads go to ``out/variants/NAME/``. Default: one variant from ``cfg`` written to ``out/``.

    Data parallel (under torchrun, ``W`` processes): an optimizer step consumes a group of ``W x grad_accum``
    micro-batches of the epoch's order; rank r takes micro-batches r, r+W, ... of it, and DDP averages the
    gradients. Each micro-batch's loss is scaled by W / (micro-batches in the group), so W processes with
    accumulation A take the same steps as one process with accumulation W x A (tested with gloo).

    ``locked``: the caller holds the lock on ``cfg.out`` (ablate, for its whole run) and keeps it after training.
    ``command``: the command the user runs (its resume hints name that command's way to continue).
    """
    locks: list = []  # rank 0's lock on --out (and its fresh claim), held until the heads are written
    try:
        run = Run(cfg, variants, locks, kind, locked, command)
        try:
            run.fit()
        finally:
            run.close()
        return run.finish()
    except BaseException:
        for lk in reversed(locks):
            lk.release(failed=True)
        raise
    finally:
        for lk in reversed(locks):
            lk.release()


class Run:
    """The state of one training run and its phases (litgpt's setup / fit / validate, as methods)."""

    def __init__(self, cfg: TrainConfig, variants: list[tuple[str, int, float]] | None, locks: list,
                 kind: str = "train", locked: bool = False, command: str = "train"):
        from . import dist

        self.cfg, self.out, self.device, self.cfg_command = cfg, Path(cfg.out), cfg.device, command
        self.rank = torch.distributed.get_rank() if dist.active() else 0
        self.world = torch.distributed.get_world_size() if dist.active() else 1
        self.group = self.world * cfg.grad_accum  # micro-batches per optimizer step, all ranks together
        self.on_cuda = self.device.startswith("cuda")
        tune_allocator()
        torch.manual_seed(cfg.seed)
        # everything that can refuse the run is read before --out is touched
        self.cache, self.val_cache = open_caches(cfg)
        lm_init = draft_lm_head(cfg.init_from_lm_head, self.cache, "--init-from-lm-head") if cfg.init_from_lm_head \
            else None
        self.teacher_w = draft_lm_head(cfg.distill, self.cache, "--distill").to(cfg.device) if cfg.distill else None
        val_fp = self.val_cache.content_fingerprint() if self.val_cache is not None else None
        self.train_seqs, self.val_seqs, rule = split(self.cache, cfg, with_rule=True)
        self.settings = {**checkpoint.resume_settings(cfg, self.cache.content_fingerprint(), val_fp), "split": rule}
        claim = (cfg, self.settings, self.group, locks, kind, locked, command)
        resumed = dist.on_rank0(lambda: checkpoint.claim_or_resume(*claim), self.rank)  # rank 0's checkpoint
        # the data: labels, blocks, the epoch's batches (a pure function of seed and epoch), planned once
        self.plan = plan(cfg, self.cache, self.train_seqs)
        self.labels = self.plan.labels
        self.total_steps = math.ceil(self.plan.batches_per_epoch / self.group) * cfg.epochs
        # the heads: one variant per (layers, lr), restored on --resume
        self.vs = [make_variant(name, cfg, self.cache, self.total_steps, layers, lr, lm_init)
                   for name, layers, lr in variants or [("", cfg.num_layers, cfg.lr)]]
        self.step, self.epoch, next_batch = checkpoint.restore(self.out, self.vs, self.device, resumed, cfg.resume)
        self.start_group = next_batch // self.group
        self.models = [parallel(v.heads, self.world, self.device) for v in self.vs]
        # int8 stores stay int8 until the training device (a quarter of float32's bytes in RAM and on the bus)
        self.packed = self.cache.codec == "int8"
        self.memory = self.cache.read_hidden(0, self.cache.n_tokens, self.packed) if cfg.in_memory else None
        self.targets = torch.from_numpy(all_targets(self.labels, self.cache.offsets, cfg.num_heads)) \
            if cfg.in_memory else None
        self.weights = cfg.loss_weights()
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.on_cuda else \
            torch.autocast("cpu", enabled=False)
        # accounting and logging
        self.log = RunLog(cfg, self.out, self.rank, min(self.total_steps, cfg.max_steps or self.total_steps),
                          self.step)
        self.window_tokens, self.t_window = 0, time.perf_counter()
        self.tokens_seen, self.t_start, self.last_save = 0, time.perf_counter(), time.monotonic()
        self.last_val: dict = {}
        self.stop = StopSignals()

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

    def stream(self, batches) -> BatchStream:
        """This rank's micro-batches of the epoch from the group ``start_group`` on."""
        cfg = self.cfg
        source = StreamSource(self.cache, self.labels, cfg.num_heads, self.plan.blocks, self.memory, self.targets,
                              self.packed, lookahead=cfg.num_heads if self.teacher_w is not None else 0)
        return BatchStream(source, batches, self.start_group * cfg.grad_accum, cfg.prefetch, self.rank, self.world)

    def fit_epoch(self) -> tuple[bool, int]:
        """Optimizer steps over this epoch's groups; (stopped early by --max-steps, last group index)."""
        cfg, world, group = self.cfg, self.world, self.group
        batches = self.plan.batches(self.epoch)
        n_groups = math.ceil(len(batches) / group)
        # rank r: micro-batches r, r+W, ... (its local batches); local group g = local batches g*A .. (g+1)*A - 1
        n_mine = len(range(self.rank, len(batches), world))
        stream = self.stream(batches)
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
                                      f"{self.out / checkpoint.CHECKPOINT}; {checkpoint.rerun_hint(self.cfg_command)}",
                                      self.stop.signum)
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
            clip(v, self.cfg)
            v.opt.step()
            v.sched.step()
            v.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.log.bar.update(1)

    def log_window(self) -> None:
        dt = time.perf_counter() - self.t_window
        for v in self.vs:
            self.log.train_record({"step": self.step, "epoch": self.epoch, **({"variant": v.name} if v.name else {}),
                                   "lr": v.sched.get_last_lr()[0], **v.window_record(),
                                   "tokens_per_s": round(self.world * self.window_tokens / max(dt, 1e-9), 1)})
        self.tokens_seen += self.world * self.window_tokens
        self.window_tokens, self.t_window = 0, time.perf_counter()

    def save(self, next_epoch: int, next_group: int) -> None:
        self.last_save = time.monotonic()
        if self.rank == 0:
            checkpoint.save(self.out, self.vs, self.step, next_epoch, next_group * self.group, self.group,
                            self.settings)

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
            self.log.write({"split": "val", **self.last_val})

    # ---- finish ---------------------------------------------------------------------------------------
    def close(self) -> None:
        self.stop.restore()
        self.log.close()

    def finish(self) -> dict:
        from . import dist

        if self.rank == 0:
            write_heads(self.vs, self.cache, self.cfg, self.out)
        dist.barrier()
        return {**self.last_val, "val_step": self.last_val.get("step"), "step": self.step, "val_seqs": self.val_seqs,
                "out": str(self.out), "tokens_seen": self.tokens_seen + self.world * self.window_tokens,
                "vocab": vocab_summary(self.cache), "wall_s": round(time.perf_counter() - self.t_start, 1),
                "heads": {v.name: v.heads.cpu().eval() for v in self.vs}, "mapping": self.cache.mapping()}  # ablate
