"""The trainer's parts on their own: schedule, recipes, tokenizers, loaders, gradient accumulation."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch
from conftest import COLORS, SHAPES

from trainer import data as D
from trainer.config import DataConfig, load_recipe
from trainer.schedule import warmup_cosine
from trainer.train import (
    Dist,
    Tokenizer,
    build_model,
    choose_device,
    main,
    make_loss,
    model_config,
    train_step,
)

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "trainer" / "recipes").glob("*.yaml"))
CAPTIONS = [f"a {c} {s} on a grey background" for c in COLORS for s in SHAPES]


# ---------------------------------------------------------------- schedule and recipes


def test_warmup_then_cosine_to_final_lr():
    lr = [warmup_cosine(s, base_lr=1.0, warmup_steps=10, total_steps=110, final_lr=0.1) for s in range(111)]
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)  # linear warmup
    assert lr[10] == pytest.approx(1.0) and lr[60] == pytest.approx(0.55)  # cosine midpoint
    assert lr[110] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lr[10:-1], lr[11:], strict=True))


def test_set_overrides_and_validation():
    r = load_recipe(RECIPES[0], ["train.global_batch=32", "train.accum=4", "data.scale=[0.5, 1.0]"])
    assert r.train.global_batch == 32 and r.data.scale == (0.5, 1.0)
    assert r.micro_batch(world_size=2) == 4
    with pytest.raises(ValueError, match="not divisible"):
        r.micro_batch(world_size=3)
    with pytest.raises(ValueError):
        load_recipe(RECIPES[0], ["optim.lrr=1"])  # typo: unknown key
    with pytest.raises(ValueError):
        load_recipe(RECIPES[0], ["data.scale=[0.9, 0.2]"])


def test_bad_recipe_or_data_is_one_clear_error_before_work(tmp_path, caplog):
    assert main(["--data", str(tmp_path), "--set", "train.stepz=3"]) == 2
    assert "stepz" in caplog.text
    assert main(["--data", str(tmp_path / "missing")]) == 2
    assert "no train shards" in caplog.text


def test_each_process_takes_the_device_it_is_given():
    cpu, cuda = torch.device("cpu"), torch.device
    assert choose_device("auto", 0, 1, 0) == cpu
    assert choose_device("cpu", 3, 8, 8) == cpu  # a CPU run on a GPU machine stays on the CPU
    # one visible GPU is this process's own (SLURM --gpus-per-task, Ray Train): not cuda:LOCAL_RANK
    assert choose_device("auto", 3, 8, 1) == cuda("cuda:0")
    assert choose_device("cuda", 1, 2, 1) == cuda("cuda:0")
    assert choose_device("auto", 3, 8, 8) == cuda("cuda:3")  # the whole node's GPUs: one per local rank
    with pytest.raises(ValueError, match="sees no CUDA device"):
        choose_device("cuda", 0, 1, 0)
    with pytest.raises(ValueError, match="4 processes on this node share 2 visible GPUs"):
        choose_device("auto", 3, 4, 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_asked_without_a_gpu_is_one_clear_error(tmp_path, caplog):
    assert main(["--data", str(tmp_path), "--set", "train.device=cuda"]) == 2
    assert "train.device=cuda but this process sees no CUDA device" in caplog.text


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    text = folder / "captions.txt"
    text.write_text("\n".join(CAPTIONS * 4))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=32, hard_vocab_limit=False,
                                   model_type="unigram", pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   minloglevel=2)
    return str(folder / "sp.model")


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory) -> str:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = HFTok(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CAPTIONS, trainers.BpeTrainer(vocab_size=80, special_tokens=["<pad>", "<unk>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)])
    folder = tmp_path_factory.mktemp("hf-tok")
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    return str(folder)


def _tiny_sets(recipe: Path, spm_model: str) -> list[str]:
    sets = ["model.tiny=true", "train.global_batch=8", "train.accum=1", "model.allow_random_locked=true"]
    if load_recipe(recipe).tokenizer.kind == "sentencepiece":
        sets.append(f"tokenizer.name={spm_model}")
    return sets


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_parses_and_builds_at_tiny_size(recipe, spm_model):
    r = load_recipe(recipe, _tiny_sets(recipe, spm_model))
    full = load_recipe(recipe)
    assert full.train.global_batch >= 2048 and full.train.precision == "bf16"
    tok = Tokenizer(r.tokenizer)
    cfg = model_config(r, tok.info)
    model = build_model(r, cfg, torch.device("cpu"))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # CoCa's decoder projection included
    assert cfg["text_cfg"]["context_length"] == full.tokenizer.context_length  # the recipe's length, kept
    assert cfg["text_cfg"]["vocab_size"] == full.tokenizer.vocab_size
    assert type(model).__name__ == ("CoCa" if "coca" in full.model.name else "CLIP")
    if full.model.lock_image:
        assert not any(p.requires_grad for p in model.visual.parameters())
        assert any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("visual."))
    if full.model.grad_checkpointing:
        assert model.visual.transformer.grad_checkpointing
    texts = tok(CAPTIONS[:2])
    assert texts.shape == (2, full.tokenizer.context_length)
    out = model(torch.randn(2, 3, 32, 32), texts)
    assert out["image_features"].shape == out["text_features"].shape == (2, cfg["embed_dim"])


def test_sentencepiece_and_hf_tokenizers_end_every_caption_with_eos(spm_model, hf_tokenizer):
    for kind, name in (("sentencepiece", spm_model), ("hf", hf_tokenizer)):
        r = load_recipe(None, [f"tokenizer.kind={kind}", f"tokenizer.name={name}", "tokenizer.context_length=8",
                               "tokenizer.vocab_size=128"])
        tok = Tokenizer(r.tokenizer)
        ids = tok(["a red circle", "a purple triangle " * 10])
        assert ids.shape == (2, 8)
        short_len = int((ids[0] != tok.pad_id).sum())
        assert ids[0, short_len - 1] == tok.eos_id and (ids[0, short_len:] == tok.pad_id).all()
        assert ids[1, -1] == tok.eos_id  # truncated, eos kept
        # the text tower pools at that eos token
        cfg = model_config(load_recipe(None, ["model.tiny=true", *[f"tokenizer.{k}={v}" for k, v in
                                                                     r.tokenizer.model_dump().items()]]), tok.info)
        assert cfg["text_cfg"]["pool_type"] == "eos" and cfg["text_cfg"]["eos_id"] == tok.eos_id


def test_unknown_tokenizer_vocab_larger_than_model_is_refused(hf_tokenizer):
    r = load_recipe(None, ["tokenizer.kind=hf", f"tokenizer.name={hf_tokenizer}", "tokenizer.vocab_size=10"])
    with pytest.raises(ValueError, match="tokens"):
        Tokenizer(r.tokenizer)


# ---------------------------------------------------------------- gradient accumulation


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


ACCUM_MODELS = {
    "clip": ["model.name=ViT-B-32"],
    "coca": ["model.name=coca_ViT-B-32", "loss.caption_weight=0.5"],
    "siglip": ["model.name=ViT-B-32", "model.overrides={init_logit_bias: -10.0}"],
}


@pytest.mark.parametrize("kind", sorted(ACCUM_MODELS))
def test_accumulating_k_micro_batches_equals_one_big_batch(kind):
    torch.manual_seed(0)
    r = load_recipe(None, ["model.tiny=true", "tokenizer.context_length=12", *ACCUM_MODELS[kind]])
    tok = Tokenizer(r.tokenizer)
    cfg = model_config(r, tok.info)
    model = build_model(r, cfg, torch.device("cpu"))
    loss_fn = make_loss(r, Dist(), cfg, tok.pad_id)
    assert loss_fn.kind == ("sigmoid" if kind == "siglip" else "softmax")
    images, texts = torch.randn(8, 3, 32, 32), tok(CAPTIONS[:8])

    whole = train_step(model, loss_fn, [(images, texts)], contextlib.nullcontext)
    g_whole = _grads(model)
    model.zero_grad(set_to_none=True)
    micro = [(images[i : i + 2], texts[i : i + 2]) for i in range(0, 8, 2)]
    accum = train_step(model, loss_fn, micro, contextlib.nullcontext)
    g_accum = _grads(model)

    assert accum["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    if kind == "coca":  # the caption loss is summed per micro-batch over the batch's tokens
        assert accum["caption_loss"] == pytest.approx(whole["caption_loss"], rel=1e-5) and whole["caption_loss"] > 0
    assert g_whole.keys() == g_accum.keys() and len(g_whole) > 10
    if kind == "siglip":
        assert "logit_bias" in g_whole
    for k in g_whole:
        torch.testing.assert_close(g_accum[k], g_whole[k], rtol=1e-4, atol=1e-6, msg=k)

    # Control: naive accumulation (mean of per-micro-batch losses) is a different objective, which
    # this test would catch if the feature cache were dropped.
    model.zero_grad(set_to_none=True)
    naive = sum(train_step(model, loss_fn, [m], contextlib.nullcontext)["loss"] for m in micro) / 4
    assert abs(naive - whole["loss"]) > 1e-3


def test_sigmoid_loss_matches_its_definition():
    # Independent oracle: SigLIP's loss written out pair by pair.
    from trainer.loss import Loss

    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    expected = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            expected -= math.log(1 / (1 + math.exp(-z * (10 * float(img[i] @ txt[j]) - 3))))
    got = Loss(kind="sigmoid", contrastive_weight=1.0, caption_weight=0.0, pad_id=0).contrastive(img, txt, scale, bias)
    assert float(got) == pytest.approx(expected / 5, rel=1e-5)


def test_siglip_models_get_the_sigmoid_loss_or_a_one_line_refusal(dataset, tmp_path, caplog):
    import open_clip

    from trainer.train import SetupError

    siglip = next(n for n in open_clip.list_models() if n.endswith("-SigLIP"))
    assert open_clip.get_model_config(siglip).get("init_logit_bias") is not None
    for sets, message in ((["model.overrides={init_logit_bias: -10.0}", "loss.kind=softmax"], "has a logit_bias"),
                          (["loss.kind=sigmoid"], "needs a model with a logit_bias")):
        r = load_recipe(None, ["model.tiny=true", *sets])
        with pytest.raises(SetupError, match=message):
            make_loss(r, Dist(), model_config(r, Tokenizer(r.tokenizer).info), 0)
        argv = ["--data", dataset["train"], "--output", str(tmp_path / "x"), "--set", "model.tiny=true", *sets]
        assert main(argv) == 2 and message in caplog.text


# ---------------------------------------------------------------- loaders


@pytest.mark.parametrize("world", [2, 3])
def test_both_loaders_yield_one_stream_whatever_the_world_size(dataset, world):
    """Rank r's micro-batches, concatenated rank by rank, are the 1-rank stream; both loaders agree."""
    cfg = DataConfig(flip=True, workers=1, shuffle_buffer=16, shuffle_block=4)
    source = D.make_source(D.find_shards(dataset["train"]), cfg, seed=1)
    n = len(source)
    micro = 4
    steps = 2 * n // (world * micro) + 1  # two epochs and a bit: batches straddle the epoch boundary
    one = D.make_loader("torch", source, cfg, image_size=32, batch_size=world * micro, seed=1)
    single = [k for _ in range(steps) for k in one.next().keys]
    streams = {}
    for kind in ("dali", "torch"):
        loaders = [D.make_loader(kind, source, cfg, image_size=32, batch_size=micro, rank=r, world=world, seed=1)
                   for r in range(world)]
        keys = []
        for _ in range(steps):
            for loader in loaders:
                batch = loader.next()
                assert batch.images.shape == (micro, 3, 32, 32) and len(batch.captions) == micro
                keys += batch.keys
        streams[kind] = keys
    assert streams["dali"] == streams["torch"] == single
    assert sorted(single[:n]) == sorted(dataset["train_keys"])  # every sample once per epoch
    assert sorted(single[n : 2 * n]) == sorted(dataset["train_keys"]) and single[:n] != single[n : 2 * n]


