"""Caption cleaning for model-written captions: what a vision-language model said -> a usable caption.

Captioning models echo their prompt ("Describe this image. The image shows ..."), open with filler
("an image of", "this picture depicts"), fall into loops ("a dog a dog a dog"), leak BLIP's
"arafed" artefact, and run past any sensible length. :func:`clean` undoes what can be undone and
says when nothing usable is left: ``problem`` is ``"empty"`` (no words left) or ``"degenerate"``
(looping, mostly non-text, too few words, one giant token). The rules work on words, so they are
model-agnostic; every one of them is tested on crafted inputs in tests/recaption/test_captions.py.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

# What an image caption should not start with. Style words (drawing, illustration, painting,
# cartoon, clip art) are information and stay; "image/picture/photo of" only says it is an image.
_MEDIUM = r"(?:image|picture|photo|photograph|pic|close-?up(?: image| photo)?)"
_BOILERPLATE = [
    re.compile(p, re.IGNORECASE)
    for p in (
        # "in this image, we can see a dog" / "in the picture: a dog"
        rf"^(?:in|within) (?:this|the) {_MEDIUM}\s*[,:]?\s*(?:(?:we|you|i) can see|there (?:is|are))?\s*",
        # "this image shows a dog" / "the photo depicts ..."
        rf"^(?:this|the) {_MEDIUM}\s+(?:shows|depicts|features|contains|displays|presents|captures|"
        rf"illustrates|is showing|is of|shows us)(?:\s+|$)",
        # "this is an image of a dog" / "here is a picture showing ..." / "an image of a dog"
        rf"^(?:(?:this|here|it) is |here's |it's |there is )?(?:an?|the) {_MEDIUM}\s+"
        rf"(?:of|showing|depicting|that shows|with)(?:\s+|$)",
    )
]
# Tokens BLIP checkpoints are known to emit at the start of captions ("arafed man sitting ...").
_ARTEFACTS = re.compile(r"\b(?:arafed|araffe|arafe|araffed|arafly)\b\s*", re.IGNORECASE)
# Role markers and answer prefixes that chat models put before the answer.
_ROLE = re.compile(r"^\s*(?:assistant|answer|caption|description|output|gpt)\s*:\s*", re.IGNORECASE)
# Leftover special tokens when a processor decodes with skip_special_tokens but the model has
# unregistered ones (<|im_end|>, </s>, [SEP], <end_of_utterance>, <image>).
_SPECIAL = re.compile(r"<\|?/?[A-Za-z_]{1,24}\|?>|\[(?:SEP|CLS|PAD|UNK|MASK|DEC)\]")
# Control characters and U+FFFD: what byte-level BPE decodes from an invalid UTF-8 byte sequence.
_JUNK = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")
_WORD_CORE = re.compile(r"[\W_]+")
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")


@dataclasses.dataclass(frozen=True)
class CleaningRules:
    """Limits and switches of :func:`clean` (the recaption stage's config carries the same fields)."""

    strip_boilerplate: bool = True
    min_words: int = 2
    max_words: int = 60
    max_chars: int = 400
    # A caption whose collapsed repetitions were more than this fraction of its words was a loop.
    max_repeat_fraction: float = 0.5
    # Below this share of distinct words (in captions of 8+ words) a caption is a loop in disguise.
    min_distinct_fraction: float = 0.35
    # Below this share of letters among non-space characters, it is not text.
    min_alpha_fraction: float = 0.5
    max_word_chars: int = 40


@dataclasses.dataclass(frozen=True)
class Cleaned:
    text: str
    problem: str | None  # None, "empty" or "degenerate"
    repeats_removed: int = 0
    truncated: bool = False


def strip_echo(text: str, echoes: Iterable[str]) -> str:
    """Remove a leading copy of any of ``echoes`` (the prompt), ignoring case, spacing, punctuation."""
    for echo in echoes:
        words = [w for w in _WORD_CORE.split(echo) if w]
        if not words:
            continue
        pattern = r"^\W*" + r"\W+".join(re.escape(w) for w in words) + r"(?:\W+|$)"
        text = re.sub(pattern, "", text, count=1, flags=re.IGNORECASE)
    return text


def strip_boilerplate(text: str) -> str:
    """Drop filler openings ("an image of", "this picture shows") and BLIP's "arafed" artefacts."""
    text = _ARTEFACTS.sub("", text)
    changed = True
    while changed:  # "this image shows an image of a cat" needs two passes
        changed = False
        for pattern in _BOILERPLATE:
            new = pattern.sub("", text, count=1).lstrip()
            if new != text:
                text, changed = new, True
    return text


def _core(word: str) -> str:
    return _WORD_CORE.sub("", word.lower())


def collapse_repeats(words: list[str], max_n: int = 8) -> tuple[list[str], int]:
    """Collapse immediate repetitions of any n-gram (n <= max_n) to one copy.

    "a dog a dog a dog on grass" -> "a dog on grass". Words are compared without case and
    punctuation. Returns the words and how many were removed.
    """
    words = list(words)
    removed = 0
    changed = True
    while changed:
        changed = False
        for n in range(1, max_n + 1):
            keys = [_core(w) for w in words]
            i = 0
            out: list[str] = []
            out_keys: list[str] = []
            while i < len(words):
                # the n words starting at i repeat the n words just before them
                if len(out_keys) >= n and keys[i : i + n] == out_keys[-n:] and i + n <= len(words):
                    removed += n
                    changed = True
                    i += n
                    continue
                out.append(words[i])
                out_keys.append(keys[i])
                i += 1
            words = out
    return words, removed


def truncate(text: str, max_words: int, max_chars: int) -> tuple[str, bool]:
    """Cut to ``max_words`` words and ``max_chars`` characters, at a sentence end when one lies in the
    second half of what is kept, else at a word boundary."""
    words = text.split()
    cut = False
    if len(words) > max_words:
        text, cut = " ".join(words[:max_words]), True
    if len(text) > max_chars:
        space = text.rfind(" ", 0, max_chars + 1)
        text, cut = text[: space if space > 0 else max_chars], True
    if cut:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] >= len(text) / 2:
            text = text[: ends[-1]]
        text = text.rstrip(" ,;:-")
    return text, cut


