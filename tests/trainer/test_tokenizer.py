"""Tokenizers trained on an export's captions (trainer/tokenizer.py), loaded by the trainer and trained with."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import TINY, read_metrics

from trainer.tokenizer import main as tok_main
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "demo" / "corpus"


@pytest.fixture(scope="module")
def demo_export(tmp_path_factory) -> Path:
    """The demo corpus' good images and captions as an export (Parquet + tars), with a recaption column."""
    from curate import schema
    from curate.testing.datasets import IMAGE, write_image_dataset

    entries = [json.loads(line) for line in (CORPUS / "captions.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for i, e in enumerate(x for x in entries if x["kind"] == "ok"):
        ext = e["file"].rsplit(".", 1)[-1].lower()
        if ext not in ("jpg", "jpeg", "png", "webp"):
            continue
        rows.append({IMAGE: (CORPUS / e["file"]).read_bytes(), schema.IMAGE_FORMAT: ext, schema.UID: f"{i:032x}",
                     schema.CAPTION: e["caption"], schema.RECAPTION: f"a drawing of {e['caption'].lower()}"})
    root = tmp_path_factory.mktemp("demo-export") / "export"
    write_image_dataset(str(root), [rows[: len(rows) // 2], rows[len(rows) // 2 :]], stage="export")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != "provenance.json"}


@pytest.mark.parametrize("kind, vocab, recipe, extra", [
    ("bpe", 600, "clip_vit_l14_336.yaml", []),
    ("sentencepiece", 400, "vit_b16_sentencepiece.yaml", []),
    ("sentencepiece", 400, "vit_h14_sentencepiece.yaml", ["--model-type", "bpe"]),
])
def test_trained_tokenizer_is_reproducible_and_a_tiny_model_trains_on_it(demo_export, tmp_path, kind, vocab, recipe,
                                                                         extra, capsys):
    args = ["--data", str(demo_export), "--kind", kind, "--vocab-size", str(vocab), *extra]
    assert tok_main([*args, "--out", str(tmp_path / "tok")]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert tok_main([*args, "--out", str(tmp_path / "again")]) == 0
    assert _files(tmp_path / "tok") == _files(tmp_path / "again")  # rerun: the same tokenizer files
    prov = json.loads((tmp_path / "tok" / "provenance.json").read_text())
    n_rows = sum(pq.read_metadata(p).num_rows for p in (demo_export / "shards").glob("*.parquet"))
    assert prov["captions_used"] == n_rows and prov["source"]["data"] == str(demo_export.resolve())
    assert prov["source"]["manifest_sha256"] and prov["vocab_size"] <= vocab
    use = prov["recipe_set"].split()
    assert printed == "use it: --set " + prov["recipe_set"]

    # the trainer loads it (recipe's own tokenizer settings replaced by the printed --set line) and learns
    out = tmp_path / "run"
    sets = [*TINY, *use, "tokenizer.context_length=16", "train.steps=4", "train.global_batch=8", "train.accum=2", "optim.lr=1e-3",
            "optim.warmup_steps=1"]
    assert train_main(["--data", str(demo_export), "--recipe", str(REPO / "trainer" / "recipes" / recipe),
                       "--output", str(out), "--set", *sets]) == 0
    losses = [r["loss"] for r in read_metrics(out)[0]]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    from trainer.config import TokenizerConfig
    from trainer.train import Tokenizer

    cfg = TokenizerConfig.model_validate(json.loads((out / "recipe.json").read_text())["tokenizer"])
    tok = Tokenizer(cfg)
    ids = tok(["Multi Colour Fireworks", "MULTI colour fireworks"])
    assert ids.max() < prov["vocab_size"]
    assert ids[0].tolist() == ids[1].tolist()  # lower-cased like open_clip's BPE
    # the end-of-text token closes the caption, then padding
    row = ids[0].tolist()
    end = row.index(tok.eos_id)
    assert 1 < end < 16 and all(t == tok.pad_id for t in row[end + 1 :])


def test_sample_and_caption_choice(demo_export, tmp_path):
    base = ["--data", str(demo_export), "--kind", "sentencepiece", "--vocab-size", "200"]

    def run(name, *extra):
        assert tok_main([*base, "--out", str(tmp_path / name), *extra]) == 0
        return json.loads((tmp_path / name / "provenance.json").read_text()), _files(tmp_path / name)

    a, fa = run("a", "--sample", "100", "--seed", "1")
    b, fb = run("b", "--sample", "100", "--seed", "1")
    c, fc = run("c", "--sample", "100", "--seed", "2")
    assert a["captions_used"] == 100 and a["source"]["captions_seen"] > 100
    assert fa == fb and fa != fc  # the seed picks the captions
    rec, frec = run("rec", "--captions", "recaption")
    both, _ = run("both", "--captions", "both")
    assert both["captions_used"] == 2 * rec["captions_used"]
    # every recaption starts "a drawing of": a tokenizer trained on them spends fewer pieces on it
    import sentencepiece as spm

    run("orig")
    pieces = {name: len(spm.SentencePieceProcessor(model_file=str(tmp_path / name / "spm.model")).encode("a drawing of"))
              for name in ("rec", "orig")}
    assert pieces["rec"] < pieces["orig"], pieces


def test_user_mistakes_exit_2(demo_export, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("keep me")
    cases = [
        (["--data", str(demo_export), "--kind", "bpe", "--vocab-size", "200", "--out", str(tmp_path / "x")], "256 bytes"),
        (["--data", str(demo_export), "--kind", "bpe", "--vocab-size", "600", "--out", str(theirs)], "not written by"),
        (["--data", str(tmp_path / "nope"), "--kind", "bpe", "--vocab-size", "600", "--out", str(tmp_path / "y")],
         "no such export"),
    ]
    for args, message in cases:
        assert tok_main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (theirs / "notes.txt").read_text() == "keep me"


def test_demo_trains_recipe_e_with_a_tokenizer_of_its_own_export(demo_export, tmp_path):
    from curate.demo import DEMO_SPM_STEPS, train_sentencepiece_demo

    assert train_sentencepiece_demo(demo_export, tmp_path) == 0
    prov = json.loads((tmp_path / "tokenizer" / "provenance.json").read_text())
    assert prov["kind"] == "sentencepiece" and prov["source"]["data"] == str(demo_export.resolve())
    recipe = json.loads((tmp_path / "train_spm" / "recipe.json").read_text())
    assert recipe["name"] == "vit-b16-sentencepiece" and recipe["tokenizer"]["kind"] == "sentencepiece"
    losses = [r["loss"] for r in read_metrics(tmp_path / "train_spm")[0]]
    assert losses and all(math.isfinite(v) for v in losses)
    assert (tmp_path / "train_spm" / "checkpoints" / f"step_{DEMO_SPM_STEPS:08d}.pt").is_file()
