"""The VLM wrapper on tiny random BLIP, BLIP-2, LLaVA, Qwen2-VL and Idefics3 (SmolVLM) models loaded from disk like hub checkpoints.

Batching must not change a row's output: every row generated alone (batch of 1) and in a batch of 8
with prompts of different lengths gives the same greedy caption in fp32, and the per-step logits
agree within LOGIT_TOL. Prompt lengths differ because the instruction embeds each row's caption, so
the LLaVA batch really is padded (left) and BLIP's really is grouped by length; Qwen2-VL adds a
different number of image tokens per image (dynamic resolution) and multimodal rotary positions;
BLIP-2's processor puts its query tokens before the left-padded text, so padding sits mid-sequence.
"""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image
from recaption_data import sample_image

from curate.models.vlm import VLM, GenerationSettings, family_for

# fp32 on CPU: batched and single-row matmuls differ by a few 1e-6 here; 1e-4 leaves margin while a
# padding bug (a pad token attended to, a shifted position) moves logits by orders of magnitude more.
LOGIT_TOL = 1e-4
CAPTIONS = [
    "a red cat",
    "a big dog on a table near a house in the city at night",
    None,
    "x",
    "a blue house",
    "two birds in the sky over a lake",
    "tree",
    "a small yellow bus on a street",
]


def _images(n: int) -> list[Image.Image]:
    return [Image.open(io.BytesIO(sample_image(i)[0])).convert("RGB") for i in range(n)]


def _load(path: str, **kw) -> VLM:
    settings = GenerationSettings(max_new_tokens=kw.pop("max_new_tokens", 12), **kw.pop("settings", {}))
    return VLM(path, device="cpu", settings=settings, **kw).load()


def _generate_batched(vlm: VLM, images, prompts, batch_size: int, return_logits: bool = True):
    out = [None] * len(prompts)
    for batch in vlm.plan_batches(prompts, batch_size):
        got = vlm.generate([images[i] for i in batch], [prompts[i] for i in batch], return_logits=return_logits)
        for i, g in zip(batch, got, strict=True):
            out[i] = g
    return out


def _assert_same(single, batched):
    for a, b in zip(single, batched, strict=True):
        assert a.text == b.text and a.num_tokens == b.num_tokens and a.finished == b.finished
        assert a.logits.shape == b.logits.shape
        assert torch.allclose(a.logits, b.logits, atol=LOGIT_TOL, rtol=0), (a.logits - b.logits).abs().max()


@pytest.mark.parametrize("arch", ["blip", "blip2", "llava", "qwen2_vl", "idefics3"])
def test_loads_through_auto_classes_with_family_defaults(tiny_vlms, arch):
    vlm = _load(tiny_vlms[arch])
    assert type(vlm.model).__name__ == {"blip": "BlipForConditionalGeneration",
                                        "llava": "LlavaForConditionalGeneration",
                                        "qwen2_vl": "Qwen2VLForConditionalGeneration",
                                        "blip2": "Blip2ForConditionalGeneration",
                                        "idefics3": "Idefics3ForConditionalGeneration"}[arch]
    assert vlm.family is family_for(vlm.model.config.model_type)
    assert vlm.dtype == torch.float32 and vlm.device == "cpu" and vlm.engine == "transformers"
    prompt = vlm.prompt("ignored without {caption}")
    if arch == "llava":
        # chat template of the checkpoint, image placeholder included; left padding for decoder-only
        assert prompt == "USER: <image>\nDescribe this image in one sentence. ASSISTANT:"
        assert vlm.tokenizer.padding_side == "left"
    elif arch == "qwen2_vl":
        assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                          "Describe this image in one sentence.<|im_end|>\n<|im_start|>assistant\n")
        assert vlm.tokenizer.padding_side == "left"
    elif arch == "idefics3":
        assert prompt == "User:<image>Describe this image in one sentence.<end_of_utterance>\nAssistant:"
        assert vlm.family.nested_images and vlm.tokenizer.padding_side == "left"
    elif arch == "blip2":
        assert prompt == "" and vlm.tokenizer.padding_side == "left"  # unconditional captioning
    else:
        assert prompt == "a picture of"


