"""Train an open_clip CLIP or CoCa model on an exported dataset: one loop, read top to bottom.

    python -m trainer.train --data DATASET --recipe trainer/recipes/NAME.yaml [--set key=value ...]
    torchrun --nproc-per-node N -m trainer.train ...        # DDP: NCCL on GPUs, gloo on CPU

The device is ``train.device`` (auto | cpu | cuda), per process: see ``choose_device``.

What a step does: fetch ``accum`` micro-batches from the loader (DALI or torch), tokenize the captions,
and run them through the model. With ``accum > 1`` it first embeds every micro-batch without gradients,
then recomputes each with gradients while the others' cached features fill in the rest of the batch,
so the contrastive loss (and its gradient) is the one of the full global batch, as open_clip's
``accum_freq`` does. AdamW with warmup + cosine, gradient clipping, bf16 autocast on GPU.

Outputs under ``--output``: ``metrics.jsonl`` (one JSON object per logged step and per eval),
``checkpoints/step_NNNNNNNN.pt`` (everything an exact resume needs: model, optimiser, step, each rank's
loader position and RNG state), and ``model/`` (``open_clip_config.json`` + ``open_clip_model.safetensors``)
that ``open_clip.create_model("local-dir:OUTPUT/model")`` loads, as does
``open_clip.create_model(NAME, pretrained=OUTPUT/model/open_clip_model.safetensors)`` for the recipe's
architecture. A rerun with the same output resumes from the newest checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from trainer import data as datamod
from trainer import mix as mixmod
from trainer.config import TINY_OVERRIDES, ModelConfig, Recipe, TokenizerConfig, deep_merge, load_recipe
from trainer.loss import Loss
from trainer.schedule import set_lr, warmup_cosine

log = logging.getLogger("trainer")


class SetupError(ValueError):
    """A recipe that cannot run as asked (weights that do not fit, a loss the model cannot take): one line."""


# ---------------------------------------------------------------- setup helpers


@dataclasses.dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # gloo group for checkpoint-time waits and small Python objects (None when single-process)
    slow_group: object | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def choose_device(requested: str, local_rank: int, local_world: int, visible: int) -> torch.device:
    """This process's device. ``visible``: the CUDA devices this process sees.

    One visible GPU is this process's own (the launcher gave each process one), whatever LOCAL_RANK
    says; several are the whole node's, one per local rank. Raises ValueError when that cannot work."""
    if requested == "cpu" or (requested == "auto" and visible == 0):
        return torch.device("cpu")
    if visible == 0:
        raise ValueError("train.device=cuda but this process sees no CUDA device; use train.device=cpu or auto")
    if visible == 1:
        return torch.device("cuda:0")
    if local_world > visible:
        raise ValueError(f"{local_world} processes on this node share {visible} visible GPUs; start one process "
                         f"per GPU (torchrun --nproc-per-node {visible}) or use train.device=cpu")
    return torch.device(f"cuda:{local_rank}")


def init_distributed(recipe: Recipe) -> Dist:
    """One process per device; torchrun's environment says how many. NCCL on GPUs, gloo on CPU."""
    from datetime import timedelta

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = choose_device(recipe.train.device, local_rank, local_world, visible)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    slow = None
    if world > 1:
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if cuda else "gloo")
        slow = torch.distributed.new_group(backend="gloo", timeout=timedelta(minutes=recipe.train.save_timeout_min))
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, slow_group=slow)


