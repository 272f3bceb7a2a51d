"""Nothing silently wrong: every chunk of every array carries a CRC32C (format 5) that every read checks, so a byte
changed on disk is a named error in verify, train and eval, never a number and never a traceback."""

from __future__ import annotations

import shutil

import pytest
from conftest import sharegpt_slice, write_jsonl

from medusa_cache.cli import main
from medusa_cache.dump import DumpConfig, run_dump
from medusa_cache.errors import UserError
from medusa_cache.evaluate import EvalConfig, run_eval
from medusa_cache.store import FORMAT_VERSION, SMALL_ARRAYS, Cache
from medusa_cache.train import TrainConfig, train
from medusa_cache.verify import verify


@pytest.fixture(scope="module")
def stores(tmp_path_factory, tiny_llama):
    """A plain float32 store, an int8 needed-rows one (hidden_scale, row_kept) and an uncompressed one (a changed
    byte there still decodes, to other numbers: only the checksum can tell), several units each, and heads."""
    d = tmp_path_factory.mktemp("integrity")
    data = write_jsonl(d / "chat.jsonl", sharegpt_slice(30))
    common = dict(model=str(tiny_llama), data=[str(data)], draft_vocab_size=300, max_length=256, chunk_tokens=256,
                  shard_tokens=1024)
    run_dump(DumpConfig(out=str(d / "plain"), dtype="float32", **common))
    run_dump(DumpConfig(out=str(d / "int8"), hidden_codec="int8", keep_rows="needed", max_heads=3, **common))
    run_dump(DumpConfig(out=str(d / "raw"), dtype="float32", hidden_compression="none", **common))
    train(TrainConfig(cache=str(d / "plain"), out=str(d / "heads"), num_heads=2, epochs=1, batch_tokens=512))
    return d


def _chunk_file(store, name):
    root = store / name / "c"
    return min((p for p in root.rglob("*") if p.is_file()), key=lambda p: [int(x) for x in p.relative_to(root).parts])


def _flip(f):
    """One byte of the chunk data changed, the file's size kept (a bad disk, not a truncation)."""
    data = bytearray(f.read_bytes())
    data[min(5, len(data) - 5)] ^= 0x5A
    f.write_bytes(bytes(data))


CASES = [("plain", a) for a in ("hidden", *SMALL_ARRAYS) if a != "row_kept"] + \
        [("int8", "hidden_scale"), ("int8", "row_kept"), ("int8", "hidden"), ("raw", "hidden")]


@pytest.mark.parametrize("kind, name", CASES)
def test_a_flipped_byte_in_any_array_is_refused_by_name(tmp_path, stores, kind, name, capsys):
    store = tmp_path / "c"
    shutil.copytree(stores / kind, store)
    assert Cache(store).meta.medusa_cache == FORMAT_VERSION >= 5  # every chunk checksummed since format 5
    _flip(_chunk_file(store, name))
    res = verify(str(store), deep=True)
    assert not res["healthy"] and any(name in p for p in res["problems"]), res["problems"]
    assert main(["train", "--cache", str(store), "--out", str(tmp_path / "h"), "--num-heads", "2", "--epochs", "1",
                 "--batch-tokens", "512", *(["--in-memory"] if name == "hidden" else [])]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and f"{name}" in err and "re-dump" in err, err
    if kind == "plain":
        with pytest.raises(UserError, match=name):
            run_eval(EvalConfig(str(stores / "heads"), str(store)))


def test_the_plain_verify_reads_every_small_array(tmp_path, stores):
    store = tmp_path / "c"
    shutil.copytree(stores / "plain", store)
    _flip(_chunk_file(store, "labels"))
    res = verify(str(store))
    # named once, by chunk, rows and unit; no raw checksum bytes, no "verify names it" from inside verify
    assert res["problems"] == ["array labels: chunk 0 (rows 0:256, unit 0) fails its checksum: the file changed after "
                               "the dump wrote it; re-dump the store (or restore the file)"], res["problems"]


def test_a_run_refused_on_a_damaged_chunk_leaves_nothing_that_blocks_the_rerun(tmp_path, stores, capsys):
    """train finds the flipped hidden chunk while reading, after claiming --out: it leaves no files behind, so the
    same command run again gives the same one-line error (not "already exists" or "no checkpoint")."""
    store = tmp_path / "c"
    shutil.copytree(stores / "plain", store)
    _flip(_chunk_file(store, "hidden"))
    args = ["train", "--cache", str(store), "--out", str(tmp_path / "h"), "--num-heads", "2", "--epochs", "1",
            "--batch-tokens", "512"]
    for _ in range(2):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "hidden" in err and "re-dump" in err and "already exists" not in err, err
        assert not (tmp_path / "h").exists() or not any((tmp_path / "h").iterdir())


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_the_plain_verify_checks_every_hidden_chunk_by_its_checksum(tmp_path, stores, damage, capsys):
    """Without --deep, verify reads every hidden chunk's bytes against its CRC32C (nothing decoded): a flipped byte
    or a truncated shard is named with its chunk and rows, and the summary says what was checked."""
    store = tmp_path / "c"
    shutil.copytree(stores / "plain", store)
    f = _chunk_file(store, "hidden")
    if damage == "flip":
        _flip(f)
    else:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    res = verify(str(store))
    assert not res["healthy"] and any("hidden" in p and "unit 0" in p for p in res["problems"]), res["problems"]
    with pytest.raises(SystemExit) as e:
        main(["verify", str(store)])
    assert e.value.code == 1
    out = capsys.readouterr().out
    assert "PROBLEMS" in out and "checked: every chunk's checksum" in out
    shutil.rmtree(store)
    shutil.copytree(stores / "plain", store)
    assert main(["verify", str(store)]) == 0 and "healthy" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["hidden", "seq_offsets", "labels", "input_ids"])
def test_a_missing_array_is_named_once_by_every_command(tmp_path, stores, name, capsys):
    """An array's zarr.json deleted: verify names it once (exit 1), inspect does not call the store complete, and
    train, eval and inspect give one line naming it, never a traceback."""
    store = tmp_path / "c"
    shutil.copytree(stores / "plain", store)
    (store / name / "zarr.json").unlink()
    with pytest.raises(SystemExit):
        main(["verify", str(store)])
    out = capsys.readouterr().out
    assert out.count(f"array {name} is missing") == 1 and "Traceback" not in out, out
    for args in (["train", "--cache", str(store), "--out", str(tmp_path / "h"), "--num-heads", "2"],
                 ["eval", "--heads", str(stores / "heads"), "--cache", str(store)]):
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{name}" in err and "missing" in err, err
    code = main(["inspect", str(store)])
    out, err = capsys.readouterr()
    assert (code == 2 and f"array {name} is missing" in err) or f"complete: False: array {name} missing" in out
