"""Evaluation of a CLIP/CoCa model: zero-shot classification and image-text retrieval, split across ranks.

    python -m trainer.eval --checkpoint RUN|CKPT.pt|MODEL_DIR --zeroshot DIR [--classnames F] [--templates F]
    python -m trainer.eval --checkpoint ... --retrieval DATASET        # held-out image<->text retrieval
    torchrun --nproc-per-node N -m trainer.eval ...                    # every rank encodes 1/N of the set

A classification set is one of
- an ImageFolder tree: ``DIR/<class>/<image>``, classes in sorted folder order;
- webdataset tars (``DIR/*.tar`` or ``DIR/shards/*.tar``) with ``KEY.cls`` (the class index as text) or a
  ``KEY.json`` field named by ``--label`` (an index or a class name);
- a curate dataset (``_manifest.json`` + Parquet) with a label column named by ``--label``, its image bytes
  reached through the dataset's pointers.
Class names come from ``--classnames`` (one per line, in class-index order; ``imagenet`` for ImageNet's
1,000) or the folder names / the labels themselves; prompt templates from ``--templates`` (one per line
with ``{}`` where the class name goes; ``openai`` / ``simple`` for open_clip's ImageNet sets), default
``a photo of a {}.``. Each class's embedding is the normalised mean of its prompts' normalised embeddings.

Work is split, not repeated: rank r encodes classes and samples [N*r/W, N*(r+1)/W) and the ranks
exchange only embeddings and counts. Every rank makes the same number of model calls (padding with a
dummy batch where its part runs out), which FSDP needs since each call gathers parameters.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("trainer.eval")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATES = ("a photo of a {}.",)
BUILTIN_TEMPLATES = {"openai": "OPENAI_IMAGENET_TEMPLATES", "simple": "SIMPLE_IMAGENET_TEMPLATES"}


# ---------------------------------------------------------------- the classification set


@dataclasses.dataclass(frozen=True)
class Item:
    """One image: a file (offset None) or a byte range of a tar/URL, and its class index."""

    path: str
    offset: int | None
    length: int | None
    label: int


@dataclasses.dataclass(frozen=True)
class ClassificationSet:
    name: str
    items: list[Item]
    classnames: list[str]
    templates: list[str]


def _read_lines(path: str) -> list[str]:
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def load_templates(spec: str | None) -> list[str]:
    """Prompt templates: a file (one per line, ``{}`` for the class name), ``openai`` or ``simple``."""
    if spec is None:
        return list(DEFAULT_TEMPLATES)
    if spec in BUILTIN_TEMPLATES:
        from open_clip import zero_shot_metadata

        return [t("{}") for t in getattr(zero_shot_metadata, BUILTIN_TEMPLATES[spec])]
    templates = _read_lines(spec)
    bad = [t for t in templates if t.count("{}") != 1]
    if not templates or bad:
        raise ValueError(f"{spec}: every template line needs exactly one {{}} for the class name"
                         + (f" (not: {bad[0]!r})" if bad else " (the file has none)"))
    return templates


def load_classnames(spec: str | None) -> list[str] | None:
    if spec is None:
        return None
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    names = _read_lines(spec)
    if not names:
        raise ValueError(f"{spec}: no class names in the file")
    return names


def _label_index(value, where: str) -> int | str:
    """An int label as it is; a digit string as an int; any other string is a class name."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    if isinstance(value, str):
        return value
    raise ValueError(f"{where}: label {value!r} is neither a class index nor a class name")


