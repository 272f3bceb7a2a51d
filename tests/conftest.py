"""Tiny models built from configs, the real fixtures vendored in tests/fixtures/, and small chat files.

Nothing here reads outside the repository: a bare clone runs the whole suite (``.ci/run`` proves it by
testing a clone with nothing beside it). ``MEDUSA_CACHE_FIXTURES`` may point at another fixture tree.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MEDUSA_CACHE_FIXTURES", REPO / "tests" / "fixtures"))
CHAT = FIXTURES / "chat"
STORIES = REPO / "medusa_cache" / "demo" / "stories260K"  # the pretrained model the package ships (MIT)
TOKENIZER_SHA256 = {
    "llama3": "82f3ae94c30ecff2dbd54ee0faf6cb061149620937486e272cc136cb6acb213b",
    "qwen2": "a648544f79f4c2b4b9a34d1eef5b457b94bf6967962170a1bf4bb15f5356b5e2",
}


def _tokenizer_dir(name: str) -> Path:
    """A tokenizer directory; a vendored ``tokenizer.json.xz`` is unpacked once into ``.unpacked/``."""
    src = FIXTURES / "tokenizers" / name
    if (src / "tokenizer.json").exists():
        return src
    dst = FIXTURES / ".unpacked" / name
    if not (dst / "tokenizer.json").exists():
        tmp = dst.with_name(f"{name}.tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for f in src.iterdir():
            if f.name == "tokenizer.json.xz":
                data = lzma.decompress(f.read_bytes())
                assert hashlib.sha256(data).hexdigest() == TOKENIZER_SHA256[name], f"{f}: checksum differs"
                (tmp / "tokenizer.json").write_bytes(data)
            else:
                shutil.copy(f, tmp / f.name)
        try:
            tmp.rename(dst)
        except OSError:  # another process unpacked it first
            shutil.rmtree(tmp)
    return dst


LLAMA3_TOK = _tokenizer_dir("llama3")
QWEN2_TOK = _tokenizer_dir("qwen2")


def _tiny(path: Path, kind: str, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128256, **common))
        tok = LLAMA3_TOK
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151936, **common))
        tok = QWEN2_TOK
    model.save_pretrained(path)
    for f in tok.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens")):
            shutil.copy(f, path / f.name)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama8(tmp_path_factory) -> Path:
    """The tiny random Llama with 8 decoder layers: Eagle3's default auxiliary layers (1, 3, 4) exist."""
    return _tiny(tmp_path_factory.mktemp("tiny-llama8"), "llama", layers=8)


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory) -> Path:
    return _tiny(tmp_path_factory.mktemp("tiny-qwen"), "qwen")


@pytest.fixture(scope="session")
def llama_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(LLAMA3_TOK)


@pytest.fixture(scope="session")
def qwen_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(QWEN2_TOK)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sharegpt_slice(n: int, name: str = "fastchat_dummy_sharegpt.json", start: int = 0) -> list:
    return json.loads((CHAT / name).read_text())[start : start + n]


@pytest.fixture
def small_chat(tmp_path) -> Path:
    """40 real ShareGPT conversations as JSONL."""
    return write_jsonl(tmp_path / "chat.jsonl", sharegpt_slice(40))


FAULT_SCRIPT = """
import importlib, os, signal, sys
from medusa_cache.cli import main

target, after, action = sys.argv[1], int(sys.argv[2]), sys.argv[3]
module, attr = target.split(":")
*path, name = attr.split(".")
owner = importlib.import_module(module)
for part in path:
    owner = getattr(owner, part)
real, calls = getattr(owner, name), [0]


def wrapped(*a, **k):
    out = real(*a, **k)
    calls[0] += 1
    if calls[0] == after:  # right after the after-th call returned in this process
        if action == "raise":
            raise RuntimeError("injected fault")
        os.kill(os.getpid(), getattr(signal, action))
    return out


setattr(owner, name, wrapped)
sys.exit(main(sys.argv[4:]))
"""


def fault_command(target: str, after: int, action: str, *args: str) -> list[str]:
    """The command line of ``medusa-cache ARGS`` with a fault injected at a given step, deterministically: right after
    the ``after``-th call of ``target`` (``module:Class.method`` or ``module:function``) returns in the process,
    ``action`` happens there: a signal sent to itself (``SIGKILL``, ``SIGINT``, ``SIGTERM``) or ``raise``."""
    script = Path(tempfile.gettempdir()) / f"medusa_cache_fault_{os.getpid()}.py"
    if not script.exists():
        script.write_text(FAULT_SCRIPT)
    return [str(script), target, str(after), action, *args]


def run_fault(target: str, after: int, action: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *fault_command(target, after, action, *args)], capture_output=True,
                          text=True, env=env, timeout=600)


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "medusa_cache", *args], capture_output=True, text=True, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def dumped(tmp_path_factory, tiny_llama) -> Path:
    """A complete float32 cache of 60 real conversations, several units."""
    from medusa_cache.dump import DumpConfig, run_dump

    d = tmp_path_factory.mktemp("dumped")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(60))
    run_dump(DumpConfig(model=str(tiny_llama), data=[str(data)], out=str(d / "cache"), draft_vocab_size=300,
                        dtype="float32", max_length=256, chunk_tokens=256, shard_tokens=1024))
    return d / "cache"


def killed_copy(src: Path, dst: Path, units: tuple[int, ...]) -> Path:
    """A copy of a complete store as a kill leaves it: ``units`` not done, their shards absent."""
    import zarr

    from medusa_cache.store import chunk_key, shard_key

    shutil.copytree(src, dst)
    g = zarr.open_group(str(dst), mode="r+")
    g.attrs["complete"] = False
    for k in units:
        g["unit_done"][k] = 0
        for key in (shard_key("hidden", k), shard_key("hidden_scale", k), chunk_key("bad_rows", k)):
            (dst / key).unlink(missing_ok=True)
    return dst


CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}{{ '<|im_start|>system\\nYou are "
          "a helpful assistant.<|im_end|>\\n' }}{% endif %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_chatml(tmp_path_factory, tiny_llama) -> Path:
    """The tiny random Llama with SmolLM2's kind of chat template (ChatML, a default system prompt)."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-chatml")
    for f in tiny_llama.iterdir():
        shutil.copy(f, d / f.name)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = CHATML
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def property_env(tmp_path_factory, tiny_llama, dumped) -> dict:
    """Valid inputs for every command (a model, a data file, a cache, heads) and an output path that must stay
    absent."""
    from medusa_cache.train import TrainConfig, train

    root = tmp_path_factory.mktemp("property")
    heads = root / "heads"
    train(TrainConfig(cache=str(dumped), out=str(heads), num_heads=2, epochs=1, max_steps=1))
    data = write_jsonl(root / "d.jsonl", [{"text": "Once upon a time"}])
    return {"m": str(tiny_llama), "d": str(data), "c": str(dumped), "h": str(heads), "o": str(root / "out"),
            "root": str(root)}
