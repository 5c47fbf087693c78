"""Training data: exported webdataset tars -> augmented image batches + captions + sample keys.

Two loaders over the same tars with the same augmentations and the same per-rank split:

- ``DaliLoader``: NVIDIA DALI ``readers.webdataset`` with the ``.idx`` files, shuffled in a buffer,
  decode on the GPU (``device="mixed"``) or on CPU threads when there is no GPU, random resized crop
  fused into the decode, bicubic resize, flip, colour jitter, normalisation. Resumable exactly through
  DALI's own pipeline checkpoints (reader position and the random state of every operator).
- ``TorchLoader``: a plain PyTorch ``DataLoader`` (PIL + torchvision transforms) over an index built
  from the same ``.idx`` files. Each sample's augmentation is seeded by (seed, epoch, position), so its
  output does not depend on the worker count and resume only needs the count of batches consumed.

Both split the samples across ranks the way DALI does (rank r reads samples [N*r/W, N*(r+1)/W) and
sticks to them), so for any world size the two yield the same keys per rank per epoch. Batches run
on across epoch boundaries; a loader never ends.

Captions come out as strings: the training loop tokenizes them with the model's tokenizer.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from trainer.config import NORMALIZE, DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"


@dataclasses.dataclass(frozen=True)
class Sample:
    """Where one sample's image and caption bytes lie in its tar."""

    key: str
    tar: str
    image: tuple[int, int]  # data offset, size
    text: tuple[int, int]


@dataclasses.dataclass
class Batch:
    images: object  # torch.Tensor [B, 3, S, S], float, normalised
    captions: list[str]
    keys: list[str]


# ---------------------------------------------------------------- finding the shards


def _split_shards(root: Path, folder: Path) -> dict[str, set[int]] | None:
    """Shard numbers per split as export records them (manifest ``splits``, else each shard's stats
    file), or None for a dataset without splits."""
    manifest = root / "_manifest.json"
    if manifest.is_file():
        splits = json.loads(manifest.read_text()).get("splits")
        if splits:
            return {name: {int(n) for n in info["shards"]} for name, info in splits.items()}
    found: dict[str, set[int]] = {}
    for stats in folder.glob("*.stats.json"):
        split = json.loads(stats.read_text()).get("split")
        if split:
            found.setdefault(split, set()).add(int(stats.name.split(".", 1)[0]))
    return found or None


def find_shards(path: str | Path, split: str | None = "train") -> list[tuple[str, str | None]]:
    """(tar, idx or None) for every shard of one split of a dataset directory (or its ``shards/``).

    The shard list comes from ``sizes.json`` (what export writes, as open_clip reads it); without one,
    every ``*.tar`` in the folder. An export with a held-out split records which shards are ``train``
    and which ``val``; a dataset without splits is all ``train`` (``split=None``: every shard). Only
    local paths: DALI's reader opens files itself.
    """
    root = Path(path)
    folder = root / "shards" if (root / "shards").is_dir() else root
    sizes = folder / "sizes.json"
    if sizes.is_file():
        names = sorted(json.loads(sizes.read_text()))
    else:
        names = sorted(p.name for p in folder.glob("*.tar"))
    if split is not None:
        splits = _split_shards(root, folder)
        if splits is None:
            names = names if split == "train" else []
        else:
            wanted = splits.get(split, set())
            names = [n for n in names if int(n.split(".", 1)[0]) in wanted]
    if not names:
        if split not in (None, "train"):
            return []
        raise FileNotFoundError(f"no {split or ''} shards under {folder} (no sizes.json entries and no *.tar)")
    out = []
    for name in names:
        tar = folder / name
        if not tar.is_file():
            raise FileNotFoundError(f"{tar} is listed in sizes.json but missing")
        idx = tar.with_suffix(".idx")
        out.append((str(tar), str(idx) if idx.is_file() else None))
    return out