def model_config(recipe: Recipe, tokenizer_info: dict) -> dict:
    """The open_clip model config this run trains: the named one, shrunk and overridden by the recipe."""
    import open_clip

    base = open_clip.get_model_config(recipe.model.name)
    if base is None:
        raise ValueError(f"model.name={recipe.model.name!r} is not an open_clip model config")
    cfg = base
    if recipe.model.tiny:
        cfg = deep_merge(cfg, {k: v for k, v in TINY_OVERRIDES.items() if k in cfg})
    cfg = deep_merge(cfg, recipe.model.overrides)
    tok = recipe.tokenizer
    text = cfg["text_cfg"]
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False  # no hub downloads at build time; a recipe may load weights itself
    else:
        text["context_length"] = tok.context_length
        text["vocab_size"] = tok.vocab_size
    if tok.kind != "open_clip":
        # open_clip's default pooling takes the argmax token as end-of-text, which holds only for its BPE.
        text["pool_type"] = text.get("pool_type") if text.get("pool_type") not in (None, "argmax") else "eos"
        text["eos_id"], text["pad_id"] = tokenizer_info["eos_id"], tokenizer_info["pad_id"]
        if tok.kind == "hf":
            text["hf_tokenizer_name"] = tok.name
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"]["context_length"] = tok.context_length
        cfg["multimodal_cfg"]["vocab_size"] = tok.vocab_size
    if recipe.data.image_size is not None:
        cfg["vision_cfg"]["image_size"] = recipe.data.image_size
    return cfg


