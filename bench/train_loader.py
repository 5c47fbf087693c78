"""Training data loading: the trainer's DALI pipeline vs a PyTorch DataLoader (PIL + torchvision).

Both read the same webdataset tars (real ~800 px JPEG photos from ``bench/assets.photos()``, packed
with ``curate.wds.TarWriter`` + DALI ``.idx``) and apply the same augmentations (recipe (a)'s: random
resized crop with scale (0.9, 1.0), bicubic resize to 224, horizontal flip, colour jitter with p=0.8,
CLIP normalisation), producing float CHW batches:

- ours: ``trainer.data.DaliLoader``: bytes read by ranged reads over the ``.idx`` offsets and fed through
  ``external_source``, CPU decode of only the crop window (``decoders.image_slice``), ``--threads`` DALI
  threads (no GPU here).
- baseline: ``trainer.data.TorchLoader``: ``torch.utils.data.DataLoader`` with ``--threads`` worker
  processes, PIL decode of the whole image, torchvision transforms.

Each is timed over ``--images`` images after one warm-up batch, best of ``--repeats`` interleaved runs
(background load on this shared machine hits both alike), torch intra-op threads set to 1.

On a GPU machine it also trains ViT-B-32 at full size (random init, bf16 autocast, AdamW) fed by DALI
with ``device="mixed"`` (nvJPEG decode) vs the DataLoader, and reports samples/s and the fraction of
step time spent waiting for data.

Last line: ``ratio: X.XX`` = DALI images/s / DataLoader images/s (CPU loaders; on a GPU machine the
training samples/s ratio).

Run: ``.venv/bin/python bench/train_loader.py [--images 1024] [--batch 64] [--threads 2] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench import assets  # noqa: E402
from curate.wds import TarWriter  # noqa: E402
from trainer.config import ColorJitter, DataConfig  # noqa: E402
from trainer.data import DaliLoader, TorchLoader, find_shards, make_source  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache" / "train_loader"


def build_tars(n: int, per_shard: int = 256) -> Path:
    """Pack ``n`` real photos into webdataset tars with DALI indexes (cached)."""
    root = CACHE / f"photos-{n}"
    shards = root / "shards"
    if (shards / "sizes.json").is_file():
        return root
    photos = assets.photos(n=n, max_side=800)
    shards.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for s, lo in enumerate(range(0, len(photos), per_shard)):
        name = f"{s:05d}"
        with open(shards / f"{name}.tar", "wb") as f:
            w = TarWriter(f)
            for i, path in enumerate(photos[lo : lo + per_shard]):
                w.add(f"{name}{i:04d}", {"jpg": path.read_bytes(), "txt": f"a photo, {path.stem}"})
            w.close()
        (shards / f"{name}.idx").write_text(w.index_text())
        sizes[f"{name}.tar"] = len(w)
    (shards / "sizes.json").write_text(json.dumps(sizes))
    return root


def recipe_a_augment(threads: int) -> DataConfig:
    return DataConfig(scale=(0.9, 1.0), flip=True, interpolation="bicubic", normalize="clip", workers=threads,
                      color_jitter=ColorJitter(p=0.8, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1))


def time_loader(make, images: int, batch: int) -> float:
    """Images/s of a fresh loader over ``images`` images, after one warm-up batch."""
    loader = make()
    loader.next()
    done, t0 = 0, time.perf_counter()
    while done < images:
        b = loader.next()
        done += len(b.keys)
    elapsed = time.perf_counter() - t0
    del loader
    return done / elapsed


def gpu_training(shards, cfg: DataConfig, batch: int, steps: int) -> dict[str, dict[str, float]]:
    """ViT-B-32 training steps fed by each loader: samples/s and the share of time spent waiting on data."""
    from trainer import train as T
    from trainer.config import load_recipe

    device = torch.device("cuda:0")
    recipe = load_recipe(None, ["model.name=ViT-B-32", f"train.global_batch={batch}"])
    tok = T.Tokenizer(recipe.tokenizer)
    results = {}
    for name, cls in (("dali_mixed", DaliLoader), ("dataloader", TorchLoader)):
        torch.manual_seed(0)
        model = T.build_model(recipe, T.model_config(recipe, tok.info), device)
        opt = T.make_optimizer(model, recipe)
        cfg_model = T.model_config(recipe, tok.info)
        loss_fn = T.make_loss(recipe, T.Dist(device=device), cfg_model, tok.pad_id)
        loader = cls(make_source(shards, cfg, seed=0), cfg, image_size=224, batch_size=batch, seed=0, device_id=0)

        def autocast():
            return torch.autocast("cuda", dtype=torch.bfloat16)

        wait = 0.0
        for step in range(steps + 3):
            if step == 3:  # warm-up (cuDNN autotune, DALI buffers, worker start)
                torch.cuda.synchronize()
                t0, wait = time.perf_counter(), 0.0
            tw = time.perf_counter()
            b = loader.next()
            texts = tok(b.captions).to(device, non_blocking=True)
            wait += time.perf_counter() - tw
            opt.zero_grad(set_to_none=True)
            T.train_step(model, loss_fn, [(b.images.to(device), texts)], autocast)
            opt.step()
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        results[name] = {"samples_per_s": steps * batch / elapsed, "data_wait_frac": wait / elapsed}
        del loader, model, opt
        with contextlib.suppress(Exception):
            torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=int, default=1024, help="distinct photos packed into the tars")
    p.add_argument("--images", type=int, default=1024, help="images timed per run")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="DALI threads / DataLoader worker processes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--gpu-steps", type=int, default=30)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    root = build_tars(args.photos)
    shards = find_shards(str(root))
    cfg = recipe_a_augment(args.threads)
    source = make_source(shards, cfg, seed=0)
    print(f"data: {args.photos} real JPEG photos (~800 px) in {len(shards)} tars under {root}")
    print(f"augment: random resized crop scale (0.9, 1.0) -> 224 bicubic, flip, colour jitter p=0.8, CLIP norm; "
          f"batch {args.batch}, {args.threads} threads/workers, {args.images} images per run")

    def dali():
        return DaliLoader(source, cfg, image_size=224, batch_size=args.batch, seed=0)

    def dataloader():
        return TorchLoader(source, cfg, image_size=224, batch_size=args.batch, seed=0)

    best = {"dali": 0.0, "dataloader": 0.0}
    for r in range(args.repeats):
        for name, make in (("dali", dali), ("dataloader", dataloader)):
            rate = time_loader(make, args.images, args.batch)
            best[name] = max(best[name], rate)
            print(f"run {r + 1} {name:>10}: {rate:7.1f} images/s")
    ratio = best["dali"] / best["dataloader"]
    print(f"CPU, best of {args.repeats}: DALI {best['dali']:.1f} images/s, "
          f"DataLoader (PIL + torchvision) {best['dataloader']:.1f} images/s")

    if torch.cuda.is_available():
        gpu = gpu_training(shards, cfg.model_copy(update={"workers": 8}), batch=256, steps=args.gpu_steps)
        for name, row in gpu.items():
            print(f"GPU ViT-B-32 training fed by {name}: {row['samples_per_s']:.1f} samples/s, "
                  f"waiting on data {100 * row['data_wait_frac']:.0f}% of the time")
        ratio = gpu["dali_mixed"]["samples_per_s"] / gpu["dataloader"]["samples_per_s"]
    else:
        print("no CUDA device: GPU variant (DALI mixed decode feeding ViT-B-32) skipped")
    print(f"ratio: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
