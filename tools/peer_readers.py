"""Proof with the peers' own code: SpecForge's and speculators' readers load what `export-features` writes.

Full run (a throwaway environment where the peers are installed with ``--no-deps``, so they cannot replace torch):

    python3 -m venv /tmp/peerenv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/peerenv/lib/python3.11/site-packages/project.pth
    /tmp/peerenv/bin/pip install --no-deps specforge speculators hs-connectors openai sniffio
    /tmp/peerenv/bin/python tools/peer_readers.py

It dumps the bundled stories260K (5 layers) over 4 story openings with ``--aux-layers 1,2,3,4`` (bf16, as the peers
capture), exports both layouts into ``tests/fixtures/peers/`` (the golden files), and reads every file back with
the peers' readers: SpecForge's ``list_feature_files`` + ``load_feature_file`` + ``normalize_offline_sample`` and
speculators' ``ArrowDataset`` (``on_missing="raise"``). Every tensor they return must equal the cache's (SpecForge's
normaliser zeroes the last loss-mask position; that is its rule, checked as such). ``provenance.json`` records the
versions and what was compared.

    python tools/peer_readers.py --quick   # no peers needed (what CI runs): the golden files, imported by
                                           # `medusa-cache import` and exported again, give the same tensors
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GOLD = REPO / "tests" / "fixtures" / "peers"
MODEL = REPO / "medusa_cache" / "demo" / "stories260K"
LAYERS = "1,2,3,4"  # stories260K has 5 decoder layers: three for Eagle3, the last (4) for speculators' fourth slot


def export_goldens(work: Path) -> Path:
    from medusa_cache.dump import DumpConfig, run_dump
    from medusa_cache.export_features import ExportFeaturesConfig, export_features

    prompts = [json.loads(x) for x in (REPO / "medusa_cache" / "demo" / "prompts.jsonl").read_text().splitlines()[:4]]
    data = work / "stories.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cache = work / "cache.zarr"
    run_dump(DumpConfig(model=str(MODEL), data=[str(data)], out=str(cache), max_length=64, aux_layers=LAYERS,
                        forward_tokens=1))
    if GOLD.exists():
        shutil.rmtree(GOLD)
    for fmt in ("specforge", "speculators"):
        export_features(ExportFeaturesConfig(cache=str(cache), format=fmt, out=str(GOLD / fmt)))
    return cache


def read_with_peers(cache_path: Path) -> dict:
    """Every exported file through the peers' readers, compared with the cache; returns what was compared."""
    from specforge.algorithms.eagle3.data import normalize_offline_sample
    from specforge.runtime.data_plane.feature_store import load_feature_file
    from specforge.runtime.data_plane.offline_reader import list_feature_files
    from speculators.train.data import ArrowDataset

    from medusa_cache.store import Cache

    c = Cache(cache_path)
    ids, mask, off, h = c.array("input_ids"), c.array("loss_mask"), c.offsets, c.hidden_size

    def seq(s: int) -> dict:
        a, b = int(off[s]), int(off[s + 1])
        return {"ids": torch.from_numpy(ids[a:b]).long(), "mask": torch.from_numpy(mask[a:b]).long(),
                "hidden": c.read_hidden(a, b), "aux": c.read_aux(a, b)}

    files = list_feature_files(str(GOLD / "specforge"))
    files = [f for f in files if Path(f).name.startswith("data_")]  # vocab_mapping.pt is not a sample
    assert len(files) == c.n_seqs, f"SpecForge lists {len(files)} samples, the cache has {c.n_seqs}"
    for f in files:
        s = int(Path(f).name.split("_")[1].split(".")[0])
        want, got = seq(s), normalize_offline_sample(load_feature_file(f), max_len=1 << 20)
        want_mask = want["mask"].clone()
        want_mask[-1] = 0  # normalize_offline_sample's own rule: the last position has no next token
        assert torch.equal(got["input_ids"][0], want["ids"]), f
        assert torch.equal(got["loss_mask"][0], want_mask), f
        assert torch.equal(got["target"][0], want["hidden"]), f  # Eagle3's target: the post-norm last layer
        assert torch.equal(got["hidden_state"][0], want["aux"][:, : 3 * h]), f  # its input: the three aux layers
    vm = torch.load(GOLD / "specforge" / "vocab_mapping.pt", weights_only=True)  # one draft vocabulary for both
    for name in ("d2t", "t2d"):  # speculators' scripts/train.py reads DATA/{d2t,t2d}.npy with np.load
        assert np.array_equal(np.load(GOLD / "speculators" / f"{name}.npy"), vm[name].numpy()), name
    ds = ArrowDataset(max_len=1 << 20, datapath=str(GOLD / "speculators"), on_missing="raise")
    assert len(ds) == c.n_seqs
    for s in range(len(ds)):
        want, got = seq(s), ds[s]
        assert torch.equal(got["input_ids"], want["ids"]) and torch.equal(got["loss_mask"].long(), want["mask"]), s
        assert torch.equal(got["hidden_states"], want["aux"][:, : 3 * h]), s
        assert torch.equal(got["verifier_last_hidden_states"], want["aux"][:, 3 * h :]), s  # before the final norm
    return {"specforge": {"files": len(files), "reader": "list_feature_files + load_feature_file + "
                          "normalize_offline_sample", "equal": ["input_ids", "loss_mask (last zeroed by the "
                          "normaliser)", "target = hidden", "hidden_state = aux layers 1,2,3"]},
            "speculators": {"rows": len(ds), "reader": "ArrowDataset(on_missing='raise')", "equal": [
                "input_ids", "loss_mask", "hidden_states = aux layers 1,2,3",
                "verifier_last_hidden_states = layer 4 before the final norm",
                "d2t.npy, t2d.npy = SpecForge's vocab_mapping.pt (np.load, as scripts/train.py reads them)"]}}


