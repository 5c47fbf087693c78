"""Zero-shot classification and retrieval eval (trainer/eval.py), checked against open_clip's own code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import COLORS, SHAPES, TINY, _image, read_metrics
from realsets import read_pairs, write_cls_tars, write_imagefolder

from trainer import eval as E
from trainer.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
TEMPLATES = ["a {}", "a photo of a {}."]


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict:
    """The real clip-art set (ImageFolder + .cls tars + curate dataset) and a learnable colour set."""
    root = tmp_path_factory.mktemp("zeroshot")
    classes, items = write_imagefolder(root / "real")
    write_cls_tars(root / "real_tars", items)
    from curate import schema
    from curate.testing.datasets import IMAGE, write_image_dataset

    rows = [{IMAGE: Path(p).read_bytes(), schema.IMAGE_FORMAT: "jpg", schema.UID: f"{i:032x}",
             schema.CAPTION: "x", "label": label} for i, (p, label) in enumerate(items)]
    write_image_dataset(str(root / "real_ds"), [rows[:15], rows[15:]], stage="export")
    # Names in the vocabulary the tiny model learned (colours, shapes), so its answers on these drawings
    # differ from image to image; what is checked is that both implementations compute the same answers.
    (root / "classnames.txt").write_text("red circle\ngreen square\nblue triangle\nyellow circle\npurple square\norange triangle\ncyan circle\n")
    (root / "templates.txt").write_text("# two prompts\n" + "\n".join(TEMPLATES) + "\n")
    # colours as classes: shapes of each colour, whatever the shape
    rng = np.random.default_rng(7)
    for colour in COLORS:
        (root / "colours" / colour).mkdir(parents=True)
        for i, shape in enumerate(SHAPES * 2):
            (root / "colours" / colour / f"{i}.jpg").write_bytes(_image(rng, colour, shape))
    (root / "colour_templates.txt").write_text("a {} circle\na {} square\na {} triangle\n")
    return {"root": root, "classes": classes, "items": items}


@pytest.fixture(scope="module")
def trained(dataset, sets, tmp_path_factory) -> Path:
    """A tiny CLIP trained on the shapes, with both zero-shot sets evaluated at its end."""
    out = tmp_path_factory.mktemp("zs-run") / "run"
    root = sets["root"]
    zs = (f"eval.zeroshot=[{{path: {root / 'real'}, classnames: {root / 'classnames.txt'}, "
          f"templates: {root / 'templates.txt'}}}, {{path: {root / 'colours'}, templates: {root / 'colour_templates.txt'}}}]")
    sets_ = [*TINY, "train.steps=60", "train.global_batch=16", "optim.lr=2e-3", "optim.warmup_steps=5",
             "optim.weight_decay=0.1", "data.color_jitter=null", "train.log_every=20", zs]
    assert train_main(["--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out),
                       "--set", *sets_]) == 0
    return out


def _open_clip_zeroshot(model_dir: Path, classnames: list[str], templates: list[str],
                        items: list[tuple[str, int]]) -> tuple[float, float, np.ndarray]:
    """Top-1 and top-5 as open_clip computes them: its loader, preprocessing, tokenizer and classifier builder."""
    import open_clip
    from open_clip.zero_shot_classifier import build_zero_shot_classifier
    from PIL import Image

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{model_dir}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{model_dir}")
    with torch.no_grad():
        classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, num_classes_per_batch=2)
        images = torch.stack([preprocess(Image.open(p)) for p, _ in items])
        feats = model.encode_image(images, normalize=True)
        logits = 100.0 * feats @ classifier
    labels = torch.tensor([lab for _, lab in items])
    top = logits.topk(5, dim=1).indices
    top1 = (top[:, 0] == labels).float().mean().item()
    top5 = (top == labels[:, None]).any(dim=1).float().mean().item()
    return top1, top5, top[:, 0].numpy()


def test_zeroshot_top1_equals_open_clips_own_zero_shot_code(trained, sets):
    root = sets["root"]
    names = (root / "classnames.txt").read_text().split("\n")[:-1]
    top1, top5, predicted = _open_clip_zeroshot(trained / "model", names, TEMPLATES, sets["items"])
    # the model predicts more than one class, so equal accuracy is not the accident of a constant answer
    assert len(set(predicted.tolist())) > 1

    _, evals = read_metrics(trained)
    final = evals[-1]
    assert final["step"] == 60
    assert final["eval/zeroshot/real/n"] == len(sets["items"])
    assert final["eval/zeroshot/real/top1"] == pytest.approx(top1, abs=1e-6)
    assert final["eval/zeroshot/real/top5"] == pytest.approx(top5, abs=1e-6)

    # standalone, from the run directory, for each layout of the same images
    for layout, extra in (("real", []), ("real_tars", []), ("real_ds", ["--label", "label"])):
        out = root / f"standalone-{layout}"
        rc = E.main(["--checkpoint", str(trained), "--zeroshot", str(root / layout), "--classnames",
                     str(root / "classnames.txt"), "--templates", str(root / "templates.txt"), "--output", str(out),
                     "--tensorboard", *extra])
        assert rc == 0
        rows = (out / "metrics.jsonl").read_text().splitlines()
        row = json.loads(rows[-1])
        assert row["step"] == 60
        assert row[f"zeroshot/{layout}/top1"] == pytest.approx(top1, abs=1e-6), layout
        assert row[f"zeroshot/{layout}/top5"] == pytest.approx(top5, abs=1e-6), layout
        assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # a rerun of the same eval replaces its row instead of adding a second one
    assert E.main(["--checkpoint", str(trained), "--zeroshot", str(root / "real"), "--classnames",
                   str(root / "classnames.txt"), "--templates", str(root / "templates.txt"), "--output",
                   str(root / "standalone-real")]) == 0
    assert len((root / "standalone-real" / "metrics.jsonl").read_text().splitlines()) == 1


def test_zeroshot_on_learned_colours_is_far_above_chance(trained):
    _, evals = read_metrics(trained)
    final = evals[-1]
    assert final["eval/zeroshot/colours/n"] == 8 * 6
    # 8 colours: chance is 1/8; the model was trained on "a {colour} {shape}" captions
    assert final["eval/zeroshot/colours/top1"] > 3 / 8, final


def test_retrieval_recall_and_ranks_match_a_direct_computation(trained, dataset):
    import open_clip
    from PIL import Image

    _, evals = read_metrics(trained)
    final = evals[-1]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{trained / 'model'}")
    model.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{trained / 'model'}")
    pairs = read_pairs(dataset["val"])
    import io

    with torch.no_grad():
        img = model.encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for _, b, _ in pairs]),
                                 normalize=True)
        txt = model.encode_text(tokenizer([c for _, _, c in pairs]), normalize=True)
    sims = (img @ txt.T).numpy()
    for name, s in (("image_to_text", sims), ("text_to_image", sims.T)):
        ranks = np.array([1 + (row > row[i]).sum() for i, row in enumerate(s)])
        for k in (1, 5, 10):
            assert final[f"eval/{name}_R@{k}"] == pytest.approx((ranks <= k).mean(), abs=1e-9)
        assert final[f"eval/{name}_mean_rank"] == pytest.approx(ranks.mean(), abs=1e-9)
        assert final[f"eval/{name}_median_rank"] == pytest.approx(np.median(ranks), abs=1e-9)


def test_two_ranks_split_the_eval_and_agree_with_one(trained, sets, dataset, tmp_path):
    root = sets["root"]
    args = ["--checkpoint", str(trained / "model"), "--zeroshot", str(root / "real"), "--classnames",
            str(root / "classnames.txt"), "--templates", str(root / "templates.txt"), "--retrieval", dataset["val"],
            "--batch-size", "8"]
    assert E.main([*args, "--output", str(tmp_path / "one")]) == 0
    one = json.loads((tmp_path / "one" / "metrics.jsonl").read_text())
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "trainer.eval",
           *args, "--output", str(tmp_path / "two")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "metrics.jsonl").read_text())
    assert two.keys() == one.keys()
    for k in one:
        assert two[k] == pytest.approx(one[k], abs=1e-6), k
    n = len(sets["items"])
    # each rank encoded its own half, not the whole set
    assert f"rank 0 classified {n // 2} of {n} images" in proc.stderr
    assert f"rank 1 classified {n - n // 2} of {n} images" in proc.stderr
    assert "rank 0 encoded 12 of 24 held-out pairs" in proc.stderr
    assert "rank 1 encoded 12 of 24 held-out pairs" in proc.stderr


def test_bad_sets_are_one_line_and_exit_2(trained, sets, tmp_path, caplog):
    root = sets["root"]
    (tmp_path / "t.txt").write_text("a photo of a cat\n")
    (tmp_path / "few.txt").write_text("one\ntwo\n")
    cases = [
        (["--zeroshot", str(tmp_path / "missing")], "not an ImageFolder"),
        (["--zeroshot", str(root / "real"), "--templates", str(tmp_path / "t.txt")], "exactly one {}"),
        (["--zeroshot", str(root / "real"), "--classnames", str(tmp_path / "few.txt")], "2 class names"),
        (["--zeroshot", str(root / "real_ds")], "no label column 'cls'"),
        ([], "nothing to evaluate"),
    ]
    for extra, message in cases:
        caplog.clear()
        assert E.main(["--checkpoint", str(trained), *extra]) == 2, extra
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and message in errors[0], (extra, errors)