def test_dali_and_torchvision_preprocess_alike(dataset):
    # Deterministic path (resize shorter side + centre crop): the two implementations agree closely.
    cfg = DataConfig(workers=1)
    shards = D.find_shards(dataset["val"])
    dali = D.DaliLoader(D.Source(shards, shuffle=False), cfg, image_size=32, batch_size=24, train=False).next()
    torch_batch = next(D.eval_batches(shards, cfg, image_size=32, batch_size=24, limit=24))
    assert dali.keys == torch_batch.keys and dali.captions == torch_batch.captions
    diff = (dali.images - torch_batch.images).abs().mean().item()
    assert diff < 0.02, diff  # measured 0.003; a wrong mean/std or channel order is >= 0.1
    # captions pair with keys the same way in both
    assert dali.captions[0].startswith("a ")


def test_splits_recorded_by_export_pick_train_and_val_shards(dataset, tmp_path):
    import json
    import shutil

    root = str(tmp_path / "ds")
    shutil.copytree(dataset["train"], root)
    all_tars = [t for t, _ in D.find_shards(root, None)]
    assert [t for t, _ in D.find_shards(root)] == all_tars and D.find_val(root, None) is None
    # export's manifest: train shards first, held-out shards after them
    manifest = json.loads(Path(root, "_manifest.json").read_text())
    manifest["splits"] = {"train": {"shards": [0, 1, 2], "rows": 72}, "val": {"shards": [3], "rows": 24}}
    Path(root, "_manifest.json").write_text(json.dumps(manifest))
    assert [t for t, _ in D.find_shards(root)] == all_tars[:3]
    assert [t for t, _ in D.find_val(root, None)] == all_tars[3:]
    # an explicit --val-data wins; a dataset without splits is evaluated whole
    assert sum(map(len, D.index_samples(D.find_val(root, dataset["val"])))) == 24