def find_val(data: str | Path, val: str | Path | None) -> list[tuple[str, str | None]] | None:
    """The held-out shards to evaluate on, or None (eval is then skipped).

    ``val`` given: that dataset's ``val`` split if it records one, else all its shards. Otherwise the
    training dataset's own ``val`` split (export's held-out shards), or a ``val/`` dataset inside it.
    """
    if val:
        return find_shards(val, "val") or find_shards(val, None)
    held_out = find_shards(data, "val")
    if held_out:
        return held_out
    if (Path(data) / "val").is_dir():
        return find_shards(Path(data) / "val", None)
    return None


def _parse_idx(idx: str, tar: str) -> list[Sample] | None:
    """Samples from a DALI v1.2 index (``ext offset size name`` per member); None if it has no names."""
    lines = Path(idx).read_text().splitlines()
    head = lines[0].split()
    if head[0] != "v1.2":
        return None
    out = []
    for line in lines[1 : 1 + int(head[1])]:
        parts = line.split()
        if len(parts) % 4:
            return None
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2])) for i in range(0, len(parts), 4)}
        out.append(_sample(parts[3].split(".", 1)[0], tar, members))
    return out


def _scan_tar(tar: str) -> list[Sample]:
    """Samples of a tar without an index (slower: reads every header)."""
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    with tarfile.open(tar) as tf:
        for info in tf:
            if not info.isreg():
                continue
            base = info.name.rsplit("/", 1)[-1]
            if base.startswith("."):
                continue
            key, _, ext = info.name.partition(".")
            groups.setdefault(key, {})[ext] = (info.offset_data, info.size)
    return [_sample(key.rsplit("/", 1)[-1], tar, members) for key, members in groups.items()]


def _sample(key: str, tar: str, members: dict[str, tuple[int, int]]) -> Sample:
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None or TEXT_EXT not in members:
        raise ValueError(f"{tar}: sample {key} lacks an image or a caption (members: {sorted(members)})")
    return Sample(key=key, tar=tar, image=image, text=members[TEXT_EXT])


def index_samples(shards: list[tuple[str, str | None]]) -> list[Sample]:
    """Every sample of the shards, in stored order (the order DALI's reader walks them)."""
    out: list[Sample] = []
    for tar, idx in shards:
        samples = _parse_idx(idx, tar) if idx else None
        out.extend(samples if samples is not None else _scan_tar(tar))
    return out


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous sample range of one rank, exactly as DALI's readers split a dataset."""
    return n * rank // world, n * (rank + 1) // world


def read_member(tar: str, where: tuple[int, int]) -> bytes:
    with open(tar, "rb") as f:
        f.seek(where[0])
        return f.read(where[1])


# ---------------------------------------------------------------- DALI


