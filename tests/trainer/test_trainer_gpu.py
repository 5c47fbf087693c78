"""GPU checks (skipped without CUDA): real-size recipe builds and steps, DALI mixed decode, bf16 training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY, TINY_GPU, read_metrics

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
    sets = ["model.allow_random_locked=true"]
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
    torch.manual_seed(0)
    cfg = model_config(r, tok.info)
    model = build_model(r, cfg, device)
    opt = make_optimizer(model, r)
    loss_fn = make_loss(r, Dist(device=device), cfg, tok.pad_id)
    size = cfg["vision_cfg"]["image_size"]
    images = torch.randn(4, 3, size, size, device=device)
    texts = tok(["a photo of a cat"] * 4).to(device)
    micro = [(images[:2], texts[:2]), (images[2:], texts[2:])]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_step(model, loss_fn, micro, lambda: torch.autocast("cuda", dtype=torch.bfloat16))
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    opt.step()
    # the step moved the weights: most trainable tensors changed (frozen towers are not in `before`)
    after = dict(model.named_parameters())
    moved = [n for n in before if not torch.equal(before[n], after[n].detach())]
    assert len(moved) > len(before) // 2, (len(moved), len(before))
    assert losses["loss"] > 0 and torch.isfinite(torch.tensor(losses["loss"]))
    del model, opt, before
    torch.cuda.empty_cache()


def test_dali_mixed_decode_matches_cpu_decode(dataset):
    shards = D.find_shards(dataset["val"])
    cfg = DataConfig(workers=2)
    source = D.Source(shards, shuffle=False)
    gpu = D.DaliLoader(source, cfg, image_size=32, batch_size=24, train=False, device_id=0).next()
    cpu = D.DaliLoader(source, cfg, image_size=32, batch_size=24, train=False).next()
    assert gpu.images.is_cuda and gpu.keys == cpu.keys
    assert (gpu.images.cpu() - cpu.images).abs().mean().item() < 0.05


def test_dali_mixed_from_s3_augments_like_the_cpu_loaders(dataset, s3_bucket):
    """nvJPEG ROI decode + GPU resize/jitter, bytes streamed from S3 (moto), vs DALI CPU and PIL on the
    local copy: same keys, same captions, pixels within the CPU loaders' tolerance band."""
    from test_trainer_data import _upload

    from trainer.config import ColorJitter

    url = _upload(Path(dataset["train"]), s3_bucket, "train")
    cfg = DataConfig(workers=2, flip=True, scale=(0.5, 1.0),
                     color_jitter=ColorJitter(p=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))
    remote = D.make_source(D.find_shards(url), cfg, seed=5)
    local = D.make_source(D.find_shards(dataset["train"]), cfg, seed=5)
    gpu = D.DaliLoader(remote, cfg, image_size=64, batch_size=32, seed=5, device_id=0)
    cpu = D.DaliLoader(local, cfg, image_size=64, batch_size=32, seed=5)
    pil = D.TorchLoader(local, cfg, image_size=64, batch_size=32, seed=5)
    std = torch.tensor(D.NORMALIZE["clip"][1])[:, None, None] * 255
    for _ in range(4):  # 128 samples: past the 96-sample epoch
        a, b, c = gpu.next(), cpu.next(), pil.next()
        assert a.images.is_cuda and a.images.shape == (32, 3, 64, 64)
        assert a.keys == b.keys == c.keys and a.captions == b.captions
        for other in (b.images, c.images):
            levels = (a.images.cpu() - other).abs() * std
            assert levels.mean(dim=(1, 2, 3)).max() < 3.0, levels.mean(dim=(1, 2, 3))
    assert gpu.state()["position"] == 128


