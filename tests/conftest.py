"""Tiny models built from configs, the real fixtures beside the repo, and small chat files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("MEDUSA_CACHE_FIXTURES", REPO.parent / "shared" / "fixtures"))
CHAT = FIXTURES / "chat"
LLAMA3_TOK = FIXTURES / "tokenizers" / "llama3"
QWEN2_TOK = FIXTURES / "tokenizers" / "qwen2"
STORIES = FIXTURES / "models" / "stories260K"


def _tiny(path: Path, kind: str) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
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
