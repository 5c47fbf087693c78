"""Tiny randomly initialised open_clip models, built offline and saved the way a user's checkpoint is.

This machine cannot download weights, so tests, benchmarks and the demo write an open_clip model
config (a real ``VisionTransformer`` image tower and a real text ``Transformer``, at toy widths),
build the model with random weights and save it as an open_clip "local directory":
``open_clip_config.json`` (``model_cfg`` + ``preprocess_cfg``) beside ``open_clip_model.safetensors``.
That directory loads through ``open_clip.create_model_and_transforms("local-dir:DIR")`` exactly like
a checkpoint a user exported with ``open_clip.push_to_hf_hub``'s layout, and through curate's
``model: DIR`` setting. Scores from such a model are meaningless; the mechanics are real.

Only open_clip things live here (the VLM helpers are in ``tiny_vlms``).

Run ``python -m curate.testing.tiny_models OUT_DIR [--image-size 224]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# OpenAI CLIP normalisation, which every open_clip ViT preset uses unless its tag says otherwise.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_clip_config(
    image_size: int = 64,
    patch_size: int = 16,
    width: int = 64,
    layers: int = 2,
    embed_dim: int = 32,
    context_length: int = 16,
    interpolation: str = "bicubic",
) -> dict[str, Any]:
    """An ``open_clip_config.json`` body: a toy ViT + text transformer with the real tokenizer's vocab."""
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "patch_size": patch_size,
            "head_width": 32,
        },
        "text_cfg": {
            # The default open_clip tokenizer (CLIP BPE, 49408 tokens) so real captions tokenise.
            "context_length": context_length,
            "vocab_size": 49408,
            "width": width,
            "heads": max(1, width // 32),
            "layers": layers,
        },
    }
    preprocess_cfg = {
        "size": image_size,
        "mode": "RGB",
        "mean": list(OPENAI_MEAN),
        "std": list(OPENAI_STD),
        "interpolation": interpolation,
        "resize_mode": "shortest",
    }
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}


def write_tiny_clip(out_dir: str | Path, seed: int = 0, **config: Any) -> Path:
    """Build a tiny open_clip model with random weights and save it as a local model directory.

    Returns the directory; pass it as the clip stage's ``model`` (or ``local-dir:DIR`` to open_clip).
    Deterministic for a given seed and config.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    body = tiny_clip_config(**config)
    (out / "open_clip_config.json").write_text(json.dumps(body, indent=1) + "\n")
    torch.manual_seed(seed)
    # No weights in the directory yet: open_clip builds the architecture with its own random init.
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    log.info("wrote tiny open_clip model to %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    path = write_tiny_clip(args.out_dir, seed=args.seed, image_size=args.image_size, patch_size=args.patch_size)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