def build_model(recipe: Recipe, cfg: dict, device: torch.device) -> torch.nn.Module:
    import open_clip

    kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
    m = recipe.model
    if m.lock_image and not (m.pretrained or m.pretrained_image) and not m.allow_random_locked:
        raise SetupError("model.lock_image=true but no weights are given, so the locked image tower would stay "
                         "random: set model.pretrained or model.pretrained_image (or model.allow_random_locked=true)")
    for path in (m.pretrained_image,) + ((m.pretrained,) if m.pretrained and _is_path(m.pretrained) else ()):
        if path and not os.path.isfile(path):
            raise SetupError(f"pretrained weights not found: {path}")
    tag = m.pretrained if m.pretrained and not _is_path(m.pretrained) else None  # open_clip's own (strict)
    try:
        model = open_clip.create_model(m.name, pretrained=tag, device=device, output_dict=True, **kwargs)
    except (RuntimeError, OSError) as e:
        if tag is None:
            raise
        raise SetupError(f"model.pretrained={tag} could not be loaded for {m.name}: {str(e).splitlines()[0]}") from e
    if m.pretrained and _is_path(m.pretrained):
        load_strict(model, read_state_dict(m.pretrained), f"model.pretrained={m.pretrained}", m)
    if m.pretrained_image:
        sd = read_state_dict(m.pretrained_image)
        if sd and all(k.startswith("visual.") for k in sd):
            sd = {k[len("visual."):]: v for k, v in sd.items()}
        load_strict(model.visual, sd, f"model.pretrained_image={m.pretrained_image}", m)
    decoder = getattr(model, "text_decoder", None)
    if decoder is not None and not m.pretrained:
        # open_clip's CoCa never initialises its decoder's output projection (its init_parameters is
        # never called, and fails when called): from scratch it would keep whatever bytes torch.empty
        # found, NaN included. Use the std that init_parameters intends.
        torch.nn.init.normal_(decoder.text_projection, std=decoder.width**-0.5)
    if recipe.model.lock_image:
        model.lock_image_tower(unlocked_groups=recipe.model.lock_image_unlocked_groups, freeze_bn_stats=True)
    if recipe.model.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def _is_path(name: str) -> bool:
    return os.sep in name or name.endswith((".pt", ".pth", ".bin", ".safetensors"))


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file (open_clip and DDP wrappings unwrapped)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        sd = load_file(path)
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_strict(module: torch.nn.Module, sd: dict, what: str, m: ModelConfig) -> None:
    """Load ``sd`` into ``module`` only if every key matches and every shape is equal; else SetupError."""
    own = module.state_dict()
    missing, extra = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or extra or shapes:
        parts = [f"{len(v)} {name} (first: {v[0]})" for name, v in
                 (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", shapes)) if v]
        raise SetupError(f"{what} does not fit model.name={m.name}{' (tiny)' if m.tiny else ''}: {'; '.join(parts)}")
    module.load_state_dict(sd, strict=True)


class Tokenizer:
    """Captions -> LongTensor [B, context_length] with the recipe's tokenizer.

    open_clip: its BPE (start/end tokens, zero padding). hf / sentencepiece: the vocabulary's own ids,
    truncated to leave room for an end-of-text token that is always present (the text tower pools there),
    padded with the pad id.
    """

    def __init__(self, cfg: TokenizerConfig):
        self.cfg = cfg
        self.length = cfg.context_length
        if cfg.kind != "open_clip" and not cfg.name:
            raise ValueError(f"tokenizer.kind={cfg.kind} needs tokenizer.name (hub id, directory or .model file)")
        if cfg.kind == "open_clip":
            from open_clip.tokenizer import SimpleTokenizer

            self._bpe = SimpleTokenizer(context_length=cfg.context_length)
            self.vocab_size, self.eos_id, self.pad_id = len(self._bpe.encoder), self._bpe.eot_token_id, 0
        elif cfg.kind == "hf":
            from transformers import AutoTokenizer

            self._hf = AutoTokenizer.from_pretrained(cfg.name)
            self.vocab_size = len(self._hf)
            self.eos_id = self._hf.eos_token_id if self._hf.eos_token_id is not None else self._hf.sep_token_id
            if self.eos_id is None:
                raise ValueError(f"tokenizer {cfg.name} has neither an eos nor a sep token")
            self.pad_id = self._hf.pad_token_id if self._hf.pad_token_id is not None else self.eos_id
        else:
            import sentencepiece as spm

            # a folder from `python -m trainer.tokenizer` stands for the spm.model inside it
            path = os.path.join(cfg.name, "spm.model") if os.path.isdir(cfg.name) else cfg.name
            self._sp = spm.SentencePieceProcessor(model_file=path)
            self.vocab_size = self._sp.get_piece_size()
            self.eos_id = self._sp.eos_id()
            if self.eos_id < 0:
                raise ValueError(f"SentencePiece model {cfg.name} has no eos piece")
            self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id
        if self.vocab_size > cfg.vocab_size:
            raise ValueError(f"tokenizer has {self.vocab_size} tokens but tokenizer.vocab_size={cfg.vocab_size}")

    @property
    def info(self) -> dict:
        return {"eos_id": self.eos_id, "pad_id": self.pad_id}

    def __call__(self, texts: list[str]) -> torch.Tensor:
        if self.cfg.kind == "open_clip":
            return self._bpe(texts)
        if self.cfg.kind == "hf":
            ids = self._hf(texts, add_special_tokens=True, truncation=False)["input_ids"]
        else:
            ids = self._sp.encode(texts)
        out = torch.full((len(texts), self.length), self.pad_id, dtype=torch.long)
        for row, seq in enumerate(ids):
            seq = [t for t in seq if t != self.eos_id][: self.length - 1] + [self.eos_id]
            out[row, : len(seq)] = torch.tensor(seq)
        return out


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW; no weight decay on gains, biases, embeddings of rank < 2 and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "logit_scale" in name or "logit_bias" in name
        (no_decay if exempt else decay).append(p)
    o = recipe.optim
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": o.weight_decay}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def make_loss(recipe: Recipe, dist: Dist, cfg: dict, pad_id: int) -> Loss:
    """The recipe's loss for this model; a loss the model cannot take is refused, never swapped."""
    has_bias = cfg.get("init_logit_bias") is not None
    kind = recipe.loss.kind if recipe.loss.kind != "auto" else ("sigmoid" if has_bias else "softmax")
    if kind == "sigmoid" and not has_bias:
        raise SetupError(f"loss.kind=sigmoid needs a model with a logit_bias; {recipe.model.name} has none (use an "
                         "open_clip *-SigLIP model or model.overrides={init_logit_bias: -10})")
    if kind == "softmax" and has_bias:
        raise SetupError(f"{recipe.model.name} has a logit_bias (a SigLIP model) that the softmax loss would ignore: "
                         "use loss.kind=sigmoid (or auto)")
    if recipe.loss.caption_weight and "multimodal_cfg" not in cfg:
        raise SetupError(f"loss.caption_weight needs a CoCa model; {recipe.model.name} is a CLIP")
    return Loss(kind=kind, contrastive_weight=recipe.loss.contrastive_weight,
                caption_weight=recipe.loss.caption_weight, pad_id=pad_id, rank=dist.rank, world=dist.world)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def wrap_parallel(model: torch.nn.Module, recipe: Recipe, dist: Dist) -> torch.nn.Module:
    if dist.world == 1:
        return model
    if recipe.train.parallel == "fsdp":
        # FSDP2: each transformer block is its own shard group, the rest goes with the root. Parameters
        # become DTensors; optimiser, clipping and get_state_dict handle them. Works on CPU (gloo) too.
        from open_clip.transformer import ResidualAttentionBlock
        from torch.distributed.fsdp import fully_shard

        # 0-dim parameters (logit scale/bias) cannot be sharded: they stay replicated, and
        # sync_replicated_grads averages their gradients by hand.
        scalars = {p for p in model.parameters() if p.ndim == 0}
        for module in model.modules():
            if isinstance(module, ResidualAttentionBlock):
                fully_shard(module)
        model = fully_shard(model, ignored_params=scalars)
        model._replicated_params = sorted(scalars, key=id)
        return model
    ids = [dist.device.index] if dist.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)


# ---------------------------------------------------------------- the step


FEATURES = ("image_features", "text_features")


def train_step(model, loss: Loss, micro: list[tuple[torch.Tensor, torch.Tensor]], autocast) -> dict[str, float]:
    """Forward + backward over ``micro`` micro-batches as if they were one batch; returns this rank's losses.

    Gradients are accumulated into ``.grad`` (the caller zeroes them and steps the optimiser).
    """
    tokens = sum(loss.caption_tokens(t) for _, t in micro) if loss.caption_weight else 0
    # Pass 1 (only with accumulation): every micro-batch's embeddings without gradients, to stand in for
    # the others in pass 2. CoCa's full-vocabulary logits are dropped at once, never cached.
    cached: dict[str, list[torch.Tensor]] = {}
    if len(micro) > 1:
        with torch.no_grad(), autocast():
            for images, texts in micro:
                out = model(images, texts)
                for key in FEATURES:
                    cached.setdefault(key, []).append(out[key])
                del out
    # Pass 2: recompute one micro-batch at a time with gradients, contrastive loss over the whole batch,
    # caption loss over this micro-batch's tokens. The sum over j of these gradients is the gradient of
    # the full-batch loss. DDP syncs on the last one only.
    totals: dict[str, float] = {}
    for j, (images, texts) in enumerate(micro):
        last = j == len(micro) - 1
        with _grad_sync(model, last):
            with autocast():
                out = model(images, texts)
                feats = {k: torch.cat(v[:j] + [out[k]] + v[j + 1 :]) for k, v in cached.items()} or \
                    {k: out[k] for k in FEATURES}
                # The temperature (and SigLIP's bias) enter every pass's loss; let only the last pass carry
                # their gradient, or it would be counted once per micro-batch.
                scale, bias = out["logit_scale"], out.get("logit_bias")
                if not last:
                    scale, bias = scale.detach(), None if bias is None else bias.detach()
                parts = {}
                if loss.contrastive_weight or "logits" not in out:
                    parts["contrastive_loss"] = loss.contrastive(feats["image_features"], feats["text_features"],
                                                                 scale, bias)
                if "logits" in out:
                    parts["caption_loss"] = loss.caption(out["logits"], out["labels"], tokens)
                total = sum(parts.values())
            total.backward()
        for k, v in parts.items():
            # the contrastive value is the whole batch's in every pass; caption parts add up
            totals[k] = v.item() if k == "contrastive_loss" else totals.get(k, 0.0) + v.item()
    return {"loss": sum(totals.values()), **totals}


@contextlib.contextmanager
def _grad_sync(model, enabled: bool):
    """Skip the gradient all-reduce (DDP) / reduce-scatter (FSDP2) on all but the last micro-batch."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def sync_replicated_grads(model) -> None:
    """Average the gradients of parameters FSDP2 leaves replicated (it does not reduce them)."""
    params = [p for p in getattr(model, "_replicated_params", []) if p.grad is not None]
    if not params or not torch.distributed.is_initialized():
        return
    flat = torch.stack([p.grad.reshape(()) for p in params])
    torch.distributed.all_reduce(flat)  # SUM: gloo has no AVG
    flat /= torch.distributed.get_world_size()
    for p, g in zip(params, flat, strict=True):
        p.grad.copy_(g)


def mean_over_ranks(values: dict[str, float], dist: Dist) -> dict[str, float]:
    """Each rank's losses are its local share; the full-batch loss is their mean."""
    if dist.world == 1:
        return values
    keys = sorted(values)
    flat = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    torch.distributed.all_reduce(flat, group=dist.slow_group)
    return {k: float(v) / dist.world for k, v in zip(keys, flat, strict=True)}


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's (FSDP2 parameter's) whole value; other tensors as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ---------------------------------------------------------------- eval


