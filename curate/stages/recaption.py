"""recaption: a vision-language model writes a new caption for every image (ARCHITECTURE §4).

Runs as an actor pool holding the model (``uses_model``); one call per shard, so a killed run redoes
only the shards that were not committed. Per shard, rows are batched (:meth:`VLM.plan_batches`:
padding-safe order); per batch, the image bytes behind the rows' pointers are read (one open per tar,
offset order, no re-download), decoded once, and generated for, so memory holds one batch of
images whatever the shard size. The output is cleaned (:mod:`curate.captions`) and written to
``recaption``; the original ``caption`` is never touched. With ``clip_model`` set, ``recaption_clip_score`` is the CLIP cosine of
the image and the new caption, comparable with the ``clip_score`` of the original.

Reasons: ``recaption:missing_image`` (pointer unreadable), ``recaption:undecodable`` (bytes that
are not an image; the rest of the batch goes on), ``recaption:empty`` / ``recaption:degenerate``
(nothing usable generated), ``recaption:out_of_memory`` (a single image that does not fit after a
batch was split in halves on OOM). With ``on_bad: flag``, empty and degenerate outputs keep the row,
leave ``recaption`` null (export then uses the original caption) and say why in ``recaption_flag``.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate import schema
from curate.captions import Cleaned, CleaningRules, clean
from curate.dataset import Dataset, read_images
from curate.stage import ShardContext, Stage, StageConfig

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

NAME = "recaption"
MISSING = "missing_image"
UNDECODABLE = "undecodable"
EMPTY = "empty"
DEGENERATE = "degenerate"
OUT_OF_MEMORY = "out_of_memory"


class RecaptionConfig(StageConfig):
    # hub id (e.g. Salesforce/blip-image-captioning-large, llava-hf/llava-1.5-7b-hf) or local directory
    model: str
    revision: str | None = None
    family: Literal["auto", "blip", "blip2", "llava", "qwen_vl", "idefics"] = "auto"
    # Instruction given to the model (None: the family's default). "{caption}" is replaced by the
    # row's original caption, e.g. "Improve this caption: {caption}".
    prompt: str | None = None
    # Whole prompt layout, overriding the chat template; "{instruction}" is replaced.
    template: str | None = None
    decoding: Literal["greedy", "beam", "sampling"] = "greedy"
    max_new_tokens: int = Field(48, ge=1, le=2048)
    num_beams: int = Field(3, ge=2)
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    repetition_penalty: float = Field(1.0, gt=0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    seed: int = 0
    batch_size: int = Field(16, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # vLLM only when asked for: being installed is not consent to its memory policy (it takes 90% of the
    # GPU), and it has no no_repeat_ngram_size. Not for BLIP-1 or beam search.
    engine: Literal["transformers", "vllm"] = "transformers"
    # Decode JPEGs at 1/2..1/8 scale (DCT domain) when still at least model-input sized.
    fast_decode: bool = True
    max_pixels: int = Field(100_000_000, ge=1)
    # cleaning
    strip_boilerplate: bool = True
    min_words: int = Field(2, ge=1)
    max_words: int = Field(60, ge=1)
    max_chars: int = Field(400, ge=8)
    max_repeat_fraction: float = Field(0.5, gt=0, le=1)
    on_bad: Literal["reject", "flag"] = "reject"
    # scoring the new caption with open_clip (same model as the clip stage for comparable scores)
    clip_model: str | None = None
    clip_pretrained: str | None = None
    clip_batch_size: int = Field(64, ge=1)

    @model_validator(mode="after")
    def _check(self) -> RecaptionConfig:
        if self.template is not None and "{instruction}" not in self.template:
            raise ValueError("template must contain {instruction}")
        if self.clip_pretrained is not None and self.clip_model is None:
            raise ValueError("clip_pretrained needs clip_model")
        if self.engine == "vllm" and self.no_repeat_ngram_size:
            raise ValueError("engine vllm has no no_repeat_ngram_size; set it to 0 or use engine: transformers")
        if self.engine == "vllm" and 0 < self.resources.num_gpus < 1:
            raise ValueError("engine vllm takes a whole GPU per actor (it reserves 90% of the device's memory); "
                             "set resources.num_gpus to 1 or more, or use engine: transformers")
        return self

    def cleaning(self) -> CleaningRules:
        return CleaningRules(
            strip_boilerplate=self.strip_boilerplate,
            min_words=self.min_words,
            max_words=self.max_words,
            max_chars=self.max_chars,
            max_repeat_fraction=self.max_repeat_fraction,
        )


def decode_image(data: bytes, min_side: int, fast: bool, max_pixels: int) -> Image.Image:
    """RGB image from encoded bytes; raises on anything that is not a decodable image.

    The pixel count is checked from the header before decoding (bombs). Transparent images are
    matted on white, not black: clip art is mostly transparent, and a black background changes
    what a captioning model sees."""
    from PIL import Image, ImageOps

    from curate.images import open_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = open_image(data, max_pixels)  # allowlisted format, pixels checked from the header
        if fast and img.format == "JPEG" and min_side > 0:
            img.draft("RGB", (min_side, min_side))
        img = ImageOps.exif_transpose(img)
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            img = img.convert("RGBA")
            background = Image.new("RGBA", img.size, (255, 255, 255, 255))
            img = Image.alpha_composite(background, img)
        return img.convert("RGB")


def input_side(processor: Any, family: str = "") -> int:
    """The side the model's image processor resizes to, so draft decoding never goes below it."""
    ip = getattr(processor, "image_processor", None)

    def get(size: Any, key: str) -> Any:  # transformers 5 SizeDict or a plain dict
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    size = getattr(ip, "size", None)
    if family == "qwen_vl":
        # dynamic resolution: shortest/longest_edge are pixel budgets; a square of the largest
        # budget is at least what the processor keeps
        budget = get(size, "longest_edge") or get(size, "max_pixels") or getattr(ip, "max_pixels", None)
        return int(budget**0.5) + 1 if budget else 1024
    sides = [
        v for s in (getattr(ip, "crop_size", None), size) if s is not None
        for v in (get(s, k) for k in ("height", "width", "shortest_edge", "longest_edge")) if isinstance(v, int)
    ]
    # Unknown layout: keep a generous side so tiling processors still see detail.
    return max(sides) if sides else 1024


