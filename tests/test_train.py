"""Training from the cache: the t+2+i offset, learning, lm_head init, resume, export, configs, bad input."""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import REPO, STORIES, run_cli, run_fault, write_jsonl
from safetensors.torch import load_file

from medusa_cache import store
from medusa_cache.cli import main
from medusa_cache.errors import UserError
from medusa_cache.export import export
from medusa_cache.headsdir import load_heads
from medusa_cache.loader import make_batches, make_blocks, targets_for
from medusa_cache.stream import BatchStream, StreamSource
from medusa_cache.train import TrainConfig, train
from medusa_cache.vocab import IGNORE, VocabMapping

I = IGNORE  # noqa: E741


def make_cache(path: Path, offsets, labels, hidden: torch.Tensor, draft: int, complete: bool = True) -> store.Cache:
    """A hand-built store with an identity draft vocabulary (ids = labels where valid), every unit written."""
    mapping = VocabMapping(np.zeros(draft, dtype=np.int64), np.ones(draft, dtype=bool))
    return store.from_arrays(path, hidden, offsets, labels, mapping, complete=complete)


def test_head_i_at_t_targets_token_t_plus_2_plus_i_within_its_sequence(tmp_path):
    offsets = [0, 5, 9]
    labels = [10, 11, 12, 13, 14, 20, I, 22, 23]
    c = make_cache(tmp_path / "c", offsets, labels, torch.arange(9.0)[:, None].repeat(1, 4), draft=30)
    o = np.array(offsets)
    lab = np.array(labels)
    assert targets_for(lab, o, (0, 0, 5), 3).T.tolist() == [[12, 13, 14, I, I], [13, 14, I, I, I], [14, I, I, I, I]]
    assert targets_for(lab, o, (1, 5, 9), 2).T.tolist() == [[22, 23, I, I], [23, I, I, I]]
    # token batches cut sequences anywhere; targets and rows still line up and never cross a boundary
    blocks = make_blocks(np.arange(2), o, 4)
    for bt in (None, 3, 4, 100):
        batches = make_batches(np.array([1, 0]), o, 1, bt)
        got = {}
        for b in BatchStream(StreamSource(c, lab, 2, blocks), batches):
            for row, tg in zip(b.hidden[:, 0].long().tolist(), b.targets.tolist(), strict=True):
                got[row] = tg
        assert sorted(got) == list(range(9))
        assert got[0] == [12, 13] and got[3] == [I, I] and got[4] == [I, I]
        assert got[5] == [22, 23] and got[6] == [23, I] and got[7] == [I, I]