def evaluate(model, tokenizer: Tokenizer, recipe: Recipe, val_shards, zeroshot_sets, image_size: int, device,
             autocast) -> dict[str, float]:
    """Held-out retrieval (recall@1/5/10, mean/median rank) and each zero-shot set's top-1/top-5; every
    rank encodes its own part of each set (trainer/eval.py)."""
    from trainer import eval as evalmod
    from trainer.config import NORMALIZE

    transform = evalmod.eval_transform(image_size, *NORMALIZE[recipe.data.normalize], recipe.data.interpolation)
    batch = recipe.eval.batch_size
    metrics: dict[str, float] = {}
    if val_shards is not None:
        batches_of, n = evalmod.retrieval_batches(val_shards, transform, batch, recipe.data.val_max)
        metrics.update(evalmod.retrieval(model, tokenizer, batches_of, n, device, autocast=autocast, batch=batch))
    for s in zeroshot_sets:
        res = evalmod.zeroshot(model, tokenizer, s, transform, device, autocast=autocast, batch=batch,
                               workers=recipe.data.workers)
        metrics.update({f"zeroshot/{s.name}/{k}": v for k, v in res.items()})
    return metrics


# ---------------------------------------------------------------- checkpoints


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _gather(obj, dist: Dist) -> list:
    if dist.world == 1:
        return [obj]
    out = [None] * dist.world
    torch.distributed.all_gather_object(out, obj, group=dist.slow_group)
    return out


