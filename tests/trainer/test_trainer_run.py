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


def _torchrun(dataset, out: Path, *sets: str, nproc: int = 2) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "trainer.train", "--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out),
           "--set", *TINY, "train.steps=3", "train.global_batch=8", "train.accum=2", "data.workers=0",
           "optim.clip_norm=1.0", *sets]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_torchrun_two_processes_gloo_ddp_and_fsdp_equal_one_process(dataset, tmp_path):
    """Local loss + gather-with-grad + accumulation on 2 ranks is the 1-process full-batch step."""
    _torchrun(dataset, tmp_path / "ddp", "train.parallel=ddp")
    _torchrun(dataset, tmp_path / "fsdp", "train.parallel=fsdp")
    one = ["--data", dataset["train"], "--val-data", dataset["val"], "--output", str(tmp_path / "one"), "--set",
           *TINY, "train.steps=3", "train.global_batch=8", "train.accum=2", "data.workers=0", "optim.clip_norm=1.0"]
    assert main(one) == 0
    runs = {}
    for kind in ("ddp", "fsdp", "one"):
        out = tmp_path / kind
        train, evals = read_metrics(out)
        assert [r["step"] for r in train] == [1, 2, 3]  # rank 0 writes, once per step
        assert all(math.isfinite(r["loss"]) for r in train) and evals
        ckpt = torch.load(out / "checkpoints/step_00000003.pt", map_location="cpu", weights_only=False)
        assert ckpt["world"] == (1 if kind == "one" else 2)
        assert [s["position"] for s in ckpt["loaders"]] == [24] * ckpt["world"]  # 3 steps x 8 samples
        runs[kind] = (train, ckpt["model"])
    # Same samples per step whatever the world size, same global-batch loss: neither the local loss nor
    # sharding the parameters may change the maths.
    for kind in ("ddp", "fsdp"):
        for a, b in zip(runs["one"][0], runs[kind][0], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), kind
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), kind
        wa, wb = runs["one"][1], runs[kind][1]
        assert wa.keys() == wb.keys()
        assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa), kind


def test_resume_on_another_world_size_continues_the_stream(dataset, tmp_path):
    """2 ranks stop at step 2; 1 process resumes to step 4: the same samples and losses as 1 process
    throughout (data position is global, no sample repeated or skipped)."""
    _torchrun(dataset, tmp_path / "mixed", "train.steps=4", "train.stop_at=2")
    sets = [*TINY, "train.steps=4", "train.global_batch=8", "train.accum=2", "data.workers=0", "optim.clip_norm=1.0"]
    common = ["--data", dataset["train"], "--val-data", dataset["val"]]
    assert main([*common, "--output", str(tmp_path / "mixed"), "--set", *sets]) == 0
    assert main([*common, "--output", str(tmp_path / "one"), "--set", *sets]) == 0
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "mixed")
    assert sorted(b) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])
    ckpt = torch.load(tmp_path / "mixed/checkpoints/step_00000004.pt", map_location="cpu", weights_only=False)
    assert ckpt["world"] == 1 and ckpt["loaders"][0]["position"] == 32


def test_train_steps_can_be_raised_on_resume(dataset, tmp_path):
    sets = [*TINY, "train.global_batch=8", "data.loader=torch"]
    common = ["--data", dataset["train"], "--output", str(tmp_path / "r")]
    assert main([*common, "--set", *sets, "train.steps=3"]) == 0
    first = _losses(tmp_path / "r")
    assert main([*common, "--set", *sets, "train.steps=5"]) == 0  # resumes at 3, runs 4 and 5
    assert sorted(_losses(tmp_path / "r")) == [1, 2, 3, 4, 5]
    assert all(_losses(tmp_path / "r")[k] == first[k] for k in first)
    ckpt = torch.load(tmp_path / "r/checkpoints/step_00000005.pt", map_location="cpu", weights_only=False)
    assert ckpt["loaders"][0]["position"] == 40
    with pytest.raises(SystemExit, match="past train.steps"):  # lowering below the checkpoint is refused
        main([*common, "--set", *sets, "train.steps=4"])