def degenerate(words: list[str], repeats_removed: int, rules: CleaningRules) -> bool:
    """True when what is left (after collapsing) is not a caption."""
    total = len(words) + repeats_removed
    if repeats_removed and repeats_removed > rules.max_repeat_fraction * total:
        return True
    if len(words) < rules.min_words:
        return True
    if len(words) >= 8 and len({_core(w) for w in words}) < rules.min_distinct_fraction * len(words):
        return True
    chars = "".join(words)
    if sum(c.isalpha() for c in chars) < rules.min_alpha_fraction * len(chars):
        return True
    return any(len(w) > rules.max_word_chars for w in words)


def clean(
    text: str | None,
    rules: CleaningRules = CleaningRules(),
    echoes: Iterable[str] = (),
    finished: bool = True,
) -> Cleaned:
    """Clean one generated caption. ``echoes``: prompt strings the model may repeat back.
    ``finished``: False when generation stopped at the token limit, so the last sentence may be cut
    mid-way and is dropped when an earlier complete sentence exists."""
    text = _JUNK.sub("", _SPECIAL.sub(" ", text or ""))
    text = " ".join(text.split())
    text = _ROLE.sub("", text)
    text = strip_echo(text, echoes)
    text = _ROLE.sub("", text)
    if rules.strip_boilerplate:
        text = strip_boilerplate(text)
    words, removed = collapse_repeats(text.split())
    if not any(any(c.isalnum() for c in w) for w in words):
        return Cleaned("", "empty", removed)
    if degenerate(words, removed, rules):
        return Cleaned(" ".join(words), "degenerate", removed)
    text = " ".join(words)
    if not finished:
        ends = [m.end() for m in _SENTENCE_END.finditer(text)]
        if ends and ends[-1] < len(text) and len(text[: ends[-1]].split()) >= rules.min_words:
            text = text[: ends[-1]]
    text, cut = truncate(text, rules.max_words, rules.max_chars)
    text = text.strip(" ,;:-")
    if len(text.split()) < rules.min_words:
        return Cleaned(text, "degenerate", removed, cut)
    return Cleaned(text, None, removed, cut)
