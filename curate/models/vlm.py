"""Image-to-text models through transformers (and vLLM only when asked for by name): load, prompt, generate.

Any checkpoint that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works, by hub id or local
directory. What differs between model families is kept in one table (:data:`FAMILIES`): the default
instruction, the prompt layout when the processor has no chat template, whether the model is
decoder-only (then prompts are left-padded so every row's last prompt token sits at the end, and the
prompt is cut off the output), and whether the images go in as one list per prompt.

BLIP is the exception that shapes the batching API: its text decoder has absolute positions and its
``generate`` drops the last prompt token assuming it is [SEP], so a padded prompt changes the
output. :meth:`VLM.plan_batches` therefore groups BLIP rows by prompt length (no padding at all);
for other families it sorts by length so padding is small. A fixed prompt gives one group.

No Ray, no Arrow: the recaption stage and the benchmark drive this with PIL images and strings.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

Decoding = Literal["greedy", "beam", "sampling"]
Engine = Literal["transformers", "vllm"]


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    instruction: str
    # Prompt layout used when the processor has no chat template (or the family has none);
    # {instruction} is replaced. Must hold the family's image placeholder where it has one.
    template: str
    decoder_only: bool = True
    use_chat_template: bool = True
    # Images passed as [[img], [img], ...] (one list per prompt) rather than [img, img, ...].
    nested_images: bool = False
    # Left padding changes the output (absolute positions): batch only equal-length prompts.
    pad_safe: bool = True


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        # BLIP conditional captioning: the prompt is the start of the caption it continues.
        Family("blip", ("blip",), "a picture of", "{instruction}", decoder_only=False,
               use_chat_template=False, pad_safe=False),
        # BLIP-2 (OPT / Flan-T5): best captions with no prompt; the processor inserts query tokens.
        Family("blip2", ("blip-2", "instructblip"), "", "{instruction}", use_chat_template=False),
        Family("llava", ("llava", "llava_next", "llava_onevision", "vipllava", "mllama"),
               "Describe this image in one sentence.", "USER: <image>\n{instruction} ASSISTANT:"),
        Family("qwen_vl", ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"),
               "Describe this image in one sentence.",
               "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{instruction}<|im_end|>\n"
               "<|im_start|>assistant\n"),
        Family("idefics", ("idefics2", "idefics3", "smolvlm"), "Describe this image in one sentence.",
               "User:<image>{instruction}<end_of_utterance>\nAssistant:", nested_images=True),
    )
}


def family_for(model_type: str) -> Family:
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(
        f"no prompt family for model_type {model_type!r} (known: {known}); set family explicitly "
        "(and template if the processor has no chat template)"
    )


@dataclasses.dataclass(frozen=True)
class GenerationSettings:
    decoding: Decoding = "greedy"
    max_new_tokens: int = 48
    num_beams: int = 3
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    seed: int = 0

    def transformers_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = dict(
            max_new_tokens=self.max_new_tokens,
            repetition_penalty=self.repetition_penalty,
            no_repeat_ngram_size=self.no_repeat_ngram_size,
            do_sample=self.decoding == "sampling",
            num_beams=self.num_beams if self.decoding == "beam" else 1,
        )
        if self.decoding == "sampling":
            kw.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        else:
            # A checkpoint's generation_config may ask for sampling; greedy/beam must not sample.
            kw.update(temperature=None, top_p=None, top_k=None)
        if self.decoding == "beam":
            kw.update(early_stopping=True)
        return kw


@dataclasses.dataclass
class Generation:
    """One row's output: decoded new text (uncleaned), how many tokens were generated before the
    end token, whether it ended by itself (not at max_new_tokens). ``logits``: [steps, vocab] raw
    next-token logits, only when asked for (greedy/sampling, transformers engine)."""

    text: str
    num_tokens: int
    finished: bool
    logits: torch.Tensor | None = None


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """bf16 on GPU (fp16 where the GPU has no bf16), fp32 on CPU, unless asked otherwise."""
    import torch

    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


class VLM:
    """A captioning model with its processor, prompt family and generation settings."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        family: str = "auto",
        instruction: str | None = None,
        template: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        engine: Engine = "transformers",
        settings: GenerationSettings = GenerationSettings(),
    ):
        self.model_id = model
        self.revision = revision
        self.family_name = family
        self.instruction_override = instruction
        self.template = template
        self.device_request = device
        self.dtype_request = dtype
        self.engine_request = engine
        self.settings = settings
        self.loaded = False

    # ------------------------------------------------------------------ loading
    def load(self) -> VLM:
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        config = AutoConfig.from_pretrained(self.model_id, revision=self.revision)
        self.family = FAMILIES[self.family_name] if self.family_name != "auto" else family_for(config.model_type)
        self.instruction = (
            self.instruction_override if self.instruction_override is not None else self.family.instruction
        )
        self.device = resolve_device(self.device_request)
        self.dtype = resolve_dtype(self.dtype_request, self.device)
        self.processor = AutoProcessor.from_pretrained(self.model_id, revision=self.revision)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if self.family.decoder_only:
            # Generation continues from the last position of each row: pad on the left.
            self.tokenizer.padding_side = "left"
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        self.engine = self._pick_engine()
        if self.engine == "vllm":
            self._vllm = _VllmEngine(self, config)
            self.model = None
        else:
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_id, revision=self.revision, dtype=self.dtype
            ).to(self.device)
            self.model.eval()
        self._stop_ids = self._collect_stop_ids(config)
        self.loaded = True
        log.info(
            "loaded %s (family %s, engine %s, %s on %s)",
            self.model_id, self.family.name, self.engine, str(self.dtype).removeprefix("torch."), self.device,
        )
        return self

    def _pick_engine(self) -> str:
        """transformers unless vLLM was asked for by name; then it must be able to run this model."""
        if self.engine_request != "vllm":
            return "transformers"
        reasons = []
        if importlib.util.find_spec("vllm") is None:
            reasons.append("vllm is not installed")
        if not self.device.startswith("cuda"):
            reasons.append("no CUDA device")
        if self.family.name == "blip":
            reasons.append("vLLM does not serve BLIP-1")
        if self.settings.decoding == "beam":
            reasons.append("beam search runs on the transformers path")
        if self.settings.no_repeat_ngram_size:
            reasons.append("vLLM has no no_repeat_ngram_size")
        if reasons:
            raise RuntimeError("engine=vllm requested but " + "; ".join(reasons))
        return "vllm"

    def _collect_stop_ids(self, config: Any) -> set[int]:
        ids: set[int] = set()
        candidates: list[Any] = [self.tokenizer.eos_token_id, self.tokenizer.pad_token_id]
        if self.model is not None:
            candidates += [self.model.generation_config.eos_token_id, self.model.generation_config.pad_token_id]
        if self.family.name == "blip":
            # BLIP's decoder stops at [SEP] and pads with [PAD]
            candidates += [config.text_config.sep_token_id, config.text_config.pad_token_id]
        for c in candidates:
            if isinstance(c, int):
                ids.add(c)
            elif isinstance(c, (list, tuple)):
                ids.update(i for i in c if isinstance(i, int))
        return ids

    # ------------------------------------------------------------------ prompts
    def prompt(self, caption: str | None = None) -> str:
        """The full text prompt for one row; ``{caption}`` in the instruction becomes the row's
        original caption (so a model can be asked to improve it)."""
        instruction = self.instruction.replace("{caption}", caption or "")
        if self.template is not None:
            return self.template.replace("{instruction}", instruction)
        if self.family.use_chat_template and getattr(self.processor, "chat_template", None):
            content: list[dict[str, str]] = [{"type": "image"}]
            if instruction:
                content.append({"type": "text", "text": instruction})
            messages = [{"role": "user", "content": content}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.family.template.replace("{instruction}", instruction)

    def echoes(self, captions: Sequence[str | None] = ()) -> list[str]:
        """Strings a model may repeat back at the start of its answer (for caption cleaning)."""
        out = [self.instruction.replace("{caption}", c or "") for c in dict.fromkeys(captions)]
        out = out or [self.instruction]
        return [e for e in out if e.strip()]

    def plan_batches(self, prompts: Sequence[str], batch_size: int) -> list[list[int]]:
        """Row indices per batch. Rows are ordered by prompt length (stable); for families that are
        not pad-safe a batch never mixes lengths. The output of a row never depends on the batch."""
        if len(set(prompts)) <= 1:
            return [list(range(i, min(i + batch_size, len(prompts)))) for i in range(0, len(prompts), batch_size)]
        lengths = [len(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        for i in order:
            if (
                batches
                and len(batches[-1]) < batch_size
                and (self.family.pad_safe or lengths[batches[-1][0]] == lengths[i])
            ):
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    # ------------------------------------------------------------------ generation
    def generate(
        self, images: Sequence[Image.Image], prompts: Sequence[str], return_logits: bool = False
    ) -> list[Generation]:
        """Generate for one batch (one image per prompt). Rows of a non-pad-safe family must have
        equal-length prompts (use :meth:`plan_batches`)."""
        if not self.loaded:
            raise RuntimeError("VLM.load() first")
        if len(images) != len(prompts):
            raise ValueError("one prompt per image")
        if not images:
            return []
        if self.engine == "vllm":
            return self._vllm.generate(images, prompts)
        return self._generate_transformers(images, prompts, return_logits)

    def _generate_transformers(self, images, prompts, return_logits: bool) -> list[Generation]:
        import torch

        imgs = [[im] for im in images] if self.family.nested_images else list(images)
        inputs = self.processor(images=imgs, text=list(prompts), return_tensors="pt", padding=True)
        inputs = {
            k: (v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }
        if self.family.name == "blip":
            inputs.pop("token_type_ids", None)
        kwargs = self.settings.transformers_kwargs()
        if self.family.name != "blip":  # BLIP's generate passes its own pad token
            kwargs["pad_token_id"] = self.tokenizer.pad_token_id
        want_logits = return_logits and self.settings.decoding != "beam"
        if self.settings.decoding == "sampling":
            torch.manual_seed(self.settings.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, **kwargs, return_dict_in_generate=True, output_logits=want_logits)
        sequences = out.sequences
        new = self._new_tokens(sequences, inputs["input_ids"])
        results = []
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        for row, text in enumerate(texts):
            ids = new[row].tolist()
            end = next((j for j, t in enumerate(ids) if t in self._stop_ids), None)
            logits = None
            if want_logits:
                steps = len(ids) if end is None else end + 1
                logits = torch.stack([step[row] for step in out.logits[:steps]]).float().cpu()
            results.append(
                Generation(text=text, num_tokens=len(ids) if end is None else end, finished=end is not None,
                           logits=logits)
            )
        return results

    def _new_tokens(self, sequences: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        n = input_ids.shape[1]
        if self.family.name == "blip":
            # BLIP's generate feeds input_ids[:, :-1] (bos swapped in) and returns them as a prefix
            return sequences[:, n - 1 :]
        if getattr(self.model.config, "is_encoder_decoder", False):
            return sequences[:, 1:]  # decoder start token
        if sequences.shape[1] >= n and bool((sequences[:, :n] == input_ids).all()):
            return sequences[:, n:]
        return sequences  # models whose generate returns only the new tokens (e.g. BLIP-2 OPT)


class _VllmEngine:
    """vLLM offline engine: continuous batching and paged attention on GPU. Same prompts as the
    transformers path; vLLM expands the image placeholder itself. Beam search and BLIP-1 stay on
    transformers (see VLM._pick_engine)."""

    def __init__(self, vlm: VLM, config: Any):
        from vllm import LLM

        self.settings = vlm.settings
        self.llm = LLM(
            model=vlm.model_id,
            revision=vlm.revision,
            dtype=str(vlm.dtype).removeprefix("torch."),
            limit_mm_per_prompt={"image": 1},
            seed=vlm.settings.seed,
        )
        self.eos = vlm.tokenizer.eos_token_id

    def generate(self, images, prompts) -> list[Generation]:
        from vllm import SamplingParams

        s = self.settings
        params = SamplingParams(
            n=1,
            max_tokens=s.max_new_tokens,
            repetition_penalty=s.repetition_penalty,
            temperature=s.temperature if s.decoding == "sampling" else 0.0,
            top_p=s.top_p if s.decoding == "sampling" else 1.0,
            top_k=s.top_k if s.decoding == "sampling" and s.top_k > 0 else -1,
            seed=s.seed if s.decoding == "sampling" else None,
        )
        requests = [{"prompt": p, "multi_modal_data": {"image": im}} for p, im in zip(prompts, images, strict=True)]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        results = []
        for o in outs:
            c = o.outputs[0]
            ids = list(c.token_ids)
            finished = c.finish_reason == "stop"
            n = len(ids) - (1 if finished and ids and ids[-1] == self.eos else 0)
            results.append(Generation(text=c.text, num_tokens=n, finished=finished))
        return results