def digests() -> dict[str, str]:
    return {str(p.relative_to(GOLD)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(GOLD.rglob("*")) if p.is_file() and p.name != "provenance.json"}


def round_trip(work: Path) -> list[str]:
    """The golden files imported by medusa-cache and exported again: every tensor equal (no model is run)."""
    from safetensors.torch import load_file

    from medusa_cache.export_features import ExportFeaturesConfig, export_features
    from medusa_cache.importer import ImportConfig, run_import
    from medusa_cache.peers import load_specforge

    lines = []
    for fmt, layers in (("specforge", "1,2,3"), ("speculators", LAYERS)):
        cache = work / f"{fmt}.zarr"
        run_import(ImportConfig(src=str(GOLD / fmt), format=fmt, model=str(MODEL), out=str(cache), keep_aux=True,
                                aux_layers=layers, vocab_mapping=str(GOLD / "specforge" / "vocab_mapping.pt")))
        again = work / f"{fmt}-again"
        export_features(ExportFeaturesConfig(cache=str(cache), format=fmt, out=str(again)))
        n = 0
        if fmt == "specforge":
            for f in sorted((GOLD / fmt).rglob("data_*.ckpt")):
                a, b = load_specforge(f), load_specforge(again / f.relative_to(GOLD / fmt))
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{f}: differs"
                n += 1
        else:
            for f in sorted((GOLD / fmt / "hidden_states").glob("hs_*.safetensors")):
                a, b = load_file(str(f)), load_file(str(again / "hidden_states" / f.name))
                assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{f}: differs"
                n += 1
        lines.append(f"{fmt}: {n} golden samples imported and exported again: every tensor equal")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="without the peers: the golden files round-trip through "
                    "import and export-features unchanged (what CI runs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if not args.quick:
            cache = export_goldens(work)
            compared = read_with_peers(cache)
            prov = {"peers": {p: md.version(p) for p in ("specforge", "speculators", "hs-connectors")},
                    "model": "medusa_cache/demo/stories260K (5 layers, H 64)", "aux_layers": LAYERS,
                    "data": "the first 4 lines of medusa_cache/demo/prompts.jsonl", "dtype": "bfloat16",
                    "compared": compared, "files_sha256_16": digests(), "tool": "tools/peer_readers.py",
                    "torch": torch.__version__, "transformers": md.version("transformers")}
            (GOLD / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
            print(json.dumps(compared, indent=2))
            print(f"the peers' readers accepted every exported file; golden files and provenance in {GOLD}")
        prov = json.loads((GOLD / "provenance.json").read_text())
        assert prov["files_sha256_16"] == digests(), "tests/fixtures/peers: the golden files are not the recorded ones"
        for line in round_trip(work):
            print(line)
        print(f"golden files read by {', '.join(f'{k} {v}' for k, v in prov['peers'].items())} "
              "(tests/fixtures/peers/provenance.json)")


if __name__ == "__main__":
    main()
