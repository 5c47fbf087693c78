"""Training data: webdataset tars at any fsspec URL -> augmented image batches + captions + sample keys.

One pipeline, two decoders. Everything that decides *what* a batch holds is plain Python shared by both
loaders; only the pixel work differs:

1. ``Source``: the samples of one dataset (from the ``.idx`` files, read through fsspec) and the
   sample order. Each epoch is a seeded permutation of *blocks* (``data.shuffle_block`` consecutive
   samples of one shard, one ranged read each on object storage), then a seeded shuffle inside windows of
   ``data.shuffle_buffer`` positions. Position p of the endless stream is sample ``order(p // n)[p % n]``,
   computed window by window, so any position is reached without replaying the ones before it.
2. The global stream is cut into micro-batches of ``world x micro`` samples; rank r takes positions
   ``g*world*micro + r*micro + [0, micro)`` of global micro-batch g. The loader state is one number, the
   global position, so a run resumes exactly with any world size, and 1 rank x 16 sees the samples that
   2 ranks x 8 see.
3. ``fetch``: the bytes of a batch's samples with one ``cat_ranges`` call (concurrent ranged GETs on
   s3://, gs://, https://; seeks locally): nothing is copied to local disk.
4. ``augment_params``: crop box (torchvision's random-resized-crop rule), flip and colour jitter, drawn
   from a generator seeded by (seed, position): the same for both loaders and any world size.
5. Pixels: ``DaliLoader`` feeds bytes and parameters to DALI through ``external_source`` (decode of only
   the crop window, on the GPU with ``device="mixed"``); ``TorchLoader`` decodes with PIL in DataLoader
   workers. Both apply: crop -> bicubic (or bilinear) antialiased resize -> jitter -> flip -> normalise.
   Colour jitter (when drawn, probability p): brightness (scale), contrast (blend with the image's mean
   grey level), then saturation and hue as one 3x3 matrix on RGB (scale and rotate the chroma plane of
   YIQ), clamping to [0, 255] after each. The order is fixed; torchvision's ColorJitter randomises it and
   rotates hue in HSV, so our hue is close to, not equal to, torchvision's.

A sample whose image cannot be decoded is replaced by the next good sample of its micro-batch (a
duplicate pair), in both loaders, and its key is logged and kept in ``state()``. Batch sizes stay equal
on every rank, which the local contrastive loss needs.

Mixing several datasets plugs in at ``Source``: anything with ``__len__`` (samples per epoch) and
``samples_at(positions) -> list[Sample]`` feeds both loaders unchanged.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import logging
import math
import random
import tarfile
from collections.abc import Iterator

import numpy as np

from trainer.config import NORMALIZE, DataConfig

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
TEXT_EXT = "txt"
# The YIQ transform: Y is the luma that greyscale uses; I and Q span the chroma plane.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_LUMA = _YIQ[0]
_YIQ_INV = np.linalg.inv(_YIQ)


@dataclasses.dataclass(frozen=True)
class Sample:
    """Where one sample's image and caption bytes lie in its tar (a local path or an fsspec URL)."""

    key: str
    tar: str
    image: tuple[int, int]  # data offset, size
    text: tuple[int, int]


@dataclasses.dataclass
class Batch:
    images: object  # torch.Tensor [B, 3, S, S], float, normalised
    captions: list[str]
    keys: list[str]
    bad: list[str] = dataclasses.field(default_factory=list)  # "tar::key" replaced in this batch


@functools.lru_cache(maxsize=65536)
def _fs(url: str):
    """(filesystem, path) of a URL or local path; cached, as every sample of a shard asks for its tar's."""
    from curate.dataset import url_to_fs

    return url_to_fs(url)


def _join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}"


# ---------------------------------------------------------------- finding the shards