def test_locked_image_tower_loads_strictly_and_stays_frozen_while_text_trains(dataset, tmp_path, caplog):
    from trainer.config import load_recipe
    from trainer.train import Tokenizer, build_model, model_config

    out = tmp_path / "lit"
    recipe = REPO / "trainer/recipes/lit_frozen_bigg14.yaml"
    sets = [*TINY, "tokenizer.context_length=16", "train.steps=3", "train.global_batch=8", "optim.lr=1e-2"]
    argv = ["--data", dataset["train"], "--output", str(out), "--recipe", str(recipe), "--set", *sets]
    # No weights for the locked tower: one line, exit 2, nothing trained.
    assert main(argv) == 2
    assert "locked image tower would stay random" in caplog.text and not (out / "checkpoints").exists()

    # A trained image tower (here: another seed's tiny tower), saved as an image-tower state dict.
    r = load_recipe(recipe, [*sets, "model.allow_random_locked=true"])
    torch.manual_seed(123)
    donor = build_model(r, model_config(r, Tokenizer(r.tokenizer).info), torch.device("cpu"))
    tower = {k: v.clone() for k, v in donor.visual.state_dict().items()}
    torch.save(tower, tmp_path / "tower.pt")
    # A tower of another shape is refused with one line naming what does not fit.
    bad = {**tower, "conv1.weight": torch.zeros(3, 3, 1, 1)}
    torch.save(bad, tmp_path / "bad.pt")
    assert main([*argv, f"model.pretrained_image={tmp_path / 'bad.pt'}"]) == 2
    assert "1 shape mismatches (first: conv1.weight)" in caplog.text
    del bad["conv1.weight"]
    torch.save(bad, tmp_path / "bad.pt")
    assert main([*argv, f"model.pretrained_image={tmp_path / 'bad.pt'}"]) == 2
    assert "1 missing keys (first: conv1.weight)" in caplog.text

    assert main([*argv, f"model.pretrained_image={tmp_path / 'tower.pt'}"]) == 0
    trained = torch.load(out / "checkpoints/step_00000003.pt", map_location="cpu", weights_only=False)["model"]
    torch.manual_seed(r.train.seed)  # train() seeds the same way before building the model
    init = build_model(r, model_config(r, Tokenizer(r.tokenizer).info), torch.device("cpu")).state_dict()
    text = [k for k in init if k.startswith(("transformer.", "token_embedding", "text_projection"))]
    assert text and all(torch.equal(trained[f"visual.{k}"], v) for k, v in tower.items())  # loaded, frozen
    assert any(not torch.equal(tower[k], init[f"visual.{k}"]) for k in tower)  # ... and not the random init
    assert any(not torch.equal(init[k], trained[k]) for k in text)


def test_sigmoid_loss_trains_a_model_with_a_logit_bias(dataset, tmp_path):
    out = tmp_path / "siglip"
    sets = [*TINY, "model.overrides={init_logit_bias: -10.0}", "train.steps=30", "train.global_batch=16",
            "optim.lr=2e-3", "optim.warmup_steps=3", "data.loader=torch"]
    assert main(["--data", dataset["train"], "--output", str(out), "--set", *sets]) == 0
    train, _ = read_metrics(out)
    # At init (bias -10, scale 10) every pair's logit is about -10 +- 10: the loss starts near
    # N * softplus(-10 + ...) and must fall as positives are pulled up.
    assert sum(r["loss"] for r in train[-5:]) < sum(r["loss"] for r in train[:5]) - 0.2
    weights = torch.load(out / "checkpoints/step_00000030.pt", map_location="cpu", weights_only=False)["model"]
    assert float(weights["logit_bias"]) != pytest.approx(-10.0, abs=1e-4)  # the bias is trained


def _upload(local: Path, bucket: str, prefix: str) -> str:
    """Copy a dataset folder to the local S3 server; return its s3:// URL."""
    import fsspec

    fs = fsspec.filesystem("s3")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.pipe_file(f"{bucket}/{prefix}/{path.relative_to(local)}", path.read_bytes())
    return f"s3://{bucket}/{prefix}"


@pytest.mark.parametrize(("loader", "storage"), [("dali", "local"), ("torch", "local"), ("dali", "s3")])
def test_an_undecodable_image_is_replaced_and_the_run_still_resumes_exactly(tmp_path, loader, storage, request):
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
    data = str(tmp_path / "data")
    if storage == "s3":
        data = _upload(tmp_path / "data", request.getfixturevalue("s3_bucket"), "train")

    sets = [*TINY, "train.steps=6", "train.global_batch=8", "data.shuffle_buffer=4", "data.shuffle_block=2",
            f"data.loader={loader}"]
    common = ["--data", data]
    assert main([*common, "--output", str(tmp_path / "a"), "--set", *sets]) == 0
    state = torch.load(tmp_path / "a/checkpoints/step_00000006.pt", map_location="cpu", weights_only=False)
    tar = f"{data}/shards/00000.tar" if storage == "s3" else str(shards / "00000.tar")
    assert state["loaders"][0]["bad"] == [f"{tar}::000000005"]
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets, "train.stop_at=3"]) == 0
    assert main([*common, "--output", str(tmp_path / "b"), "--set", *sets]) == 0
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(b) == list(range(1, 7))
    assert all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)

    # The broken sample's slot holds the next good sample of its micro-batch, in either loader.
    from trainer import data as D
    from trainer.config import load_recipe

    r = load_recipe(None, sets)
    source = D.make_source(D.find_shards(data), r.data, seed=r.train.seed)
    out = D.make_loader(loader, source, r.data, image_size=32, batch_size=8, seed=r.train.seed)
    keys = [k for _ in range(3) for k in out.next().keys]
    assert "000000005" not in keys and len(keys) == 24 and len(set(keys)) == 23
