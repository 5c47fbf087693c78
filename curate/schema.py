"""Column names and Arrow types of a curate row (ARCHITECTURE §3).

Every other module refers to columns through the constants here, never through string literals,
so a rename happens in one place.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1

# identity and input
UID = "uid"
URL = "url"
CAPTION = "caption"
KEY = "key"

# download / import
STATUS = "status"
ERROR_MESSAGE = "error_message"
WIDTH = "width"
HEIGHT = "height"
ORIGINAL_WIDTH = "original_width"
ORIGINAL_HEIGHT = "original_height"
SHA256 = "sha256"
ORIGINAL_SHA256 = "original_sha256"  # import: the input's own sha256 (img2dataset: of the downloaded bytes)
IMAGE_TAR = "image_tar"
IMAGE_OFFSET = "image_offset"
IMAGE_LENGTH = "image_length"
IMAGE_FORMAT = "image_format"  # member extension: jpg, png, webp

# dedup
PHASH = "phash"
COLOR_SIG = "color_sig"  # 4x4 grid of mean CIELAB colours, 48 bytes, from the same decode as the pHash
PHASH_CROPS = "phash_crops"  # pHashes of 5 crops keeping 97% of each side (corners, centre), 40 bytes
DUP_OF = "dup_of"

# clip
CLIP_SCORE = "clip_score"
IMAGE_EMBEDDING = "image_embedding"
TEXT_EMBEDDING = "text_embedding"
CLIP_CONCEPT = "clip_concept"  # the concept prompt an image matched (concept filter)

# filter
LANGUAGE = "language"  # detected language (ISO 639-1 where one exists), or "und": not placed with confidence
LANGUAGE_SCORE = "language_score"  # the detector's probability for that language
LANGUAGE_DETECTOR = "language_detector"  # which detector: fasttext, lingua

# recaption
RECAPTION = "recaption"
RECAPTION_CLIP_SCORE = "recaption_clip_score"
RECAPTION_FLAG = "recaption_flag"  # why a kept row has no recaption (on_bad: flag): empty, degenerate

# export
CAPTION_SOURCE = "caption_source"  # "original" or "recaption": what export wrote into KEY.txt
SPLIT = "split"  # "train" or "val"

# safety, decontaminate and export's face blurring (issue 13)
PUNSAFE = "punsafe"  # nsfw head: probability the image is unsafe (LAION's column name)
PWATERMARK = "pwatermark"  # watermark head: probability of a watermark (LAION's column name)
AESTHETIC_SCORE = "aesthetic_score"  # aesthetic head: LAION-style 1-10 regression
TEXT_UNSAFE = "text_unsafe"  # text classifier: probability the caption is unsafe
SAFETY_FLAGS = "safety_flags"  # rules that flagged (not dropped) a row: pii:email, words, text, ...
CAPTION_ORIGINAL = "caption_original"  # the caption as it was before PII scrubbing (scrubbed rows only)
BLOCKLIST_MATCH = "blocklist_match"  # the blocklisted sha256 / pHash (hex) a row matched
DECONTAM_MATCH = "decontam_match"  # "<reference set>:<item>" a row matched
DECONTAM_PHASH_DISTANCE = "decontam_phash_distance"  # Hamming distance to that item (pHash match)
DECONTAM_COSINE = "decontam_cosine"  # cosine to that item (CLIP embedding match)
FACE_COUNT = "face_count"  # export with blur_faces: faces found
FACE_BOXES = "face_boxes"  # [[x, y, w, h], ...] in the exported image's pixels
FACE_BLURRED = "face_blurred"  # the exported bytes were re-encoded with faces blurred
UNBLURRED_SHA256 = "unblurred_sha256"  # sha256 of the bytes before blurring (blurred rows only)
# Score column of each built-in safety head; a user head "x" writes head_column("x") = "x_score".
HEAD_COLUMNS = {"nsfw": PUNSAFE, "watermark": PWATERMARK, "aesthetic": AESTHETIC_SCORE}


def head_column(head: str) -> str:
    return HEAD_COLUMNS.get(head, f"{head}_score")


# rejects only
DROP_REASON = "drop_reason"

# img2dataset status values
STATUS_SUCCESS = "success"
STATUS_FAILED_TO_DOWNLOAD = "failed_to_download"
STATUS_FAILED_TO_RESIZE = "failed_to_resize"
STATUS_FAILED_TO_DECODE = "failed_to_decode"

TYPES: dict[str, pa.DataType] = {
    UID: pa.string(),
    URL: pa.string(),
    CAPTION: pa.string(),
    KEY: pa.string(),
    STATUS: pa.string(),
    ERROR_MESSAGE: pa.string(),
    WIDTH: pa.int32(),
    HEIGHT: pa.int32(),
    ORIGINAL_WIDTH: pa.int32(),
    ORIGINAL_HEIGHT: pa.int32(),
    SHA256: pa.string(),
    ORIGINAL_SHA256: pa.string(),
    IMAGE_TAR: pa.dictionary(pa.int32(), pa.string()),
    IMAGE_OFFSET: pa.int64(),
    IMAGE_LENGTH: pa.int64(),
    IMAGE_FORMAT: pa.string(),
    PHASH: pa.uint64(),
    COLOR_SIG: pa.binary(48),
    PHASH_CROPS: pa.binary(40),
    DUP_OF: pa.string(),
    CLIP_SCORE: pa.float32(),
    CLIP_CONCEPT: pa.string(),
    LANGUAGE: pa.string(),
    LANGUAGE_SCORE: pa.float32(),
    LANGUAGE_DETECTOR: pa.string(),
    RECAPTION: pa.string(),
    RECAPTION_CLIP_SCORE: pa.float32(),
    RECAPTION_FLAG: pa.string(),
    CAPTION_SOURCE: pa.string(),
    SPLIT: pa.string(),
    PUNSAFE: pa.float32(),
    PWATERMARK: pa.float32(),
    AESTHETIC_SCORE: pa.float32(),
    TEXT_UNSAFE: pa.float32(),
    SAFETY_FLAGS: pa.list_(pa.string()),
    CAPTION_ORIGINAL: pa.string(),
    BLOCKLIST_MATCH: pa.string(),
    DECONTAM_MATCH: pa.string(),
    DECONTAM_PHASH_DISTANCE: pa.int32(),
    DECONTAM_COSINE: pa.float32(),
    FACE_COUNT: pa.int32(),
    FACE_BOXES: pa.list_(pa.list_(pa.int32(), 4)),
    FACE_BLURRED: pa.bool_(),
    UNBLURRED_SHA256: pa.string(),
    DROP_REASON: pa.string(),
}

# Columns that locate the image bytes of a row inside the tar of the dataset that owns them.
POINTER_COLUMNS = (IMAGE_TAR, IMAGE_OFFSET, IMAGE_LENGTH)


def embedding_type(dim: int) -> pa.DataType:
    """Arrow type of an L2-normalised embedding column of ``dim`` float16 values."""
    return pa.list_(pa.float16(), dim)


def reason(stage: str, why: str) -> str:
    """A ``drop_reason`` value: ``stage:why``."""
    return f"{stage}:{why}"


def field(name: str) -> pa.Field:
    return pa.field(name, TYPES[name])


def conform(table: pa.Table) -> pa.Table:
    """Cast the known columns of ``table`` to their canonical types; leave extra columns untouched.

    Stages build columns with whatever Arrow inferred (int64 widths, plain strings); the runner calls
    this before writing so every shard of every dataset has the same physical schema.
    """
    for i, name in enumerate(table.column_names):
        want = TYPES.get(name)
        col = table.column(i)
        if want is None or col.type == want:
            continue
        if pa.types.is_dictionary(want) and not pa.types.is_dictionary(col.type):
            col = col.cast(want.value_type).dictionary_encode()
            if col.type != want:
                col = col.cast(want)
        else:
            col = col.cast(want)
        table = table.set_column(i, pa.field(name, want), col)
    return table


def with_column(table: pa.Table, name: str, values, type_: pa.DataType | None = None) -> pa.Table:
    """Set (replace or append) column ``name``, typed as the schema says unless ``type_`` is given."""
    type_ = type_ or TYPES.get(name)
    arr = values if isinstance(values, (pa.Array, pa.ChunkedArray)) else pa.array(values, type=type_)
    if type_ is not None and arr.type != type_:
        arr = arr.cast(type_)
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, arr)
    return table.append_column(name, arr)
