"""Caption cleaning rules on crafted model outputs."""

from __future__ import annotations

import pytest

from curate.captions import CleaningRules, clean, collapse_repeats, strip_boilerplate, strip_echo, truncate

PROMPT = "Describe this image in one sentence."


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("an image of a dog on a couch", "a dog on a couch"),
        ("A picture of two cats sleeping", "two cats sleeping"),
        ("This image shows a red car parked on a street.", "a red car parked on a street."),
        ("The photo depicts a lighthouse at dusk", "a lighthouse at dusk"),
        ("In this image, we can see a cat on a mat", "a cat on a mat"),
        ("this is an image of an illustration of a cat", "an illustration of a cat"),
        ("arafed man sitting on a bench", "man sitting on a bench"),
        # style words are information, not boilerplate
        ("a drawing of a horse in a field", "a drawing of a horse in a field"),
        ("clip art of a green tree", "clip art of a green tree"),
    ],
)
def test_boilerplate_is_stripped_and_style_kept(raw, want):
    assert clean(raw).text == want
    assert clean(raw).problem is None


def test_prompt_echo_and_role_markers_are_stripped():
    got = clean("Describe this image in one sentence. A small boat on a lake.", echoes=[PROMPT])
    assert got.text == "A small boat on a lake."
    # case, spacing and punctuation of the echo do not matter
    assert strip_echo("describe   THIS image, in one sentence: a boat", [PROMPT]) == "a boat"
    assert clean("ASSISTANT: a boat on a lake", echoes=[PROMPT]).text == "a boat on a lake"
    # an echo in the middle of the text is content, not an echo
    assert clean("a sign saying describe this image in one sentence", echoes=[PROMPT]).text.startswith("a sign")
    # the caption-conditioned prompt echoed back
    echo = "Improve this caption: a red house."
    assert clean("Improve this caption: a red house. A red house with a white door.", echoes=[echo]).text == (
        "A red house with a white door."
    )


def test_special_tokens_leaking_through_decode_are_removed():
    assert clean("a dog on grass</s><pad><pad>").text == "a dog on grass"
    assert clean("<|im_end|>a dog on grass [SEP]").text == "a dog on grass"
    # byte-level BPE decoding broken UTF-8: control characters and U+FFFD
    assert clean("a d\x00og on\ufffd gr\x17ass").text == "a dog on grass"


def test_repetitions_are_collapsed():
    words, removed = collapse_repeats("a dog on the beach on the beach on the beach with a ball".split())
    assert " ".join(words) == "a dog on the beach with a ball" and removed == 6
    words, removed = collapse_repeats("red red red red car".split())
    assert words == ["red", "car"] and removed == 3
    # case and punctuation do not hide a repeat
    assert collapse_repeats("a cat. A cat. a cat".split())[0] == ["a", "cat."]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("!!!! ??? ...", "empty"),
        ("</s>", "empty"),
        ("a dog a dog a dog a dog a dog", "degenerate"),  # a loop: most words were repeats
        ("dog", "degenerate"),  # fewer than min_words
        ("the cat the dog the cat the bird the cat the dog the fish the cat", "degenerate"),  # few distinct
        ("## %% 12 34 ## %% 56 ::", "degenerate"),  # not text
        ("a " + "x" * 60 + " house", "degenerate"),  # one giant token
        ("an image of", "empty"),  # only boilerplate
    ],
)
def test_empty_and_degenerate_are_detected(raw, problem):
    assert clean(raw).problem == problem


def test_good_captions_pass_untouched():
    for text in ("A brown dog runs across a sandy beach.", "two people riding bicycles on a city street"):
        got = clean(text)
        assert (got.text, got.problem, got.repeats_removed, got.truncated) == (text, None, 0, False)


def test_length_limits():
    long = " ".join(f"word{i}" for i in range(100))
    got = clean(long, CleaningRules(max_words=10))
    assert got.truncated and got.text.split() == [f"word{i}" for i in range(10)]
    got = clean(long, CleaningRules(max_chars=50))
    assert got.truncated and len(got.text) <= 50 and not got.text.endswith(" ")
    # cut back to a sentence end when one lies in the kept half
    text, cut = truncate("A dog sits on a mat. It looks at the camera and then it", max_words=9, max_chars=400)
    assert cut and text == "A dog sits on a mat."


def test_unfinished_generation_drops_its_cut_off_sentence():
    raw = "A red car parked on a street. It is next to a big"
    assert clean(raw, finished=False).text == "A red car parked on a street."
    assert clean(raw, finished=True).text == raw  # a finished one is kept whole
    # no complete sentence to fall back to: keep what there is
    assert clean("a red car parked next to a", finished=False).text == "a red car parked next to a"


def test_boilerplate_can_be_kept():
    assert clean("an image of a dog", CleaningRules(strip_boilerplate=False)).text == "an image of a dog"
    assert strip_boilerplate("this image shows an image of a cat") == "a cat"