def _split_shards(fs, root: str, folder: str) -> dict[str, set[int]] | None:
    """Shard numbers per split as export records them (manifest ``splits``, else each shard's stats
    file), or None for a dataset without splits."""
    manifest = _join(root, "_manifest.json")
    if fs.isfile(manifest):
        splits = json.loads(fs.cat_file(manifest)).get("splits")
        if splits:
            return {name: {int(n) for n in info["shards"]} for name, info in splits.items()}
    found: dict[str, set[int]] = {}
    for stats in fs.glob(_join(folder, "*.stats.json")):
        split = json.loads(fs.cat_file(stats)).get("split")
        if split:
            found.setdefault(split, set()).add(int(stats.rsplit("/", 1)[-1].split(".", 1)[0]))
    return found or None


def find_shards(path: str, split: str | None = "train") -> list[tuple[str, str | None]]:
    """(tar, idx or None) for every shard of one split of a dataset directory (or its ``shards/``).

    ``path`` is a local path or any fsspec URL. The shard list comes from ``sizes.json`` (what export
    writes, as open_clip reads it, ``train-00000.tar`` or, from older exports, ``00000.tar``); without
    one, every ``*.tar`` in the folder. An export with a held-out
    split records which shards are ``train`` and which ``val``; a dataset without splits is all ``train``
    (``split=None``: every shard).
    """
    fs, root = _fs(str(path))
    folder = _join(root, "shards") if fs.isdir(_join(root, "shards")) else root
    sizes = _join(folder, "sizes.json")
    if fs.isfile(sizes):
        names = sorted(json.loads(fs.cat_file(sizes)))
    else:
        names = sorted(p.rsplit("/", 1)[-1] for p in fs.glob(_join(folder, "*.tar")))
    if split is not None:
        splits = _split_shards(fs, root, folder)
        if splits is None:
            names = names if split == "train" else []
        else:
            wanted = splits.get(split, set())
            names = [n for n in names if _shard_number(n) in wanted]
    if not names:
        if split not in (None, "train"):
            return []
        raise FileNotFoundError(f"no {split or ''} shards under {path} (no sizes.json entries and no *.tar)")
    listed = set(fs.ls(folder, detail=False))
    listed |= {p.rstrip("/") for p in listed}
    out = []
    for name in names:
        tar = _join(folder, name)
        if tar not in listed and not fs.isfile(tar):
            raise FileNotFoundError(f"{fs.unstrip_protocol(tar)} is listed in sizes.json but missing")
        idx = next((i for i in _idx_candidates(folder, name) if i in listed or fs.isfile(i)), None)
        url = tar if _local(fs) else fs.unstrip_protocol(tar)
        idx_url = None if idx is None else idx if _local(fs) else fs.unstrip_protocol(idx)
        out.append((url, idx_url))
    return out


def _shard_number(name: str) -> int:
    """The shard number in a tar's name: ``00041.tar``, or ``val-00041.tar`` where export names its
    tars by split."""
    return int(name.rsplit(".", 1)[0].rsplit("-", 1)[-1])


def _idx_candidates(folder: str, name: str) -> list[str]:
    """Where a tar's DALI index may be: beside it with its stem (``NAME.idx``, the wds2idx habit and
    exports made before tars were named by split), else under the shard number alone
    (``shards/00041.idx`` for ``val-00041.tar``)."""
    stem = name.rsplit(".", 1)[0]
    digits = stem.rsplit("-", 1)[-1]
    return [_join(folder, f"{s}.idx") for s in dict.fromkeys((stem, digits)) if s]


def _local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def find_val(data: str, val: str | None) -> list[tuple[str, str | None]] | None:
    """The held-out shards to evaluate on, or None (eval is then skipped).

    ``val`` given: that dataset's ``val`` split if it records one, else all its shards. Otherwise the
    training dataset's own ``val`` split (export's held-out shards), or a ``val/`` dataset inside it.
    """
    if val:
        return find_shards(val, "val") or find_shards(val, None)
    held_out = find_shards(data, "val")
    if held_out:
        return held_out
    fs, root = _fs(str(data))
    if fs.isdir(_join(root, "val")):
        return find_shards(_join(str(data), "val"), None)
    return None


def _parse_idx(text: str, tar: str) -> list[Sample] | None:
    """Samples from a DALI v1.2 index (``ext offset size name`` per member); None if it has no names."""
    lines = text.splitlines()
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
    fs, path = _fs(tar)
    groups: dict[str, dict[str, tuple[int, int]]] = {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f) as tf:
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