class DaliLoader:
    """Infinite batches from a DALI pipeline over the shards; ``state()`` resumes it exactly.

    DALI cannot skip an image it fails to decode: the whole pipeline stops. So on such a failure this
    loader drops that sample from a private copy of its tar's ``.idx``, logs the key, and rebuilds the
    pipeline (the epoch restarts, reshuffled). The skipped keys are part of ``state()``, so a resumed run
    rebuilds the same filtered indexes and continues exactly.
    """

    def __init__(
        self,
        shards: list[tuple[str, str | None]],
        cfg: DataConfig,
        *,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        device_id: int | None = None,
        train: bool = True,
        checkpoint: bytes | None = None,
        skipped: list[str] | None = None,
    ):
        self.cfg, self.device_id, self.batch_size = cfg, device_id, batch_size
        self.shards = shards
        self.skipped: list[str] = list(skipped or [])  # "tar::key" of samples that failed to decode
        self._args = {"cfg": cfg, "image_size": image_size, "batch_size": batch_size, "rank": rank,
                      "world": world, "device_id": device_id, "train": train}
        self._seed = seed
        self._idx_dir: str | None = None
        self._build(checkpoint)
        # DALI reports the whole dataset; this rank reads its contiguous part of it.
        lo, hi = shard_range(self.pipe.epoch_size("reader"), rank, world)
        self.epoch_size = hi - lo

    def _build(self, checkpoint: bytes | None) -> None:
        shards = self._filtered_shards()
        # Each rebuild after a skip starts a new shuffle, not a replay of the first batches.
        seed = self._seed + 1_000_003 * len(self.skipped)
        self.pipe = _dali_pipeline(shards, seed=seed, checkpoint=checkpoint, **self._args)
        self.pipe.build()

    def _filtered_shards(self) -> list[tuple[str, str | None]]:
        if not self.skipped:
            return self.shards
        import tempfile

        if self._idx_dir is None:
            self._idx_dir = tempfile.mkdtemp(prefix="trainer-idx-")
        out = []
        for n, (tar, idx) in enumerate(self.shards):
            drop = {entry.split("::", 1)[1] for entry in self.skipped if entry.split("::", 1)[0] == tar}
            if drop and idx:
                lines = Path(idx).read_text().splitlines()
                kept = [line for line in lines[1:] if _key_of(line.split()[3]) not in drop]
                idx = os.path.join(self._idx_dir, f"{n:06d}.idx")
                Path(idx).write_text("\n".join([f"{lines[0].split()[0]} {len(kept)}", *kept]) + "\n")
            out.append((tar, idx))
        return out

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def next(self) -> Batch:
        try:
            images, texts, infos = self.pipe.run()
        except RuntimeError as e:
            bad = _undecodable(str(e))
            tars = dict(self.shards)
            if bad is None or bad[0] not in tars or tars[bad[0]] is None or "::".join(bad) in self.skipped:
                raise
            log.error("cannot decode sample %s in %s: skipping it and restarting the data pipeline", bad[1], bad[0])
            self.skipped.append("::".join(bad))
            del self.pipe
            self._build(checkpoint=None)
            return self.next()
        return Batch(images=_dali_to_torch(images, self.device_id), captions=_strings(texts),
                     keys=[_key_of(s) for s in _strings(infos)])

    def state(self) -> dict:
        """DALI's checkpoint (reader position and every random operator's state) and the skipped samples."""
        return {"dali": self.pipe.checkpoint(), "skipped": list(self.skipped)}


_DECODE_ERROR = re.compile(r"Failed to decode sample #\d+ : (.+):\d+:([^\s:]+)")


def _undecodable(message: str) -> tuple[str, str] | None:
    """(tar, key) of the sample DALI names in a decode error, or None for any other error."""
    m = _DECODE_ERROR.search(message)
    return (m.group(1), m.group(2).rsplit("/", 1)[-1].split(".", 1)[0]) if m else None


def _dali_pipeline(shards, *, cfg: DataConfig, image_size, batch_size, rank, world, seed, device_id, train,
                   checkpoint):
    from nvidia.dali import fn, pipeline_def, types

    mean, std = NORMALIZE[cfg.normalize]
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    decode_device = "mixed" if device_id is not None else "cpu"
    missing_idx = [t for t, i in shards if i is None]
    if missing_idx:
        log.warning("%d shard(s) have no .idx; DALI will scan them (slow start): %s", len(missing_idx), missing_idx[:3])

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        jpegs, texts = fn.readers.webdataset(
            paths=[t for t, _ in shards],
            index_paths=[i for _, i in shards] if not missing_idx else None,
            ext=[";".join(IMAGE_EXTS), TEXT_EXT],
            missing_component_behavior="error",
            random_shuffle=train,
            initial_fill=cfg.shuffle_buffer,
            shard_id=rank,
            num_shards=world,
            stick_to_shard=True,
            pad_last_batch=False,
            name="reader",
        )
        # "tar:offset:KEY.ext" of each image member: the sample key, for bookkeeping and tests.
        infos = fn.get_property(jpegs, key="source_info")
        if train:
            # The crop window is chosen from the header and only that region is decoded.
            images = fn.decoders.image_random_crop(
                jpegs, device=decode_device, output_type=types.RGB,
                random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio), num_attempts=10,
            )
            images = fn.resize(images, size=[image_size, image_size], interp_type=interp, antialias=True)
            if cfg.color_jitter is not None:
                images = _dali_color_jitter(fn, types, images, cfg.color_jitter)
            mirror = fn.random.coin_flip(probability=0.5) if cfg.flip else 0
        else:
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=image_size, interp_type=interp, antialias=True)
            mirror = 0
        images = fn.crop_mirror_normalize(
            images, crop=(image_size, image_size), mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
            mean=[m * 255 for m in mean], std=[s * 255 for s in std],
        )
        return images, texts, infos

    kwargs = {"checkpoint": checkpoint} if checkpoint is not None else {}
    return pipeline(batch_size=batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
                    seed=_seed32(seed, rank), prefetch_queue_depth=2, **kwargs)


