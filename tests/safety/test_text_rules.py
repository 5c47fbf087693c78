"""Caption rules of the safety stage: personal data, word lists, a transformers text classifier."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curate import pii, schema
from curate.dataset import Dataset
from curate.stage import ShardContext
from curate.stages.safety import SafetyConfig, SafetyStage

# (caption, {kind: exact text that must be found})
PLANTED = [
    ("Contact john.doe@example.com or call (555) 123-4567 for prints",
     {"email": "john.doe@example.com", "phone": "(555) 123-4567"}),
    ("My card 4111 1111 1111 1111 was stolen at 221B Baker Street, London",
     {"card": "4111 1111 1111 1111", "address": "221B Baker Street"}),
    ("Spende an DE89 3704 0044 0532 0130 00 - Hauptstraße 5, Berlin",
     {"iban": "DE89 3704 0044 0532 0130 00", "address": "Hauptstraße 5"}),
    ("Applicant SSN 123-45-6789, tel: 030 12345678, WhatsApp +44 20 7946 0958",
     {"ssn": "123-45-6789", "phone": "030 12345678"}),
    ("Wedding photographer | bookings: anna_m+weddings@studio-photo.co.uk",
     {"email": "anna_m+weddings@studio-photo.co.uk"}),
    ("For sale: 3 bed house, 1600 Pennsylvania Ave, call 202-456-1111",
     {"address": "1600 Pennsylvania Ave", "phone": "202-456-1111"}),
]
CLEAN = [
    "Vintage poster 1920x1080, printed 2019, size 50 x 70 cm, price $1,299.99",
    "Photo taken 2020-01-15 by the lake, f/2.8 1/250s ISO 100",
    "Product code 4111111111111112 (fails Luhn), ISBN 978-3-16-148410-0",
    "IMG_20190704_123456.jpg - sunset over the bay",
    "Route 66 road trip, mile marker 1234",
    "Set of 12 wine glasses 350 ml",
]


@pytest.mark.parametrize("caption,want", PLANTED)
def test_pii_found_and_scrubbed_in_realistic_captions(caption, want):
    spans = pii.find(caption)
    found = {}
    for s in spans:
        found.setdefault(s.kind, []).append(caption[s.start:s.end])
    for kind, text in want.items():
        assert text in found.get(kind, []), (kind, found)
    scrubbed = pii.scrub(caption, spans)
    for text in want.values():
        assert text not in scrubbed
    for kind in want:
        assert pii.PLACEHOLDER[kind] in scrubbed
    # the words around the personal data survive
    assert caption.split()[0] in scrubbed


@pytest.mark.parametrize("caption", CLEAN)
def test_numbers_that_are_not_personal_are_left_alone(caption):
    assert pii.find(caption) == []


def test_checksums():
    assert pii.luhn_ok("4111111111111111") and pii.luhn_ok("378282246310005")
    assert not pii.luhn_ok("4111111111111112")
    assert pii.iban_ok("GB82 WEST 1234 5698 7654 32") and pii.iban_ok("DE89370400440532013000")
    assert not pii.iban_ok("GB82 WEST 1234 5698 7654 33") and not pii.iban_ok("DE8937040044053201300")
    assert not pii.find("SSN 000-12-3456 and 666-12-3456 are never issued")


def _run(cfg: SafetyConfig, captions: list[str], tmp_path) -> pa.Table:
    table = pa.table({schema.UID: [f"{i:032x}" for i in range(len(captions))], schema.CAPTION: captions})
    stage = SafetyStage(cfg)
    stage.check(None)
    stage.setup()
    ctx = ShardContext(shard=0, input_path=None, input=None, output=Dataset(str(tmp_path / "o")), plan_dir="",
                       options=None)
    return stage.process(table, ctx)


def test_pii_scrub_keeps_the_original_and_flags(tmp_path):
    captions = [c for c, _ in PLANTED] + CLEAN
    out = _run(SafetyConfig(pii={"action": "scrub"}), captions, tmp_path)
    assert out.column(schema.DROP_REASON).null_count == len(captions)  # scrub keeps every row
    new = out.column(schema.CAPTION).to_pylist()
    orig = out.column(schema.CAPTION_ORIGINAL).to_pylist()
    flags = out.column(schema.SAFETY_FLAGS).to_pylist()
    for i, (caption, want) in enumerate(PLANTED):
        assert orig[i] == caption and new[i] != caption
        assert all(t not in new[i] for t in want.values())
        assert {f"pii:{k}" for k in want} <= set(flags[i])
    for j in range(len(PLANTED), len(captions)):
        assert new[j] == captions[j] and orig[j] is None and flags[j] is None


def test_pii_drop_and_flag(tmp_path):
    captions = [c for c, _ in PLANTED] + CLEAN
    out = _run(SafetyConfig(pii={"action": "drop", "kinds": ["email"]}), captions, tmp_path)
    want = ["safety:pii" if "email" in w else None for _, w in PLANTED] + [None] * len(CLEAN)
    assert out.column(schema.DROP_REASON).to_pylist() == want
    assert schema.CAPTION_ORIGINAL not in out.column_names
    out = _run(SafetyConfig(pii={"action": "flag"}), captions, tmp_path)
    assert out.column(schema.DROP_REASON).null_count == len(captions)
    assert out.column(schema.CAPTION).to_pylist() == captions


def test_word_list_whole_words_from_a_file(tmp_path):
    (tmp_path / "words.txt").write_text("# blocked words\ngun\nblood bath\n")
    captions = ["a toy gun on a table", "the show has begun", "Blood Bath and beyond", "GUN!", "gunmetal grey car"]
    out = _run(SafetyConfig(words={"word_files": [str(tmp_path / "words.txt")]}), captions, tmp_path)
    assert out.column(schema.DROP_REASON).to_pylist() == ["safety:words", None, "safety:words", "safety:words", None]
    out = _run(SafetyConfig(words={"words": ["gun"], "action": "flag"}), captions, tmp_path)
    assert out.column(schema.DROP_REASON).null_count == 5
    assert out.column(schema.SAFETY_FLAGS).to_pylist() == [["words"], None, None, ["words"], None]


def test_text_classifier_scores_like_transformers_pipeline(tmp_path, text_classifier_dir):
    from transformers import pipeline

    captions = [f"a photo of a {a} {b}" for a in ("red", "blue", "old", "small", "dark") for b in
                ("dog", "cat", "house", "tree", "car", "boat")]
    # longer than the model's 64 positions: truncated like the pipeline's tokenizer call does, not an error
    captions.append(" ".join(["a red dog in a field"] * 30))
    oracle = pipeline("text-classification", model=text_classifier_dir, top_k=None, device="cpu")
    want = np.array([next(d["score"] for d in res if d["label"] == "unsafe")
                     for res in oracle(captions, truncation=True, max_length=64)])
    threshold = float(np.median(want))
    cfg = SafetyConfig(text_classifier={"model": text_classifier_dir, "unsafe_labels": ["unsafe"],
                                        "drop_above": threshold})
    out = _run(cfg, captions, tmp_path)
    np.testing.assert_allclose(out.column(schema.TEXT_UNSAFE).to_numpy(), want, rtol=1e-4, atol=1e-5)
    expect = ["safety:text" if s > threshold else None for s in want]
    assert out.column(schema.DROP_REASON).to_pylist() == expect
    assert 0 < expect.count(None) < len(captions)


def test_text_classifier_with_an_unknown_label_is_refused(text_classifier_dir):
    from curate.config import ConfigError

    stage = SafetyStage(SafetyConfig(text_classifier={"model": text_classifier_dir, "unsafe_labels": ["toxic"]}))
    with pytest.raises(ConfigError, match="toxic"):
        stage.check(None)
    stage = SafetyStage(SafetyConfig(text_classifier={"model": "/nonexistent/model"}))
    with pytest.raises(ConfigError, match="cannot be loaded"):
        stage.check(None)


@pytest.mark.gpu
def test_text_classifier_on_gpu_matches_cpu(tmp_path, text_classifier_dir):
    captions = [f"a {c} dog on the grass" for c in ("red", "blue", "old", "small")]
    scores = {}
    for device in ("cpu", "cuda"):
        cfg = SafetyConfig(device=device, text_classifier={"model": text_classifier_dir, "unsafe_labels": ["unsafe"]})
        scores[device] = _run(cfg, captions, tmp_path).column(schema.TEXT_UNSAFE).to_numpy()
    np.testing.assert_allclose(scores["cuda"], scores["cpu"], rtol=1e-3, atol=1e-4)