def _tar_items(tars: list[Path], label: str) -> list[tuple[str, int, int, int | str]]:
    out = []
    for tar in tars:
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isreg() and not info.name.rsplit("/", 1)[-1].startswith("."):
                    key, _, ext = info.name.partition(".")
                    groups.setdefault(key, {})[ext.lower()] = info
            for key, members in groups.items():
                image = next((members[e] for e in IMAGE_EXTS if e in members), None)
                if image is None:
                    continue
                where = f"{tar}:{key}"
                if "cls" in members and label == "cls":
                    value = tf.extractfile(members["cls"]).read().decode("utf-8").strip()
                elif "json" in members:
                    meta = json.loads(tf.extractfile(members["json"]).read())
                    if label not in meta:
                        raise ValueError(f"{where}: no {label!r} field in its .json (pick one with --label)")
                    value = meta[label]
                else:
                    raise ValueError(f"{where}: no .cls member and no .json to read the label {label!r} from")
                out.append((str(tar), image.offset_data, image.size, _label_index(value, where)))
    return out


def _dataset_items(root: str, label: str) -> list[tuple[str, int, int, int | str]]:
    from curate import schema
    from curate.dataset import Dataset

    ds = Dataset(root)
    cols = [schema.IMAGE_TAR, schema.IMAGE_OFFSET, schema.IMAGE_LENGTH]
    out = []
    for n, table in ds.iter_shards():
        if label not in table.column_names:
            raise ValueError(f"{root}: shard {n} has no label column {label!r} (pick one with --label)")
        missing = [c for c in cols if c not in table.column_names]
        if missing:
            raise ValueError(f"{root}: shard {n} has no image pointers ({', '.join(missing)})")
        rows = zip(*(table.column(c).to_pylist() for c in [*cols, label]), strict=True)
        out.extend((t, o, n_, _label_index(v, f"{root} shard {n}")) for t, o, n_, v in rows)
    return out


