"""Scaling out: torchrun dump (gloo, CPU) independent of the number of processes; data-parallel training."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import fault_command, sharegpt_slice, write_jsonl
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
# one intra-op thread per process in every run: kernels then compute the same bits whatever the process count
ENV = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def torchrun(n: int, *args: str, wait: bool = True):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "medusa_cache", *args]
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def dump_args(model: Path, data: Path, out: Path) -> list[str]:
    return ["dump", "--model", str(model), "--data", str(data), "--out", str(out), "--draft-vocab-size", "500",
            "--max-length", "256", "--chunk-tokens", "128", "--shard-tokens", "512", "--forward-tokens", "1024",
            "--dtype", "float32"]


ARRAYS = ("hidden", "input_ids", "loss_mask", "labels", "seq_offsets", "seq_source", "d2t", "t2d", "bad_rows")


def same(a: Path, b: Path) -> None:
    ga, gb = zarr.open_group(str(a), mode="r"), zarr.open_group(str(b), mode="r")
    for name in ARRAYS:
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert ga.attrs["complete"] and gb.attrs["complete"]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_llama):
    d = tmp_path_factory.mktemp("scale")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(200))
    torchrun(1, *dump_args(tiny_llama, data, d / "one"))
    return data, d / "one"


def test_dump_with_2_processes_equals_1_process(tmp_path, tiny_llama, one_process):
    data, one = one_process
    torchrun(2, *dump_args(tiny_llama, data, tmp_path / "two"))
    same(one, tmp_path / "two")


def test_killed_2_process_dump_resumes_with_1_process(tmp_path, tiny_llama, one_process):
    data, one = one_process
    out = tmp_path / "k"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           *fault_command("medusa_cache.store.writer:CacheWriter.mark_done", 2, "SIGKILL",
                          *dump_args(tiny_llama, data, out))]
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0  # each rank killed itself right after its second unit's commit
    assert not zarr.open_group(str(out), mode="r").attrs["complete"]
    torchrun(1, *dump_args(tiny_llama, data, out), "--resume")
    same(one, out)


def test_data_parallel_training_matches_one_process(tmp_path, one_process):
    _, cache = one_process
    common = ["train", "--cache", str(cache), "--num-heads", "2", "--epochs", "2", "--lr", "1e-3",
              "--batch-tokens", "512", "--log-every", "1"]
    torchrun(1, *common, "--grad-accum", "2", "--out", str(tmp_path / "one"))
    torchrun(2, *common, "--grad-accum", "1", "--out", str(tmp_path / "two"))
    a = load_file(str(tmp_path / "one" / "medusa_lm_head.safetensors"))
    b = load_file(str(tmp_path / "two" / "medusa_lm_head.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    # and the comparison can fail: a different global batch ends elsewhere
    torchrun(2, *common, "--grad-accum", "2", "--out", str(tmp_path / "other"))
    c = load_file(str(tmp_path / "other" / "medusa_lm_head.safetensors"))
    assert any(not torch.allclose(a[k], c[k], atol=1e-5, rtol=1e-4) for k in a)


FAULT = '''
import os, sys
import torch
import medusa_cache.dump as d
from medusa_cache.cli import main

if int(os.environ["RANK"]) == 1:  # rank 1 fails mid-run with an error that is not a UserError
    calls = [0]
    if sys.argv[1] == "dump":
        orig = d.compute_unit

        def compute_unit(*a, **k):
            calls[0] += 1
            if calls[0] == 2:
                raise RuntimeError("injected fault")
            return orig(*a, **k)
        d.compute_unit = compute_unit
    else:
        orig = torch.optim.AdamW.step

        def step(self, *a, **k):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected fault")
            return orig(self, *a, **k)
        torch.optim.AdamW.step = step
sys.exit(main(sys.argv[1:]))
'''


def _torchrun_script(script: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), *args]
    t0 = time.time()
    p = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120)
    return p, time.time() - t0


def test_a_runtime_error_on_one_rank_stops_every_rank_and_the_dump_stays_resumable(tmp_path, tiny_llama):
    script = tmp_path / "fault.py"
    script.write_text(FAULT)
    data = write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(120))
    out = tmp_path / "c"
    p, dt = _torchrun_script(script, *dump_args(tiny_llama, data, out))
    assert p.returncode != 0, (p.returncode, dt, p.stderr[-2000:])  # every rank stopped: no hang (timeout)
    # the failure is agreed: both ranks stop with the same one-line message, not only the failing one
    assert p.stderr.count("medusa-cache dump: error: rank 1: RuntimeError: injected fault") == 2, p.stderr[-3000:]
    g = zarr.open_group(str(out), mode="r")
    assert not g.attrs["complete"]
    p = subprocess.run([sys.executable, "-m", "medusa_cache", *dump_args(tiny_llama, data, out), "--resume"],
                       env=ENV, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    from medusa_cache.verify import verify

    assert verify(str(out), deep=True)["healthy"]
    p, dt = _torchrun_script(script, "train", "--cache", str(out), "--out", str(tmp_path / "h"), "--num-heads", "2",
                             "--grad-accum", "1", "--batch-tokens", "256", "--epochs", "2")
    assert p.returncode != 0 and "injected fault" in p.stderr, (p.returncode, dt, p.stderr[-2000:])


def test_needed_rows_int8_dump_with_2_processes_equals_1_process(tmp_path, tiny_llama, one_process):
    """Units are shards of the stored rows: any process count writes the same bytes for the new layouts too."""
    data, _ = one_process
    extra = ["--keep-rows", "needed", "--max-heads", "3", "--hidden-codec", "int8", "--int8-group", "16"]
    torchrun(1, *dump_args(tiny_llama, data, tmp_path / "one"), *extra)
    torchrun(2, *dump_args(tiny_llama, data, tmp_path / "two"), *extra)
    same(tmp_path / "one", tmp_path / "two")
    ga, gb = zarr.open_group(str(tmp_path / "one"), mode="r"), zarr.open_group(str(tmp_path / "two"), mode="r")
    for name in ("hidden_scale", "row_kept"):
        assert np.array_equal(ga[name][:], gb[name][:]), name
    assert ga["hidden"].shape[0] < ga["input_ids"].shape[0]
