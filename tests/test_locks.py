"""One writer per output for the whole run: a second dump or train into the same --out is refused at any moment of
the first (while it prepares, mid-run, after `--overwrite` emptied the directory), never interleaved. Faults are
injected at a given step (no sleeps): the second command runs from inside the first one's model pass or step."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import sharegpt_slice, write_jsonl

from medusa_cache.backbone import ModelPass
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.store import WriterLock
from medusa_cache.train import Run, TrainConfig, train
from medusa_cache.verify import verify


def _dump_cfg(tiny_llama, data, out, **kw):
    return DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(out), dtype="float32", max_length=128,
                      chunk_tokens=128, shard_tokens=512, **kw)


@pytest.mark.parametrize("second", [dict(resume=True), dict(overwrite=True)])
def test_a_second_dump_is_refused_while_the_first_runs(tmp_path, tiny_llama, monkeypatch, second):
    data = write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(30))
    other = write_jsonl(tmp_path / "other.jsonl", sharegpt_slice(10, start=200))
    out = tmp_path / "c"
    real, seen = ModelPass.run, []

    def run(self, ids, batch):  # the first unit of the first dump: the store exists, nothing is done yet
        if not seen:
            seen.append(1)
            with pytest.raises(UserError, match="another medusa-cache command is writing"):
                run_dump(_dump_cfg(tiny_llama, other if second.get("overwrite") else data, out, **second))
        return real(self, ids, batch)

    monkeypatch.setattr(ModelPass, "run", run)
    run_dump(_dump_cfg(tiny_llama, data, out))
    assert seen and verify(str(out), deep=True)["healthy"]


def test_overwrite_keeps_the_lock_of_the_directory_it_empties(tmp_path, tiny_llama, monkeypatch):
    """`dump --overwrite` empties the store in place and `create` keeps the directory: the lock taken before stays
    on the directory the new store is written to (a recreated directory would let a second writer in)."""
    data = write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(20))
    out = tmp_path / "c"
    run_dump(_dump_cfg(tiny_llama, data, out))
    real, seen = ModelPass.run, []

    def run(self, ids, batch):
        if not seen:
            seen.append(1)
            with pytest.raises(UserError, match="another medusa-cache command is writing"):
                WriterLock(out, "dump")
        return real(self, ids, batch)

    monkeypatch.setattr(ModelPass, "run", run)
    run_dump(_dump_cfg(tiny_llama, data, out, overwrite=True))
    assert seen and verify(str(out), deep=True)["healthy"]


def test_a_second_train_into_the_same_out_is_refused_mid_run(tmp_path, dumped, monkeypatch):
    cfg = dict(cache=str(dumped), num_heads=2, epochs=1, batch_tokens=512, lr=1e-2)
    real, seen = Run.optimizer_step, []

    def step(self):
        real(self)
        if self.step == 2 and not seen:
            seen.append(1)
            for kw in (dict(overwrite=True), dict(resume=True), dict()):
                with pytest.raises(UserError, match="another medusa-cache command is writing"):
                    train(TrainConfig(out=str(tmp_path / "h"), **{**cfg, "lr": 3e-3}, **kw))

    monkeypatch.setattr(Run, "optimizer_step", step)
    train(TrainConfig(out=str(tmp_path / "h"), **cfg))
    assert seen
    assert json.loads((tmp_path / "h" / "train_config.json").read_text())["lr"] == 1e-2  # the first run's files
    monkeypatch.setattr(Run, "optimizer_step", real)
    train(TrainConfig(out=str(tmp_path / "h"), overwrite=True, **cfg))  # released at the end of the run


def test_a_crashed_writer_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "o"
    code = f"from medusa_cache.store import WriterLock; import os; WriterLock({str(out)!r}, 'train'); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 9
    WriterLock(out, "train").release()  # the kernel dropped the dead process's lock


@pytest.mark.parametrize("phase", ["train", "evaluate"])
@pytest.mark.parametrize("sweep", [False, True])
def test_a_second_ablate_is_refused_while_the_first_trains_or_evaluates(tmp_path, monkeypatch, phase, sweep):
    """ablate holds its lock for its whole run, the draft-vocabulary sweep included and after training (its evaluate
    phase): a second `ablate --overwrite` into the same --out is refused, and the first finishes whole."""
    from test_train import learnable_cache

    import medusa_cache.ablate as ab

    learnable_cache(tmp_path / "c")
    cfg = TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "abl"), epochs=1, lr=1e-2, batch_tokens=256,
                      grad_accum=1, val_fraction=0.2)
    a = ab.AblateConfig(heads=[1, 2], tree_budget=[4], verify_cost=0.01, draft_vocab=[20, 30] if sweep else None)
    target = "train" if phase == "train" else "head_ranks"
    real, seen = getattr(ab, target), []

    def inside(*args, **kw):
        if not seen:
            seen.append(1)
            with pytest.raises(UserError, match="another medusa-cache command is writing"):
                ab.run_ablate(replace(cfg, overwrite=True),
                              ab.AblateConfig(heads=[1], tree_budget=[4], verify_cost=0.01,
                                              draft_vocab=[10] if sweep else None))
        return real(*args, **kw)

    monkeypatch.setattr(ab, target, inside)
    res = ab.run_ablate(cfg, a)
    assert seen and len(res["results"]) == (4 if sweep else 2)
    assert json.loads((tmp_path / "abl" / "results.json").read_text())["best"] == res["best"]


@pytest.mark.parametrize("second", [dict(resume=True), dict(overwrite=True)])
def test_a_second_generate_into_the_same_file_is_refused_while_the_first_runs(tmp_path, monkeypatch, second):
    """generate holds a lock on its output file: a second --resume or --overwrite started from inside the first's
    first batch is refused, and the first writes every row once."""
    import medusa_cache.generate as gen
    from medusa_cache.demo import DEMO

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join((DEMO / "prompts.jsonl").read_text().splitlines()[:4]) + "\n")
    cfg = gen.GenerateConfig(model=str(DEMO / "stories260K"), prompts=str(prompts), out=str(tmp_path / "g.jsonl"),
                             max_new_tokens=6, batch_size=2)
    real, seen = gen._generate_window, []

    def inside(*a, **k):
        if not seen:
            seen.append(1)
            with pytest.raises(UserError, match="another medusa-cache command is writing"):
                gen.generate(replace(cfg, **second))
        return real(*a, **k)

    monkeypatch.setattr(gen, "_generate_window", inside)
    assert gen.generate(cfg) == 4
    rows = (tmp_path / "g.jsonl").read_text().splitlines()
    assert seen and len(rows) == 4 and len(set(rows)) == 4


def test_an_interrupted_draft_vocabulary_sweep_resumes_as_its_hint_says(tmp_path):
    """Ctrl-C in the second run of `ablate --draft-vocab`: the hint says to rerun the same command with --resume,
    which continues (the finished run kept, the interrupted one from its checkpoint) and ends with the report; a
    changed setting is named by ablate's own flag."""
    from conftest import run_cli, run_fault
    from test_train import learnable_cache

    learnable_cache(tmp_path / "c")
    args = ["ablate", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "abl"), "--heads", "1,2", "--epochs",
            "2", "--lr", "1e-2", "--batch-tokens", "256", "--grad-accum", "1", "--val-fraction", "0.2",
            "--tree-budget", "4", "--verify-cost", "0.01", "--draft-vocab", "20,30", "--checkpoint-every", "1"]
    p = run_fault("medusa_cache.train:Run.optimizer_step", 30, "SIGINT", *args)
    assert p.returncode == 130, p.stderr
    assert "rerun the same `medusa-cache ablate` command with --resume" in p.stderr
    assert (tmp_path / "abl" / "runs" / "V20" / "medusa_lm_head.safetensors").exists() or \
        (tmp_path / "abl" / "runs" / "V20" / "variants").exists()
    bad = run_cli(*[a if a != "1,2" else "1,3" for a in args], "--resume", check=False)
    assert bad.returncode == 2 and "--heads: checkpoint 2, now 3" in bad.stderr, bad.stderr
    done = run_cli(*args, "--resume")
    assert "best:" in done.stdout
    res = json.loads((tmp_path / "abl" / "results.json").read_text())
    assert sorted((r["draft_vocab_size"], r["num_heads"]) for r in res["results"]) == [(20, 1), (20, 2), (30, 1),
                                                                                      (30, 2)]