def latest_checkpoint(output: Path) -> Path | None:
    found = sorted((output / "checkpoints").glob("step_*.pt"))
    return found[-1] if found else None


def save_checkpoint(output: Path, step: int, model, optimizer, loader, recipe: Recipe, dist: Dist, keep: int = 2):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # Full (unsharded) state on CPU; FSDP gathers here (a quick collective on every rank). Rank 0 writes
    # while the others wait on the gloo group, whose timeout is train.save_timeout_min, not NCCL's.
    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    loaders, rngs = _gather(loader.state(), dist), _gather(_rng_state(), dist)
    if dist.main:
        folder = output / "checkpoints"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step_{step:08d}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"step": step, "model": model_sd, "optimizer": optim_sd, "loaders": loaders, "rng": rngs,
                    "world": dist.world, "recipe": recipe.model_dump(mode="json")}, tmp)
        os.replace(tmp, path)
        for old in sorted(folder.glob("step_*.pt"))[:-keep]:
            old.unlink()
        log.info("checkpoint %s", path)
    if dist.world > 1:
        torch.distributed.barrier(group=dist.slow_group)
    return model_sd


def load_checkpoint(path: Path, model, optimizer, recipe: Recipe, dist: Dist) -> tuple[int, dict | None]:
    """Restore model and optimiser in place; return (step, this rank's loader state or None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # mmap: the ranks of a node share the file's pages instead of each holding a copy of the whole
    # checkpoint (8 ranks x a multi-GB state is an OOM).
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    saved = Recipe.model_validate(ckpt["recipe"])
    if _resume_key(saved) != _resume_key(recipe):
        raise SystemExit(f"{path} was made by a different recipe; use another --output or --resume never")
    set_state_dict(model, optimizer, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    # The data position is global (the same on every rank), so any world size continues the stream where
    # it stopped; samples found broken by any rank are known to all.
    if any("position" not in s for s in ckpt["loaders"]):
        raise SystemExit(f"{path} was written by an older trainer whose data order cannot be continued; "
                         "use another --output or --resume never")
    positions = {s["position"] for s in ckpt["loaders"]}
    if len(positions) != 1:
        raise SystemExit(f"{path}: the ranks' data positions differ ({sorted(positions)}); the checkpoint is damaged")
    bad = sorted({b for s in ckpt["loaders"] for b in s.get("bad", [])})
    loader_state = {"position": positions.pop(), "bad": bad}
    if ckpt["world"] == dist.world:
        _set_rng_state(ckpt["rng"][dist.rank])
    else:
        log.info("checkpoint written by %d ranks, resumed on %d: the data stream continues at sample %d",
                 ckpt["world"], dist.world, loader_state["position"])
    if ckpt["step"] > recipe.train.steps:
        raise SystemExit(f"{path} is at step {ckpt['step']}, past train.steps={recipe.train.steps}")
    return ckpt["step"], loader_state


def _resume_key(recipe: Recipe) -> dict:
    """What must match to resume: everything but when to stop (``steps`` may be raised to extend a run;
    the cosine then spans the new total), log, evaluate and save, and the device and world size."""
    d = recipe.model_dump(mode="json")
    for k in ("steps", "stop_at", "log_every", "eval_every", "ckpt_every", "tensorboard", "device", "save_timeout_min"):
        d["train"].pop(k)
    d["data"].pop("workers")
    d.pop("eval")
    return d


def load_zeroshot_sets(recipe: Recipe) -> list:
    from trainer.eval import load_classification

    return [load_classification(z.path, classnames=z.classnames, templates=z.templates, label=z.label, name=z.name)
            for z in recipe.eval.zeroshot]


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after ``step`` (a run that died past its last checkpoint logs them again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def export_model(output: Path, model_sd: dict, cfg: dict, recipe: Recipe) -> Path:
    """Weights + config in the layout open_clip's ``local-dir:`` schema and ``pretrained=PATH`` read."""
    from safetensors.torch import save_file

    from trainer.config import NORMALIZE

    folder = output / "model"
    folder.mkdir(parents=True, exist_ok=True)
    mean, std = NORMALIZE[recipe.data.normalize]
    config = {"model_cfg": cfg, "preprocess_cfg": {"mean": list(mean), "std": list(std),
                                                   "interpolation": recipe.data.interpolation},
              "trainer": {"model_name": recipe.model.name, "tokenizer": recipe.tokenizer.model_dump(mode="json")}}
    (folder / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.detach().contiguous().clone() for k, v in model_sd.items()}
    tmp = folder / "open_clip_model.safetensors.tmp"
    save_file(weights, str(tmp))
    os.replace(tmp, folder / "open_clip_model.safetensors")
    return folder


