"""Tiny randomly initialised vision-language models of real architectures, built offline.

Tests, the benchmark and the demo need a captioning model, and this machine cannot download one. So
we build the real classes (``BlipForConditionalGeneration``; ``Blip2ForConditionalGeneration`` with a
Q-Former and an OPT decoder; ``LlavaForConditionalGeneration`` with a CLIP vision tower and a Llama
decoder; ``Qwen2VLForConditionalGeneration`` with its dynamic-resolution vision tower;
``Idefics3ForConditionalGeneration``, the SmolVLM architecture) at toy sizes with random weights,
train a small tokenizer with the ``tokenizers`` library on a caption word list, and
``save_pretrained`` model + processor into a directory. That directory loads through exactly the same ``AutoProcessor`` /
``AutoModelForImageTextToText.from_pretrained`` path as a hub model. The captions are gibberish; the
mechanics (batching, padding, prompts, decoding, cleaning, resume) are real.

Run ``python -m curate.testing.tiny_vlms OUT_DIR [--arch NAME|all]``: writes
OUT_DIR/<arch>/ for blip, blip2, llava, qwen2_vl, idefics3 (``all``: these tiny ones) or blip-base (the
real-size BLIP-base, ~900 MB).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

ARCHES = ("blip", "blip2", "llava", "qwen2_vl", "idefics3")

# Vocabulary for the tokenizer: words that show up in alt-text and clip-art captions. A tokenizer
# trained on sentences made of them gives whole-word tokens, so decoded gibberish is readable words.
_SUBJECTS = (
    "cat dog bird horse cow sheep fish flower tree house car bus train boat plane bicycle man woman "
    "child girl boy person people face hand star sun moon cloud mountain river lake sea beach road "
    "city street building bridge tower castle church book computer phone chair table cup bottle "
    "apple banana orange cake pizza bread heart circle square triangle arrow sign flag map icon logo "
    "symbol pattern frame border button cartoon robot dragon angel skull crown key clock lamp"
).split()
_ADJECTIVES = (
    "red blue green yellow black white gray brown pink purple orange small large old young happy "
    "cute simple colorful bright dark round tall wooden metal glass vintage modern abstract"
).split()
_PLACES = (
    "on a table|in a field|on the grass|in the sky|on a white background|in the water|on a street|"
    "near a house|under a tree|in a room|on a beach|in the snow|at night|in the city"
).split("|")
_STYLES = ("a photo of|a drawing of|an illustration of|a picture of|clip art of|an icon of").split("|")


def caption_corpus(extra: Iterable[str] = ()) -> list[str]:
    """Deterministic caption-like sentences covering the word lists above (plus ``extra``)."""
    # The prompt words of the supported families, so prompts tokenize into a few whole tokens.
    out = ["USER: ASSISTANT: User: Assistant: Describe this image in one sentence. Write a short caption."]
    for i, (subject, adjective) in enumerate(itertools.product(_SUBJECTS, _ADJECTIVES)):
        style = _STYLES[i % len(_STYLES)]
        place = _PLACES[i % len(_PLACES)]
        out.append(f"{style} a {adjective} {subject} {place}.")
    out.extend(extra)
    return out


def _train_wordpiece(texts: Sequence[str], vocab_size: int) -> dict[str, int]:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    # [DEC] is BLIP's decoder start token (the real checkpoints add it after BERT's vocabulary).
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.get_vocab()


def _train_bpe(texts: Sequence[str], vocab_size: int, special: Sequence[str]) -> tuple[dict[str, int], list]:
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    # Metaspace pre-tokenisation is what Llama's (sentencepiece-style) tokenizer uses; splitting on
    # spaces while training keeps merges inside words. Every printable ASCII character is in the
    # alphabet so no prompt character is ever dropped.
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special),
        initial_alphabet=[chr(c) for c in range(32, 127)] + ["▁", "\n"],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return model["vocab"], merges


def build_blip(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, texts: Iterable[str] = ()) -> Path:
    """A tiny ``BlipForConditionalGeneration`` (ViT vision encoder + BERT-style causal text decoder)."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out_dir)
    vocab = _train_wordpiece(caption_corpus(texts), vocab_size=400)
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=64)
    hidden = 32
    config = BlipConfig(
        vision_config=dict(
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=8,
            initializer_range=0.2,
        ),
        text_config=dict(
            vocab_size=len(vocab),
            hidden_size=hidden,
            encoder_hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            pad_token_id=vocab["[PAD]"],
            bos_token_id=vocab["[DEC]"],
            sep_token_id=vocab["[SEP]"],
            eos_token_id=vocab["[SEP]"],
            initializer_range=0.2,
        ),
        projection_dim=hidden,
        image_text_hidden_size=hidden,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(
        image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_blip_base(out_dir: str | Path, *, seed: int = 0) -> Path:
    """``BlipForConditionalGeneration`` at the real BLIP-base size (ViT-B/16 at 384 px, BERT-base text
    decoder, 30,524-token vocabulary), random weights: the benchmark's stand-in for
    Salesforce/blip-image-captioning-base where nothing can be downloaded. The tokenizer is the
    trained word-level one laid out on BERT's ids ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103, [DEC]=30522) and filled with unused tokens up to the real vocabulary size."""
    import torch
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessor,
        BlipProcessor,
    )

    out = Path(out_dir)
    trained = _train_wordpiece(caption_corpus(), vocab_size=400)
    fixed = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, "[DEC]": 30522}
    words = [t for t in sorted(trained, key=trained.get) if t not in fixed]
    free = (i for i in range(30524) if i not in fixed.values())
    vocab = dict(fixed)
    for word in words:
        vocab[word] = next(free)
    for i in free:
        vocab[f"[unused{i}]"] = i
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)
    config = BlipConfig()  # the defaults are BLIP-base
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 384, "width": 384}),
                              tokenizer=tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def _train_byte_bpe(texts: Sequence[str], vocab_size: int, special: Sequence[str]) -> tuple[dict[str, int], list]:
    """Byte-level BPE (GPT-2 / OPT / Qwen style): any text tokenizes, nothing is unknown."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bpe = json.loads(tok.to_str())["model"]
    return bpe["vocab"], [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in bpe["merges"]]


def build_blip2(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, texts: Iterable[str] = ()) -> Path:
    """A tiny ``Blip2ForConditionalGeneration``: ViT -> Q-Former (4 query tokens) -> OPT decoder. The
    processor puts the query tokens before the (left-padded) text, so padding sits mid-sequence."""
    import torch
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessor,
        GPT2Tokenizer,
    )

    out = Path(out_dir)
    vocab, merges = _train_byte_bpe(caption_corpus(texts), 500, ["<pad>", "</s>", "<unk>"])
    # OPT's tokenizer: GPT-2 BPE with </s> as BOS and EOS
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                              unk_token="<unk>", add_bos_token=True, model_max_length=256)
    queries = 4
    processor = Blip2Processor(image_processor=BlipImageProcessor(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=queries)  # adds the <image> token
    hidden = 32
    config = Blip2Config(
        vision_config=dict(hidden_size=hidden, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=8, initializer_range=0.2),
        qformer_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=hidden, cross_attention_frequency=1,
                            initializer_range=0.2),
        text_config=dict(model_type="opt", vocab_size=len(tokenizer), hidden_size=hidden, ffn_dim=64,
                         num_hidden_layers=2, num_attention_heads=2, word_embed_proj_dim=hidden,
                         max_position_embeddings=256, bos_token_id=vocab["</s>"], eos_token_id=vocab["</s>"],
                         pad_token_id=vocab["<pad>"], init_std=0.2),
        num_query_tokens=queries,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# LLaVA-1.5's chat template, cut to what a single-turn caption request needs.
_LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_llava(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, texts: Iterable[str] = ()) -> Path:
    """A tiny ``LlavaForConditionalGeneration``: CLIP vision tower -> MLP projector -> Llama decoder."""
    import torch
    from transformers import (
        CLIPImageProcessor,
        LlamaTokenizer,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    special = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    vocab, merges = _train_bpe(caption_corpus(texts), vocab_size=400, special=special)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=256, add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": ["<image>"]})
    patch = 8
    hidden = 32
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=hidden,
            initializer_range=0.2,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=vocab["<s>"],
            eos_token_id=vocab["</s>"],
            pad_token_id=vocab["<pad>"],
            initializer_range=0.2,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=vocab["<pad>"],
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.eos_token_id = vocab["</s>"]
    model.generation_config.bos_token_id = vocab["<s>"]
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=_LLAVA_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# Qwen2-VL's chat template, cut to single-turn user messages with images and text.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_qwen2_vl(out_dir: str | Path, *, seed: int = 0, texts: Iterable[str] = ()) -> Path:
    """A tiny ``Qwen2VLForConditionalGeneration``: dynamic-resolution ViT (the number of image tokens
    depends on the image's size and aspect, so batches really are ragged) and a Qwen2 decoder with
    multimodal rotary positions; byte-level BPE tokenizer like the real one."""
    import torch
    from transformers import (
        Qwen2Tokenizer,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out_dir)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
               "<|image_pad|>", "<|video_pad|>"]
    vocab, merges = _train_byte_bpe(caption_corpus(texts), 500, special)
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": special[1:]})
    ids = tokenizer.get_vocab()
    patch, merge, temporal = 8, 2, 2
    config = Qwen2VLConfig(
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=patch,
                           spatial_merge_size=merge, temporal_patch_size=temporal, initializer_range=0.2),
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width)
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            initializer_range=0.2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    sizes = dict(patch_size=patch, merge_size=merge, temporal_patch_size=temporal)
    processor = Qwen2VLProcessor(
        # 16-px grid cells between 32x32 and 64x64 pixels: 4 to 16 image tokens per image
        image_processor=Qwen2VLImageProcessor(min_pixels=32 * 32, max_pixels=64 * 64, **sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# SmolVLM / Idefics3 chat layout: "User:<image>...<end_of_utterance>\nAssistant:".
_IDEFICS_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def build_idefics3(out_dir: str | Path, *, seed: int = 0, image_size: int = 32, texts: Iterable[str] = ()) -> Path:
    """A tiny ``Idefics3ForConditionalGeneration`` (the SmolVLM architecture): SigLIP-style vision
    encoder, pixel-shuffle connector (scale 2: 16 patches -> 4 image tokens), Llama decoder; images go
    to the processor as one list per prompt, wrapped in <fake_token_around_image><global-img>."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        LlamaTokenizer,
    )

    out = Path(out_dir)
    special = ["<unk>", "<s>", "</s>", "<pad>", "<fake_token_around_image>", "<image>", "<end_of_utterance>",
               "<global-img>"]
    vocab, merges = _train_bpe(caption_corpus(texts), vocab_size=400, special=special)
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=256, add_bos_token=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": special[4:]})
    patch, scale = 8, 2
    processor = Idefics3Processor(
        image_processor=Idefics3ImageProcessor(size={"longest_edge": image_size},
                                               max_image_size={"longest_edge": image_size},
                                               do_image_splitting=False),
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch) ** 2 // scale**2,
        chat_template=_IDEFICS_CHAT_TEMPLATE,
    )
    ids = tokenizer.get_vocab()
    config = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch, initializer_range=0.2),
        text_config=dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, bos_token_id=ids["<s>"],
                         eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<pad>"], initializer_range=0.2),
        image_token_id=ids["<image>"],
        scale_factor=scale,
        pad_token_id=ids["<pad>"],
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = ids["<end_of_utterance>"]
    model.generation_config.pad_token_id = ids["<pad>"]
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


BUILDERS = {
    "blip": build_blip,
    "blip2": build_blip2,
    "llava": build_llava,
    "qwen2_vl": build_qwen2_vl,
    "idefics3": build_idefics3,
    "blip-base": build_blip_base,
}


def build(arch: str, out_dir: str | Path, **kwargs) -> Path:
    return BUILDERS[arch](out_dir, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curate.testing.tiny_vlms", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="writes OUT_DIR/<arch>/ for each architecture")
    parser.add_argument("--arch", choices=(*BUILDERS, "all"), default="all",
                        help="all: the tiny ones (blip-base is real-size, ~900 MB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for arch in ARCHES if args.arch == "all" else (args.arch,):
        path = build(arch, Path(args.out_dir) / arch, seed=args.seed)
        log.info("tiny %s model written to %s", arch, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
