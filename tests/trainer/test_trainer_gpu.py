"""GPU checks (skipped without CUDA): real-size recipe builds and steps, DALI mixed decode, bf16 training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, read_metrics

from trainer import data as D
from trainer.config import DataConfig, load_recipe
from trainer.train import (
    Dist,
    Tokenizer,
    build_model,
    main,
    make_loss,
    make_optimizer,
    model_config,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "trainer" / "recipes").glob("*.yaml"))

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_real_size_recipe_builds_and_takes_a_bf16_step(recipe, tmp_path):
    """Each recipe's full-size model (real towers, real context length) trains one step at batch 4."""
    sets = []
    r0 = load_recipe(recipe)
    if r0.tokenizer.kind == "sentencepiece":
        import sentencepiece as spm

        text = tmp_path / "t.txt"
        text.write_text("\n".join(f"a photo of object number {i}" for i in range(200)))
        spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(tmp_path / "sp"), vocab_size=64,
                                       hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                       minloglevel=2)
        sets.append(f"tokenizer.name={tmp_path / 'sp.model'}")
    r = load_recipe(recipe, sets)
    device = torch.device("cuda")
    tok = Tokenizer(r.tokenizer)
    cfg = model_config(r, tok.info)
    model = build_model(r, cfg, device)
    opt = make_optimizer(model, r)
    loss_fn = make_loss(r, Dist(device=device), "multimodal_cfg" in cfg, tok.pad_id)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(4, 3, size, size, device=device)
    texts = tok(["a photo of a cat"] * 4).to(device)
    micro = [(images[:2], texts[:2]), (images[2:], texts[2:])]
    losses = train_step(model, loss_fn, micro, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    opt.step()
    assert torch.isfinite(torch.tensor(losses["loss"]))
    del model, opt
    torch.cuda.empty_cache()


def test_dali_mixed_decode_matches_cpu_decode(dataset):
    shards = D.find_shards(dataset["val"])
    cfg = DataConfig(workers=2)
    gpu = D.DaliLoader(shards, cfg, image_size=32, batch_size=24, train=False, device_id=0).next()
    cpu = D.DaliLoader(shards, cfg, image_size=32, batch_size=24, train=False).next()
    assert gpu.images.is_cuda and gpu.keys == cpu.keys
    assert (gpu.images.cpu() - cpu.images).abs().mean().item() < 0.05


def test_tiny_training_run_on_gpu(dataset, tmp_path):
    out = tmp_path / "run"
    argv = ["--data", dataset["train"], "--val-data", dataset["val"], "--output", str(out),
            "--set", *TINY, "train.steps=20", "train.global_batch=16", "optim.lr=2e-3"]
    assert main(argv) == 0
    train, evals = read_metrics(out)
    assert len(train) == 20 and evals