def learnable_cache(path: Path, seed=0) -> store.Cache:
    """hidden[t] = E[label[t+2]] + noise: head 0 can learn it, later heads partly."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(20, 60, 80)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    labels = rng.integers(0, 40, offsets[-1]).astype(np.int32)
    E = torch.from_numpy(rng.normal(size=(40, 16)).astype(np.float32))
    hidden = torch.zeros(offsets[-1], 16)
    for s in range(len(lens)):
        a, b = offsets[s], offsets[s + 1]
        for t in range(a, b - 2):
            hidden[t] = E[labels[t + 2]]
    hidden += 0.1 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(seed))
    return make_cache(path, offsets, labels, hidden, draft=40)


def test_a_few_steps_lower_the_loss_on_a_learnable_cache(tmp_path):
    learnable_cache(tmp_path / "c")
    train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h"), num_heads=2, lr=1e-2, epochs=3,
                      batch_tokens=256, grad_accum=1, log_every=1, val_fraction=0.1))
    recs = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "step" in r and "split" not in r]
    assert steps[-1]["head_loss"][0] < 0.5 * steps[0]["head_loss"][0]
    val = [r for r in recs if r.get("split") == "val"]
    assert len(val) == 3 and val[-1]["val_top1"][0] > 0.6 and val[-1]["val_top1"][1] < 0.2


def test_a_few_steps_lower_the_loss_on_a_real_model_cache(tmp_path, dumped):
    # 256 trainable positions per batch (--mix positions): about the steps of 512-token pieces of these chats
    train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h"), num_heads=2, lr=3e-3, epochs=2,
                      batch_tokens=256, grad_accum=1, log_every=1, val_fraction=0))
    recs = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.0


def test_deterministic_with_seed(tmp_path):
    learnable_cache(tmp_path / "c")
    for name in ("a", "b"):
        train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / name), num_heads=2, epochs=1, lr=1e-3))
    a, b = (load_file(str(tmp_path / n / "medusa_lm_head.safetensors")) for n in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_heads_are_distinct_modules_with_reference_keys(tmp_path):
    from medusa_cache.heads import MedusaHeads

    h = MedusaHeads(8, 10, num_heads=2, num_layers=2)
    assert h.heads[0][0] is not h.heads[0][1]
    assert sorted(h.reference_state_dict()) == sorted(
        f"{i}.{k}" for i in range(2) for k in ("0.linear.weight", "0.linear.bias", "1.linear.weight",
                                                "1.linear.bias", "2.weight"))
    assert all((blk.linear.weight == 0).all() for head in h.heads for blk in head[:-1])


# ---- lm_head init -----------------------------------------------------------------------------------
def _stories_cache(tmp_path) -> Path:
    from medusa_cache.dump import DumpConfig, run_dump

    data = write_jsonl(tmp_path / "s.jsonl", [{"text": "Once upon a time there was a little girl named Lily."},
                                              {"text": "The cat sat on the mat and looked at the sun."}])
    run_dump(DumpConfig(model=str(STORIES), data=[str(data)], out=str(tmp_path / "sc"), draft_vocab_size=40,
                        dtype="float32"))
    return tmp_path / "sc"


def test_lm_head_init_tied_embeddings_selects_draft_rows(tmp_path):
    from safetensors import safe_open

    cache = _stories_cache(tmp_path)
    train(TrainConfig(cache=str(cache), out=str(tmp_path / "h"), num_heads=2, epochs=1, max_steps=1, lr=1e-12,
                      init_from_lm_head=str(STORIES), val_fraction=0, warmup_ratio=0))
    with safe_open(str(STORIES / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
    rows = store.Cache(cache).mapping().draft_to_target
    sd = load_file(str(tmp_path / "h" / "medusa_lm_head.safetensors"))
    torch.testing.assert_close(sd["0.1.weight"], emb[rows], atol=1e-6, rtol=0)


def test_lm_head_init_untied_and_sharded(tmp_path, dumped, tiny_llama):
    from transformers import AutoModelForCausalLM

    from medusa_cache.backbone import read_lm_head

    rows = store.Cache(dumped).mapping().draft_to_target
    m = AutoModelForCausalLM.from_pretrained(tiny_llama)
    want = m.lm_head.weight.detach()[torch.from_numpy(rows)]
    assert torch.equal(read_lm_head(str(tiny_llama), rows), want)
    sharded = tmp_path / "sharded"
    m.save_pretrained(sharded, max_shard_size="5MB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(read_lm_head(str(sharded), rows), want)


def test_lm_head_from_another_model_is_refused(tmp_path, dumped):
    with pytest.raises(UserError, match="not the model the cache was dumped with"):
        train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h"), init_from_lm_head=str(STORIES)))


# ---- resume -----------------------------------------------------------------------------------------
def test_kill_signals_and_resume_end_with_the_same_weights(tmp_path, dumped):
    """SIGINT, kill -9 and SIGTERM at given steps; `--resume` alone continues; no step is logged twice."""
    args = ["train", "--cache", str(dumped), "--num-heads", "2", "--epochs", "3", "--grad-accum", "2",
            "--lr", "1e-3", "--log-every", "1"]
    run_cli(*args, "--out", str(tmp_path / "ref"))
    out = tmp_path / "k"
    metrics = out / "metrics.jsonl"
    resume = ["train", "--out", str(out), "--resume", "--checkpoint-every", "1000"]
    runs = [(args + ["--out", str(out), "--checkpoint-every", "1000"], 10, "SIGINT"),  # no checkpoint yet
            # kill -9 long after the last checkpoint: the steps logged since then must not be logged twice
            (resume, 20, "SIGKILL"),
            (resume, 15, "SIGTERM")]
    for argv, steps, sig in runs:
        before = torch.load(out / "checkpoint.pt", weights_only=True)["step"] if (out / "checkpoint.pt").exists() else 0
        p = run_fault("medusa_cache.train:Run.optimizer_step", steps, sig, *argv)
        code = getattr(signal, sig)
        if code == signal.SIGKILL:
            assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
            continue
        assert p.returncode == 128 + code, p.stderr[-2000:]
        step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
        assert step == before + steps  # exactly the steps done before the signal were kept
        assert f"interrupted at step {step}; checkpoint written to" in p.stderr and "rerun with --resume" in p.stderr
    assert not (out / "medusa_lm_head.safetensors").exists()
    run_cli("train", "--out", str(out), "--resume")
    a = load_file(str(tmp_path / "ref" / "medusa_lm_head.safetensors"))
    b = load_file(str(out / "medusa_lm_head.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [r["step"] for r in recs if r.get("split") != "val"]
    assert steps == sorted(set(steps)) and steps == list(range(1, len(steps) + 1))
    ref = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("split") for r in recs] == [r.get("split") for r in ref]


@pytest.mark.parametrize("change", [{"block_tokens": 4096}, {"shuffle_buffer": 8}, {"allow_partial": True},
                                    {"seed": 1}, {"lr": 2e-3}, {"batch_tokens": 256}, {"num_heads": 3},
                                    {"val_fraction": 0.1}])
def test_resume_refuses_any_setting_that_changes_the_run(tmp_path, dumped, change):
    base = dict(cache=str(dumped), out=str(tmp_path / "h"), num_heads=2, lr=1e-3, grad_accum=1, max_steps=2,
                checkpoint_every=1, batch_tokens=512)
    train(TrainConfig(**base))
    saved = (tmp_path / "h" / "train_config.json").read_text()
    (name, value), = change.items()
    old = base.get(name, getattr(TrainConfig, name))
    with pytest.raises(UserError, match=rf"--{name.replace('_', '-')}: checkpoint {old!r}, now {value!r}"):
        train(TrainConfig(**{**base, "max_steps": 4, "resume": True, **change}))
    assert (tmp_path / "h" / "train_config.json").read_text() == saved


def test_resume_refuses_a_changed_cache_and_a_val_cache(tmp_path, dumped):
    base = dict(cache=str(dumped), out=str(tmp_path / "h"), num_heads=2, grad_accum=1, max_steps=2, batch_tokens=512)
    train(TrainConfig(**base))
    other = tmp_path / "other"
    shutil.copytree(dumped, other)
    g = zarr.open_group(str(other), mode="r+")
    g.attrs["fingerprints"] = {**g.attrs["fingerprints"], "data": "something else"}
    with pytest.raises(UserError, match=r"--cache \(fingerprint\): checkpoint '[0-9a-f]+', now '[0-9a-f]+'"):
        train(TrainConfig(**{**base, "cache": str(other), "max_steps": 3, "resume": True}))
    # a copy of the same cache elsewhere is the same run
    shutil.rmtree(other)
    shutil.copytree(dumped, other)
    train(TrainConfig(**{**base, "cache": str(other), "max_steps": 3, "resume": True}))


def test_val_cache_equal_to_cache_is_refused(tmp_path, dumped, tiny_llama):
    with pytest.raises(UserError, match="--val-cache: .* holds the same data as --cache"):
        train(TrainConfig(cache=str(dumped), val_cache=str(dumped), out=str(tmp_path / "h")))
    assert not (tmp_path / "h").exists()
    # the same rows dumped at another draft vocabulary size are the same data, with or without re-mapping
    from medusa_cache.dump import DumpConfig, run_dump

    run_dump(DumpConfig(model=str(tiny_llama), data=[str(dumped.parent / "chat.jsonl")], out=str(tmp_path / "v"),
                        draft_vocab_size=200, dtype="float32", max_length=256))
    for n in (None, 300, 100):
        with pytest.raises(UserError, match="--val-cache: .* holds the same data as --cache"):
            train(TrainConfig(cache=str(dumped), val_cache=str(tmp_path / "v"), out=str(tmp_path / "h"),
                              draft_vocab_size=n))
    assert not (tmp_path / "h").exists()


# ---- export -----------------------------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path, dumped) -> Path:
    train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h"), num_heads=3, num_layers=2, epochs=1,
                      lr=1e-2, batch_tokens=512, grad_accum=1))
    return tmp_path / "h"


def test_export_vllm_loads_by_vllms_rules(tmp_path, trained, dumped):
    export(trained, "vllm", tmp_path / "v")
    cfg = json.loads((tmp_path / "v" / "config.json").read_text())
    w = load_file(str(tmp_path / "v" / "model.safetensors"))
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"] and cfg["medusa_fc_bias"]
    assert cfg["truncated_vocab_size"] == 300 < cfg["vocab_size"] == 128256
    assert w["token_map"].dtype == torch.int64 and w["token_map"].shape == (300,)
    heads, mapping, _ = load_heads(trained)
    x = store.Cache(dumped).read_hidden(0, 50)
    ours = heads(x)
    for h in range(cfg["num_heads"]):  # vLLM: ResidualBlock layers, then lm_head, scatter into -inf row
        y = x
        for layer in range(cfg["num_hidden_layers"]):
            y = y + torch.nn.functional.silu(y @ w[f"blocks.{h}.layers.{layer}.weight"].T
                                             + w[f"blocks.{h}.layers.{layer}.bias"])
        d = y @ w[f"lm_heads.{h}.weight"].T
        full = torch.full((len(x), cfg["vocab_size"]), -torch.inf)
        full[:, w["token_map"]] = d
        torch.testing.assert_close(full[:, w["token_map"]], ours[h])
        assert torch.equal(full.argmax(-1), torch.from_numpy(mapping.draft_to_target)[ours[h].argmax(-1)])


def test_export_medusa_reference_layout_loads_as_the_reference_loads(tmp_path, dumped):
    """Follows FasterDecoding/Medusa's loader: it opens medusa_lm_head.pt, builds per head
    ``Sequential(*([ResBlock(H)] * L), Linear(H, V, bias=False))`` and loads with strict=False."""
    train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h1"), num_heads=3, num_layers=1, epochs=1,
                      lr=1e-2, batch_tokens=512, grad_accum=1))
    export(tmp_path / "h1", "medusa", tmp_path / "m", base_model="org/base-model")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["base_model_name_or_path"] == "org/base-model"
    sd = torch.load(tmp_path / "m" / "medusa_lm_head.pt", map_location="cpu", weights_only=True)
    # the file the loader reads, once: no second full-vocabulary copy unless asked for
    assert not (tmp_path / "m" / "medusa_lm_head.safetensors").exists()
    export(tmp_path / "h1", "medusa", tmp_path / "m2", safetensors=True)
    assert set(sd) == set(load_file(str(tmp_path / "m2" / "medusa_lm_head.safetensors")))
    K, L, H, V = cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["hidden_size"], cfg["vocab_size"]

    class RefResBlock(torch.nn.Module):  # FasterDecoding/Medusa's ResBlock, re-stated
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(H, H)
            self.act = torch.nn.SiLU()

        def forward(self, x):
            return x + self.act(self.linear(x))

    ref = torch.nn.ModuleList([torch.nn.Sequential(*([RefResBlock()] * L), torch.nn.Linear(H, V, bias=False))
                               for _ in range(K)])
    res = ref.load_state_dict(sd, strict=False)
    assert not res.missing_keys and not res.unexpected_keys  # every key consumed, none left out
    heads, mapping, _ = load_heads(tmp_path / "h1")
    x = store.Cache(dumped).read_hidden(0, 50)
    tm = torch.from_numpy(mapping.draft_to_target)
    with torch.no_grad():
        for h in range(K):
            full = ref[h](x)
            torch.testing.assert_close(full[:, tm], heads(x)[h])
            others = torch.ones(V, dtype=torch.bool)
            others[tm] = False
            assert (full[:, others] == 0).all()
        # what README's export figure is measured with: the reference layout's top-1 against the draft top-1
        from medusa_cache.export import full_vocab_agreement

        want = [float((ref[h](x).argmax(-1) == tm[heads(x)[h].argmax(-1)]).float().mean()) for h in range(K)]
        assert full_vocab_agreement(heads, mapping, x) == want


def test_export_medusa_refuses_multi_layer_heads(tmp_path, trained):
    with pytest.raises(UserError, match=r"--format medusa: .* 2 ResBlocks .* use --format vllm"):
        export(trained, "medusa", tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_overwrite_never_deletes_an_input_or_a_foreign_directory(tmp_path, trained, dumped):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not written by medusa-cache"):
        export(trained, "vllm", foreign, overwrite=True)
    assert (foreign / "notes.txt").exists()
    for target in (trained, trained / "sub", dumped):  # the input, inside it, a cache store
        with pytest.raises(UserError, match="input|not written by medusa-cache|not of export"):
            export(trained, "vllm", target, overwrite=True)
    assert (trained / "checkpoint.pt").exists() and (dumped / "zarr.json").exists()
    with pytest.raises(UserError, match="holds or lies inside the input --cache"):
        train(TrainConfig(cache=str(dumped), out=str(dumped), overwrite=True))
    assert (dumped / "zarr.json").exists()
    export(trained, "vllm", tmp_path / "v")
    export(trained, "vllm", tmp_path / "v", overwrite=True)  # ours, not an input: replaced


# ---- configs and bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.json")), ids=lambda p: p.name)
def test_every_config_file_loads_and_validates(path):
    from medusa_cache.config import load_config_file
    from medusa_cache.dump import DumpConfig

    raw = json.loads(path.read_text())
    cmd = "dump" if path.name.endswith("-dump.json") else "train"
    assert list(raw)[0] == "command" and raw["command"].startswith(f"medusa-cache {cmd} --config configs/{path.name}")
    if cmd == "train":
        TrainConfig(cache="x", out="y", **load_config_file(path, TrainConfig))
    else:
        DumpConfig(model="m", data=["d"], out="o", **load_config_file(path, DumpConfig))


@pytest.mark.parametrize("name, hidden, vocab, draft", [("llama3-8B-medusa.json", 4096, 128256, 32000),
                                                        ("qwen2.5-7B-medusa.json", 3584, 152064, 16000)])
def test_reference_configs_hold_the_reference_settings(name, hidden, vocab, draft):
    from medusa_cache.config import load_config_file

    c = TrainConfig(cache="x", out="y", **load_config_file(REPO / "configs" / name, TrainConfig))
    assert (c.num_heads, c.num_layers, c.draft_transformer_layers) == (4, 1, 0)
    assert (c.lr, c.batch_size, c.grad_accum, c.epochs) == (1e-4, 1, 4, 10)
    assert (c.warmup_ratio, c.max_grad_norm, c.schedule, c.batch_tokens) == (0.015, 0.5, "cosine", None)
    assert (c.hidden_size, c.vocab_size, c.draft_vocab_size) == (hidden, vocab, draft)
    # the Eagle3 comparison: SpecForge's exact preprocessing, required of the cache and selected by the dump config
    from medusa_cache.dump import DumpConfig

    d = DumpConfig(model="m", data=["x"], out="o",
                   **load_config_file(REPO / "configs" / name.replace("-medusa", "-dump"), DumpConfig))
    assert c.data_pipeline == d.pipeline == "specforge" and d.draft_vocab_size == draft and d.max_length == 2048


def _err(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    return err


def test_train_bad_inputs(tmp_path, capsys, dumped):
    c, o = str(dumped), str(tmp_path / "o")
    assert "--num-heads: must be in 1..32" in _err(capsys, "train", "--cache", c, "--out", o, "--num-heads", "0")
    assert "--lr: must be a positive number" in _err(capsys, "train", "--cache", c, "--out", o, "--lr", "-1")
    assert "--hidden-size: config says 4096 but the cache" in _err(
        capsys, "train", "--cache", c, "--out", o, "--config", str(REPO / "configs" / "llama3-8B-medusa.json"))
    assert "cache not found" in _err(capsys, "train", "--cache", str(tmp_path / "nope"), "--out", o)
    assert "--config: file not found" in _err(capsys, "train", "--cache", c, "--out", o, "--config", "nope.json")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("mine")
    assert "already exists" in _err(capsys, "train", "--cache", c, "--out", o)
    assert (tmp_path / "o" / "x").read_text() == "mine"


def test_incomplete_cache_is_refused_unless_allowed(tmp_path, capsys):
    make_cache(tmp_path / "c", [0, 100, 300], np.arange(300) % 30, torch.randn(300, 8), draft=30, complete=False)
    assert "cache is incomplete" in _err(capsys, "train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o"))
    assert main(["train", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "o2"), "--allow-partial",
                 "--max-steps", "1", "--num-heads", "1"]) == 0


def test_cli_help_lists_every_command_and_flag(capsys):
    with pytest.raises(SystemExit):
        main(["-h"])
    out = capsys.readouterr().out
    assert all(c in out for c in ("dump", "train", "export", "inspect"))
    with pytest.raises(SystemExit):
        main(["train", "-h"])
    out = capsys.readouterr().out
    for f in ("--cache", "--val-cache", "--num-heads", "--batch-tokens", "--init-from-lm-head", "--in-memory",
              "--head-loss-weights", "--schedule", "--resume"):
        assert f in out
    with pytest.raises(SystemExit):
        main(["dump", "-h"])
    out = capsys.readouterr().out
    for f in ("--model", "--data", "--chat-template", "--draft-vocab-size", "--vocab-mapping", "--skip-bad-rows"):
        assert f in out


def test_train_without_a_terminal_logs_progress_and_ends_with_a_summary(tmp_path, dumped):
    p = run_cli("train", "--cache", str(dumped), "--out", str(tmp_path / "h"), "--num-heads", "2", "--epochs", "1",
                "--batch-tokens", "512", "--grad-accum", "1", "--log-every", "2")
    lines = [x for x in p.stderr.splitlines() if x.startswith("step ")]
    assert len(lines) >= 2 and all(re.search(r"loss [\d.]+ head loss [\d.]+ [\d.]+ top1 .* tok/s ETA \d+m\d\ds", x)
                                   for x in lines)
    assert f"-> {tmp_path / 'h'}" in p.stdout
    assert re.search(r"validation \(epoch 0, step \d+\): loss per head", p.stdout)
    assert f"medusa-cache export {tmp_path / 'h'} --format vllm" in p.stdout


def test_max_steps_mid_epoch_reports_the_steps_run_and_validates_the_heads_written(tmp_path):
    learnable_cache(tmp_path / "c")
    res = train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h"), num_heads=2, epochs=3,
                            batch_tokens=256, grad_accum=1, max_steps=15, val_fraction=0.2))
    from medusa_cache.train import render_summary

    steps = [json.loads(x)["step"] for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert res["step"] == max(steps) == 15 and res["val_step"] == 15 and res["mid_epoch"]
    text = render_summary(res)
    assert text.startswith("trained 15 steps") and "validation (step 15, mid-epoch 1)" in text
    assert res["tokens_seen"] > 0  # the steps after the last log line count too


def test_report_to_tensorboard_writes_scalars_per_head_that_tensorboard_reads_back(tmp_path, dumped):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(TrainConfig(cache=str(dumped), out=str(tmp_path / "h"), num_heads=2, epochs=1, batch_tokens=512,
                      grad_accum=1, log_every=2, report_to=["tensorboard"]))
    acc = EventAccumulator(str(tmp_path / "h" / "runs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_head0", "train/loss_head1", "train/top1_head1", "train/lr", "train/tokens_per_s",
            "val/loss_head0", "val/top1_head1"} <= tags
    recs = [json.loads(x) for x in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in recs if r.get("split") != "val"]
    got = [(e.step, e.value) for e in acc.Scalars("train/loss_head1")]
    assert [s for s, _ in got] == [r["step"] for r in train_recs]
    assert np.allclose([v for _, v in got], [r["head_loss"][1] for r in train_recs], atol=1e-4)


def test_vectorised_targets_equal_the_per_piece_definition(tmp_path):
    from medusa_cache.loader import all_targets

    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 9, 30))])
    labels = rng.integers(-1, 50, offsets[-1])
    labels[labels < 0] = IGNORE
    want = np.concatenate([targets_for(labels, offsets, (s, int(offsets[s]), int(offsets[s + 1])), 4)
                           for s in range(30)])
    assert np.array_equal(all_targets(labels, offsets, 4), want)


def test_validation_counts_targets_outside_a_small_draft_vocabulary_as_misses(tmp_path):
    """--draft-vocab-size 2 keeps 2 of 40 tokens: validation top-1 can be no higher than their share of the targets
    (as eval counts it), however well the heads predict the 2 tokens."""
    from medusa_cache.store import Cache

    learnable_cache(tmp_path / "c")
    res = train(TrainConfig(cache=str(tmp_path / "c"), out=str(tmp_path / "h"), num_heads=2, lr=3e-2, epochs=3,
                            batch_tokens=256, grad_accum=1, val_fraction=0.2, draft_vocab_size=2))
    c = Cache(str(tmp_path / "c"))
    ids, mask = c.array("input_ids"), c.array("loss_mask").astype(bool)
    kept = np.argsort(-c.array("token_counts"), kind="stable")[:2]
    share = np.isin(ids[mask], kept).mean()
    assert share < 0.1 and 0 < res["val_top1"][0] <= share + 0.02, (res["val_top1"], share)