def index_samples(shards: list[tuple[str, str | None]]) -> list[list[Sample]]:
    """Every sample of each shard, in stored order, one list per shard."""
    out = []
    for tar, idx in shards:
        samples = None
        if idx:
            fs, path = _fs(idx)
            samples = _parse_idx(fs.cat_file(path).decode(), tar)
        if samples is None:
            log.warning("%s has no usable .idx: scanning its headers", tar)
            samples = _scan_tar(tar)
        out.append(samples)
    return out


# ---------------------------------------------------------------- order


class Source:
    """One dataset's samples and their per-epoch order (see the module docstring)."""

    def __init__(self, shards: list[tuple[str, str | None]], *, seed: int = 0, block: int = 64, window: int = 1024,
                 shuffle: bool = True):
        per_shard = index_samples(shards)
        self.samples = [s for group in per_shard for s in group]
        if not self.samples:
            raise ValueError("the dataset has no samples")
        self.seed, self.window, self.shuffle = seed, max(1, window), shuffle
        starts, lengths, offset = [], [], 0
        for group in per_shard:
            for lo in range(0, len(group), block):
                starts.append(offset + lo)
                lengths.append(min(block, len(group) - lo))
            offset += len(group)
        self._block_start, self._block_len = np.array(starts, np.int64), np.array(lengths, np.int64)
        self._epoch: tuple | None = None  # (epoch, block starts, cumulative ends, lengths)
        self._windows: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def _window(self, epoch: int, w: int) -> np.ndarray:
        """Sample indices at positions [w*window, (w+1)*window) of one epoch."""
        found = self._windows.get((epoch, w))
        if found is not None:
            return found
        n = len(self.samples)
        lo, hi = w * self.window, min((w + 1) * self.window, n)
        if not self.shuffle:
            return np.arange(lo, hi)
        current = self._epoch  # read once: the DALI loader's reader threads share this object
        if current is None or current[0] != epoch:
            perm = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self._block_start))
            lengths = self._block_len[perm]
            current = self._epoch = (epoch, self._block_start[perm], np.cumsum(lengths), lengths)
        _, starts, ends, lengths = current
        pos = np.arange(lo, hi)
        b = np.searchsorted(ends, pos, side="right")  # the block each position falls in
        idx = starts[b] + pos - (ends[b] - lengths[b])
        idx = idx[np.random.default_rng([self.seed, epoch, 1, w]).permutation(len(idx))]
        if len(self._windows) > 8:
            self._windows.clear()
        self._windows[(epoch, w)] = idx
        return idx

    def index_at(self, position: int) -> int:
        epoch, i = divmod(position, len(self.samples))
        return int(self._window(epoch, i // self.window)[i % self.window])

    def samples_at(self, positions) -> list[Sample]:
        return [self.samples[self.index_at(int(p))] for p in positions]


def micro_positions(g: int, rank: int, world: int, micro: int) -> range:
    """Stream positions of rank ``rank``'s share of global micro-batch ``g``."""
    start = g * world * micro + rank * micro
    return range(start, start + micro)


def fetch(samples: list[Sample]) -> list[tuple[memoryview, bytes]]:
    """(image bytes, caption bytes) per sample: one ranged read per sample, batched per filesystem."""
    by_fs: dict[int, tuple[object, list[int]]] = {}
    paths = []
    for i, s in enumerate(samples):
        fs, path = _fs(s.tar)
        by_fs.setdefault(id(fs), (fs, []))[1].append(i)
        paths.append(path)
    out: list[tuple[bytes, bytes] | None] = [None] * len(samples)
    for fs, items in by_fs.values():
        starts = [min(samples[i].image[0], samples[i].text[0]) for i in items]
        ends = [max(sum(samples[i].image), sum(samples[i].text)) for i in items]
        if _local(fs):  # fsspec would open the file once per range
            blobs = _read_local([paths[i] for i in items], starts, ends)
        else:
            blobs = fs.cat_ranges([paths[i] for i in items], starts, ends)
        for i, lo, blob in zip(items, starts, blobs, strict=True):
            if isinstance(blob, Exception):
                raise blob
            s, view = samples[i], memoryview(blob)  # slices without copying the image bytes
            out[i] = (view[s.image[0] - lo : sum(s.image) - lo], bytes(view[s.text[0] - lo : sum(s.text) - lo]))
    return out  # type: ignore[return-value]


def _read_local(paths: list[str], starts: list[int], ends: list[int]) -> list[bytes]:
    out: list[bytes] = [b""] * len(paths)
    by_path: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        by_path.setdefault(path, []).append(i)
    for path, items in by_path.items():
        with open(path, "rb") as f:
            for i in sorted(items, key=starts.__getitem__):
                f.seek(starts[i])
                out[i] = f.read(ends[i] - starts[i])
    return out


# ---------------------------------------------------------------- augmentation parameters


@dataclasses.dataclass(frozen=True)
class Aug:
    """One sample's augmentation: crop box in the decoded (EXIF-oriented) image, flip, jitter."""

    box: tuple[int, int, int, int]  # top, left, height, width
    flip: bool
    brightness: float = 1.0
    contrast: float = 1.0
    color: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # RGB 3x3


def image_size_of(data: bytes) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        orientation = im.getexif().get(0x0112, 1) if im.format in ("JPEG", "WEBP", "PNG") else 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def crop_box(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop rule: 10 tries at a random area and log-uniform aspect, then a
    centre crop clamped to the aspect range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif aspect > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def color_matrix(saturation: float, hue_turns: float) -> np.ndarray:
    """RGB -> RGB: scale the YIQ chroma plane by ``saturation`` and rotate it by ``hue_turns`` of a turn."""
    a = 2 * math.pi * hue_turns
    chroma = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    return _YIQ_INV @ np.diag([1.0, saturation, saturation]) @ chroma @ _YIQ


def augment_params(cfg: DataConfig, seed: int, position: int, size: tuple[int, int]) -> Aug:
    """Every random choice for the sample at ``position`` of the stream (same for both loaders)."""
    # Python's generator: seeding it is ~10x cheaper than numpy's SeedSequence, and this runs per sample.
    rng = random.Random((seed << 48) | (position & 0xFFFFFFFFFFFF))
    box = crop_box(rng, size[0], size[1], cfg.scale, cfg.ratio)
    flip = bool(cfg.flip and rng.random() < 0.5)  # drawn only when enabled: the draws after it shift
    cj = cfg.color_jitter
    if cj is None or rng.random() >= cj.p:
        return Aug(box=box, flip=flip)

    def factor(amount: float) -> float:
        return rng.uniform(max(0.0, 1 - amount), 1 + amount)

    b, c, s = factor(cj.brightness), factor(cj.contrast), factor(cj.saturation)
    m = color_matrix(s, rng.uniform(-cj.hue, cj.hue))
    return Aug(box=box, flip=flip, brightness=b, contrast=c, color=tuple(tuple(float(v) for v in r) for r in m))


def _is_bad(data: bytes) -> bool:
    """True when PIL cannot fully decode the image."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return False
    except Exception:
        return True


def _replace_bad(bad: list[bool], what: str) -> list[int]:
    """For each slot, the slot whose sample it uses: itself, or the next good one (cyclically)."""
    n = len(bad)
    if all(bad):
        raise ValueError(f"every image of a batch failed to decode: {what}; run `curate verify` on the dataset")
    return [i if not bad[i] else next((i + k) % n for k in range(1, n) if not bad[(i + k) % n]) for i in range(n)]


# ---------------------------------------------------------------- PyTorch (PIL) pixels


def _jitter_torch(x, aug: Aug):
    """The jitter on a float HWC tensor in [0, 255] (see the module docstring)."""
    import torch

    x = (x * aug.brightness).clamp_(0, 255)
    mean = float((x.mean(dim=(0, 1)) * torch.tensor(_LUMA, dtype=x.dtype)).sum())
    x = (mean + aug.contrast * (x - mean)).clamp_(0, 255)
    return (x @ torch.tensor(aug.color, dtype=x.dtype).T).clamp_(0, 255)


def torch_pixels(data: bytes, aug: Aug | None, cfg: DataConfig, image_size: int):
    """Decode and augment one image with PIL + torch; ``aug=None``: resize shorter side + centre crop."""
    import torch
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    resample = Image.BICUBIC if cfg.interpolation == "bicubic" else Image.BILINEAR
    if aug is None:
        from torchvision.transforms import functional as F

        image = F.center_crop(F.resize(image, image_size, interpolation=F.InterpolationMode(cfg.interpolation)),
                              image_size)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
    else:
        top, left, h, w = aug.box
        image = image.crop((left, top, left + w, top + h)).resize((image_size, image_size), resample)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())
        if cfg.color_jitter is not None:
            x = _jitter_torch(x, aug)
        if aug.flip:
            x = x.flip(1)
    mean, std = NORMALIZE[cfg.normalize]
    x = x.permute(2, 0, 1) / 255.0
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class _Batches:
    """Map-style dataset: global micro-batch g -> this rank's ``Batch`` (read, decode, augment)."""

    def __init__(self, source, cfg: DataConfig, *, image_size, micro, rank, world, seed, train):
        self.source, self.cfg, self.image_size = source, cfg, image_size
        self.micro, self.rank, self.world, self.seed, self.train = micro, rank, world, seed, train

    def positions(self, g: int) -> range:
        return micro_positions(g, self.rank, self.world, self.micro)

    def __getitem__(self, g: int) -> Batch:
        import torch

        positions = self.positions(g)
        samples = self.source.samples_at(positions)
        blobs = fetch(samples)
        pixels, bad = [], []
        for p, (image, _) in zip(positions, blobs, strict=True):
            try:
                aug = augment_params(self.cfg, self.seed, p, image_size_of(image)) if self.train else None
                pixels.append(torch_pixels(image, aug, self.cfg, self.image_size))
                bad.append(False)
            except Exception:
                pixels.append(None)
                bad.append(True)
        use = _replace_bad(bad, ", ".join(f"{s.tar}::{s.key}" for s in samples))
        return Batch(images=torch.stack([pixels[j] for j in use]),
                     captions=[blobs[j][1].decode("utf-8") for j in use], keys=[samples[j].key for j in use],
                     bad=[f"{s.tar}::{s.key}" for s, b in zip(samples, bad, strict=True) if b])


class TorchLoader:
    """Endless batches from a torch DataLoader (PIL decode in worker processes)."""

    def __init__(self, source, cfg: DataConfig, *, image_size: int, batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, train: bool = True, state: dict | None = None, device_id: int | None = None):
        self.batches = _Batches(source, cfg, image_size=image_size, micro=batch_size, rank=rank, world=world,
                                seed=seed, train=train)
        self.cfg, self.device_id, self.step = cfg, device_id, world * batch_size
        state = state or {}
        self.position = int(state.get("position", 0))
        self.bad: list[str] = list(state.get("bad", []))
        self._it = None

    def next(self) -> Batch:
        import itertools

        import torch

        if self._it is None:
            loader = torch.utils.data.DataLoader(
                self.batches, sampler=itertools.count(self.position // self.step), batch_size=None,
                num_workers=self.cfg.workers, persistent_workers=self.cfg.workers > 0,
                prefetch_factor=4 if self.cfg.workers > 0 else None, pin_memory=self.device_id is not None,
            )
            self._it = iter(loader)
        batch = next(self._it)
        self.position += self.step
        _note_bad(batch.bad, self.bad)
        if self.device_id is not None:
            batch.images = batch.images.to(f"cuda:{self.device_id}", non_blocking=True)
        return batch

    def state(self) -> dict:
        return {"position": self.position, "bad": list(self.bad)}


def _note_bad(found: list[str], known: list[str]) -> None:
    for entry in found:
        if entry not in known:
            known.append(entry)
            tar, key = entry.split("::", 1)
            log.error("cannot decode sample %s in %s: it is replaced by another sample of its batch", key, tar)


# ---------------------------------------------------------------- DALI pixels


class DaliLoader:
    """Endless batches decoded by DALI from bytes this loader reads (``external_source``).

    A thread pool reads the next batches ahead while DALI decodes. DALI stops its pipeline on an image
    it cannot decode: the loader then checks the in-flight batches with PIL, marks the broken samples,
    rebuilds the pipeline and feeds again from the batch it had not handed out, with each broken sample
    replaced as the torch loader replaces it.
    """

    def __init__(self, source, cfg: DataConfig, *, image_size: int, batch_size: int, rank: int = 0,
                 world: int = 1, seed: int = 0, device_id: int | None = None, train: bool = True,
                 state: dict | None = None, prefetch: int = 4):
        self.batches = _Batches(source, cfg, image_size=image_size, micro=batch_size, rank=rank, world=world,
                                seed=seed, train=train)
        self.cfg, self.device_id, self.image_size, self.train = cfg, device_id, image_size, train
        self.step, self.batch_size, self.prefetch = world * batch_size, batch_size, prefetch
        state = state or {}
        self.position = int(state.get("position", 0))
        self.bad: list[str] = list(state.get("bad", []))
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="trainer-read")
        self._build()

    def _build(self) -> None:
        self._next_g = self.position // self.step
        self._reads: collections.deque = collections.deque()
        self._fed: collections.deque = collections.deque()  # (samples, blobs, captions, keys) fed, not run
        self.pipe = _dali_pipeline(self, self.cfg, image_size=self.image_size, batch_size=self.batch_size,
                                   device_id=self.device_id, train=self.train)
        self.pipe.build()

    def _read(self, g: int):
        positions = self.batches.positions(g)
        samples = self.batches.source.samples_at(positions)
        return positions, samples, fetch(samples)

    def _feed(self):
        """DALI's external_source callback: the next batch's encoded images and augmentation inputs."""
        while len(self._reads) < self.prefetch:
            self._reads.append(self._pool.submit(self._read, self._next_g + len(self._reads)))
        positions, samples, blobs = self._reads.popleft().result()
        self._next_g += 1
        known = set(self.bad)
        bad, augs = [], []
        for p, s, (image, _) in zip(positions, samples, blobs, strict=True):
            aug = None
            if f"{s.tar}::{s.key}" not in known:
                try:
                    aug = augment_params(self.batches.cfg, self.batches.seed, p, image_size_of(image))
                except Exception:  # no readable header
                    _note_bad([f"{s.tar}::{s.key}"], self.bad)
            bad.append(aug is None)
            augs.append(aug)
        use = _replace_bad(bad, ", ".join(f"{s.tar}::{s.key}" for s in samples))
        self._fed.append(([samples[j] for j in use], [blobs[j] for j in use]))
        jpegs = [np.frombuffer(blobs[j][0], np.uint8) for j in use]
        if not self.train:
            return (jpegs,)
        chosen = [augs[j] for j in use]
        geometry = (jpegs, [np.array(a.box[:2], np.int32) for a in chosen],
                    [np.array(a.box[2:], np.int32) for a in chosen], [np.array(int(a.flip), np.int32) for a in chosen])
        if self.cfg.color_jitter is None:
            return geometry
        return (*geometry, [np.array([a.brightness], np.float32) for a in chosen],
                [np.array([a.contrast], np.float32) for a in chosen], [np.array(a.color, np.float32) for a in chosen])

    def next(self) -> Batch:
        try:
            (images,) = self.pipe.run()
        except RuntimeError:
            found = [f"{s.tar}::{s.key}" for samples, blobs in self._fed for s, (image, _) in zip(samples, blobs, strict=True)
                     if _is_bad(image)]
            if not found:
                raise
            _note_bad(found, self.bad)
            del self.pipe
            for future in self._reads:
                future.cancel()
            self._build()
            return self.next()
        samples, blobs = self._fed.popleft()
        self.position += self.step
        return Batch(images=_dali_to_torch(images, self.device_id), captions=[b[1].decode("utf-8") for b in blobs],
                     keys=[s.key for s in samples])

    def state(self) -> dict:
        return {"position": self.position, "bad": list(self.bad)}


def _dali_pipeline(loader: DaliLoader, cfg: DataConfig, *, image_size, batch_size, device_id, train):
    import nvidia.dali.math as dmath
    from nvidia.dali import fn, pipeline_def, types

    mean, std = NORMALIZE[cfg.normalize]
    interp = types.INTERP_CUBIC if cfg.interpolation == "bicubic" else types.INTERP_LINEAR
    decode_device = "mixed" if device_id is not None else "cpu"

    def on_device(node):
        return node.gpu() if device_id is not None else node

    @pipeline_def
    def pipeline():
        if not train:
            (jpegs,) = fn.external_source(source=loader._feed, num_outputs=1, batch=True)
            images = fn.decoders.image(jpegs, device=decode_device, output_type=types.RGB)
            images = fn.resize(images, resize_shorter=image_size, interp_type=interp, antialias=True)
            return fn.crop_mirror_normalize(images, crop=(image_size, image_size), dtype=types.FLOAT,
                                            output_layout="CHW", mean=[m * 255 for m in mean], std=[s * 255 for s in std])
        jitter = cfg.color_jitter is not None
        jpegs, anchor, shape, flip, *colour = fn.external_source(source=loader._feed, num_outputs=7 if jitter else 4,
                                                                 batch=True)
        # Only the crop window is decoded.
        images = fn.decoders.image_slice(jpegs, anchor, shape, device=decode_device, output_type=types.RGB,
                                         axis_names="HW", normalized_anchor=False, normalized_shape=False)
        images = fn.resize(images, size=[image_size, image_size], interp_type=interp, antialias=True)
        images = fn.cast(images, dtype=types.FLOAT)
        if jitter:
            bright, contrast, color = colour
            images = dmath.clamp(images * on_device(bright), 0.0, 255.0)
            grey = fn.coord_transform(fn.reshape(fn.reductions.mean(images, axes=[0, 1]), shape=[1, 3]), M=list(_LUMA))
            grey = fn.reshape(grey, shape=[1])
            images = dmath.clamp(grey + on_device(contrast) * (images - grey), 0.0, 255.0)
            images = dmath.clamp(fn.coord_transform(images, M=color), 0.0, 255.0)
        return fn.crop_mirror_normalize(images, mirror=flip, dtype=types.FLOAT, output_layout="CHW",
                                        mean=[m * 255 for m in mean], std=[s * 255 for s in std])

    return pipeline(batch_size=batch_size, num_threads=max(1, cfg.workers), device_id=device_id,
                    prefetch_queue_depth=2)


def _dali_to_torch(tensor_list, device_id):
    import torch

    if device_id is None:
        return torch.from_numpy(tensor_list.as_array())
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensor_list.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.float32, device=f"cuda:{device_id}")
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device_id))
    return out