def test_gradient_checkpointing_gives_the_same_gradients():
    r = load_recipe(None, ["model.tiny=true", "tokenizer.context_length=12"])
    tok = Tokenizer(r.tokenizer)
    images, texts = torch.randn(4, 3, 32, 32), tok(CAPTIONS[:4])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = build_model(r, model_config(r, tok.info), torch.device("cpu"))
        model.set_grad_checkpointing(checkpointing)
        train_step(model, make_loss(r, Dist(), model_config(r, tok.info), tok.pad_id), [(images, texts)], contextlib.nullcontext)
        grads.append(_grads(model))
    assert model.visual.transformer.grad_checkpointing
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-5, atol=1e-7, msg=k)


def test_softmax_loss_value_and_gradients_match_plain_cross_entropy():
    # Independent oracle: torch's cross-entropy over the full logits, both directions, halved.
    from trainer.loss import Loss

    torch.manual_seed(2)
    leaves = [torch.nn.functional.normalize(torch.randn(6, 8), dim=-1).requires_grad_() for _ in range(2)]
    scale = torch.tensor(7.0, requires_grad=True)
    got = Loss(kind="softmax", contrastive_weight=1.0, caption_weight=0.0, pad_id=0).contrastive(*leaves, scale)
    got_grads = torch.autograd.grad(got, [*leaves, scale])
    img, txt = leaves
    logits = scale * img @ txt.T
    labels = torch.arange(6)
    ref = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    ref_grads = torch.autograd.grad(ref, [*leaves, scale])
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    for g, r in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