def test_bf16_local_loss_matches_fp32_and_holds_one_logit_matrix():
    """Under bf16 autocast the local softmax and sigmoid losses give the fp32 value and gradients (bf16
    embeddings, fp32 logits), and the softmax loss's peak memory is well below torch's cross-entropy's."""
    from trainer.loss import Loss

    device = torch.device("cuda")
    torch.manual_seed(0)
    n, dim = 4096, 512
    img = torch.nn.functional.normalize(torch.randn(n, dim, device=device), dim=-1)
    txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(n, dim, device=device), dim=-1)
    for kind in ("softmax", "sigmoid"):
        loss = Loss(kind=kind, contrastive_weight=1.0, caption_weight=0.0, pad_id=0)
        results = []
        for bf16 in (False, True):
            leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
            scale = torch.tensor(20.0, device=device, requires_grad=True)
            bias = torch.tensor(-5.0, device=device, requires_grad=True)
            ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cuda", enabled=False)
            with ctx:
                a, b = (x.to(torch.bfloat16) for x in leaves) if bf16 else leaves
                value = loss.contrastive(a, b, scale, bias if kind == "sigmoid" else None)
            value.backward()
            results.append((float(value), leaves[0].grad.float(), float(scale.grad)))
        (v32, g32, s32), (v16, g16, s16) = results
        assert abs(v16 - v32) <= 0.02 * abs(v32), (kind, v16, v32)
        cos = torch.nn.functional.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
        assert cos > 0.99, (kind, float(cos))
        assert abs(s16 - s32) <= 0.05 * abs(s32) + 1e-3, (kind, s16, s32)

    def peak(fn) -> int:
        leaves = [img.clone().requires_grad_(), txt.clone().requires_grad_()]
        scale = torch.tensor(20.0, device=device, requires_grad=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(*leaves, scale).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    labels = torch.arange(n, device=device)
    ours = peak(Loss(kind="softmax", contrastive_weight=1.0, caption_weight=0.0, pad_id=0).contrastive)
    plain = peak(lambda i, t, s: (torch.nn.functional.cross_entropy(s * i @ t.T, labels)
                                  + torch.nn.functional.cross_entropy(s * t @ i.T, labels)) / 2)
    assert ours < 0.6 * plain, (ours, plain)


def test_tiny_training_run_on_gpu(dataset, tmp_path):
    """bf16 on CUDA learns, changes the weights, and starts where the fp32 CPU run starts."""
    import subprocess
    import sys

    common = ["--data", dataset["train"], "--val-data", dataset["val"], "--set", "train.steps=20",
              "train.global_batch=16", "optim.lr=2e-3", "data.color_jitter=null"]
    gpu, cpu = tmp_path / "gpu", tmp_path / "cpu"
    assert main([*common[:4], "--output", str(gpu), *common[4:], *TINY_GPU]) == 0
    assert main([*common[:4], "--output", str(cpu), *common[4:], *TINY, "train.stop_at=1"]) == 0
    train, evals = read_metrics(gpu)
    assert len(train) == 20 and evals
    assert train[-1]["loss"] < train[0]["loss"] - 0.3  # it learns
    first_cpu = read_metrics(cpu)[0][0]["loss"]
    # same init (seeded on the CPU), same first batch (DALI mixed vs CPU decode), bf16 vs fp32 arithmetic
    assert abs(train[0]["loss"] - first_cpu) < 0.05, (train[0]["loss"], first_cpu)
    r = load_recipe(None, [*TINY])
    torch.manual_seed(r.train.seed)
    init = build_model(r, model_config(r, Tokenizer(r.tokenizer).info), torch.device("cpu")).state_dict()
    done = torch.load(gpu / "checkpoints/step_00000020.pt", map_location="cpu", weights_only=False)["model"]
    changed = [k for k in init if not torch.equal(init[k], done[k])]
    assert len(changed) > len(init) // 2

    # A process that sees one GPU uses it whatever its LOCAL_RANK (SLURM --gpus-per-task, Ray Train):
    # before, LOCAL_RANK=1 asked for cuda:1 and died with an invalid device ordinal.
    env = {**__import__("os").environ, "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "0", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "trainer.train", "--data", dataset["train"], "--output",
                           str(tmp_path / "rank1"), "--set", *TINY_GPU, "train.steps=2", "train.global_batch=8"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(read_metrics(tmp_path / "rank1")[0]) == 2