class RecaptionStage(Stage):
    name = NAME
    Config = RecaptionConfig
    uses_model = True

    def __init__(self, config: RecaptionConfig):
        super().__init__(config)
        self.vlm = None
        self.scorer = None

    def model_device(self, phase: str) -> str | None:
        return self.config.device if phase == "apply" else None

    def models(self) -> list[tuple[str, str, str | None]]:
        c = self.config
        out: list[tuple[str, str, str | None]] = [("transformers", c.model, c.revision)]
        return out + ([("open_clip", c.clip_model, c.clip_pretrained)] if c.clip_model else [])

    def columns_after(self, columns: set[str]) -> set[str]:
        added = {schema.RECAPTION} | ({schema.RECAPTION_CLIP_SCORE} if self.config.clip_model else set())
        return columns | added

    def setup(self) -> None:
        from curate.models.vlm import VLM, GenerationSettings

        c = self.config
        settings = GenerationSettings(
            decoding=c.decoding, max_new_tokens=c.max_new_tokens, num_beams=c.num_beams,
            temperature=c.temperature, top_p=c.top_p, top_k=c.top_k,
            repetition_penalty=c.repetition_penalty, no_repeat_ngram_size=c.no_repeat_ngram_size, seed=c.seed,
        )
        self.vlm = VLM(
            c.model, revision=c.revision, family=c.family, instruction=c.prompt, template=c.template,
            device=c.device, dtype=c.dtype, engine=c.engine, settings=settings,
        ).load()
        self.min_side = input_side(self.vlm.processor, self.vlm.family.name)
        if c.clip_model is not None:
            self.scorer = _clip_scorer(c)

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        if self.vlm is None:
            self.setup()
        c = self.config
        n = table.num_rows
        captions = (
            table.column(schema.CAPTION).to_pylist() if schema.CAPTION in table.column_names else [None] * n
        )
        reasons: list[str | None] = [None] * n
        recaptions: list[str | None] = [None] * n
        flags: list[str | None] = [None] * n
        scores: list[float | None] = [None] * n
        # One prompt for all rows unless it embeds the row's caption (chat templates are not free).
        if "{caption}" in self.vlm.instruction:
            prompts = [self.vlm.prompt(cap) for cap in captions]
        else:
            prompts = [self.vlm.prompt()] * n
        rules = c.cleaning()
        tokens = images_done = 0
        read_s = decode_s = generate_s = 0.0
        for batch in self.vlm.plan_batches(prompts, c.batch_size):
            # Bytes are read per batch (one open of the tar, offset order): memory holds one batch
            # of encoded and decoded images, whatever the shard size.
            t = time.perf_counter()
            blobs = dict(zip(batch, read_images(table.take(batch), ctx.input), strict=True))
            read_s += time.perf_counter() - t
            t = time.perf_counter()
            rows, images = [], []
            for i in batch:
                if blobs[i] is None:
                    reasons[i] = schema.reason(NAME, MISSING)
                    continue
                try:
                    images.append(decode_image(blobs[i], self.min_side, c.fast_decode, c.max_pixels))
                except Exception as e:  # noqa: BLE001 - any decoder failure is this row's, not the batch's
                    log.debug("row %d: undecodable image: %s", i, e)
                    reasons[i] = schema.reason(NAME, UNDECODABLE)
                    continue
                rows.append(i)
            decode_s += time.perf_counter() - t
            t = time.perf_counter()
            generations = self._generate(images, [prompts[i] for i in rows])
            generate_s += time.perf_counter() - t
            echoes = self.vlm.echoes([captions[i] for i in rows])
            for i, gen in zip(rows, generations, strict=True):
                if gen is None:
                    reasons[i] = schema.reason(NAME, OUT_OF_MEMORY)
                    continue
                tokens += gen.num_tokens
                images_done += 1
                result = clean(_strip_wordpiece(gen.text), rules, echoes, finished=gen.finished)
                self._record(i, result, reasons, recaptions, flags)
            if self.scorer is not None:
                t = time.perf_counter()
                keep = [i for i in rows if recaptions[i] is not None]
                if keep:
                    got = self.scorer([blobs[i] for i in keep], [recaptions[i] for i in keep])
                    for i, s in zip(keep, got, strict=True):
                        scores[i] = s
                ctx.add_time("clip", time.perf_counter() - t)
            del images, blobs
        ctx.add_time("read", read_s)
        ctx.add_time("decode", decode_s)
        ctx.add_time("generate", generate_s)
        ctx.stats[NAME] = {
            "images": images_done,
            "generated_tokens": tokens,
            "engine": self.vlm.engine,
            "device": self.vlm.device,  # an autoscaled cluster without its GPU nodes yet shows up here
            "images_per_s": images_done / generate_s if generate_s else None,
            "tokens_per_s": tokens / generate_s if generate_s else None,
        }
        out = schema.with_column(table, schema.RECAPTION, recaptions)
        if c.on_bad == "flag":
            out = schema.with_column(out, schema.RECAPTION_FLAG, flags)
        if self.scorer is not None:
            out = schema.with_column(out, schema.RECAPTION_CLIP_SCORE, scores)
        return schema.with_column(out, schema.DROP_REASON, reasons)

    def _generate(self, images: list, prompts: list[str]) -> list:
        """Generate for a batch; on out-of-memory split it in halves and retry (a row's output does
        not depend on its batch), down to single rows, which get None if they still do not fit."""
        import gc

        import torch

        try:
            return self.vlm.generate(images, prompts)
        except Exception as e:  # noqa: BLE001 - out-of-memory is handled below, anything else re-raised
            if not is_out_of_memory(e):
                raise
            error = f"{type(e).__name__}: {e}"
        # Out here, not in the except block: there the exception's traceback keeps every frame of the
        # failed generate() alive, and with them its activations, so empty_cache() could free nothing.
        gc.collect()  # frames and tensors in reference cycles (model internals) go too
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(images) <= 1:
            log.warning("out of memory generating for a single image: %s", error)
            return [None] * len(images)
        half = len(images) // 2
        log.warning("out of memory on a batch of %d; retrying in halves", len(images))
        return self._generate(images[:half], prompts[:half]) + self._generate(images[half:], prompts[half:])

    def _record(self, i: int, result: Cleaned, reasons: list, recaptions: list, flags: list) -> None:
        if result.problem is None:
            recaptions[i] = result.text
        elif self.config.on_bad == "flag":
            flags[i] = result.problem
        else:
            reasons[i] = schema.reason(NAME, result.problem)

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        cols = [schema.UID, schema.CAPTION, schema.RECAPTION]
        for reader in (output.iter_shards, output.iter_rejects):
            for shard, t in reader():
                hit = t.filter(pc.equal(t.column(schema.UID), uid))
                if hit.num_rows:
                    row = hit.to_pylist()[0]
                    return {
                        "shard": output.shard_name(shard),
                        **{k: row.get(k) for k in (*cols, schema.RECAPTION_FLAG, schema.RECAPTION_CLIP_SCORE,
                                                   schema.DROP_REASON) if k in row},
                        "model": self.config.model,
                    }
        return None


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or torch's CPU allocator failing (a RuntimeError)."""
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _strip_wordpiece(text: str) -> str:
    # A BLIP continuation can start mid-word after its prompt; WordPiece then decodes a bare "##".
    return text[2:] if text.startswith("##") else text


def _clip_scorer(config: RecaptionConfig):
    """A callable (encoded images, texts) -> cosines, using the CLIP helper (curate.models.clip) with the
    clip stage's own decoding and preprocessing, so ``recaption_clip_score`` is comparable with the
    ``clip_score`` of the original caption when both use the same model."""
    import numpy as np

    from curate.models.clip import PilDecoder, load_clip

    clip = load_clip(config.clip_model, config.clip_pretrained, device=config.device)
    decoder = PilDecoder(clip.preprocess, threads=1, reference=clip.reference_transform)

    def score(blobs: list[bytes], texts: list[str]) -> list[float | None]:
        out: list[float | None] = [None] * len(blobs)
        for s in range(0, len(blobs), config.clip_batch_size):
            arrays = [decoder.decode(b) for b in blobs[s : s + config.clip_batch_size]]
            rows = [s + k for k, a in enumerate(arrays) if a is not None]
            if not rows:
                continue
            images = clip.encode_images(np.stack([a for a in arrays if a is not None]))
            captions = clip.encode_texts([texts[i] for i in rows])
            for i, cos in zip(rows, (images * captions).sum(axis=1), strict=True):
                out[i] = float(cos)
        return out

    return score
