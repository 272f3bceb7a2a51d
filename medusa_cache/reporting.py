"""Where a training run's numbers go: metrics.jsonl, TensorBoard or W&B, a progress bar or plain lines, and the
summary ``train`` prints at the end."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from shlex import quote as q

from tqdm.auto import tqdm

from .config import to_dict
from .errors import UserError
from .trainconfig import TrainConfig


class RunLog:
    """Rank 0 writes every record to ``metrics.jsonl`` and the reporters; training records also move the progress
    bar, or print a plain line when no bar is shown. Other ranks write nothing."""

    def __init__(self, cfg: TrainConfig, out: Path, rank: int, planned: int, step: int):
        self.metrics_f = open(out / "metrics.jsonl", "a") if rank == 0 else None
        self.bar = tqdm(total=planned, initial=step, desc="train", unit="step", disable=None if rank == 0 else True)
        self.progress = StepLog(rank == 0 and not bar_shown(self.bar), planned, step)
        self.reporters = open_reporters(cfg, out) if rank == 0 else []

    def write(self, rec: dict) -> None:
        if self.metrics_f is not None:
            self.metrics_f.write(json.dumps(rec) + "\n")
            self.metrics_f.flush()
        for r in self.reporters:
            r.scalars(rec)

    def train_record(self, rec: dict) -> None:
        self.write(rec)
        self.progress.line(rec)
        self.bar.set_postfix(loss=rec["loss"], tok_s=rec["tokens_per_s"])

    def close(self) -> None:
        self.bar.close()
        if self.metrics_f is not None:
            self.metrics_f.close()
        for r in self.reporters:
            r.close()


class Reporter:
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


def open_reporters(cfg: TrainConfig, out: Path) -> list[Reporter]:
    return [Reporter(k, out, cfg) for k in dict.fromkeys(cfg.report_to or []) if k != "none"]


def bar_shown(bar) -> bool:
    return not getattr(bar, "disable", True)


class StepLog:
    """Training's plain log lines when no progress bar is shown (nohup, a cluster log): step, loss and top-1 per head,
    tokens/s and an ETA from an exponentially smoothed step time. (Not a progress bar: ``progress.Progress`` is the
    one progress class; this logs each logged step's metrics.)"""

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
              f"next: medusa-cache eval --heads {q(out)} --cache HELDOUT.zarr --tree-budget 16,32,64 --trees-out trees",
              f"      medusa-cache export {q(out)} --format vllm --out {q(f'{out}-vllm')}"]
    return "\n".join(lines)
