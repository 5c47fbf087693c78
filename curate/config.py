"""Configs: YAML files and ``--set key=value`` overrides -> typed, frozen stage configs; pipelines.

Validation happens before any work starts and fails with one line naming the key. The resolved
config (every default filled in) is what the manifest records and what resume compares.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import yaml
from pydantic import ValidationError

from curate.stage import Frozen, StageConfig


class ConfigError(ValueError):
    """A user-facing configuration problem; its message is one line."""


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def parse_sets(sets: Sequence[str]) -> dict[str, Any]:
    """``["a.b=3", "c=[x, y]"]`` -> ``{"a": {"b": 3}, "c": ["x", "y"]}``; values are parsed as YAML."""
    out: dict[str, Any] = {}
    for item in sets:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a mapping")
        node[parts[-1]] = value
    return out


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def describe(e: ValidationError, where: str, cls: type | None = None) -> str:
    """First validation error as one line: ``where: key.path: message (got value)``; an unknown key
    gets the nearest known key and the list of known keys at that level."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key" + _suggest(cls, [str(p) for p in err["loc"]])
    got = err.get("input")
    shown = "" if isinstance(got, dict) or err["type"] == "extra_forbidden" else f" (got {got!r})"
    more = len(e.errors()) - 1
    tail = f"; and {more} more problem{'s' if more > 1 else ''}" if more else ""
    return f"{where}: {loc}: {msg}{shown}{tail}"


def _suggest(cls: type | None, loc: list[str]) -> str:
    """'; did you mean image_size? known keys: a, b, c' for the unknown key at ``loc``."""
    import difflib

    from pydantic import BaseModel

    node = cls
    for part in loc[:-1]:
        field = node.model_fields.get(part) if node is not None else None
        ann = field.annotation if field is not None else None
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if node is None:
        return ""
    known = list(node.model_fields)
    near = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
    hint = f"; did you mean {'.'.join([*loc[:-1], near[0]])}?" if near else ""
    return f"{hint} known keys{' in ' + '.'.join(loc[:-1]) if loc[:-1] else ''}: {', '.join(known)}"


def build(config_cls: type[StageConfig], data: dict[str, Any], where: str) -> StageConfig:
    try:
        return config_cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, where, config_cls)) from None


def load_stage_config(
    config_cls: type[StageConfig],
    stage: str,
    config_file: str | None = None,
    inline: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> StageConfig:
    data: dict[str, Any] = {}
    if config_file:
        data = read_yaml(config_file)
    if inline:
        data = merge(data, inline)
    if sets:
        data = merge(data, parse_sets(sets))
    return build(config_cls, data, f"{stage} config")


def stage_and_config(
    stage: str,
    config_file: str | None = None,
    inline: dict[str, Any] | None = None,
    sets: Sequence[str] = (),
) -> tuple[type, StageConfig]:
    """The stage class for ``stage`` and its validated config; every problem is one ConfigError line."""
    from curate import stages

    try:
        cls = stages.get(stage)
    except stages.UnknownStage as e:
        raise ConfigError(str(e)) from None
    except ImportError as e:
        raise ConfigError(f"stage {stage!r} is not available: {e}") from None
    return cls, load_stage_config(cls.Config, stage, config_file, inline, sets)


def resolved(config: StageConfig) -> dict[str, Any]:
    """The config as plain JSON data, every default filled in. Resources are left out: they change
    where work runs, not what it produces, so resume must not depend on them."""
    return config.model_dump(mode="json", exclude={"resources"})


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- pipelines ---------------------------------------------------------------------------------
class PipelineStep(Frozen):
    stage: str
    name: str | None = None  # output directory name; defaults to the stage name
    input: str | None = None  # overrides "the previous step's output"
    config: dict[str, Any] = {}

    @property
    def dirname(self) -> str:
        return self.name or self.stage


class Pipeline(Frozen):
    name: str
    output: str
    input: str | None = None
    stages: list[PipelineStep]


def load_pipeline(path: str, sets: Sequence[str] = ()) -> Pipeline:
    data = read_yaml(path)
    try:
        pipe = Pipeline.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, path)) from None
    if not pipe.stages:
        raise ConfigError(f"{path}: the pipeline has no stages")
    names = [s.dirname for s in pipe.stages]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"{path}: two steps write to the same directory {sorted(dup)[0]!r}; give one a name")
    # Relative paths in a pipeline file are relative to the directory it is run from.
    return pipe