# ---------------------------------------------------------------- the run


def train(recipe: Recipe, *, data: str, output: str, val: str | None = None, resume: str = "auto") -> dict:
    """Run (or resume) a training run; returns the last logged metrics and the last eval."""
    dist = init_distributed(recipe)
    out = Path(output)
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.json").write_text(json.dumps(recipe.model_dump(mode="json"), indent=2))
    if dist.device.type == "cpu":
        # Leave the cores the loader's threads use; oversubscribing them slows a CPU step many times over.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.world - recipe.data.workers))
    torch.manual_seed(recipe.train.seed)
    np.random.seed(recipe.train.seed)
    random.seed(recipe.train.seed)

    tokenizer = Tokenizer(recipe.tokenizer)
    cfg = model_config(recipe, tokenizer.info)
    model = build_model(recipe, cfg, dist.device)
    image_size = cfg["vision_cfg"]["image_size"]
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    model = wrap_parallel(model, recipe, dist)
    optimizer = make_optimizer(model, recipe)
    loss_fn = make_loss(recipe, dist, cfg, tokenizer.pad_id)

    step, loader_state = 0, None
    ckpt = latest_checkpoint(out) if resume == "auto" else None
    if ckpt is not None:
        step, loader_state = load_checkpoint(ckpt, model, optimizer, recipe, dist)
        log.info("resumed from %s at step %d", ckpt, step)
    if dist.main:
        _truncate_metrics(out / "metrics.jsonl", step)
        if resume == "never" and (out / "checkpoints").is_dir():
            log.warning("--resume never: removing the previous run's checkpoints in %s", out / "checkpoints")
            shutil.rmtree(out / "checkpoints")

    micro = recipe.micro_batch(dist.world)
    source = mixmod.make_source(recipe, data, seed=recipe.train.seed)
    loader = datamod.make_loader(
        recipe.data.loader, source, recipe.data, state=loader_state, image_size=image_size,
        batch_size=micro, rank=dist.rank, world=dist.world, seed=recipe.train.seed,
        device_id=dist.device.index if dist.device.type == "cuda" else None,
    )
    val_shards = datamod.find_val(data, val)
    cuda = dist.device.type == "cuda"
    use_bf16 = cuda and recipe.train.precision == "bf16"

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()

    zeroshot_sets = load_zeroshot_sets(recipe)

    def run_eval() -> dict | None:
        if val_shards is None and not zeroshot_sets:
            return None
        return evaluate(model, tokenizer, recipe, val_shards, zeroshot_sets, image_size, dist.device, autocast)

    metrics_file = (out / "metrics.jsonl").open("a") if dist.main else None
    tb = None
    if dist.main and recipe.train.tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        tb = SummaryWriter(str(out / "tensorboard"))

    def emit(row: dict) -> None:
        if metrics_file is None:
            return
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        if tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    tb.add_scalar(k, v, row["step"])

    total, stop = recipe.train.steps, min(recipe.train.stop_at or recipe.train.steps, recipe.train.steps)
    o = recipe.optim
    last: dict = {}
    last_eval: dict | None = None
    model.train()
    if dist.main:
        log.info("training %s from step %d to %d: global batch %d = %d micro x %d accum x %d ranks, %s loader",
                 recipe.name, step, stop, recipe.train.global_batch, micro, recipe.train.accum, dist.world,
                 recipe.data.loader)
    t_log, wait, samples = time.perf_counter(), 0.0, 0
    while step < stop:
        batches = []
        for _ in range(recipe.train.accum):
            t = time.perf_counter()
            b = loader.next()
            wait += time.perf_counter() - t
            batches.append((b.images.to(dist.device, non_blocking=True),
                            tokenizer(b.captions).to(dist.device, non_blocking=True)))
        lr = warmup_cosine(step, base_lr=o.lr, warmup_steps=o.warmup_steps, total_steps=total, final_lr=o.final_lr)
        set_lr(optimizer, lr)
        optimizer.zero_grad(set_to_none=True)
        losses = mean_over_ranks(train_step(model, loss_fn, batches, autocast), dist)
        sync_replicated_grads(model)
        if o.clip_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
            losses["grad_norm"] = float(_full(norm))
        optimizer.step()
        with torch.no_grad():  # open_clip's clamp: a temperature below 1/100 destabilises training
            unwrap(model).logit_scale.clamp_(0, math.log(100))
        step += 1
        samples += recipe.train.global_batch

        if step % recipe.train.log_every == 0 or step == stop:
            elapsed = time.perf_counter() - t_log
            last = {"step": step, "lr": lr, **losses, "logit_scale": _full(unwrap(model).logit_scale).exp().item(),
                    "samples_per_s": samples / elapsed, "data_wait_frac": wait / elapsed,
                    **mixmod.count_row(source, loader.state()["position"])}
            emit(last)
            if dist.main:
                log.info("step %d loss %.4f lr %.3g %.1f samples/s (data wait %.0f%%)", step, losses["loss"], lr,
                         last["samples_per_s"], 100 * last["data_wait_frac"])
            t_log, wait, samples = time.perf_counter(), 0.0, 0
        if recipe.train.eval_every and step % recipe.train.eval_every == 0 and step < total:
            last_eval = run_eval()
            if last_eval is not None:
                emit({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}})
        if step == stop or (recipe.train.ckpt_every and step % recipe.train.ckpt_every == 0):
            model_sd = save_checkpoint(out, step, model, optimizer, loader, recipe, dist)
            if dist.main and step == stop:
                export_model(out, model_sd, cfg, recipe)

    if step == total:
        last_eval = run_eval()
        if last_eval is not None:
            emit({"step": step, **{f"eval/{k}": v for k, v in last_eval.items()}})
            if dist.main:
                log.info("eval at step %d: %s", step, {k: round(v, 3) for k, v in last_eval.items()})
    if metrics_file is not None:
        metrics_file.close()
    if tb is not None:
        tb.close()
    return {"last": last, "eval": last_eval, "step": step}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", action="append", default=[], metavar="EXPORT[:WEIGHT]",
                   help="exported dataset (shards/*.tar + .idx + sizes.json); repeat with weights to mix "
                        "several: --data A:0.7 --data B:0.3 (sampled with replacement)")
    p.add_argument("--recipe", help="recipe YAML (trainer/recipes/*.yaml); defaults if omitted")
    p.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. model.tiny=true train.global_batch=8 (repeatable)")
    p.add_argument("--output", default=None, help="run directory (default runs/<recipe name>)")
    p.add_argument("--val-data", default=None, help="held-out dataset for retrieval eval (default: from export)")
    p.add_argument("--resume", choices=("auto", "never"), default="auto",
                   help="auto: continue from the newest checkpoint in --output if there is one")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        recipe = load_recipe(args.recipe, args.set)
    except (ValueError, OSError) as e:  # pydantic's ValidationError is a ValueError
        log.error("bad recipe: %s", e)
        return 2
    try:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        choose_device(recipe.train.device, int(os.environ.get("LOCAL_RANK", "0")),
                      int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))), visible)
    except ValueError as e:
        log.error("bad recipe: %s", e)
        return 2
    if recipe.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        log.error("bad recipe: train.tensorboard=true needs the tensorboard package: pip install 'curate[tensorboard]'")
        return 2
    try:  # fail before any model is built when the data is not there
        recipe, data = mixmod.resolve(args.data, recipe)
        for path in [e.path for e in recipe.data.mix] or [data]:
            datamod.find_shards(path)
        if args.val_data:
            datamod.find_val(data, args.val_data)
        load_zeroshot_sets(recipe)
    except (OSError, ValueError) as e:
        log.error("bad data: %s", e)
        return 2
    output = args.output or str(Path("runs") / recipe.name)
    try:
        result = train(recipe, data=data, output=output, val=args.val_data, resume=args.resume)
    except SetupError as e:
        log.error("cannot train: %s", e)
        return 2
    if result["eval"] is not None and int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"step": result["step"], **result["eval"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
