"""safety: known-bad image hashes, scoring heads on CLIP embeddings, and caption rules (text
classifier, word lists, personal data).

Rules run in this order and a row is dropped by the first that applies (``safety:<rule>``):

1. ``sha256_blocklist`` / ``phash_blocklist``: user lists of known-bad images, one hash per line in
   files at any fsspec URL. sha256 matches exactly; a pHash matches within ``phash_radius`` bits (a
   re-encoded, resized or lightly edited copy), looked up in an in-memory multi-index
   (``curate.hashindex``). The matched entry goes to ``blocklist_match``. A list that cannot be read
   (or holds a line that is not a hash) stops the stage before any work.
2. heads, in config order: small linear/MLP heads on the row's CLIP image (or text) embedding
   (``curate.heads``: file format, conversion of LAION's published heads). Each writes its score
   column (``nsfw`` -> ``punsafe``, ``watermark`` -> ``pwatermark``, ``aesthetic`` ->
   ``aesthetic_score``, a user head ``x`` -> ``x_score``) for every row, and with ``drop_above`` /
   ``drop_below`` rejects ``safety:<head>``. Embeddings are read from the input (``clip`` with
   ``embeddings: true``); without them they are computed with the open_clip model of ``model``
   (``curate.models.clip``, the clip stage's own code). A head trained on another embedding model or
   width is refused before any work.
3. ``text_classifier``: any ``transformers`` sequence-classification model directory (a toxicity or
   NSFW caption classifier); ``text_unsafe`` is the probability of the labels named unsafe.
4. ``words``: whole-word, case-insensitive list (inline or files).
5. ``pii``: e-mail addresses, phone numbers, street addresses, card numbers (Luhn), IBANs (mod 97),
   SSN-like ids in the caption (``curate.pii``): ``flag``, ``drop`` or ``scrub`` (the caption is
   rewritten with placeholders and the original kept in ``caption_original``).
Rules with ``action: flag`` keep the row and name themselves in ``safety_flags``.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator, model_validator

from curate import schema
from curate.config import ConfigError
from curate.dataset import Dataset, read_images, sha256_hex
from curate.stage import Frozen, Resources, ShardContext, Stage, StageConfig

log = logging.getLogger(__name__)

NAME = "safety"
UNDECODABLE = schema.reason(NAME, "undecodable")
_HEAD_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_PHASH_RE = re.compile(r"^(?:0x)?[0-9a-f]{16}$")
# Rule names a head cannot take (they are drop reasons of their own).
_RESERVED = {"sha256_blocklist", "phash_blocklist", "text", "words", "pii", "undecodable"}


class HeadSpec(Frozen):
    """One head: its name (score column and drop reason), its file, and an optional threshold rule."""

    name: str
    path: str
    drop_above: float | None = None  # reject rows whose score is > this
    drop_below: float | None = None  # reject rows whose score is < this

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _HEAD_NAME.match(v) or v in _RESERVED:
            raise ValueError(f"head name {v!r} must be lower-case letters, digits and _ (not one of {sorted(_RESERVED)})")
        return v


class TextClassifier(Frozen):
    model: str  # a transformers sequence-classification model directory (or hub id)
    unsafe_labels: list[str] = []  # id2label names counted as unsafe; empty: every label but label 0
    drop_above: float = Field(0.5, ge=0.0, le=1.0)
    action: Literal["drop", "flag"] = "drop"
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(128, ge=8)


class WordRules(Frozen):
    words: list[str] = []
    word_files: list[str] = []
    action: Literal["drop", "flag"] = "drop"


class PiiRules(Frozen):
    kinds: list[Literal["email", "card", "iban", "ssn", "phone", "address"]] = \
        ["email", "card", "iban", "ssn", "phone", "address"]
    action: Literal["flag", "drop", "scrub"] = "scrub"


class SafetyConfig(StageConfig):
    heads: list[HeadSpec] = []
    # open_clip model whose embeddings the heads read; None: the model of the nearest clip stage of the
    # input's lineage (its stored embeddings). When it differs from that model (or the input has no
    # embeddings), embeddings are computed with it.
    model: str | None = None
    pretrained: str | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(256, ge=1)
    text_classifier: TextClassifier | None = None
    words: WordRules | None = None
    pii: PiiRules | None = None
    sha256_blocklist_files: list[str] = []
    phash_blocklist_files: list[str] = []
    phash_radius: int = Field(4, ge=0, le=16)
    resources: Resources = Resources(num_cpus=1)

    @model_validator(mode="after")
    def _check(self) -> SafetyConfig:
        names = [h.name for h in self.heads]
        if len(set(names)) != len(names):
            raise ValueError(f"two heads share a name: {names}")
        if not (self.heads or self.text_classifier or self.words or self.pii or self.sha256_blocklist_files
                or self.phash_blocklist_files):
            raise ValueError("nothing to do: give heads, text_classifier, words, pii or a blocklist")
        return self


# -- files ----------------------------------------------------------------------------------------
def read_list(url: str, what: str) -> list[str]:
    """Non-empty, non-comment lines of a list file at any fsspec URL; ConfigError if unreadable."""
    import fsspec

    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return [s for s in (line.strip() for line in f) if s and not s.startswith("#")]
    except FileNotFoundError:
        raise ConfigError(f"{what} {url} not found; the stage does not run without it") from None
    except Exception as e:  # noqa: BLE001 - any failure to read the list is the same user-facing problem
        raise ConfigError(f"{what} {url} cannot be read ({type(e).__name__}: {e}); "
                          "the stage does not run without it") from None


def read_sha256_list(url: str) -> set[str]:
    out = set()
    for i, s in enumerate(read_list(url, "sha256 blocklist"), 1):
        s = s.split()[0].lower()
        if not _SHA_RE.match(s):
            raise ConfigError(f"sha256 blocklist {url}: entry {i} ({s[:70]!r}) is not 64 hex digits")
        out.add(s)
    return out


def read_phash_list(url: str) -> list[int]:
    out = []
    for i, s in enumerate(read_list(url, "pHash blocklist"), 1):
        s = s.split()[0].lower()
        if not _PHASH_RE.match(s):
            raise ConfigError(f"pHash blocklist {url}: entry {i} ({s[:70]!r}) is not a 16-hex-digit pHash")
        out.append(int(s, 16))
    return out


def lineage_clip(inp: Dataset) -> tuple[str | None, str | None]:
    """(model, pretrained) of the nearest clip stage up the input's lineage, or (None, None)."""
    from curate.lineage import lineage

    for ds in lineage(inp).datasets:  # newest first, on storage only
        manifest = ds.manifest() or {}
        if manifest.get("stage") == "clip":
            cfg = manifest.get("config") or {}
            return cfg.get("model"), cfg.get("pretrained")
    return None, None