def check_columns(steps: Sequence[tuple[str, str, str | None, str, type, StageConfig]]) -> None:
    """Raise one ConfigError line when a step needs a column that the steps before it do not leave in.

    ``steps`` are (step name, stage name, input, output, stage class, config), in order. A step that reads raw
    input (download, import) starts from no derived columns; a step that reads an existing dataset
    starts from that dataset's columns; one whose input cannot be read is not checked.
    """
    from curate.dataset import Dataset

    columns: set[str] | None = None
    dropped: dict[str, str] = {}  # column -> the step that dropped it
    prev_out = None
    for name, stage_name, inp, out, cls, config in steps:
        stage = cls(config)
        if not cls.reads_dataset:
            columns, dropped = set(), {}
        elif inp is None or inp != prev_out:  # the pipeline's input, or a step's own input: what is there now
            try:
                found = Dataset(inp).schema() if inp is not None else None
            except Exception:  # noqa: BLE001 - unreadable here (no credentials, not written yet): skip
                found = None
            columns, dropped = (set(found.names) if found is not None else None), {}
        if columns is not None:
            for col, fix in stage.needs().items():
                if col not in columns:
                    where = f"step {dropped[col]!r} drops it" if col in dropped else "no step before it writes it"
                    raise ConfigError(f"pipeline step {name!r} ({stage_name}) needs the {col} column, "
                                      f"and {where}: {fix}")
            after = stage.columns_after(set(columns))
            dropped.update({c: name for c in columns - after})
            for c in after:
                dropped.pop(c, None)
            columns = after
        prev_out = out


# -- describing a stage's keys (``curate config STAGE``, each stage's --help) -------------------
def _field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment in the class source: the comment at the end of its line, else the
    comment lines just above it. The comments beside the fields are the one place their meaning is
    written down, so the listing reads them instead of keeping a second copy that would drift."""
    import inspect
    import io
    import tokenize

    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    depth_line: dict[int, str] = {}
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = src.splitlines()
    for i, line in enumerate(lines, start=1):
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(comments.get(i, ""))
            continue
        name = stripped.split(":", 1)[0].strip()
        if ":" in stripped and name.isidentifier() and line.startswith("    ") and not line.startswith("     "):
            text = comments.get(i) or " ".join(pending)
            if text:
                out[name] = text
            depth_line[i] = name
        pending = []
    return out


def _type_name(annotation: Any) -> str:
    import typing

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return "|".join(str(a) for a in args)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        parts = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(parts) + (" | null" if type(None) in args else "")
    if origin in (list, tuple, set, frozenset):
        inner = _type_name(args[0]) if args else "any"
        return f"list[{inner}]"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _bounds(field: Any) -> str:
    marks = []
    for m in field.metadata:
        for attr, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            v = getattr(m, attr, None)
            if v is not None:
                marks.append(f"{sign} {v}")
    return f" ({', '.join(marks)})" if marks else ""


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, one line of meaning) for every key of a config class, nested
    sections flattened (``image.image_size``)."""
    from pydantic import BaseModel

    rows: list[tuple[str, str, str, str]] = []
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, BaseModel) and klass is not BaseModel:
            comments.update(_field_comments(klass))
    for name, field in cls.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            doc = (ann.__doc__ or "").strip().splitlines()
            rows.append((key, "section", "", comments.get(name) or (doc[0] if doc else "")))
            rows.extend(config_keys(ann, f"{key}."))
            continue
        meaning = field.description or comments.get(name) or KEY_MEANINGS.get(name, "")
        if meaning.startswith("None") and name in KEY_MEANINGS:  # a comment that only explains None
            meaning = f"{KEY_MEANINGS[name]} ({meaning.replace('None', 'null', 1)})"
        default = field.get_default(call_default_factory=True)
        shown = json.dumps(default, default=str) if not isinstance(default, BaseModel) else "{...}"
        rows.append((key, _type_name(ann) + _bounds(field), shown, meaning))
    return rows