@pytest.mark.parametrize("arch", ["blip", "blip2", "llava", "qwen2_vl", "idefics3"])
def test_batch_of_one_equals_batch_of_eight(tiny_vlms, arch):
    vlm = _load(tiny_vlms[arch], instruction="Write a short caption. Old caption: {caption}.")
    images = _images(8)
    prompts = [vlm.prompt(c) for c in CAPTIONS]
    lengths = {len(vlm.tokenizer(p)["input_ids"]) for p in prompts}
    assert len(lengths) > 3  # the batch really mixes prompt lengths
    single = [vlm.generate([im], [p], return_logits=True)[0] for im, p in zip(images, prompts, strict=True)]
    batched = _generate_batched(vlm, images, prompts, 8)
    _assert_same(single, batched)
    assert all(g.num_tokens > 0 for g in single)
    batches = vlm.plan_batches(prompts, 8)
    assert sorted(i for b in batches for i in b) == list(range(8))
    if arch == "qwen2_vl":
        ids = vlm.processor(images=images, text=prompts, return_tensors="pt", padding=True)["input_ids"]
        image_tokens = (ids == vlm.model.config.image_token_id).sum(dim=1).tolist()
        assert len(set(image_tokens)) > 1  # ragged: image token counts differ between rows
    if arch != "blip":
        assert len(batches) == 1  # padded together
    else:
        # BLIP never pads: every batch holds one prompt length
        for b in batches:
            assert len({len(vlm.tokenizer(prompts[i])["input_ids"]) for i in b}) == 1


def test_right_padding_would_change_llava_outputs(tiny_vlms):
    """The equality above is a real check: the same batch padded on the wrong side differs."""
    vlm = _load(tiny_vlms["llava"], instruction="Write a short caption. Old caption: {caption}.")
    images = _images(8)
    prompts = [vlm.prompt(c) for c in CAPTIONS]
    single = [vlm.generate([im], [p], return_logits=True)[0] for im, p in zip(images, prompts, strict=True)]
    vlm.tokenizer.padding_side = "right"
    batched = vlm.generate(images, prompts, return_logits=True)
    assert any(not torch.allclose(a.logits[:1], b.logits[:1], atol=LOGIT_TOL) for a, b in zip(single, batched, strict=True))


def test_fixed_prompt_batches_in_order(tiny_vlms):
    vlm = _load(tiny_vlms["blip"])
    prompts = [vlm.prompt(c) for c in CAPTIONS] * 2
    assert vlm.plan_batches(prompts, 5) == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14], [15]]


@pytest.mark.parametrize("arch", ["blip", "llava"])
def test_beam_and_sampling_settings(tiny_vlms, arch):
    images = _images(3)
    beam = _load(tiny_vlms[arch], settings={"decoding": "beam", "num_beams": 3})
    prompts = [beam.prompt()] * 3
    got = beam.generate(images, prompts)
    assert len(got) == 3 and all(0 < g.num_tokens <= 12 for g in got)
    sampler = _load(tiny_vlms[arch], settings={"decoding": "sampling", "temperature": 1.5, "seed": 7})
    first = [g.text for g in sampler.generate(images, prompts)]
    again = [g.text for g in sampler.generate(images, prompts)]
    assert first == again  # seeded per batch: a retried shard samples the same captions
    greedy = _load(tiny_vlms[arch])
    assert first != [g.text for g in greedy.generate(images, prompts)]


def test_max_new_tokens_and_repetition_penalty(tiny_vlms):
    images = _images(2)
    vlm = _load(tiny_vlms["blip"], max_new_tokens=5)
    got = vlm.generate(images, [vlm.prompt()] * 2)
    assert all(g.num_tokens <= 5 for g in got)
    assert any(not g.finished for g in got) or all(g.num_tokens < 5 for g in got)
    loose = _load(tiny_vlms["blip"], max_new_tokens=20)
    strict = _load(tiny_vlms["blip"], max_new_tokens=20, settings={"no_repeat_ngram_size": 1})
    for g in strict.generate(images, [vlm.prompt()] * 2):
        words = g.text.split()
        assert len(words) == len(set(words))  # no token repeated at all (WordPiece words here are tokens)
    assert [g.text for g in loose.generate(images, [vlm.prompt()] * 2)] != [
        g.text for g in strict.generate(images, [vlm.prompt()] * 2)
    ]


def test_template_override_and_unknown_family(tiny_vlms, tmp_path):
    vlm = _load(tiny_vlms["llava"], template="USER: <image>\n{instruction} ASSISTANT:", instruction="Caption:")
    assert vlm.prompt() == "USER: <image>\nCaption: ASSISTANT:"
    assert vlm.generate(_images(1), [vlm.prompt()])[0].num_tokens > 0
    with pytest.raises(ValueError, match="no prompt family"):
        family_for("some_new_vlm")
    with pytest.raises(RuntimeError, match="engine=vllm"):
        _load(tiny_vlms["llava"], engine="vllm")
