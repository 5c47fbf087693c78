"""Recaption throughput: batched generation vs one image at a time, same model, same images, same run.

What is timed is what the recaption stage does per batch: decode the encoded images (draft-decoded
JPEGs, transparency matted), run the processor, ``generate`` (greedy), decode the tokens. Reported:
images/s and generated tokens/s (tokens before the end token, summed over rows).

- CPU (always): the tiny random BLIP of ``curate.testing.tiny_vlms`` (the demo's model) and the tiny
  LLaVA, batch sizes 1 (the baseline: one image per ``generate`` call, one after another) and a sweep.
- GPU (only when CUDA is available): BLIP-base architecture at its real size with random weights, in
  bf16, batch sweep, same baseline. Random weights rarely emit the end token, so every row runs to
  ``max_new_tokens``: the figures are per generated token, which is what decides throughput.

The last line is ``ratio: X.XX`` = best batched images/s / batch-size-1 images/s for the tiny BLIP on
CPU (the GPU BLIP-base ratio is printed above it when measured). With ~70k-parameter models the CPU
speed-up is mostly per-call overhead amortised over the batch (processor, ``generate``'s per-step
Python loop), not arithmetic; the GPU BLIP-base sweep is the one that measures a real model.

Run: ``.venv/bin/python bench/recaption.py [--images 64] [--threads 1]``
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from curate.models.vlm import VLM, GenerationSettings  # noqa: E402
from curate.stages.recaption import decode_image, input_side  # noqa: E402
from curate.testing.tiny_vlms import build  # noqa: E402


def load_images(n: int) -> tuple[list[bytes], str]:
    """Real JPEG photos from bench/assets.py when they can be had, else synthetic JPEGs."""
    try:
        from bench.assets import photos

        paths = photos(n=n, max_side=800)
        return [p.read_bytes() for p in paths[:n]], f"{n} real JPEG photos (bench/assets.py, <= 800 px)"
    except Exception as e:  # noqa: BLE001 - no Debian packages here: fall back, and say so
        rng = np.random.default_rng(0)
        out = []
        for i in range(n):
            w, h = 640 - 8 * (i % 10), 480 + 6 * (i % 7)
            base = rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)
            img = Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            out.append(buf.getvalue())
        return out, f"{n} synthetic 640x480 JPEGs (photos unavailable: {type(e).__name__})"


def run(vlm: VLM, blobs: list[bytes], batch_size: int) -> dict:
    side = input_side(vlm.processor, vlm.family.name)
    prompts = [vlm.prompt()] * len(blobs)
    tokens = 0
    start = time.perf_counter()
    for batch in vlm.plan_batches(prompts, batch_size):
        images = [decode_image(blobs[i], side, True, 10**9) for i in batch]
        for g in vlm.generate(images, [prompts[i] for i in batch]):
            tokens += g.num_tokens
    if vlm.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"batch": batch_size, "seconds": seconds, "images_s": len(blobs) / seconds, "tokens_s": tokens / seconds,
            "tokens": tokens}


def sweep(title: str, vlm: VLM, blobs: list[bytes], sizes: list[int]) -> float:
    run(vlm, blobs[: min(4, len(blobs))], min(4, len(blobs)))  # warm-up: allocator, kernels, caches
    print(f"\n{title}")
    print(f"{'batch':>12} {'seconds':>8} {'images/s':>9} {'tokens/s':>9} {'tokens':>7}")
    results = []
    for bs in [1, *sizes]:
        r = run(vlm, blobs, bs)
        results.append(r)
        label = "1 (baseline)" if bs == 1 else str(bs)
        print(f"{label:>12} {r['seconds']:8.2f} {r['images_s']:9.2f} {r['tokens_s']:9.1f} {r['tokens']:7d}")
    best = max(results[1:], key=lambda r: r["images_s"])
    ratio = best["images_s"] / results[0]["images_s"]
    print(f"best batched: batch {best['batch']}, {best['images_s']:.2f} images/s = {ratio:.2f}x batch-1 "
          f"one-at-a-time ({results[0]['images_s']:.2f} images/s)")
    return ratio


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: equal footing for both on a shared 2-core machine)")
    p.add_argument("--sizes", default="4,8,16,32")
    p.add_argument("--gpu-images", type=int, default=256)
    p.add_argument("--gpu-sizes", default="8,32,64,128")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    blobs, what = load_images(args.images)
    sizes = [int(s) for s in args.sizes.split(",")]
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
    print(f"recaption bench: {what}; greedy, max_new_tokens={args.max_new_tokens}; "
          f"CPU torch threads={args.threads}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        ratios = {}
        for arch in ("llava", "blip"):
            path = build(arch, Path(tmp) / arch)
            vlm = VLM(str(path), device="cpu", settings=settings).load()
            ratios[arch] = sweep(f"CPU, tiny random {arch} ({vlm.model.num_parameters():,} parameters, fp32)",
                                 vlm, blobs, sizes)
        if torch.cuda.is_available():
            path = build("blip-base", Path(tmp) / "blip-base")
            vlm = VLM(str(path), device="cuda", settings=settings).load()
            gpu_blobs = (blobs * (args.gpu_images // len(blobs) + 1))[: args.gpu_images]
            name = torch.cuda.get_device_name(0)
            gpu_ratio = sweep(f"GPU {name}, BLIP-base architecture, random weights "
                              f"({vlm.model.num_parameters():,} parameters, {vlm.dtype})",
                              vlm, gpu_blobs, [int(s) for s in args.gpu_sizes.split(",")])
            print(f"GPU BLIP-base ratio (best batched / batch 1): {gpu_ratio:.2f}")
        else:
            print("\nGPU: no CUDA device here; the BLIP-base bf16 sweep was not run")
    print(f"tiny llava CPU ratio (best batched / batch 1): {ratios['llava']:.2f}")
    print(f"ratio: {ratios['blip']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
