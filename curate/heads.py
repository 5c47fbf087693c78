"""Small scoring heads on CLIP embeddings (NSFW, watermark, aesthetics, any user head): file format,
loading, checking against the embedding model, batched scoring, and conversion of published heads.

The file format (``curate-head/1``), one head per file:

- **safetensors** (preferred): tensors ``layer0.weight`` [out, in], ``layer0.bias`` [out], ``layer1.*``,
  ... applied in order, and optionally ``input_mean`` / ``input_std`` [D] (a normalisation applied to the
  embedding first, as Keras/AutoKeras heads carry). The string metadata says what the head expects:

  =====================  ===================================================================
  ``format``             ``curate-head/1``
  ``embedding_model``    the open_clip model whose embeddings it was trained on (``ViT-L-14``)
  ``embedding_pretrained`` optional pretrained tag (``openai``); checked when both sides name one
  ``embedding_dim``      the embedding width (768 for ViT-L/14)
  ``input``              ``image`` or ``text``: which embedding column it reads
  ``activation``         between layers: ``relu``, ``gelu`` or ``none`` (the improved aesthetic MLP)
  ``output``             ``sigmoid`` (a probability), ``identity`` (a regression such as the
                         1-10 aesthetic score) or ``softmax:K`` (probability of class K)
  ``label``              what a high score means, for people (``nsfw``, ``aesthetic``)
  =====================  ===================================================================

- **torch**: ``torch.save({"format": "curate-head/1", "metadata": {...}, "tensors": {...}})`` with the
  same keys; read with ``torch.load(weights_only=True)``, so a file cannot run code.

Published heads are converted, not loaded raw (a bare state dict does not say which embedding it
wants): ``python -m curate.heads convert SRC OUT --embedding-model ViT-L-14 --embedding-dim 768 ...``
takes a torch state dict of ``nn.Linear`` layers (LAION's ``sa_0_4_vit_l_14_linear.pth`` aesthetic
head: keys ``weight``/``bias``; the improved aesthetic MLP: ``layers.N.weight``) or a ``.npz`` of
Keras Dense kernels (``kernel_0, bias_0, ...``, [in, out] as Keras stores them; plus optional
``mean``/``variance`` of a Normalization layer), which is how the AutoKeras NSFW detector's weights
come out of Keras. See README "Safety heads".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

FORMAT = "curate-head/1"
ACTIVATIONS = ("relu", "gelu", "none")
INPUTS = ("image", "text")
_OUTPUT_RE = re.compile(r"^(sigmoid|identity|softmax:\d+)$")


class HeadError(ValueError):
    """A head file that cannot be used; the message is one line naming the file."""


@dataclasses.dataclass(frozen=True)
class HeadMeta:
    embedding_model: str
    embedding_dim: int
    input: str = "image"
    activation: str = "relu"
    output: str = "sigmoid"
    label: str = ""
    embedding_pretrained: str | None = None

    def as_strings(self) -> dict[str, str]:
        out = {"format": FORMAT, "embedding_model": self.embedding_model, "embedding_dim": str(self.embedding_dim),
               "input": self.input, "activation": self.activation, "output": self.output, "label": self.label}
        if self.embedding_pretrained:
            out["embedding_pretrained"] = self.embedding_pretrained
        return out


@dataclasses.dataclass
class Head:
    """A loaded head: float32 weights [out, in] per layer, applied to float32 embeddings."""

    path: str
    meta: HeadMeta
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    mean: np.ndarray | None = None
    std: np.ndarray | None = None

    def score(self, emb: np.ndarray, device: str = "cpu") -> np.ndarray:
        """Scores (float32 [N]) of a batch of embeddings [N, D]; torch does the matmuls (BLAS / GPU)."""
        import torch

        x = torch.as_tensor(np.asarray(emb, dtype=np.float32), device=device)
        with torch.inference_mode():
            if self.mean is not None:
                x = (x - torch.as_tensor(self.mean, device=device)) / torch.as_tensor(self.std, device=device)
            last = len(self.weights) - 1
            for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
                x = torch.addmm(torch.as_tensor(b, device=device), x, torch.as_tensor(w, device=device).T)
                if i < last:
                    if self.meta.activation == "relu":
                        x = torch.relu(x)
                    elif self.meta.activation == "gelu":
                        x = torch.nn.functional.gelu(x)
            out = self.meta.output
            if out == "sigmoid":
                y = torch.sigmoid(x[:, 0])
            elif out == "identity":
                y = x[:, 0]
            else:
                y = torch.softmax(x, dim=1)[:, int(out.split(":")[1])]
        return y.float().cpu().numpy()


def _meta_from(raw: dict[str, str], path: str) -> HeadMeta:
    if raw.get("format") != FORMAT:
        raise HeadError(f"head {path}: not a {FORMAT} file (metadata format={raw.get('format')!r}); "
                        "convert it with `python -m curate.heads convert`")
    try:
        meta = HeadMeta(embedding_model=raw["embedding_model"], embedding_dim=int(raw["embedding_dim"]),
                        input=raw.get("input", "image"), activation=raw.get("activation", "relu"),
                        output=raw.get("output", "sigmoid"), label=raw.get("label", ""),
                        embedding_pretrained=raw.get("embedding_pretrained") or None)
    except (KeyError, ValueError) as e:
        raise HeadError(f"head {path}: bad or missing metadata {e}") from None
    if meta.input not in INPUTS:
        raise HeadError(f"head {path}: input must be one of {INPUTS}, got {meta.input!r}")
    if meta.activation not in ACTIVATIONS:
        raise HeadError(f"head {path}: activation must be one of {ACTIVATIONS}, got {meta.activation!r}")
    if not _OUTPUT_RE.match(meta.output):
        raise HeadError(f"head {path}: output must be sigmoid, identity or softmax:K, got {meta.output!r}")
    return meta


def _read_raw(path: str) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    import fsspec

    try:
        with fsspec.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise HeadError(f"head file not found: {path}; check the head's path (a converted curate-head/1 file)") from None
    except OSError as e:
        raise HeadError(f"head file {path} cannot be read: {e}") from None
    if path.endswith(".safetensors"):
        from safetensors.numpy import load

        try:
            tensors = load(data)
            # the header is 8 bytes of length, then JSON whose "__metadata__" holds the strings
            header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
            raw = dict(header.get("__metadata__") or {})
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file, said in one line
            raise HeadError(f"head {path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        return raw, {k: np.asarray(v, dtype=np.float32) for k, v in tensors.items()}
    import io

    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise HeadError(f"head {path}: not a readable torch file ({type(e).__name__})") from None
    if not (isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) and isinstance(obj.get("tensors"), dict)):
        raise HeadError(f"head {path}: a bare state dict says nothing about its embedding model; "
                        "convert it with `python -m curate.heads convert`")
    raw = {str(k): str(v) for k, v in obj["metadata"].items()}
    raw.setdefault("format", str(obj.get("format", "")))
    return raw, {k: v.detach().float().numpy() for k, v in obj["tensors"].items()}


def load_head(path: str) -> Head:
    """Read and validate a head file (see module docstring); every problem is one HeadError line."""
    raw, tensors = _read_raw(path)
    meta = _meta_from(raw, path)
    weights, biases = [], []
    i = 0
    while f"layer{i}.weight" in tensors:
        w = tensors[f"layer{i}.weight"]
        b = tensors.get(f"layer{i}.bias", np.zeros(w.shape[0], np.float32))
        if w.ndim != 2 or b.shape != (w.shape[0],):
            raise HeadError(f"head {path}: layer{i} has weight {w.shape} and bias {b.shape}")
        weights.append(np.ascontiguousarray(w))
        biases.append(np.ascontiguousarray(b))
        i += 1
    if not weights:
        raise HeadError(f"head {path}: no layer0.weight tensor")
    if weights[0].shape[1] != meta.embedding_dim:
        raise HeadError(f"head {path}: first layer takes {weights[0].shape[1]} inputs but the metadata says "
                        f"embedding_dim={meta.embedding_dim}")
    for j in range(1, len(weights)):
        if weights[j].shape[1] != weights[j - 1].shape[0]:
            raise HeadError(f"head {path}: layer{j} takes {weights[j].shape[1]} inputs, layer{j - 1} gives "
                            f"{weights[j - 1].shape[0]}")
    outs = weights[-1].shape[0]
    if meta.output.startswith("softmax:"):
        if int(meta.output.split(":")[1]) >= outs:
            raise HeadError(f"head {path}: output {meta.output} but the last layer has {outs} outputs")
    elif outs != 1:
        raise HeadError(f"head {path}: output {meta.output} needs one output, the last layer has {outs}")
    mean, std = tensors.get("input_mean"), tensors.get("input_std")
    if (mean is None) != (std is None) or (mean is not None and (mean.shape != (meta.embedding_dim,)
                                                                 or std.shape != (meta.embedding_dim,))):
        raise HeadError(f"head {path}: input_mean and input_std must both be [{meta.embedding_dim}]")
    return Head(path, meta, weights, biases, mean, std)


def model_key(model: str | None) -> str | None:
    """A comparable name for an embedding model: open_clip names as written, model directories by
    their last path component (a local directory moves between machines; its name is what it is)."""
    if not model:
        return None
    m = model.removeprefix("local-dir:").rstrip("/")
    if "/" in m and not m.startswith("hf-hub:"):
        return os.path.basename(m)
    return m


def check_head(head: Head, name: str, model: str | None, pretrained: str | None, dim: int | None) -> None:
    """Refuse a head for another embedding model or width (one HeadError line naming both sides)."""
    meta = head.meta
    if dim is not None and meta.embedding_dim != dim:
        raise HeadError(f"safety head {name!r} ({head.path}) takes {meta.embedding_dim}-d embeddings but the "
                        f"{meta.input} embeddings here are {dim}-d; use a head for this model")
    if model is not None and model_key(meta.embedding_model) != model_key(model):
        raise HeadError(f"safety head {name!r} ({head.path}) was trained on {meta.embedding_model} embeddings "
                        f"but the embeddings here come from {model}; use a head for this model")
    if pretrained and meta.embedding_pretrained and pretrained != meta.embedding_pretrained:
        raise HeadError(f"safety head {name!r} ({head.path}) expects {meta.embedding_model} "
                        f"pretrained={meta.embedding_pretrained}, the embeddings here are pretrained={pretrained}")


# -- writing and conversion -----------------------------------------------------------------------
def save_head(path: str, meta: HeadMeta, weights: Sequence[np.ndarray], biases: Sequence[np.ndarray],
              mean: np.ndarray | None = None, std: np.ndarray | None = None) -> str:
    """Write a head in the safetensors format; ``weights[i]`` is [out, in] (torch's nn.Linear layout)."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        tensors[f"layer{i}.weight"] = np.ascontiguousarray(w, dtype=np.float32)
        tensors[f"layer{i}.bias"] = np.ascontiguousarray(b, dtype=np.float32)
    if mean is not None and std is not None:
        tensors["input_mean"] = np.ascontiguousarray(mean, dtype=np.float32)
        tensors["input_std"] = np.ascontiguousarray(std, dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path.removesuffix(".safetensors") + ".tmp.safetensors"
    save_file(tensors, tmp, metadata=meta.as_strings())
    try:
        load_head(tmp)  # what we write must load: a bad head never appears under its final name
    except HeadError as e:
        os.remove(tmp)
        raise HeadError(str(e).replace(tmp, path)) from None
    os.replace(tmp, path)
    return path


def layers_from_state_dict(state: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Linear layers of a torch state dict in order: ``weight``/``bias`` (one nn.Linear) or
    ``<prefix>.N.weight`` (an nn.Sequential, dropout and activations hold no tensors)."""
    arrays = {k: np.asarray(v.float().numpy() if hasattr(v, "numpy") else v, dtype=np.float32)
              for k, v in state.items()}
    if "weight" in arrays:
        return [arrays["weight"]], [arrays.get("bias", np.zeros(arrays["weight"].shape[0], np.float32))]
    found = []
    for k in arrays:
        m = re.match(r"^(.*?)(\d+)\.weight$", k)
        if m and arrays[k].ndim == 2:
            found.append((int(m.group(2)), m.group(1), k))
    if not found:
        raise HeadError("no Linear layers (weight / N.weight keys) in the state dict")
    found.sort()
    ws = [arrays[k] for _, _, k in found]
    bs = [arrays.get(k[:-len("weight")] + "bias", np.zeros(arrays[k].shape[0], np.float32)) for _, _, k in found]
    return ws, bs


def layers_from_keras_npz(npz: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray],
                                                                 np.ndarray | None, np.ndarray | None]:
    """Dense layers saved as ``kernel_0, bias_0, ...`` ([in, out], Keras' layout) plus an optional
    Normalization layer's ``mean`` / ``variance``."""
    ws, bs, i = [], [], 0
    while f"kernel_{i}" in npz:
        ws.append(np.asarray(npz[f"kernel_{i}"], np.float32).T)
        bs.append(np.asarray(npz[f"bias_{i}"], np.float32))
        i += 1
    if not ws:
        raise HeadError("no kernel_0 array in the .npz")
    mean = std = None
    if "mean" in npz:
        mean = np.asarray(npz["mean"], np.float32).reshape(-1)
        std = np.sqrt(np.maximum(np.asarray(npz["variance"], np.float32).reshape(-1), 1e-12))
    return ws, bs, mean, std


def convert(src: str, out: str, meta: HeadMeta) -> str:
    """A published head (torch state dict ``.pth/.pt`` or Keras ``.npz``) -> a curate head file."""
    if src.endswith(".npz"):
        with np.load(src) as z:
            ws, bs, mean, std = layers_from_keras_npz({k: z[k] for k in z.files})
    else:
        import torch

        state = torch.load(src, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state:
            state = state["state_dict"]
        ws, bs = layers_from_state_dict(state)
        mean = std = None
    return save_head(out, meta, ws, bs, mean, std)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m curate.heads", description="curate safety heads")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert a published head to the curate-head/1 format")
    c.add_argument("src", help="torch state dict (.pth/.pt) or Keras Dense weights (.npz)")
    c.add_argument("out", help="output .safetensors file")
    c.add_argument("--embedding-model", required=True, help="open_clip model name, e.g. ViT-L-14")
    c.add_argument("--embedding-pretrained", default=None, help="e.g. openai")
    c.add_argument("--embedding-dim", type=int, required=True)
    c.add_argument("--input", choices=INPUTS, default="image")
    c.add_argument("--activation", choices=ACTIVATIONS, default="relu")
    c.add_argument("--output", default="sigmoid", help="sigmoid, identity or softmax:K")
    c.add_argument("--label", default="")
    s = sub.add_parser("show", help="print a head file's metadata and layer shapes")
    s.add_argument("path")
    args = p.parse_args(argv)
    try:
        if args.cmd == "convert":
            meta = HeadMeta(args.embedding_model, args.embedding_dim, args.input, args.activation, args.output,
                            args.label, args.embedding_pretrained)
            _meta_from(meta.as_strings(), args.out)
            convert(args.src, args.out, meta)
            sys.stdout.write(f"wrote {args.out}\n")
        else:
            h = load_head(args.path)
            info = {**h.meta.as_strings(), "layers": [list(w.shape) for w in h.weights],
                    "input_normalisation": h.mean is not None}
            sys.stdout.write(json.dumps(info, indent=1) + "\n")
    except HeadError as e:
        sys.stderr.write(f"curate.heads: error: {e}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