def _dali_color_jitter(fn, types, images, cj):
    """torchvision's ColorJitter applied with probability p (fixed order: DALI has one fused op)."""
    apply = fn.cast(fn.random.coin_flip(probability=cj.p), dtype=types.FLOAT)

    def factor(amount):
        return 1.0 + apply * fn.random.uniform(range=[-amount, amount])

    # DALI's hue is in degrees; torchvision's is a fraction of a full turn.
    hue = apply * fn.random.uniform(range=[-cj.hue * 360.0, cj.hue * 360.0])
    return fn.color_twist(images, brightness=factor(cj.brightness), contrast=factor(cj.contrast),
                          saturation=factor(cj.saturation), hue=hue)


def _dali_to_torch(tensor_list, device_id):
    import torch

    if device_id is None:
        return torch.from_numpy(tensor_list.as_array())
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


def _strings(tensor_list) -> list[str]:
    return [bytes(np.asarray(tensor_list[i])).decode("utf-8") for i in range(len(tensor_list))]


def _key_of(source_info: str) -> str:
    name = source_info.rsplit(":", 1)[-1].rsplit("/", 1)[-1]
    return name.split(".", 1)[0]


def _seed32(*parts: int) -> int:
    return int(np.random.SeedSequence([p & 0xFFFFFFFF for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


# ---------------------------------------------------------------- PyTorch DataLoader


def torch_transform(cfg: DataConfig, image_size: int, train: bool):
    """The same augmentations as the DALI pipeline, with torchvision on PIL images."""
    from torchvision import transforms as T

    mean, std = NORMALIZE[cfg.normalize]
    interp = T.InterpolationMode.BICUBIC if cfg.interpolation == "bicubic" else T.InterpolationMode.BILINEAR
    if not train:
        steps = [T.Resize(image_size, interpolation=interp), T.CenterCrop(image_size)]
    else:
        steps = [T.RandomResizedCrop(image_size, scale=cfg.scale, ratio=cfg.ratio, interpolation=interp)]
        if cfg.color_jitter is not None:
            cj = cfg.color_jitter
            steps.append(T.RandomApply([T.ColorJitter(cj.brightness, cj.contrast, cj.saturation, cj.hue)], p=cj.p))
        if cfg.flip:
            steps.append(T.RandomHorizontalFlip())
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


class _TarDataset:
    """Map-style dataset: item (sample index, augmentation seed) -> (image tensor, caption, key)."""

    def __init__(self, samples: list[Sample], transform):
        self.samples = samples
        self.transform = transform
        self._files: dict[str, object] = {}  # one open handle per tar per worker

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: tuple[int, int]):
        import torch
        from PIL import Image, ImageOps

        index, seed = item
        s = self.samples[index]
        f = self._files.get(s.tar)
        if f is None:
            f = self._files[s.tar] = open(s.tar, "rb")  # noqa: SIM115 - kept open for the worker's life
        f.seek(s.image[0])
        image_bytes = f.read(s.image[1])
        f.seek(s.text[0])
        caption = f.read(s.text[1]).decode("utf-8")
        try:
            # EXIF orientation applied, as DALI's decoder (the other loader) applies it
            image = ImageOps.exif_transpose(Image.open(io.BytesIO(image_bytes))).convert("RGB")
        except Exception as e:  # name the sample: the bare PIL error says nothing about where it came from
            raise ValueError(f"{s.tar}: cannot decode the image of sample {s.key}: {e}") from e
        # Seeding per sample makes the augmentation independent of which worker runs it.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            pixels = self.transform(image)
        return pixels, caption, s.key


def _collate(items) -> Batch:
    import torch

    return Batch(images=torch.stack([i[0] for i in items]), captions=[i[1] for i in items],
                 keys=[i[2] for i in items])


class TorchLoader:
    """Infinite batches from a torch DataLoader over the rank's samples, reshuffled each epoch."""

    def __init__(
        self,
        shards: list[tuple[str, str | None]],
        cfg: DataConfig,
        *,
        image_size: int,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        train: bool = True,
        checkpoint: int | None = None,
        device_id: int | None = None,
    ):
        samples = index_samples(shards)
        lo, hi = shard_range(len(samples), rank, world)
        self.indices = np.arange(lo, hi)
        if len(self.indices) == 0:
            raise ValueError(f"rank {rank} of {world} gets no samples ({len(samples)} in all)")
        self.epoch_size = len(self.indices)
        self.dataset = _TarDataset(samples, torch_transform(cfg, image_size, train))
        self.cfg, self.batch_size, self.seed, self.rank, self.train = cfg, batch_size, seed, rank, train
        self.device_id = device_id
        self.batches = checkpoint or 0  # batches handed out so far: the whole resume state
        self._it = None

    def _order(self, epoch: int) -> np.ndarray:
        if not self.train:
            return self.indices
        return np.random.default_rng([self.seed, self.rank, epoch]).permutation(self.indices)

    def _batch_sampler(self, start: int) -> Iterator[list[tuple[int, int]]]:
        pos = start * self.batch_size  # position in the endless stream of epochs
        epoch, order = -1, self.indices
        while True:
            batch = []
            for _ in range(self.batch_size):
                e, i = divmod(pos, self.epoch_size)
                if e != epoch:
                    epoch, order = e, self._order(e)
                batch.append((int(order[i]), _seed32(self.seed, self.rank, pos)))
                pos += 1
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def next(self) -> Batch:
        import torch

        if self._it is None:
            loader = torch.utils.data.DataLoader(
                self.dataset, batch_sampler=self._batch_sampler(self.batches), num_workers=self.cfg.workers,
                collate_fn=_collate, persistent_workers=self.cfg.workers > 0,
                prefetch_factor=4 if self.cfg.workers > 0 else None,
                pin_memory=self.device_id is not None,
            )
            self._it = iter(loader)
        batch = next(self._it)
        self.batches += 1
        if self.device_id is not None:
            batch.images = batch.images.to(f"cuda:{self.device_id}", non_blocking=True)
        return batch

    def state(self) -> dict:
        return {"torch": self.batches}


def make_loader(kind: str, shards, cfg: DataConfig, *, state: dict | None = None, **kwargs):
    """The loader the recipe names, resumed from ``state`` (what its ``state()`` returned) if given."""
    if kind == "dali":
        state = state or {}
        return DaliLoader(shards, cfg, checkpoint=state.get("dali"), skipped=state.get("skipped"), **kwargs)
    return TorchLoader(shards, cfg, checkpoint=(state or {}).get("torch"), **kwargs)


def eval_batches(val: list[tuple[str, str | None]], cfg: DataConfig, *, image_size: int, batch_size: int,
                 limit: int) -> Iterator[Batch]:
    """The first ``limit`` held-out samples, centre-cropped, in stored order (same on every rank)."""
    import torch

    samples = index_samples(val)[:limit]
    dataset = _TarDataset(samples, torch_transform(cfg, image_size, train=False))
    batches = [[(i, 0) for i in range(lo, min(lo + batch_size, len(samples)))]
               for lo in range(0, len(samples), batch_size)]
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=min(cfg.workers, 2),
                                           collate_fn=_collate)
