"""Golden files from SpecForge's own code: token ids and loss mask per fixture conversation.

Runs SpecForge itself, never a re-reading of it: its ShareGPT conversion (``process_sharegpt_row`` from
``scripts/prepare_data.py`` of a SpecForge checkout) and its parser (``specforge.data.parse.GeneralParser`` with
``TEMPLATE_REGISTRY``, from the installed package), in a throwaway virtual environment where SpecForge is installed
with ``--no-deps`` (so it cannot replace torch) next to the same transformers/tokenizers versions as the project.

    python3 -m venv /tmp/sfenv && . /tmp/sfenv/bin/activate
    pip install torch==2.13.0 && pip install transformers==X tokenizers==Y pydantic datasets tqdm numpy
    pip download specforge --no-deps -d /tmp/sf && pip install --no-deps /tmp/sf/specforge-*.whl
    git -C SPECFORGE_CHECKOUT show HEAD:scripts/prepare_data.py > /tmp/prepare_data.py
    python tools/specforge_golden.py --prepare-data /tmp/prepare_data.py --commit SPECFORGE_COMMIT
    python tools/specforge_golden.py --quick     # no SpecForge needed: do the stored goldens still cover every
                                                 # conversation this tool reads? (what CI runs)

Writes ``tests/fixtures/specforge/{llama3,qwen2}.npz`` (ids, mask, offsets, file and row of each conversation)
and ``tests/fixtures/specforge/provenance.json``. The project never imports SpecForge.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIX = REPO / "tests" / "fixtures"
FILES = ["fastchat_dummy_sharegpt.json", "glaive_toolcall_sharegpt.json"]
TOKENIZERS = {"llama3": "llama3", "qwen2": "qwen"}  # fixture tokenizer -> SpecForge template name


def tokenizer_dir(name: str) -> Path:
    """The vendored tokenizer ``name`` as a directory transformers loads (its ``tokenizer.json.xz`` unpacked)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quick import tokenizer_dir as unpacked

    return unpacked(FIX / "tokenizers" / name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prepare-data", help="SpecForge's scripts/prepare_data.py")
    ap.add_argument("--commit", help="the SpecForge commit prepare_data.py came from")
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--quick", action="store_true", help="without SpecForge: check the stored goldens against the "
                    "inputs this tool reads (files, row counts, tokenizers, provenance)")
    args = ap.parse_args()
    if args.quick:
        return check_goldens()
    if not (args.prepare_data and args.commit):
        ap.error("--prepare-data and --commit are required (or --quick)")
    from specforge.data.parse import GeneralParser
    from specforge.data.template import TEMPLATE_REGISTRY
    from transformers import AutoTokenizer

    spec = importlib.util.spec_from_file_location("prepare_data", args.prepare_data)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    out = FIX / "specforge"
    out.mkdir(exist_ok=True)
    warnings.simplefilter("ignore")
    for tok_name, template in TOKENIZERS.items():
        tok = AutoTokenizer.from_pretrained(tokenizer_dir(tok_name))
        parser = GeneralParser(tok, TEMPLATE_REGISTRY.get(template))
        ids, masks, offsets, where = [], [], [0], []
        for fi, name in enumerate(FILES):
            for ri, row in enumerate(json.loads((FIX / "chat" / name).read_text())):
                conv, _ = prepare.process_sharegpt_row({**row, "id": row.get("id", str(ri))})
                i, m = parser.parse(conv["conversations"], args.max_length, tool=[])
                ids.append(i.numpy().astype(np.int32))
                masks.append(m.numpy().astype(np.uint8))
                offsets.append(offsets[-1] + len(i))
                where.append((fi, ri))
        np.savez_compressed(out / f"{tok_name}.npz", ids=np.concatenate(ids), mask=np.concatenate(masks),
                            offsets=np.array(offsets, np.int64), where=np.array(where, np.int64))
        print(f"{tok_name}: {len(where)} conversations, {offsets[-1]} tokens")
    prov = {
        "specforge_version": md.version("specforge"), "specforge_commit": args.commit,
        "prepare_data_sha256": hashlib.sha256(Path(args.prepare_data).read_bytes()).hexdigest(),
        "transformers": md.version("transformers"), "tokenizers": md.version("tokenizers"),
        "python": sys.version.split()[0], "max_length": args.max_length, "files": FILES,
        "templates": TOKENIZERS, "tools": "tools/specforge_golden.py",
    }
    (out / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")


def check_goldens() -> None:
    """What a rerun would rewrite is there and lines up: one golden per tokenizer, one conversation per row of every
    fixture file in order, offsets that end at the token count, provenance naming the same files and templates."""
    out = FIX / "specforge"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["files"] == FILES and prov["templates"] == TOKENIZERS, "provenance names other files or templates"
    rows = [(fi, ri) for fi, name in enumerate(FILES) for ri in range(len(json.loads((FIX / "chat" / name)
                                                                                         .read_text())))]
    for tok_name in TOKENIZERS:
        assert (tokenizer_dir(tok_name) / "tokenizer.json").exists(), f"tokenizer {tok_name} missing"
        g = np.load(out / f"{tok_name}.npz")
        assert [tuple(w) for w in g["where"].tolist()] == rows, f"{tok_name}.npz: conversations differ from the files"
        assert g["offsets"][-1] == len(g["ids"]) == len(g["mask"]), f"{tok_name}.npz: offsets do not end at N"
        print(f"{tok_name}: {len(rows)} conversations, {len(g['ids'])} tokens; SpecForge {prov['specforge_version']} "
              f"at {prov['specforge_commit'][:12]}")


if __name__ == "__main__":
    main()