def load_classification(path: str, *, classnames: str | None = None, templates: str | None = None,
                        label: str = "cls", name: str | None = None) -> ClassificationSet:
    """Read a classification set (ImageFolder, webdataset tars or a curate dataset; see the module doc)."""
    root = Path(path)
    names = load_classnames(classnames)
    if (root / "_manifest.json").is_file() and list((root / "shards").glob("*.parquet")):
        raw = _dataset_items(str(root), label)
    else:
        tars = sorted((root / "shards").glob("*.tar")) or sorted(root.glob("*.tar"))
        if tars:
            raw = _tar_items(tars, label)
        else:
            folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
            if not folders:
                raise FileNotFoundError(f"{path}: not an ImageFolder tree, a folder of tars or a curate dataset")
            raw = [(str(f), None, None, i) for i, d in enumerate(folders) for f in sorted(d.iterdir())
                   if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
            if names is None:
                names = [d.name.replace("_", " ") for d in folders]
            elif len(names) != len(folders):
                raise ValueError(f"{classnames} lists {len(names)} class names but {path} has {len(folders)} "
                                 "class folders")
    by_name = {n: i for i, n in enumerate(names)} if names else None
    if names is None:  # class names from the labels themselves (all strings) or a count of indices
        strings = sorted({lab for *_, lab in raw if isinstance(lab, str)})
        if strings and len(strings) < len({lab for *_, lab in raw}):
            raise ValueError(f"{path}: labels mix class names and indices; give --classnames")
        names = strings or [str(i) for i in range(max(lab for *_, lab in raw) + 1)]
        by_name = {n: i for i, n in enumerate(names)}
    items = []
    for p, off, length, lab in raw:
        idx = by_name.get(lab) if isinstance(lab, str) else lab
        if idx is None or not 0 <= idx < len(names):
            raise ValueError(f"{path}: label {lab!r} of {p} is not one of the {len(names)} classes")
        items.append(Item(p, off, length, idx))
    if not items:
        raise ValueError(f"{path}: no labelled images found")
    return ClassificationSet(name or root.name, items, names, load_templates(templates))


def read_bytes(item: Item) -> bytes:
    if item.offset is None:
        return Path(item.path).read_bytes()
    if "://" in item.path:
        from curate.dataset import url_to_fs

        fs, p = url_to_fs(item.path)
        with fs.open(p, "rb") as f:
            f.seek(item.offset)
            return f.read(item.length)
    with open(item.path, "rb") as f:
        f.seek(item.offset)
        return f.read(item.length)


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"):
    """Resize the shorter side, centre crop, normalise: the held-out transform of the trainer and open_clip."""
    from torchvision import transforms as T

    interp = T.InterpolationMode.BICUBIC if interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    return T.Compose([T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(mean, std)])


class _Images(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from PIL import Image

        item = self.items[i]
        try:
            image = Image.open(io.BytesIO(read_bytes(item))).convert("RGB")
        except Exception as e:  # name the file: PIL's message alone says nothing about where
            raise ValueError(f"cannot decode {item.path}" + (f" at {item.offset}" if item.offset else "")
                             + f": {e}") from e
        return self.transform(image), item.label


# ---------------------------------------------------------------- ranks


@dataclasses.dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> Ranks:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return cls(torch.distributed.get_rank(), torch.distributed.get_world_size())
        return cls()

    def part(self, n: int) -> tuple[int, int]:
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    def most(self, n: int) -> int:
        """The largest part any rank gets of n."""
        return max(n * (r + 1) // self.world - n * r // self.world for r in range(self.world))

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """All ranks' parts of an n-row tensor, in rank order (each part padded to the largest for the exchange)."""
        if self.world == 1:
            return t
        most = self.most(n)
        padded = torch.zeros((most, *t.shape[1:]), dtype=t.dtype, device=t.device)
        padded[: len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        torch.distributed.all_gather(parts, padded)
        return torch.cat([p[: n * (r + 1) // self.world - n * r // self.world] for r, p in enumerate(parts)])


@contextlib.contextmanager
def full_params(model):
    """The model with its root parameters gathered (FSDP2), so ``encode_image``/``encode_text`` can run
    outside its ``forward``; the transformer blocks gather their own in their hooks."""
    if hasattr(model, "unshard") and hasattr(model, "reshard"):
        model.unshard()
        try:
            yield _core(model)
        finally:
            model.reshard()
    else:
        yield _core(model)


def _core(model):
    return model.module if hasattr(model, "module") else model


def _batched_calls(n_mine: int, n_most: int, batch: int) -> list[tuple[int, int] | None]:
    """This rank's batch ranges, then None (a dummy call) until it has made as many calls as the busiest rank."""
    calls: list[tuple[int, int] | None] = [(lo, min(lo + batch, n_mine)) for lo in range(0, n_mine, batch)]
    return calls + [None] * (math.ceil(n_most / batch) - len(calls))


# ---------------------------------------------------------------- zero-shot


@torch.no_grad()
def class_embeddings(model, tokenize: Callable, classnames: Sequence[str], templates: Sequence[str], device,
                     ranks: Ranks, autocast=contextlib.nullcontext, batch: int = 256) -> torch.Tensor:
    """[C, D]: per class, the normalised mean of its prompts' normalised text embeddings (ranks split the classes)."""
    lo, hi = ranks.part(len(classnames))
    prompts = [t.format(c) for c in classnames[lo:hi] for t in templates]
    most = ranks.most(len(classnames)) * len(templates)
    feats = []
    with full_params(model) as core:
        for call in _batched_calls(len(prompts), most, batch):
            texts = prompts[call[0]:call[1]] if call else prompts[:1] or ["."]
            with autocast():
                f = core.encode_text(tokenize(texts).to(device), normalize=True).float()
            if call:
                feats.append(f)
    dim = _embed_dim(_core(model))
    mine = torch.cat(feats) if feats else torch.zeros((0, dim), device=device)
    mine = torch.nn.functional.normalize(mine.reshape(hi - lo, len(templates), dim).mean(dim=1), dim=-1)
    return ranks.gather_rows(mine, len(classnames))


def _embed_dim(core) -> int:
    proj = getattr(core, "text_projection", None)
    if isinstance(proj, torch.nn.Linear):
        return proj.out_features
    if proj is not None:
        return proj.shape[-1]
    return core.text.text_projection.shape[-1]  # CoCa keeps its towers in .text / .visual


@torch.no_grad()
def zeroshot(model, tokenize: Callable, dataset: ClassificationSet, transform, device, ranks: Ranks | None = None,
             autocast=contextlib.nullcontext, batch: int = 64, workers: int = 2) -> dict[str, float]:
    """Top-1 / top-5 accuracy over the whole set; each rank classifies its part."""
    ranks = ranks or Ranks.current()
    was_training = model.training
    model.eval()
    classifier = class_embeddings(model, tokenize, dataset.classnames, dataset.templates, device, ranks, autocast)
    lo, hi = ranks.part(len(dataset.items))
    loader = iter(torch.utils.data.DataLoader(_Images(dataset.items[lo:hi], transform), batch_size=batch,
                                              num_workers=min(workers, 2)))
    k = min(5, len(dataset.classnames))
    counts = torch.zeros(3, dtype=torch.float64, device=device)  # top-1 hits, top-k hits, samples
    dummy = None
    with full_params(model) as core:
        for call in _batched_calls(hi - lo, ranks.most(len(dataset.items)), batch):
            if call is None:
                dummy = dummy if dummy is not None else torch.zeros((1, *transform_shape(transform)))
                with autocast():
                    core.encode_image(dummy.to(device), normalize=True)
                continue
            images, labels = next(loader)
            with autocast():
                feats = core.encode_image(images.to(device), normalize=True).float()
            top = (feats @ classifier.T).topk(k, dim=1).indices
            labels = labels.to(device)
            counts[0] += (top[:, 0] == labels).sum()
            counts[1] += (top == labels[:, None]).any(dim=1).sum()
            counts[2] += len(labels)
    model.train(was_training)
    log.info("rank %d classified %d of %d images of %s", ranks.rank, hi - lo, len(dataset.items), dataset.name)
    counts = ranks.sum(counts).tolist()
    return {"top1": counts[0] / counts[2], f"top{k}": counts[1] / counts[2], "n": counts[2]}


def transform_shape(transform) -> tuple[int, int, int]:
    crop = next(t for t in transform.transforms if type(t).__name__ == "CenterCrop")
    h, w = crop.size
    return 3, h, w


# ---------------------------------------------------------------- retrieval


@torch.no_grad()
def retrieval(model, tokenize: Callable, batches_of: Callable[[int, int], object], n: int, device,
              ranks: Ranks | None = None, autocast=contextlib.nullcontext, batch: int = 64) -> dict[str, float]:
    """Image->text and text->image recall@1/5/10, mean and median rank over n held-out pairs.

    ``batches_of(lo, hi)`` yields Batch(images, captions) for pairs [lo, hi) in order; rank r encodes its part,
    the embeddings are exchanged and each rank ranks its own queries against all n candidates.
    """
    ranks = ranks or Ranks.current()
    was_training = model.training
    model.eval()
    lo, hi = ranks.part(n)
    it = iter(batches_of(lo, hi))
    images, texts = [], []
    dummy = None
    with full_params(model) as core:
        for call in _batched_calls(hi - lo, ranks.most(n), batch):
            b = next(it) if call else None
            if b is not None:
                dummy = (b.images[:1], b.captions[:1])
            elif dummy is None:  # a rank with no pairs at all: borrow one shape-correct input
                first = next(iter(batches_of(0, 1)))
                dummy = (first.images[:1], first.captions[:1])
            imgs, caps = (b.images, b.captions) if b is not None else dummy
            with autocast():
                fi = core.encode_image(imgs.to(device), normalize=True).float()
                ft = core.encode_text(tokenize(caps).to(device), normalize=True).float()
            if b is not None:
                images.append(fi)
                texts.append(ft)
    model.train(was_training)
    dim = _embed_dim(_core(model))
    mine_i = torch.cat(images) if images else torch.zeros((0, dim), device=device)
    mine_t = torch.cat(texts) if texts else torch.zeros((0, dim), device=device)
    all_i, all_t = ranks.gather_rows(mine_i, n), ranks.gather_rows(mine_t, n)
    truth = torch.arange(lo, hi, device=device)
    positions = []
    for queries, candidates in ((mine_i, all_t), (mine_t, all_i)):
        sims = queries @ candidates.T
        # 0-based position of the true pair = how many candidates score strictly higher
        positions.append((sims > sims[torch.arange(hi - lo), truth][:, None]).sum(dim=1))
    log.info("rank %d encoded %d of %d held-out pairs", ranks.rank, hi - lo, n)
    metrics: dict[str, float] = {"n": float(n)}
    for name, pos in zip(("image_to_text", "text_to_image"), positions, strict=True):
        pos = ranks.gather_rows(pos, n).double()
        for k in (1, 5, 10):
            metrics[f"{name}_R@{k}"] = (pos < k).double().mean().item()
        metrics[f"{name}_mean_rank"] = (pos + 1).mean().item()
        metrics[f"{name}_median_rank"] = float(np.median((pos + 1).cpu().numpy()))
    return metrics


# ---------------------------------------------------------------- standalone


def load_model(checkpoint: str, device: torch.device) -> dict:
    """{model, tokenizer, image_size, mean, std, interpolation, step, run} from a run directory (its newest
    checkpoint, else its model/), a ``step_N.pt`` training checkpoint, or an exported ``model/`` folder."""
    from trainer.config import NORMALIZE, Recipe, TokenizerConfig
    from trainer.train import Tokenizer, build_model, latest_checkpoint, model_config

    path = Path(checkpoint)
    if path.is_dir() and not (path / "open_clip_config.json").is_file():
        found = latest_checkpoint(path)
        if found is None and (path / "model" / "open_clip_config.json").is_file():
            path = path / "model"
        elif found is None:
            raise FileNotFoundError(f"{checkpoint}: no checkpoints/step_*.pt and no model/ in this run directory")
        else:
            path = found
    if path.is_dir():
        import open_clip

        cfg = json.loads((path / "open_clip_config.json").read_text())
        model = open_clip.create_model(f"local-dir:{path}", device=device)
        tok = cfg.get("trainer", {}).get("tokenizer")
        tokenizer = Tokenizer(TokenizerConfig.model_validate(tok)) if tok else open_clip.get_tokenizer(f"local-dir:{path}")
        pre = cfg["preprocess_cfg"]
        size = cfg["model_cfg"]["vision_cfg"]["image_size"]
        return {"model": model, "tokenizer": tokenizer, "image_size": size if isinstance(size, int) else size[0],
                "mean": pre["mean"], "std": pre["std"], "interpolation": pre.get("interpolation", "bicubic"),
                "step": None, "run": path.parent}
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint")
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    recipe = Recipe.model_validate(ckpt["recipe"])
    tokenizer = Tokenizer(recipe.tokenizer)
    cfg = model_config(recipe, tokenizer.info)
    model = build_model(recipe.model_copy(update={"model": recipe.model.model_copy(
        update={"pretrained": None, "pretrained_image": None})}), cfg, device)
    model.load_state_dict(ckpt["model"])
    size = cfg["vision_cfg"]["image_size"]
    mean, std = NORMALIZE[recipe.data.normalize]
    return {"model": model, "tokenizer": tokenizer, "image_size": size if isinstance(size, int) else size[0],
            "mean": mean, "std": std, "interpolation": recipe.data.interpolation, "step": ckpt["step"],
            "run": path.parent.parent}


def retrieval_batches(val_shards, transform, batch: int, limit: int):
    """``batches_of(lo, hi)`` over the first ``limit`` samples of held-out shards, for ``retrieval``."""
    from trainer.data import Batch, index_samples

    samples = index_samples(val_shards)
    if samples and isinstance(samples[0], list):  # one list per shard
        samples = [s for shard in samples for s in shard]
    samples = samples[:limit]

    def batches_of(lo: int, hi: int):
        items = [Item(s.tar, s.image[0], s.image[1], 0) for s in samples[lo:hi]]
        texts = [Item(s.tar, s.text[0], s.text[1], 0) for s in samples[lo:hi]]
        for a in range(0, len(items), batch):
            images = torch.stack([_Images(items, transform)[i][0] for i in range(a, min(a + batch, len(items)))])
            yield Batch(images=images, captions=[read_bytes(t).decode("utf-8") for t in texts[a:a + batch]],
                        keys=[s.key for s in samples[lo + a:lo + a + batch]])

    return batches_of, len(samples)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m trainer.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoints/step_N.pt, or an exported model/")
    p.add_argument("--zeroshot", action="append", default=[], metavar="DIR", help="classification set (repeatable)")
    p.add_argument("--classnames", help="class names file (one per line, class-index order) or 'imagenet'")
    p.add_argument("--templates", help="prompt templates file (one per line with {}) or 'openai' / 'simple'")
    p.add_argument("--label", default="cls", help="label member/field/column of tars or a curate dataset")
    p.add_argument("--retrieval", metavar="DATASET", help="held-out image-text pairs (an export's val split)")
    p.add_argument("--retrieval-max", type=int, default=1000, help="first N held-out pairs (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--output", help="run directory whose metrics.jsonl gets the results (default: the checkpoint's)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard scalars under OUTPUT/tensorboard")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not args.zeroshot and not args.retrieval:
        log.error("nothing to evaluate: give --zeroshot DIR and/or --retrieval DATASET")
        return 2
    import importlib.util

    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        log.error("--tensorboard needs the tensorboard package: pip install 'curate[tensorboard]'")
        return 2
    try:
        sets = [load_classification(d, classnames=args.classnames, templates=args.templates, label=args.label)
                for d in args.zeroshot]
        val = None
        if args.retrieval:
            from trainer.data import find_val

            val = find_val(args.retrieval, args.retrieval)
    except (OSError, ValueError) as e:
        log.error("bad eval set: %s", e)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % max(1, torch.cuda.device_count())}"
                          if cuda else "cpu")
    if world > 1 and not torch.distributed.is_initialized():
        if cuda:
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    try:
        loaded = load_model(args.checkpoint, device)
    except (OSError, ValueError) as e:
        log.error("bad checkpoint: %s", e)
        return 2
    model, tokenize = loaded["model"], loaded["tokenizer"]
    transform = eval_transform(loaded["image_size"], loaded["mean"], loaded["std"], loaded["interpolation"])
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext
    row: dict = {"step": loaded["step"] if loaded["step"] is not None else 0}
    for s in sets:
        res = zeroshot(model, tokenize, s, transform, device, autocast=autocast, batch=args.batch_size)
        row.update({f"zeroshot/{s.name}/{k}": v for k, v in res.items()})
    if val is not None:
        batches_of, n = retrieval_batches(val, transform, args.batch_size, args.retrieval_max)
        res = retrieval(model, tokenize, batches_of, n, device, autocast=autocast, batch=args.batch_size)
        row.update({f"eval/{k}": v for k, v in res.items()})
    if Ranks.current().rank == 0:
        write_metrics(Path(args.output) if args.output else loaded["run"], row, args.tensorboard)
        print(json.dumps(row))
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


def write_metrics(run: Path, row: dict, tensorboard: bool) -> None:
    """Append the row to ``metrics.jsonl``, replacing the row an earlier run of the same eval wrote (same
    step, same keys), so a rerun leaves the file as one run would."""
    run.mkdir(parents=True, exist_ok=True)
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    keep = [line for line in lines if line.strip() and not _same_eval(json.loads(line), row)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in [*keep, json.dumps(row)]))
    os.replace(tmp, path)
    if tensorboard:
        from torch.utils.tensorboard import SummaryWriter

        with contextlib.closing(SummaryWriter(str(run / "tensorboard"))) as tb:
            for k, v in row.items():
                if k != "step":
                    tb.add_scalar(k, v, row["step"])


def _same_eval(old: dict, new: dict) -> bool:
    return old.get("step") == new.get("step") and old.keys() == new.keys()


if __name__ == "__main__":
    raise SystemExit(main())
