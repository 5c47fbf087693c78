"""The recipe model: one typed, frozen config per training run, read from YAML plus ``--set`` overrides.

A recipe names the full-size setup of a paper; ``--set`` shrinks it (``model.tiny=true``,
``train.global_batch=8``) without a second file. Everything is validated before any work starts, and
the resolved recipe is saved beside the checkpoints so a run can be reproduced and resumed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# The tiny towers tests and the demo train: the real architectures (ViT + causal text transformer),
# a few thousand times smaller. Applied over the named model's open_clip config.
TINY_OVERRIDES: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16, "mlp_ratio": 2.0},
    "text_cfg": {"width": 32, "heads": 2, "layers": 2, "mlp_ratio": 2.0},
    "multimodal_cfg": {"width": 32, "heads": 2, "layers": 1, "attn_pooler_heads": 2},
}

# Mean/std of the two normalisations recipes ask for.
NORMALIZE = {
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Frozen):
    name: str = "ViT-B-32"  # an open_clip model config name (CLIP or coca_*)
    overrides: dict[str, Any] = Field(default_factory=dict)  # deep-merged into the open_clip config
    tiny: bool = False  # apply TINY_OVERRIDES first (tests, demo)
    pretrained: str | None = None  # open_clip checkpoint (file path or tag) for the whole model
    pretrained_image: str | None = None  # state dict for the image tower only
    lock_image: bool = False  # freeze the image tower (LiT / frozen-tower recipes)
    # A locked tower must load trained weights strictly; true allows a frozen random tower (tests only).
    allow_random_locked: bool = False
    lock_image_unlocked_groups: int = Field(0, ge=0)  # last N layer groups left trainable
    grad_checkpointing: bool = False


class TokenizerConfig(Frozen):
    # open_clip: its BPE (49,408); hf: a transformers tokenizer (hub id or local dir);
    # sentencepiece: a SentencePiece .model file.
    kind: Literal["open_clip", "hf", "sentencepiece"] = "open_clip"
    name: str | None = None  # required by hf / sentencepiece; checked when the tokenizer is loaded
    vocab_size: int = Field(49408, gt=0)  # size of the text tower's embedding table
    context_length: int = Field(77, gt=1)


class ColorJitter(Frozen):
    p: float = Field(0.8, ge=0, le=1)
    brightness: float = Field(0.4, ge=0)
    contrast: float = Field(0.4, ge=0)
    saturation: float = Field(0.4, ge=0)
    hue: float = Field(0.1, ge=0, le=0.5)


class MixEntry(Frozen):
    path: str  # an export (local path or fsspec URL)
    weight: float = Field(1.0, gt=0)  # relative share of the training stream


class DataConfig(Frozen):
    loader: Literal["dali", "torch"] = "dali"
    # Several datasets at fixed weights, sampled with replacement (trainer/mix.py); what
    # `--data A:0.7 --data B:0.3` records. Empty: the one --data dataset.
    mix: list[MixEntry] = Field(default_factory=list)
    image_size: int | None = None  # None: the model's image size
    scale: tuple[float, float] = (0.9, 1.0)  # random resized crop area range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    color_jitter: ColorJitter | None = None
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    normalize: Literal["clip", "imagenet"] = "clip"
    workers: int = Field(2, ge=0)  # DALI threads / DataLoader worker processes
    shuffle_buffer: int = Field(1024, ge=1)  # positions shuffled together after the block shuffle
    shuffle_block: int = Field(64, ge=1)  # consecutive samples of a shard read together (one ranged read)
    val_max: int = Field(1000, ge=1)  # held-out samples used for retrieval eval

    @model_validator(mode="after")
    def _ranges(self) -> DataConfig:
        if not (0 < self.scale[0] <= self.scale[1] <= 1):
            raise ValueError(f"data.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not (0 < self.ratio[0] <= self.ratio[1]):
            raise ValueError(f"data.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        return self


class LossConfig(Frozen):
    # softmax: CLIP's InfoNCE; sigmoid: SigLIP's pairwise loss with the model's logit_bias;
    # auto: sigmoid for models with a logit_bias (open_clip's SigLIP configs), softmax otherwise.
    kind: Literal["auto", "softmax", "sigmoid"] = "auto"
    contrastive_weight: float = Field(1.0, ge=0)
    caption_weight: float = Field(0.0, ge=0)  # > 0 only for CoCa models


class OptimConfig(Frozen):
    lr: float = Field(5e-4, gt=0)
    final_lr: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.2, ge=0)
    clip_norm: float | None = Field(None, gt=0)


class TrainConfig(Frozen):
    steps: int = Field(1000, ge=1)  # optimiser steps; the schedule spans these
    global_batch: int = Field(256, ge=1)  # micro x accum x world size
    accum: int = Field(1, ge=1)  # micro-batches per optimiser step
    precision: Literal["bf16", "fp32"] = "bf16"  # bf16 autocast on GPU; CPU runs fp32
    parallel: Literal["ddp", "fsdp"] = "ddp"
    # auto: CUDA when this process sees a GPU, else CPU. Each process takes cuda:0 when it sees one GPU
    # (SLURM --gpus-per-task, Ray Train) and cuda:LOCAL_RANK when it sees all of the node's.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # How long the other ranks wait for rank 0 to write a checkpoint (a gloo barrier of its own, so the
    # NCCL timeout that catches hung collectives can stay short).
    save_timeout_min: int = Field(60, ge=1)
    seed: int = 0
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(0, ge=0)  # 0: only at the end
    ckpt_every: int = Field(0, ge=0)  # 0: only at the end
    stop_at: int | None = Field(None, ge=1)  # stop (with a checkpoint) before `steps`, schedule unchanged
    tensorboard: bool = False


class ZeroShotConfig(Frozen):
    """One zero-shot classification set (see trainer/eval.py for the layouts it reads)."""

    path: str  # ImageFolder tree, folder of webdataset tars, or a curate dataset with a label column
    name: str | None = None  # metrics key (default: the folder's name)
    classnames: str | None = None  # file, one name per line in class-index order; or "imagenet"
    templates: str | None = None  # file, one prompt per line with {}; or "openai" / "simple"
    label: str = "cls"  # tar member / .json field / dataset column holding the class


class EvalConfig(Frozen):
    zeroshot: list[ZeroShotConfig] = Field(default_factory=list)  # evaluated with the retrieval eval
    batch_size: int = Field(64, ge=1)  # images per model call, per rank


class Recipe(Frozen):
    name: str = "run"
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    def micro_batch(self, world_size: int) -> int:
        """Per-rank micro-batch; the global batch must split evenly."""
        per = self.train.accum * world_size
        if self.train.global_batch % per:
            raise ValueError(
                f"train.global_batch={self.train.global_batch} is not divisible by accum x world size = "
                f"{self.train.accum} x {world_size}"
            )
        return self.train.global_batch // per


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` on top of ``base``, recursing into dicts (a copy; neither input changes)."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def apply_sets(raw: dict, sets: Sequence[str]) -> dict:
    """Apply ``key.sub=value`` overrides; values are parsed as YAML (numbers, lists, null, true)."""
    out = copy.deepcopy(raw)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ValueError(f"--set {item!r}: {part!r} is not a section")
            node = nxt
        node[parts[-1]] = yaml.safe_load(value)
    return out


def load_recipe(path: str | Path | None, sets: Sequence[str] = ()) -> Recipe:
    """Read a recipe YAML (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    raw: dict = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a recipe is a mapping, got {type(raw).__name__}")
    return Recipe.model_validate(apply_sets(raw, sets))