def open_clip_embed_dim(model: str) -> int | None:
    """The embedding width of an open_clip model from its config alone (no weights loaded)."""
    import json
    import os

    from curate.models.clip import resolve_model

    name, _ = resolve_model(model, None)
    if name.startswith("local-dir:"):
        path = os.path.join(name.removeprefix("local-dir:"), "open_clip_config.json")
        try:
            with open(path) as f:
                return int(json.load(f)["model_cfg"]["embed_dim"])
        except (OSError, KeyError, ValueError):
            return None
    if name.startswith("hf-hub:"):
        return None
    import open_clip

    cfg = open_clip.get_model_config(name)
    return int(cfg["embed_dim"]) if cfg else None


# -- the stage ------------------------------------------------------------------------------------
class SafetyStage(Stage):
    name = NAME
    Config = SafetyConfig
    uses_model = True

    config: SafetyConfig

    def __init__(self, config: SafetyConfig):
        super().__init__(config)
        self.heads: list[Any] = []
        self._sha: set[str] = set()
        self._phash_list: list[int] = []
        self._phash_index = None
        self._words: re.Pattern | None = None
        self._clip = None
        self._text = None
        self._source: tuple[str | None, str | None, dict[str, int], bool] | None = None

    # -- before any work --------------------------------------------------------------------------
    def models(self) -> list[tuple[str, str, str | None]]:
        # heads without a model of their own read stored embeddings, or embed with the clip step's model
        cfg = self.config
        out: list[tuple[str, str, str | None]] = [("open_clip", cfg.model, cfg.pretrained)] if cfg.model else []
        return out + ([("transformers", cfg.text_classifier.model, None)] if cfg.text_classifier else [])

    def needs(self) -> dict[str, str]:
        if not self.config.heads or self.config.model is not None:
            return {}
        # without a model of its own the heads read the embeddings (or the model) of an earlier clip step
        return {schema.CLIP_SCORE: "add a clip step before it (embeddings: true), or set the safety "
                                   "step's model (and pretrained)"}

    def _embedding_source(self, inp: Dataset | None) -> tuple[str | None, str | None, dict[str, int], bool]:
        """(model, pretrained, {input: width}, stored) of the embeddings the heads will read."""
        cfg = self.config
        names = inp.schema() if inp is not None else None
        widths: dict[str, int] = {}
        for kind, col in (("image", schema.IMAGE_EMBEDDING), ("text", schema.TEXT_EMBEDDING)):
            if names is not None and col in names.names and pa.types.is_fixed_size_list(names.field(col).type):
                widths[kind] = names.field(col).type.list_size
        stored = bool(widths)
        model, pretrained = lineage_clip(inp) if (inp is not None and stored) else (None, None)
        from curate.heads import model_key

        if stored and cfg.model is not None and model is not None and (
                model_key(cfg.model) != model_key(model) or (cfg.pretrained or None) != (pretrained or None)):
            # the heads want another model's embeddings than the ones stored: embed again with it
            stored = False
        if stored:
            model, pretrained = model or cfg.model, pretrained or cfg.pretrained
            return model, pretrained, widths, True
        if cfg.model is None:
            model, pretrained = lineage_clip(inp) if inp is not None else (None, None)
            if model is None:
                raise ConfigError("safety: heads need CLIP embeddings and the input has none; run clip with "
                                  "embeddings: true first, or set model (and pretrained) to compute them")
        else:
            model, pretrained = cfg.model, cfg.pretrained
        dim = open_clip_embed_dim(model)
        return model, pretrained, ({"image": dim, "text": dim} if dim else {}), False

    def check(self, input: Dataset | None) -> None:
        from curate.heads import HeadError, check_head, load_head

        cfg = self.config
        for url in cfg.sha256_blocklist_files:
            read_sha256_list(url)
        for url in cfg.phash_blocklist_files:
            read_phash_list(url)
        if cfg.words:
            for url in cfg.words.word_files:
                read_list(url, "word list")
        if cfg.heads:
            model, pretrained, widths, _ = self._embedding_source(input)
            for spec in cfg.heads:
                try:
                    head = load_head(spec.path)
                    check_head(head, spec.name, model, pretrained, widths.get(head.meta.input))
                except HeadError as e:
                    raise ConfigError(str(e)) from None
        if cfg.text_classifier:
            self._check_text_model(cfg.text_classifier)

    @staticmethod
    def _check_text_model(tc: TextClassifier) -> None:
        from transformers import AutoConfig

        try:
            mcfg = AutoConfig.from_pretrained(tc.model)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds; the user needs one line
            raise ConfigError(f"safety: text_classifier model {tc.model} cannot be loaded "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
        labels = set((mcfg.id2label or {}).values())
        missing = [x for x in tc.unsafe_labels if x not in labels]
        if missing:
            raise ConfigError(f"safety: text_classifier unsafe_labels {missing} are not labels of {tc.model} "
                              f"(it has {sorted(labels)})")

    # -- per worker -------------------------------------------------------------------------------
    def setup(self) -> None:
        from curate.hashindex import HashIndex
        from curate.heads import load_head

        cfg = self.config
        self._sha = set().union(*(read_sha256_list(u) for u in cfg.sha256_blocklist_files)) \
            if cfg.sha256_blocklist_files else set()
        self._phash_list = sorted({h for u in cfg.phash_blocklist_files for h in read_phash_list(u)})
        if self._phash_list:
            self._phash_index = HashIndex(np.array(self._phash_list, dtype=np.uint64), cfg.phash_radius)
        self.heads = [load_head(spec.path) for spec in cfg.heads]
        if cfg.words:
            words = [*cfg.words.words, *(w for u in cfg.words.word_files for w in read_list(u, "word list"))]
            if words:
                alts = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
                self._words = re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)
        if cfg.text_classifier:
            self._load_text(cfg.text_classifier)

    def _load_text(self, tc: TextClassifier) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from curate.models.clip import pick_device

        device = pick_device(self.config.device)
        tok = AutoTokenizer.from_pretrained(tc.model)
        model = AutoModelForSequenceClassification.from_pretrained(tc.model).to(device).eval()
        id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
        if tc.unsafe_labels:
            bad = [i for i, v in id2label.items() if v in tc.unsafe_labels]
        else:
            bad = [i for i in range(model.config.num_labels) if i != 0]
        multi = model.config.problem_type == "multi_label_classification"
        # never past what the model can embed: a longer caption is truncated, not an error
        limits = [tc.max_length, getattr(model.config, "max_position_embeddings", None), tok.model_max_length]
        max_len = min(x for x in limits if isinstance(x, int) and 0 < x < 1_000_000)
        self._text = (tok, model, torch.tensor(bad, device=device), multi, device, max_len)

    # -- scoring ----------------------------------------------------------------------------------
    def _embeddings(self, table: pa.Table, ctx: ShardContext) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{"image"/"text": (float32 [N, D], bool ok [N])} for the inputs the heads read."""
        wanted = {h.meta.input for h in self.heads}
        cols = {"image": schema.IMAGE_EMBEDDING, "text": schema.TEXT_EMBEDDING}
        out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self._source is None:
            self._source = self._embedding_source(ctx.input)
        if self._source[3] and all(cols[k] in table.column_names for k in wanted):
            for k in wanted:
                out[k] = embedding_matrix(table.column(cols[k]))
            return out
        if self._clip is None:
            from curate.stages.clip import ClipConfig, ClipStage

            model, pretrained, _, _ = self._source
            self._clip = ClipStage(ClipConfig(model=model, pretrained=pretrained, device=self.config.device,
                                              batch_size=self.config.batch_size, embeddings=True,
                                              resources=self.config.resources))
        t = time.perf_counter()
        scored = self._clip.score(table, ctx.input)
        ctx.add_time("embed", time.perf_counter() - t)
        for k in wanted:
            out[k] = embedding_matrix(scored.column(cols[k]))
        return out

    def _text_scores(self, captions: list[str]) -> np.ndarray:
        import torch

        tok, model, bad, multi, device, max_len = self._text
        tc = self.config.text_classifier
        out = []
        for i in range(0, len(captions), tc.batch_size):
            enc = tok(captions[i:i + tc.batch_size], padding=True, truncation=True, max_length=max_len,
                      return_tensors="pt").to(device)
            with torch.inference_mode():
                logits = model(**enc).logits.float()
            p = torch.sigmoid(logits) if multi else torch.softmax(logits, dim=1)
            sel = p[:, bad]
            out.append((sel.max(dim=1).values if multi else sel.sum(dim=1)).cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        cfg = self.config
        n = table.num_rows
        reasons: list[str | None] = [None] * n
        flags: list[list[str]] = [[] for _ in range(n)]
        drops: dict[str, int] = {}

        def reject(i: int, rule: str) -> None:
            if reasons[i] is None:
                reasons[i] = schema.reason(NAME, rule)
                drops[rule] = drops.get(rule, 0) + 1

        # 1. blocklists
        if self._sha or self._phash_index is not None:
            table, matches = self._blocklists(table, reject, ctx.input)
            if any(m is not None for m in matches):
                table = schema.with_column(table, schema.BLOCKLIST_MATCH, pa.array(matches, pa.string()))
        # 2. heads
        if self.heads:
            emb = self._embeddings(table, ctx)
            t = time.perf_counter()
            for spec, head in zip(cfg.heads, self.heads, strict=True):
                x, ok = emb[head.meta.input]
                scores = head.score(x)
                for i in np.flatnonzero(~ok):
                    reject(int(i), "undecodable")
                col = pa.array(scores, type=pa.float32(), mask=~ok)
                table = schema.with_column(table, schema.head_column(spec.name), col, pa.float32())
                bad = np.zeros(n, dtype=bool)
                if spec.drop_above is not None:
                    bad |= ok & (scores > spec.drop_above)
                if spec.drop_below is not None:
                    bad |= ok & (scores < spec.drop_below)
                for i in np.flatnonzero(bad):
                    reject(int(i), spec.name)
            ctx.add_time("heads", time.perf_counter() - t)
        captions = [c or "" for c in table.column(schema.CAPTION).to_pylist()] \
            if schema.CAPTION in table.column_names else [""] * n
        # 3. text classifier
        if self._text is not None:
            t = time.perf_counter()
            tc = cfg.text_classifier
            scores = self._text_scores(captions)
            table = schema.with_column(table, schema.TEXT_UNSAFE, pa.array(scores, pa.float32()))
            for i in np.flatnonzero(scores > tc.drop_above):
                if tc.action == "drop":
                    reject(int(i), "text")
                else:
                    flags[i].append("text")
            ctx.add_time("text_classifier", time.perf_counter() - t)
        # 4. word lists
        if self._words is not None:
            for i, c in enumerate(captions):
                if self._words.search(c):
                    if cfg.words.action == "drop":
                        reject(i, "words")
                    else:
                        flags[i].append("words")
        # 5. personal data
        if cfg.pii:
            table = self._pii(table, captions, reasons, flags, reject)
        if cfg.pii or any(flags) or (cfg.text_classifier and cfg.text_classifier.action == "flag") or \
                (cfg.words and cfg.words.action == "flag"):
            table = schema.with_column(table, schema.SAFETY_FLAGS,
                                       pa.array([f or None for f in flags], pa.list_(pa.string())))
        table = schema.with_column(table, schema.DROP_REASON, pa.array(reasons, pa.string()))
        flag_counts: dict[str, int] = {}
        for f in flags:
            for x in f:
                flag_counts[x] = flag_counts.get(x, 0) + 1
        ctx.stats[NAME] = {"drops": drops, "flags": flag_counts}
        return table

    def _blocklists(self, table: pa.Table, reject, inp: Dataset) -> tuple[pa.Table, list[str | None]]:
        from curate.phash import phash_bytes, to_hex

        n = table.num_rows
        cols = table.column_names
        shas = table.column(schema.SHA256).to_pylist() if schema.SHA256 in cols else [None] * n
        hashes = table.column(schema.PHASH).to_pylist() if schema.PHASH in cols else [None] * n
        need_sha = bool(self._sha) and any(s is None for s in shas)
        need_phash = self._phash_index is not None and any(h is None for h in hashes)
        if need_sha or need_phash:
            # only rows missing a hash are read; the bytes are the ones the pointer names
            todo = [i for i in range(n) if (need_sha and shas[i] is None) or (need_phash and hashes[i] is None)]
            blobs = read_images(table.take(todo), inp)
            fresh = phash_bytes(blobs) if need_phash else [None] * len(todo)
            for i, blob, h in zip(todo, blobs, fresh, strict=True):
                if need_sha and shas[i] is None and blob is not None:
                    shas[i] = sha256_hex(blob)
                if need_phash and hashes[i] is None:
                    hashes[i] = h
        matches: list[str | None] = [None] * n
        if self._sha:
            for i, s in enumerate(shas):
                if s is not None and s.lower() in self._sha:
                    matches[i] = s.lower()
                    reject(i, "sha256_blocklist")
        if self._phash_index is not None:
            have = [i for i in range(n) if hashes[i] is not None and matches[i] is None]
            ref, _dist = self._phash_index.query(np.array([hashes[i] for i in have], dtype=np.uint64))
            for i, r in zip(have, ref.tolist(), strict=True):
                if r >= 0:
                    matches[i] = to_hex(self._phash_list[r])
                    reject(i, "phash_blocklist")
        return table, matches

    def _pii(self, table: pa.Table, captions: list[str], reasons, flags, reject) -> pa.Table:
        from curate import pii

        rules = self.config.pii
        originals: list[str | None] = [None] * len(captions)
        new = list(captions)
        for i, c in enumerate(captions):
            spans = pii.find(c, rules.kinds)
            if not spans:
                continue
            kinds = sorted({s.kind for s in spans})
            if rules.action == "drop":
                reject(i, "pii")
            else:
                flags[i].extend(f"pii:{k}" for k in kinds)
            if rules.action == "scrub":
                originals[i] = c
                new[i] = pii.scrub(c, spans)
        if rules.action == "scrub" and schema.CAPTION in table.column_names:
            table = schema.with_column(table, schema.CAPTION, pa.array(new, pa.string()))
            table = schema.with_column(table, schema.CAPTION_ORIGINAL, pa.array(originals, pa.string()))
        return table

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        cfg = self.config
        return {
            "order": ["sha256_blocklist", "phash_blocklist", *(h.name for h in cfg.heads), "text", "words", "pii"],
            "heads": {h.name: {"column": schema.head_column(h.name), "path": h.path, "drop_above": h.drop_above,
                               "drop_below": h.drop_below} for h in cfg.heads},
            "phash_radius": cfg.phash_radius,
        }


def embedding_matrix(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float32 [N, D] (zeros where null) and the bool mask of rows that have an embedding."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n, dim = len(arr), arr.type.list_size
    ok = ~pc.is_null(arr).to_numpy(zero_copy_only=False)
    x = np.zeros((n, dim), np.float32)
    if ok.any():
        good = arr if ok.all() else arr.filter(pa.array(ok))
        x[ok] = good.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, dim)
    return x, ok
