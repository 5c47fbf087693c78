"""End-to-end training runs on the tiny dataset: learning, retrieval eval, export, resume, CoCa, torchrun."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, read_metrics

from trainer.train import main

REPO = Path(__file__).resolve().parents[2]


def test_tiny_clip_learns_and_beats_chance_on_held_out(dataset, tmp_path):
    out = tmp_path / "run"
    sets = [*TINY, "train.steps=60", "train.global_batch=16", "optim.lr=2e-3", "optim.warmup_steps=5",
            "optim.weight_decay=0.1", "data.color_jitter=null", "train.tensorboard=true"]
    assert main(["--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out), "--set", *sets]) == 0
    train, evals = read_metrics(out)
    assert [r["step"] for r in train] == list(range(1, 61))
    first = sum(r["loss"] for r in train[:5]) / 5
    last = sum(r["loss"] for r in train[-5:]) / 5
    assert first > math.log(16) - 0.3  # starts near chance for a batch of 16
    assert last < first - 0.5, (first, last)
    final = evals[-1]
    assert final["step"] == 60 and final["eval/n"] == 24
    chance1, chance5 = 1 / 24, 5 / 24
    assert final["eval/image_to_text_R@1"] > 3 * chance1, final
    # Colour alone narrows 24 captions to 3, so a model that learned anything ranks well above chance.
    assert final["eval/image_to_text_R@5"] > 2 * chance5, final
    assert final["eval/text_to_image_R@5"] > 2 * chance5, final
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    # The exported weights load through open_clip's own loading paths and give the trained model's outputs.
    import open_clip

    cfg = json.loads((out / "model" / "open_clip_config.json").read_text())["model_cfg"]
    by_dir = open_clip.create_model(f"local-dir:{out / 'model'}")
    by_path = open_clip.create_model(
        "ViT-B-32", pretrained=str(out / "model" / "open_clip_model.safetensors"),
        **{k: v for k, v in cfg.items() if k != "custom_text"},
    )
    ckpt = torch.load(out / "checkpoints" / "step_00000060.pt", map_location="cpu", weights_only=False)
    for model in (by_dir, by_path):
        sd = model.state_dict()
        assert sd.keys() == ckpt["model"].keys()
        assert all(torch.equal(sd[k], ckpt["model"][k]) for k in sd)
    tok = open_clip.get_tokenizer(f"local-dir:{out / 'model'}")
    assert tok(["a red circle"]).shape == (1, 77)

    # ... and the clip stage's loader scores with it: same text embeddings as the trained model.
    from curate.models.clip import load_clip

    scorer = load_clip(str(out / "model"), device="cpu")
    captions = ["a red circle", "a blue square"]
    with torch.no_grad():
        mine = torch.nn.functional.normalize(by_dir.encode_text(tok(captions)), dim=-1)
    assert torch.allclose(torch.from_numpy(scorer.encode_texts(captions)), mine, atol=1e-5)


def _losses(output: Path) -> dict[int, float]:
    train, _ = read_metrics(output)
    return {r["step"]: r["loss"] for r in train}


@pytest.mark.parametrize("loader", ["dali", "torch"])
def test_stop_and_resume_matches_uninterrupted_run(dataset, tmp_path, loader):
    # Accumulation, flip and colour jitter on: the resumed run must replay the same random crops too.
    sets = [*TINY, f"data.loader={loader}", "train.steps=8", "train.global_batch=8", "train.accum=2",
            "optim.lr=1e-3", "optim.warmup_steps=2", "data.flip=true",
            "data.color_jitter={p: 0.8, brightness: 0.4, contrast: 0.4, saturation: 0.4, hue: 0.1}"]
    common = ["--data", dataset["train"], "--val-data", dataset["val"]]
    assert main([*common, "--output", str(tmp_path / "a"), "--set", *sets]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets, "train.stop_at=4"]) == 0
    assert sorted(_losses(tmp_path / "b")) == [1, 2, 3, 4]
    # A run that died after step 4's checkpoint had logged step 5 already; the resumed run replaces it.
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 123.0}\n')
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets]) == 0  # resumes at step 4

    assert [r["step"] for r in read_metrics(tmp_path / "b")[0]] == list(range(1, 9))  # each step once
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    # Tolerance: 1e-6 absolute. On one CPU the resumed run replays the same arithmetic, so it is exact.
    for step in range(1, 9):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa = torch.load(tmp_path / "a/checkpoints/step_00000008.pt", map_location="cpu", weights_only=False)["model"]
    wb = torch.load(tmp_path / "b/checkpoints/step_00000008.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)


def test_resume_refuses_a_different_recipe(dataset, tmp_path):
    sets = [*TINY, "train.steps=2", "train.global_batch=8", "train.stop_at=1"]
    common = ["--data", dataset["train"], "--output", str(tmp_path / "r")]
    assert main([*common, "--set", *sets]) == 0
    with pytest.raises(SystemExit, match="different recipe"):
        main([*common, "--set", *sets, "optim.lr=0.1"])


def test_coca_trains_with_both_losses(dataset, tmp_path):
    out = tmp_path / "coca"
    sets = [*TINY, "tokenizer.context_length=16", "train.steps=3", "train.global_batch=8", "train.accum=2",
            "data.loader=torch"]
    argv = ["--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out),
            "--recipe", str(REPO / "trainer/recipes/coca_vit_l14.yaml"), "--set", *sets]
    assert main(argv) == 0
    train, evals = read_metrics(out)
    assert len(train) == 3 and evals
    for row in train:
        # 0.5 / 0.5 weights from the recipe, both terms present and summing to the loss
        assert row["caption_loss"] > 0 and row["contrastive_loss"] > 0
        assert math.isclose(row["loss"], row["caption_loss"] + row["contrastive_loss"], rel_tol=1e-5)
        assert "grad_norm" in row  # the recipe clips at 1.0
    import open_clip

    model = open_clip.create_model(f"local-dir:{out / 'model'}")
    assert type(model).__name__ == "CoCa"


def _torchrun(dataset, out: Path, *sets: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "trainer.train", "--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out),
           "--set", *TINY, "train.steps=3", "train.global_batch=8", "train.accum=2", "data.workers=0",
           "optim.clip_norm=1.0", *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_two_processes_gloo_ddp_and_fsdp_agree(dataset, tmp_path):
    _torchrun(dataset, tmp_path / "ddp", "train.parallel=ddp")
    _torchrun(dataset, tmp_path / "fsdp", "train.parallel=fsdp")
    runs = {}
    for kind in ("ddp", "fsdp"):
        out = tmp_path / kind
        train, evals = read_metrics(out)
        assert [r["step"] for r in train] == [1, 2, 3]  # rank 0 writes, once per step
        assert all(math.isfinite(r["loss"]) for r in train) and evals
        ckpt = torch.load(out / "checkpoints/step_00000003.pt", map_location="cpu", weights_only=False)
        assert ckpt["world"] == 2 and len(ckpt["loaders"]) == 2
        assert ckpt["loaders"][0]["dali"] != ckpt["loaders"][1]["dali"]  # each rank has its own position
        runs[kind] = (train, ckpt["model"])
    # Same data split, same global-batch loss: sharding the parameters must not change the math.
    for a, b in zip(runs["ddp"][0], runs["fsdp"][0], strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    wd, wf = runs["ddp"][1], runs["fsdp"][1]
    assert wd.keys() == wf.keys()
    assert all(torch.allclose(wd[k], wf[k], atol=1e-5) for k in wd)


def test_locked_image_tower_stays_frozen_while_text_trains(dataset, tmp_path):
    out = tmp_path / "lit"
    recipe = REPO / "trainer/recipes/lit_frozen_bigg14.yaml"
    sets = [*TINY, "tokenizer.context_length=16", "train.steps=3", "train.global_batch=8", "optim.lr=1e-2"]
    assert main(["--data", dataset["train"], "--output", str(out), "--recipe", str(recipe), "--set", *sets]) == 0
    from trainer.config import load_recipe
    from trainer.train import Tokenizer, build_model, model_config

    r = load_recipe(recipe, sets)
    torch.manual_seed(r.train.seed)  # train() seeds the same way before building the model
    init = build_model(r, model_config(r, Tokenizer(r.tokenizer).info), torch.device("cpu")).state_dict()
    trained = torch.load(out / "checkpoints/step_00000003.pt", map_location="cpu", weights_only=False)["model"]
    visual = [k for k in init if k.startswith("visual.")]
    text = [k for k in init if k.startswith(("transformer.", "token_embedding", "text_projection"))]
    assert visual and text
    assert all(torch.equal(init[k], trained[k]) for k in visual)
    assert any(not torch.equal(init[k], trained[k]) for k in text)


def test_dali_skips_an_undecodable_image_and_still_resumes_exactly(tmp_path):
    import io

    import numpy as np
    from PIL import Image

    from curate.wds import TarWriter

    shards = tmp_path / "data" / "shards"
    shards.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(shards / "00000.tar", "wb") as f:
        w = TarWriter(f)
        for i in range(24):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
            data = buf.getvalue()[: len(buf.getvalue()) // 2] if i == 5 else buf.getvalue()  # 5: truncated
            w.add(f"00000{i:04d}", {"jpg": data, "txt": f"caption {i}"})
        w.close()
    (shards / "00000.idx").write_text(w.index_text())
    (shards / "sizes.json").write_text(json.dumps({"00000.tar": 24}))

    sets = [*TINY, "train.steps=6", "train.global_batch=8", "data.shuffle_buffer=4"]
    common = ["--data", str(tmp_path / "data")]
    assert main([*common, "--output", str(tmp_path / "a"), "--set", *sets]) == 0
    state = torch.load(tmp_path / "a/checkpoints/step_00000006.pt", map_location="cpu", weights_only=False)
    assert state["loaders"][0]["skipped"] == [f"{shards / '00000.tar'}::000000005"]
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets, "train.stop_at=3"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets]) == 0
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    assert all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