# Meanings of keys whose class leaves them uncommented (shared names across stages).
KEY_MEANINGS = {
    "num_cpus": "CPUs one worker of this stage asks Ray for",
    "num_gpus": "GPUs one worker asks for (a model stage gets 1 when the cluster has GPUs)",
    "memory_gb": "memory one worker asks Ray for; null: no reservation",
    "concurrency": "shards at once (tasks in flight or actors); null: as many as CPUs/GPUs allow",
    "url_col": "input column holding the image URL",
    "caption_col": "input column holding the caption; null: no captions",
    "uid_col": "input column with your own uids (kept when present)",
    "extra_columns": "input columns carried into the output",
    "input_format": "format of the URL list files",
    "shard_size": "input rows per shard (the unit of work, retry and resume)",
    "decode_threads": "threads that decode/resize images per download task",
    "compute_phash": "compute the 64-bit perceptual hash while the image is decoded anyway",
    "min_pixels": "drop images with fewer pixels (width x height)",
    "max_pixels": "drop images with more pixels (width x height)",
    "size_from": "check sizes of the original image or of the stored (resized) one",
    "caption_min_words": "drop captions with fewer words",
    "caption_min_chars": "drop captions with fewer characters",
    "caption_max_chars": "drop captions with more characters",
    "language_min_relative_distance": "detector's confidence margin below which a caption is 'unknown'",
    "language_low_accuracy": "faster, less accurate language detection",
    "caption_blocklist": "words/phrases whose captions are dropped",
    "url_blocklist": "URLs/domains whose rows are dropped",
    "sha256_blocklist": "image sha256 values to drop",
    "sha256_blocklist_files": "files with one image sha256 per line to drop",
    "preset": "a named set of rules (datacomp_basic: DataComp's basic filter)",
    "image_size": "target size in px for resizing",
    "resize_mode": "no, border, keep_ratio, keep_ratio_largest, center_crop (img2dataset's modes)",
    "resize_only_if_bigger": "never enlarge an image",
    "output_format": "format the stored images are encoded in",
    "min_image_size": "drop images whose smaller side is below this (px)",
    "seed": "seed of every random choice, so reruns give the same output",
    "batch_size": "rows per model batch",
    "model": "model name or local path",
    "pretrained": "pretrained weights tag (open_clip); null: the weights at model",
    "caption_exts": "tar member extensions read as the caption",
    "per_host_connections": "open connections per host at most",
    "connect_timeout_s": "seconds to wait for a connection",
    "max_bytes": "largest response body read (bytes); bigger ones fail",
    "backoff_s": "first retry delay (s), doubled per retry",
    "backoff_max_s": "longest retry delay (s)",
    "max_redirects": "redirects followed at most (each one re-checked)",
    "user_agent": "User-Agent header sent with each request",
    "disallowed_header_directives": "X-Robots-Tag values that exclude an image (opt-out)",
    "respect_robots_txt": "also honour robots.txt of each host",
    "verify_tls": "check TLS certificates",
    "allow_private_networks": "allow private/loopback addresses (never on the open web)",
    "domain_blocklist_file": "file with one domain per line never fetched",
    "dns_cache_ttl_s": "seconds a DNS answer is reused",
    "dns_concurrency": "DNS lookups at once",
    "upscale_interpolation": "filter used to enlarge",
    "max_total_pixels": "bomb guard: pixels summed over all frames, from the header",
    "substring_files": "files of substrings, one per line",
    "regex_files": "files of regexes, one per line",
    "word_files": "files of whole words, one per line",
    "domain_files": "files of domains, one per line",
    "keep": "which member of a duplicate cluster is kept",
    "engine": "near-duplicate search: sort, faiss, distributed; auto picks by size",
    "rows_per_partition": "hashes per partition of the distributed near-duplicate search",
    "caption_jaccard": "MinHash Jaccard at or above which captions are near-duplicates",
    "minhash_perms": "MinHash permutations per caption",
    "minhash_bands": "LSH bands of the MinHash signature",
    "shingle_chars": "characters per caption shingle",
    "device": "where the model runs; auto: GPU when there is one",
    "min_score": "drop rows whose CLIP score is below this",
    "top_fraction": "keep this global top fraction by CLIP score",
    "concepts": "texts whose similarity to the image is checked (concept filter)",
    "concept_threshold": "similarity to a concept at or above which it matches",
    "concept_action": "drop matching rows, or only tag them",
    "niter": "k-means iterations",
    "max_train_points": "embeddings sampled to train the k-means",
    "revision": "model revision (git tag or commit) to load",
    "family": "model family; auto: read from the checkpoint",
    "decoding": "greedy, beam search or sampling",
    "max_new_tokens": "longest new caption in tokens",
    "num_beams": "beams for beam search",
    "temperature": "sampling temperature",
    "top_p": "nucleus sampling probability mass",
    "top_k": "sample from the k likeliest tokens; 0: no limit",
    "repetition_penalty": "penalty on repeated tokens (1: none)",
    "no_repeat_ngram_size": "never repeat an n-gram of this size (0: off)",
    "dtype": "model weights' dtype; auto: bfloat16 on GPU, float32 on CPU",
    "min_words": "a new caption with fewer words is bad",
    "max_words": "a new caption with more words is bad",
    "max_chars": "a new caption with more characters is bad",
    "max_repeat_fraction": "a new caption whose most repeated word is above this share is bad",
    "on_bad": "reject rows with a bad new caption, or keep them flagged",
    "clip_pretrained": "pretrained tag of the CLIP model that scores new captions",
    "clip_batch_size": "rows per batch when scoring new captions",
    "target_shard_bytes": "bytes per output tar when samples_per_shard is not set",
    "recaption_probability": "chance a row's new caption is used (caption: mix)",
    "val_min_count": "held-out rows at least, when val_fraction is set",
    "max_aspect_ratio": "drop images more elongated than this",
}
