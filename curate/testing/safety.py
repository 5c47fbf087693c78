"""Tiny safety models and reference sets for tests, benchmarks and the demo, built offline.

- ``write_head``: a random linear or MLP head in the ``curate-head/1`` safetensors format, loaded by
  the stage through ``curate.heads.load_head`` exactly like a converted LAION head.
- ``write_demo_heads``: ``nsfw`` / ``watermark`` (sigmoid) and ``aesthetic`` (a 1-10 style regression)
  heads sized for a tiny open_clip model directory.
- ``write_text_classifier``: a tiny randomly initialised ``BertForSequenceClassification`` with a
  WordPiece tokenizer trained on caption-like text, saved with ``save_pretrained`` (what any
  sequence-classification checkpoint directory looks like).
- ``write_reference_copies``: resized and recompressed JPEG copies of images (an evaluation set
  that a corpus may contain near-copies of).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from curate.heads import HeadMeta, save_head


def write_head(path: str | Path, dim: int, model: str, *, hidden: Sequence[int] = (), input: str = "image",
               activation: str = "relu", output: str = "sigmoid", label: str = "", seed: int = 0,
               pretrained: str | None = None, scale: float = 4.0, bias: float = 0.0) -> Path:
    """A random head ``dim -> hidden... -> 1`` (``scale`` spreads the scores of unit embeddings)."""
    rng = np.random.default_rng(seed)
    sizes = [dim, *hidden, 1]
    ws = [rng.normal(0, scale / np.sqrt(a), (b, a)).astype(np.float32) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    bs = [np.zeros(b, np.float32) for b in sizes[1:]]
    bs[-1][:] = bias
    meta = HeadMeta(embedding_model=model, embedding_dim=dim, input=input, activation=activation, output=output,
                    label=label, embedding_pretrained=pretrained)
    return Path(save_head(str(path), meta, ws, bs))


def tiny_clip_dim(model_dir: str | Path) -> int:
    with open(Path(model_dir) / "open_clip_config.json") as f:
        return int(json.load(f)["model_cfg"]["embed_dim"])


def write_demo_heads(out_dir: str | Path, model_dir: str | Path, model_name: str | None = None) -> dict[str, Path]:
    """nsfw, watermark and aesthetic heads for the tiny open_clip model at ``model_dir``."""
    out = Path(out_dir)
    dim = tiny_clip_dim(model_dir)
    model = model_name or str(model_dir)
    return {
        "nsfw": write_head(out / "nsfw.safetensors", dim, model, hidden=(16,), label="nsfw", seed=1),
        "watermark": write_head(out / "watermark.safetensors", dim, model, label="watermark", seed=2),
        "aesthetic": write_head(out / "aesthetic.safetensors", dim, model, hidden=(16, 8), activation="none",
                                output="identity", label="aesthetic", seed=3, scale=2.0, bias=5.0),
    }


def write_text_classifier(out_dir: str | Path, seed: int = 0, labels: Sequence[str] = ("safe", "unsafe"),
                          texts: Iterable[str] = ()) -> Path:
    """A tiny random BERT sequence classifier directory (config, weights, tokenizer)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    from curate.testing.tiny_vlms import _train_wordpiece, caption_corpus

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = _train_wordpiece(caption_corpus(texts), vocab_size=300)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=len(labels),
                        id2label=dict(enumerate(labels)), label2id={x: i for i, x in enumerate(labels)},
                        initializer_range=0.5)
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def reference_copy(data: bytes, scale: float = 0.7, quality: int = 75) -> bytes:
    """A resized (``scale``) and JPEG-recompressed copy of an image, over white where it had alpha."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    img = img.convert("RGB")
    w, h = img.size
    img = img.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_reference_copies(out_dir: str | Path, images: dict[str, bytes], scale: float = 0.7,
                           quality: int = 75) -> Path:
    """A folder of resized + recompressed copies, one ``<name>.jpg`` per image."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, data in images.items():
        (out / f"{Path(name).stem}.jpg").write_bytes(reference_copy(data, scale, quality))
    return out