# ---------------------------------------------------------------- entry points


def make_source(shards: list[tuple[str, str | None]], cfg: DataConfig, seed: int, train: bool = True) -> Source:
    return Source(shards, seed=seed, block=cfg.shuffle_block, window=cfg.shuffle_buffer, shuffle=train)


def make_loader(kind: str, source, cfg: DataConfig, *, state: dict | None = None, **kwargs):
    """The loader the recipe names over ``source``, resumed from ``state`` (what ``state()`` returned)."""
    cls = DaliLoader if kind == "dali" else TorchLoader
    return cls(source, cfg, state=state, **kwargs)


def eval_batches(val: list[tuple[str, str | None]], cfg: DataConfig, *, image_size: int, batch_size: int,
                 limit: int) -> Iterator[Batch]:
    """The first ``limit`` held-out samples, centre-cropped, in stored order (same on every rank)."""
    source = Source(val, shuffle=False)
    batches = _Batches(source, cfg, image_size=image_size, micro=batch_size, rank=0, world=1, seed=0, train=False)
    n = min(limit, len(source))
    for g in range(math.ceil(n / batch_size)):
        batch = batches[g]
        keep = min(batch_size, n - g * batch_size)
        yield Batch(images=batch.images[:keep], captions=batch.captions[:keep], keys=batch.keys[:keep])
