"""Stores on object storage: a real S3-compatible server (moto, started here on 127.0.0.1)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zarr
from conftest import run_fault, sharegpt_slice, write_jsonl
from safetensors.torch import load_file

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.1)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("medusa-test")
        yield "s3://medusa-test"
    finally:
        proc.terminate()
        proc.wait()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _args(model, data, out):
    return ["dump", "--model", str(model), "--data", str(data), "--out", out, "--draft-vocab-size", "300",
            "--max-length", "256", "--chunk-tokens", "128", "--shard-tokens", "512", "--dtype", "float32"]


@pytest.fixture(scope="module")
def local_and_s3(tmp_path_factory, tiny_llama, s3):
    from medusa_cache.cli import main

    d = tmp_path_factory.mktemp("s3data")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(120))
    assert main(_args(tiny_llama, data, str(d / "local"))) == 0
    assert main(_args(tiny_llama, data, f"{s3}/cache")) == 0
    return data, d / "local", f"{s3}/cache"


def test_dump_to_s3_equals_local_and_verifies(local_and_s3):
    from medusa_cache.verify import verify

    _, local, remote = local_and_s3
    a, b = zarr.open_group(str(local), mode="r"), zarr.open_group(remote, mode="r")
    for name in ("hidden", "input_ids", "labels", "seq_offsets", "d2t", "t2d"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert verify(remote, deep=True)["healthy"]


def test_train_from_s3_equals_train_from_local(tmp_path, local_and_s3):
    from medusa_cache.train import TrainConfig, train

    _, local, remote = local_and_s3
    for name, cache in (("l", str(local)), ("r", remote)):
        train(TrainConfig(cache=cache, out=str(tmp_path / name), num_heads=2, epochs=1, lr=1e-3, batch_tokens=512))
    a, b = (load_file(str(tmp_path / n / "medusa_lm_head.safetensors")) for n in ("l", "r"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_dump_on_s3_resumes(tiny_llama, local_and_s3, s3):
    data, local, _ = local_and_s3
    out = f"{s3}/killed"
    import s3fs

    fs = s3fs.S3FileSystem()
    p = run_fault("medusa_cache.store.writer:CacheWriter.mark_done", 2, "SIGKILL", *_args(tiny_llama, data, out))
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]  # killed right after its second unit's commit
    fs.invalidate_cache()
    assert len(fs.ls(f"{out}/unit_done/c")) == 2
    from medusa_cache.cli import main

    assert main(_args(tiny_llama, data, out) + ["--resume"]) == 0
    a, b = zarr.open_group(str(local), mode="r"), zarr.open_group(out, mode="r")
    assert np.array_equal(a["hidden"][:], b["hidden"][:]) and b.attrs["complete"]


def test_int8_needed_rows_store_on_s3_equals_local_and_trains_the_same(tmp_path, tiny_llama, local_and_s3, s3):
    """Both new layouts at once on object storage (read through zarr there, through the shard files locally)."""
    from medusa_cache.cli import main
    from medusa_cache.train import TrainConfig, train
    from medusa_cache.verify import verify

    data, _, _ = local_and_s3
    extra = ["--keep-rows", "needed", "--max-heads", "3", "--hidden-codec", "int8", "--int8-group", "16"]
    assert main(_args(tiny_llama, data, str(tmp_path / "local")) + extra) == 0
    assert main(_args(tiny_llama, data, f"{s3}/needed") + extra) == 0
    a, b = zarr.open_group(str(tmp_path / "local"), mode="r"), zarr.open_group(f"{s3}/needed", mode="r")
    for name in ("hidden", "hidden_scale", "row_kept", "labels"):
        assert np.array_equal(a[name][:], b[name][:]), name
    assert verify(f"{s3}/needed", deep=True)["healthy"]
    for name, cache in (("l", str(tmp_path / "local")), ("r", f"{s3}/needed")):
        train(TrainConfig(cache=cache, out=str(tmp_path / name), num_heads=3, epochs=1, lr=1e-3, batch_tokens=512))
    x, y = (load_file(str(tmp_path / n / "medusa_lm_head.safetensors")) for n in ("l", "r"))
    assert all(torch.equal(x[k], y[k]) for k in x)
