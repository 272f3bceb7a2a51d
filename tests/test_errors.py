"""Every row of docs/errors.md: the exact message users see, the exit code, and that nothing was written.

Each case builds its inputs in a fresh directory, snapshots every file (and the shared cache and heads it
reads), runs the command in-process, and checks: exit code, one-line message containing the documented text,
no traceback, and every file byte-identical afterwards (no output created where the row says "nothing").
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest
from conftest import REPO, STORIES

from medusa_cache.cli import main

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def _w(p: Path, text: str | bytes) -> str:
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(p)


def _jsonl(p: Path, *rows) -> str:
    return _w(p, "".join(json.dumps(r) + "\n" for r in rows))


# (id, command, builder(tmp, env) -> argv, expected text, exit code)
CASES = [
    ("dump-malformed-line", "dump", lambda t, e: e.dump(_w(t / "d.jsonl", json.dumps(GOOD) + "\n{oops\n")),
     "d.jsonl:2: malformed JSON line", 2),
    ("dump-malformed-json-file", "dump", lambda t, e: e.dump(_w(t / "d.json", '[{"text": "a"},\n {oops}]')),
     "d.json:2: malformed JSON", 2),
    ("dump-unknown-role", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", {"conversations": [
        {"from": "wizard", "value": "x"}]})), "turn 0 has unknown role 'wizard'", 2),
    ("dump-empty-content", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", {"messages": [
        {"role": "user", "content": ""}]})), "turn 0 (user) has empty content", 2),
    ("dump-no-assistant-turn", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", {"messages": [
        {"role": "user", "content": "a"}]})), "no usable conversations (1 rows, 0 bad, 1 without an assistant", 2),
    ("dump-non-utf8", "dump", lambda t, e: e.dump(_w(t / "d.jsonl", b'{"text": "\xff"}\n')),
     "d.jsonl:1: not valid UTF-8", 2),
    ("dump-unknown-format", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", {"prompt": "x"})),
     "unknown data format", 2),
    ("dump-missing-file", "dump", lambda t, e: e.dump(str(t / "nope.jsonl")), "--data: file not found", 2),
    ("dump-no-chat-template", "dump", lambda t, e: ["dump", "--model", str(STORIES), "--data",
                                                    _jsonl(t / "d.jsonl", GOOD), "--out", str(t / "o")],
     "the tokenizer has no chat template; pass --chat-template FILE", 2),
    ("dump-existing-out", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), out=e.existing(t)),
     "already exists; it is not a medusa-cache store, so --overwrite would refuse to delete it", 2),
    ("dump-out-is-a-file", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), out=_w(t / "f.txt", b"x")),
     "is a file, not a store (a store is a directory): choose another --out", 2),
    ("dump-overwrite-foreign-dir", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), e.existing(t),
                                                               "--overwrite"),
     "exists and is not a medusa-cache store; refusing to delete it", 2),
    ("dump-max-length-0", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None, "--max-length", "0"),
     "--max-length: must be in 1..", 2),
    ("dump-draft-vocab-0", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None, "--draft-vocab-size", "0"),
     "--draft-vocab-size: must be >= 1", 2),
    ("dump-mapping-other-vocab", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None, "--vocab-mapping",
                                                             e.small_mapping(t)),
     "covers a vocabulary of 10 tokens, the model has 128256", 2),
    ("dump-resume-different-data", "dump", lambda t, e: ["dump", "--model", str(e.model), "--data",
                                                         _jsonl(t / "other.jsonl", GOOD), "--out", e.resumable(t),
                                                         "--resume"],
     "was dumped with a different data", 2),
    ("train-incomplete-cache", "train", lambda t, e: ["train", "--cache", e.partial(t), "--out", str(t / "o")],
     "cache is incomplete (0/", 2),
    ("train-config-mismatch", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"), "--config",
                                                     str(REPO / "configs" / "llama3-8B-medusa.json")],
     "--hidden-size: config says 4096 but the cache", 2),
    ("train-num-heads-0", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"), "--num-heads",
                                                 "0"], "--num-heads: must be in 1..32, got 0", 2),
    ("train-negative-lr", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"), "--lr", "-1"],
     "--lr: must be a positive number, got -1.0", 2),
    ("train-lm-head-other-model", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"),
                                                         "--init-from-lm-head", str(STORIES)],
     "is not the model the cache was dumped with", 2),
    ("train-existing-out", "train", lambda t, e: ["train", "--cache", e.cache, "--out", e.existing(t)],
     "already exists; pass --resume to continue it or --overwrite", 2),
    ("train-unknown-config-key", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"),
                                                        "--config", _w(t / "c.json", '{"heads": 3}')],
     "unknown key(s) heads for TrainConfig", 2),
    ("export-not-heads-dir", "export", lambda t, e: ["export", e.cache, "--format", "vllm", "--out", str(t / "o")],
     "not a medusa-cache heads directory (missing config.json)", 2),
    ("export-existing-out", "export", lambda t, e: ["export", e.heads, "--format", "vllm", "--out", e.existing(t)],
     "already exists; pass --overwrite to replace it", 2),
    ("eval-other-model", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.partial(t, complete=True)],
     "was dumped with another model than the one the heads in", 2),
    ("eval-tree-not-prefix-closed", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--tree",
                                                          _w(t / "t.json", "[[0], [1, 0]]")],
     "path [1, 0] has no parent [1] (trees must be prefix-closed)", 2),
    ("ablate-zero-heads", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"), "--heads",
                                                  "0,2"], "--heads: give head counts >= 1", 2),
    ("ablate-no-held-out", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"),
                                                   "--val-fraction", "0"], "ablate needs held-out data", 2),
    ("generate-existing-out", "generate", lambda t, e: ["generate", "--model", str(STORIES), "--prompts",
                                                        _jsonl(t / "p.jsonl", {"text": "Once"}), "--out",
                                                        _w(t / "out.jsonl", "{}\n")],
     "already exists; pass --resume to continue it or --overwrite", 2),
    ("generate-max-new-tokens-0", "generate", lambda t, e: ["generate", "--model", str(STORIES), "--prompts",
                                                            _jsonl(t / "p.jsonl", {"text": "Once"}), "--out",
                                                            str(t / "o.jsonl"), "--max-new-tokens", "0"],
     "--max-new-tokens: must be >= 1, got 0", 2),
    ("verify-newer-format", "verify", lambda t, e: ["verify", e.partial(t, version=99)],
     "cache format version 99 is newer than this medusa-cache reads", 2),
    ("config-string-for-number", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"),
                                                        "--config", _w(t / "c.json", '{"lr": "1e-4"}')],
     "c.json: key 'lr' must be a number, got \"1e-4\" (str)", 2),
    ("config-float-for-int", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"),
                                                    "--config", _w(t / "c.json", '{"num_heads": 2.5}')],
     "c.json: key 'num_heads' must be an integer, got 2.5 (float)", 2),
    ("ablate-empty-heads", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"),
                                                   "--heads", ","],
     "argument --heads: expected comma-separated integers, got ','", 2),
    ("dump-jsonl-holds-array", "dump", lambda t, e: e.dump(_w(t / "d.jsonl", json.dumps([GOOD, GOOD], indent=1))),
     "d.jsonl:1: this file holds a JSON array spread over several lines", 2),
    ("dump-jsonl-pretty-object", "dump", lambda t, e: e.dump(_w(t / "d.jsonl", json.dumps(GOOD, indent=2))),
     "d.jsonl:1: this file holds one pretty-printed JSON object spread over several lines", 2),
    ("dump-utf8-bom", "dump", lambda t, e: e.dump(_w(t / "d.jsonl", b"\xef\xbb\xbf" + json.dumps(GOOD).encode())),
     "d.jsonl:1: the file starts with a UTF-8 byte-order mark (BOM)", 2),
    ("dump-concurrent-out", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), e.locked(t)),
     "another medusa-cache command is writing", 2),
    ("dump-draft-vocab-too-large", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None,
                                                               "--draft-vocab-size", "200000"),
     "--draft-vocab-size 200000 is larger than the model's vocabulary (128256)", 2),
    ("dump-beyond-max-positions", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", {"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "word " * 4200}]}), None,
        "--max-length", "8192"), "beyond the model's max_position_embeddings 4096; pass --max-length 4096", 2),
    ("train-device-without-cuda", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"),
                                                         "--device", "cuda"],
     "--device cuda: CUDA is not available here", 2),
    ("train-val-cache-is-cache", "train", lambda t, e: ["train", "--cache", e.cache, "--val-cache", e.cache,
                                                        "--out", str(t / "o")],
     "holds the same data as --cache", 2),
    ("train-resume-changed-setting", "train", lambda t, e: ["train", "--out", e.heads, "--resume",
                                                            "--block-tokens", "4096"],
     "--block-tokens: checkpoint 16384, now 4096", 2),
    ("train-out-inside-cache", "train", lambda t, e: ["train", "--cache", e.cache, "--out", e.cache + "/heads"],
     "lies inside the input --cache", 2),
    ("export-over-its-input", "export", lambda t, e: ["export", e.heads, "--format", "vllm", "--out", e.heads,
                                                      "--overwrite"], "lies inside the input heads directory", 2),
    ("export-overwrite-foreign", "export", lambda t, e: ["export", e.heads, "--format", "vllm", "--out",
                                                         e.existing(t), "--overwrite"],
     "was not written by medusa-cache (no .medusa-cache marker); refusing to delete it", 2),
    ("eval-tree-budget-0", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--tree-budget",
                                                 "0"], "--tree-budget: tree sizes must be >= 1, got [0]", 2),
    ("eval-incomplete-cache", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.partial(t)],
     "units dumped); finish it with `medusa-cache dump ... --resume`", 2),
    ("dump-vocab-mapping-plain-dir", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None,
                                                                 "--vocab-mapping", e.existing(t)),
     "is a directory but neither a medusa-cache store nor a heads directory", 2),
    ("train-beyond-stored-reach", "train", lambda t, e: ["train", "--cache", e.needed(t), "--out", str(t / "o"),
                                                         "--num-heads", "3"],
     "stores hidden rows for at most 2 heads (dumped with --keep-rows needed --max-heads 2)", 2),
    ("ablate-nothing-to-hold-out", "ablate", lambda t, e: ["ablate", "--cache", e.one_sequence(t), "--out",
                                                           str(t / "o")],
     "has 1 usable sequences; holding out 0.02 of them leaves none", 2),
    # round three: options checked before any work, the libraries' failures as one line, trees loaded whole
    ("verify-samples-negative", "verify", lambda t, e: ["verify", e.cache, "--samples", "-3"],
     "--samples: must be >= 1, got -3", 2),
    ("train-seed-negative", "train", lambda t, e: ["train", "--cache", e.cache, "--out", str(t / "o"), "--seed", "-1"],
     "--seed: must be >= 0, got -1", 2),
    ("eval-topk-0", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--topk", "0"],
     "--topk: must be >= 1, got 0", 2),
    ("ablate-topk-0", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"), "--topk", "0"],
     "--topk: must be >= 1, got 0", 2),
    ("ablate-speculate-tokens-0", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"),
                                                          "--speculate-tokens", "0"],
     "--speculate-tokens: must be >= 1, got 0", 2),
    ("ablate-draft-vocab-beyond-vocabulary", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out",
                                                                     str(t / "o"), "--draft-vocab", "100,200000"],
     "--draft-vocab: give distinct sizes in 1..128256 (the model's vocabulary), got [100, 200000]", 2),
    ("demo-epochs-0", "demo", lambda t, e: ["demo", "--out", str(t / "d"), "--epochs", "0"],
     "--epochs: must be >= 1, got 0", 2),
    ("speculate-empty-prompts", "speculate", lambda t, e: ["speculate", "--model", str(e.model), "--heads", e.heads,
                                                           "--prompts", _w(t / "p.jsonl", ""), "--chain"],
     "p.jsonl holds no prompts", 2),
    ("speculate-other-model", "speculate", lambda t, e: ["speculate", "--model", e.other_model(t), "--heads",
                                                         e.heads, "--prompts", _jsonl(t / "p.jsonl", {"text": "hi"}),
                                                         "--chain"],
     "were trained on states of another model than", 2),
    ("eval-tree-index-beyond-topk", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--topk", "2",
                                                          "--tree", _w(t / "t.json", "[[0], [0, 3]]")],
     "path [0, 3] uses top-k index 3, but --topk is 2", 2),
    ("eval-tree-float-index", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--tree",
                                                    _w(t / "t.json", "[[0.5]]")],
     "path [0.5] is not a list of integer top-k indices", 2),
    ("eval-tree-object", "eval", lambda t, e: ["eval", "--heads", e.heads, "--cache", e.cache, "--tree",
                                               _w(t / "t.json", '{"0": [0]}')],
     "a tree is a non-empty JSON list of paths", 2),
    ("dump-chat-template-syntax-error", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None,
                                                                    "--chat-template", _w(t / "t.jinja", "{% for %}")),
     "the chat template does not render: TemplateSyntaxError", 2),
    ("dump-int8-group-not-dividing", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None, "--hidden-codec",
                                                                 "int8", "--int8-group", "24"),
     "--int8-group: 24 does not divide the model's hidden size 32", 2),
    ("generate-nothing-to-answer", "generate", lambda t, e: ["generate", "--model", str(STORIES), "--prompts",
                                                             _jsonl(t / "p.jsonl", {"messages": [
                                                                 {"role": "system", "content": "be terse"}]}),
                                                             "--out", str(t / "o.jsonl")],
     "p.jsonl:1: nothing to generate: the conversation has no assistant turn", 2),
    ("inspect-malformed-zarr-json", "inspect", lambda t, e: ["inspect", e.damaged_metadata(t)],
     "labels/zarr.json: the array's metadata cannot be read", 2),
    ("dump-aux-layers-not-ids", "dump", lambda t, e: e.dump(_jsonl(t / "d.jsonl", GOOD), None, "--aux-layers", "1,x"),
     "--aux-layers: '1,x' is not eagle3, speculators or a comma-separated list of layer ids", 2),
    ("export-features-no-aux-layers", "export-features", lambda t, e: ["export-features", e.cache, "--out",
                                                                       str(t / "f")],
     "no auxiliary layers stored: Eagle3's features need them; re-dump with", 2),
    ("import-speculators-not-a-dataset", "import", lambda t, e: ["import", (t / "src").mkdir() or str(t / "src"),
                                                                 "--format", "speculators",
                                                                 "--model", str(e.model), "--out", str(t / "c")],
     "is not a speculators dataset directory", 2),
    ("ablate-empty-list-option", "ablate", lambda t, e: ["ablate", "--cache", e.cache, "--out", str(t / "o"),
                                                         "--tree-budget=--"],
     "--tree-budget: expected at least one value, got none", 2),
]


class Env:
    def __init__(self, model: Path, cache: Path, heads: Path):
        self.model, self.cache, self.heads = model, str(cache), str(heads)
        Env._model = model

    def dump(self, data: str, out: str | None = None, *extra: str) -> list[str]:
        return ["dump", "--model", str(self.model), "--data", data, "--out", out or str(Path(data).parent / "o"),
                *extra]

    @staticmethod
    def other_model(t: Path) -> str:
        """A model of the same shapes as the heads' but other weights (another fingerprint)."""
        import shutil

        import torch
        from safetensors.torch import load_file, save_file

        shutil.copytree(Env._model, t / "m2")
        sd = load_file(str(t / "m2" / "model.safetensors"))
        save_file({k: v + 0.01 if k.endswith("norm.weight") else v for k, v in sd.items()},
                  str(t / "m2" / "model.safetensors"), metadata={"format": "pt"})
        assert torch.is_tensor(next(iter(sd.values())))
        return str(t / "m2")

    def damaged_metadata(self, t: Path) -> str:
        """A copy of the cache whose labels array's zarr.json is cut short."""
        import shutil

        shutil.copytree(self.cache, t / "c")
        f = t / "c" / "labels" / "zarr.json"
        f.write_text(f.read_text()[:40])
        return str(t / "c")

    @staticmethod
    def existing(t: Path) -> str:
        d = t / "existing"
        d.mkdir()
        (d / "mine.txt").write_text("precious")
        return str(d)

    @staticmethod
    def locked(t: Path) -> str:
        """An --out that another dump holds (its WriterLock), as while a dump runs."""
        from medusa_cache.store import WriterLock

        Env._held = WriterLock(t / "busy")  # kept alive until the next case
        return str(t / "busy")

    @staticmethod
    def one_sequence(t: Path) -> str:
        import torch
        from test_train import make_cache

        make_cache(t / "one", [0, 100], [3] * 100, torch.randn(100, 32), draft=30)
        return str(t / "one")

    @staticmethod
    def small_mapping(t: Path) -> str:
        import numpy as np

        from medusa_cache.vocab import build_mapping, save_mapping

        save_mapping(build_mapping(np.arange(10), 4), t / "m.safetensors")
        return str(t / "m.safetensors")

    def resumable(self, t: Path) -> str:
        import shutil

        shutil.copytree(self.cache, t / "c")
        return str(t / "c")

    @staticmethod
    def needed(t: Path) -> str:
        import numpy as np
        import torch

        from medusa_cache.store import from_arrays, needed_rows
        from medusa_cache.vocab import VocabMapping

        labels = np.where(np.arange(300) % 50 < 10, np.arange(300) % 30, -100)
        mapping = VocabMapping(np.zeros(30, dtype=np.int64), np.ones(30, dtype=bool))
        from_arrays(t / "n", torch.randn(300, 32), [0, 100, 300], labels, mapping,
                    row_kept=needed_rows(labels != -100, np.array([0, 100, 300]), 2), max_heads=2)
        return str(t / "n")

    @staticmethod
    def partial(t: Path, complete: bool = False, version: int | None = None) -> str:
        import numpy as np
        import torch
        from test_train import make_cache

        c = make_cache(t / "p", [0, 100, 300], np.arange(300) % 30, torch.randn(300, 32), draft=30, complete=complete)
        if not complete:
            c.group["unit_done"][:] = 0
        if version:
            c.set_attrs(medusa_cache=version)
        return str(t / "p")


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_llama, dumped) -> Env:
    from medusa_cache.train import TrainConfig, train

    heads = tmp_path_factory.mktemp("heads") / "h"
    train(TrainConfig(cache=str(dumped), out=str(heads), num_heads=2, epochs=1, max_steps=2))
    return Env(tiny_llama, dumped, heads)


def _snapshot(*roots: Path) -> dict[str, str]:
    out = {}
    for r in roots:
        for f in sorted(Path(r).rglob("*")):
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, env, capsys):
    _, _, build, expected, code = case
    argv = build(tmp_path, env)
    roots = (tmp_path, Path(env.cache), Path(env.heads))
    before = _snapshot(*roots)
    capsys.readouterr()
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert rc == code, err
    assert expected in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    if case[0] == "eval-incomplete-cache":
        assert "--allow-partial" not in err  # eval has no such flag: never suggest it
    assert _snapshot(*roots) == before, "something was written or changed"
    if os.environ.get("MEDUSA_CACHE_ERRORS_LOG"):  # used to regenerate docs/errors.md
        with open(os.environ["MEDUSA_CACHE_ERRORS_LOG"], "a") as f:
            f.write(json.dumps([case[0], case[1], err.strip().replace(str(tmp_path), "DIR"), code]) + "\n")


def test_docs_errors_md_lists_every_case():
    doc = (REPO / "docs" / "errors.md").read_text()
    rows = [r for r in doc.splitlines() if r.startswith("| `")]
    assert len(rows) == len(CASES) >= 20
    for name, command, _, expected, code in CASES:
        row = next((r for r in rows if r.startswith(f"| `{name}`")), None)
        assert row is not None, name
        assert f"`{command}`" in row and expected in row and f"| {code} |" in row
    assert re.search("nothing", doc)


def test_a_store_url_without_its_fsspec_package_is_one_line(monkeypatch, capsys):
    """fsspec raises a plain ImportError("Install s3fs to access S3") when s3fs is missing: one line naming the
    package to install, never a traceback."""
    import medusa_cache.info as info
    from medusa_cache.cli import main

    def missing(*a, **k):
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(info, "inspect_store", missing)
    assert main(["inspect", "s3://bucket/cache.zarr"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs the s3fs package: pip install 'medusa-cache[s3]'" in err, err
