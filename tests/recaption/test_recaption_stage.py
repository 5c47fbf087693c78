"""The recaption stage on Arrow tables (no Ray) and through the runner on an embedded Ray."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from recaption_data import CORRUPT, write_source

from curate import schema
from curate.config import ConfigError
from curate.dataset import Dataset, read_images
from curate.runner import prepare, run_stage
from curate.stage import ShardContext
from curate.stages.recaption import RecaptionConfig, RecaptionStage, decode_image

REASONS = {"recaption:undecodable", "recaption:missing_image", "recaption:empty", "recaption:degenerate"}


def _ctx(ds: Dataset) -> ShardContext:
    return ShardContext(shard=0, input_path=ds.url, input=ds, output=ds, plan_dir="", options=None)


def _stage(model: str, **config) -> RecaptionStage:
    stage = RecaptionStage(RecaptionConfig(model=model, device="cpu", max_new_tokens=12, **config))
    stage.setup()
    return stage


def _check_every_row_accounted(table: pa.Table, out: pa.Table) -> None:
    assert out.num_rows == table.num_rows
    assert out.column(schema.UID).to_pylist() == table.column(schema.UID).to_pylist()
    # the original caption and the carried columns are untouched
    assert out.column(schema.CAPTION).equals(table.column(schema.CAPTION))
    assert out.column("extra").equals(table.column("extra"))
    for recap, reason in zip(out.column(schema.RECAPTION).to_pylist(),
                             out.column(schema.DROP_REASON).to_pylist(), strict=True):
        assert (recap is None) != (reason is None), (recap, reason)  # a caption or a reason, never both
        assert reason is None or reason in REASONS
        assert recap is None or recap.strip() == recap and len(recap.split()) >= 2


@pytest.mark.parametrize("arch", ["blip", "blip2", "llava", "qwen2_vl", "idefics3"])
def test_every_row_gets_a_caption_or_a_reason_and_corrupt_images_do_not_stop_the_batch(tiny_vlms, tmp_path, arch):
    ds = write_source(tmp_path / "src", shards=1, rows=10, corrupt=frozenset({(0, 2), (0, 7)}))
    table = ds.read_shard(0)
    # a row whose pointer leads nowhere
    offsets = table.column(schema.IMAGE_OFFSET).to_pylist()
    offsets[5] = 10**9
    table = schema.with_column(table, schema.IMAGE_OFFSET, offsets)
    stage = _stage(tiny_vlms[arch], batch_size=4, on_bad="reject", repetition_penalty=1.3, no_repeat_ngram_size=2)
    # JPEGs are draft-decoded down to (not below) the model's input side
    assert stage.min_side == {"blip": 32, "blip2": 32, "llava": 32, "qwen2_vl": 65, "idefics3": 32}[arch]
    ctx = _ctx(ds)
    out = stage.process(table, ctx)
    _check_every_row_accounted(table, out)
    reasons = out.column(schema.DROP_REASON).to_pylist()
    assert reasons[2] == reasons[7] == "recaption:undecodable"
    assert reasons[5] == "recaption:missing_image"
    # the rows batched with the corrupt ones were still captioned (or judged on their own output)
    generated = [i for i, r in enumerate(reasons) if r not in ("recaption:undecodable", "recaption:missing_image")]
    assert generated == [0, 1, 3, 4, 6, 8, 9]
    assert ctx.stats["recaption"]["images"] == 7
    assert ctx.stats["recaption"]["generated_tokens"] > 0
    assert {"read", "decode", "generate"} <= set(ctx.timings)


def test_flag_mode_keeps_bad_outputs_with_a_flag(tiny_vlms, tmp_path):
    ds = write_source(tmp_path / "src", shards=1, rows=6, corrupt=frozenset({(0, 1)}))
    table = ds.read_shard(0)
    # max_words=... with min_words high makes every generated caption "degenerate": all flagged
    stage = _stage(tiny_vlms["blip"], on_bad="flag", min_words=50, max_words=60)
    out = stage.process(table, _ctx(ds))
    assert out.column(schema.DROP_REASON).to_pylist() == [None, "recaption:undecodable", None, None, None, None]
    assert out.column(schema.RECAPTION).to_pylist() == [None] * 6
    flags = out.column(schema.RECAPTION_FLAG).to_pylist()
    assert flags[1] is None and set(flags[:1] + flags[2:]) == {"degenerate"}
    reject = _stage(tiny_vlms["blip"], on_bad="reject", min_words=50, max_words=60)
    out = reject.process(table, _ctx(ds))
    assert out.column(schema.DROP_REASON).to_pylist().count("recaption:degenerate") == 5
    assert schema.RECAPTION_FLAG not in out.column_names


def test_output_does_not_depend_on_batch_size(tiny_vlms, tmp_path):
    ds = write_source(tmp_path / "src", shards=1, rows=9, corrupt=frozenset({(0, 4)}))
    table = ds.read_shard(0)
    outs = [
        _stage(tiny_vlms["llava"], batch_size=bs, prompt="Caption: {caption}", on_bad="flag").process(table, _ctx(ds))
        for bs in (1, 8)
    ]
    assert outs[0].equals(outs[1])


def test_out_of_memory_splits_the_batch_and_isolates_the_row_that_never_fits(tiny_vlms, tmp_path, monkeypatch):
    import torch

    ds = write_source(tmp_path / "src", shards=1, rows=8)
    table = ds.read_shard(0)
    want = _stage(tiny_vlms["blip"], batch_size=8, on_bad="flag").process(table, _ctx(ds))
    stage = _stage(tiny_vlms["blip"], batch_size=8, on_bad="flag")
    real = stage.vlm.generate
    calls = []
    poison = (40, 41)  # row 5's image size (see recaption_data.sample_image)

    def generate(images, prompts, **kw):  # fault injection: the device fits 2 images, never row 5's
        calls.append(len(images))
        if len(images) > 2 or any(im.size == poison for im in images):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(images, prompts, **kw)

    monkeypatch.setattr(stage.vlm, "generate", generate)
    got = stage.process(table, _ctx(ds))
    assert calls[0] == 8 and max(calls[1:]) <= 4
    reasons = got.column(schema.DROP_REASON).to_pylist()
    assert reasons == [None] * 5 + ["recaption:out_of_memory"] + [None] * 2
    for i in (0, 1, 2, 3, 4, 6, 7):  # the others: exactly what an unsplit batch gave
        assert got.slice(i, 1).equals(want.slice(i, 1))


def test_decode_mattes_transparency_on_white_and_rejects_bombs():
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (20, 10), (0, 0, 0, 0)).save(buf, "PNG")
    img = decode_image(buf.getvalue(), 8, True, 10**8)
    assert img.mode == "RGB" and np.asarray(img).min() == 255
    with pytest.raises(ValueError, match="pixels"):
        decode_image(buf.getvalue(), 8, True, 100)
    with pytest.raises(Exception):  # noqa: B017 - whatever PIL raises for garbage
        decode_image(CORRUPT, 8, True, 10**8)
    # JPEG draft decoding never goes below the requested side
    buf = io.BytesIO()
    Image.new("RGB", (800, 600), (10, 200, 30)).save(buf, "JPEG")
    small = decode_image(buf.getvalue(), 64, True, 10**8)
    assert min(small.size) >= 64 and small.size[0] < 800
    assert decode_image(buf.getvalue(), 64, False, 10**8).size == (800, 600)


def test_recaption_clip_score_matches_open_clip_reference(tiny_vlms, tmp_path):
    import open_clip
    import torch

    from curate.testing.tiny_models import write_tiny_clip

    clip_dir = write_tiny_clip(tmp_path / "clip")
    ds = write_source(tmp_path / "src", shards=1, rows=6)
    table = ds.read_shard(0)
    # no token may repeat, so the random model's outputs survive cleaning and get scored
    stage = _stage(tiny_vlms["blip"], clip_model=str(clip_dir), on_bad="reject", min_words=1,
                   no_repeat_ngram_size=1)
    out = stage.process(table, _ctx(ds))
    recaps = out.column(schema.RECAPTION).to_pylist()
    scores = out.column(schema.RECAPTION_CLIP_SCORE).to_pylist()
    assert out.schema.field(schema.RECAPTION_CLIP_SCORE).type == pa.float32()
    assert sum(r is not None for r in recaps) >= 3
    # independent reference: open_clip's own eval transform and encoders, cosine of unit vectors
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + str(clip_dir))
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:" + str(clip_dir))
    from PIL import Image

    for blob, recap, score, fmt in zip(read_images(table, ds), recaps, scores,
                                       table.column(schema.IMAGE_FORMAT).to_pylist(), strict=True):
        if recap is None:
            assert score is None
            continue
        with torch.no_grad():
            im = model.encode_image(preprocess(Image.open(io.BytesIO(blob))).unsqueeze(0))
            tx = model.encode_text(tokenizer([recap]))
        want = torch.nn.functional.cosine_similarity(im, tx).item()
        # PNG pixels go through identical operations; JPEG is draft-decoded by the CLIP helper
        assert score == pytest.approx(want, abs=1e-3 if fmt == "png" else 0.05)


def test_config_is_validated_before_any_work(tiny_vlms, tmp_path):
    src = write_source(tmp_path / "src", shards=1, rows=2)
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="decoding"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "decoding": "nucleus"})
    with pytest.raises(ConfigError, match="batch_sizee|extra"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "batch_sizee": 4})
    with pytest.raises(ConfigError, match="model"):
        prepare("recaption", src.url, out, {})
    with pytest.raises(ConfigError, match="instruction"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "template": "no placeholder"})
    # vLLM is opt-in by name, and refused where it would silently change the output or the GPU share
    assert RecaptionConfig(model="m").engine == "transformers"
    with pytest.raises(ConfigError, match="engine"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "engine": "auto"})
    with pytest.raises(ConfigError, match="no_repeat_ngram_size"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "engine": "vllm", "no_repeat_ngram_size": 3})
    with pytest.raises(ConfigError, match="whole GPU"):
        prepare("recaption", src.url, out, {"model": tiny_vlms["blip"], "engine": "vllm",
                                            "resources": {"num_gpus": 0.5}})


def test_through_the_runner(ray_session, tiny_vlms, tmp_path):
    src = write_source(tmp_path / "src", shards=3, rows=5, corrupt=frozenset({(1, 3)}))
    out = str(tmp_path / "out")
    config = {"model": tiny_vlms["llava"], "max_new_tokens": 8, "batch_size": 4, "on_bad": "flag",
              "resources": {"concurrency": 1}}
    summary = run_stage("recaption", src.url, out, config=config)
    assert (summary["rows_in"], summary["kept"]) == (15, 14)
    assert summary["drops"] == {"recaption:undecodable": 1}
    ds = Dataset(out)
    kept = pa.concat_tables([t for _, t in ds.iter_shards()])
    assert set(kept.column(schema.UID).to_pylist()) | set(
        ds.read_rejects(1).column(schema.UID).to_pylist()) == {
        u for _, t in src.iter_shards([schema.UID]) for u in t.column(0).to_pylist()}
    for recap, flag in zip(kept.column(schema.RECAPTION).to_pylist(),
                           kept.column(schema.RECAPTION_FLAG).to_pylist(), strict=True):
        assert (recap is None) != (flag is None)
    stats = ds.stats(0)
    assert stats["recaption"]["images"] == 5 and stats["recaption"]["engine"] == "transformers"
    # device auto: the GPU where Ray has one (the actor asked for it), else the CPU
    assert stats["recaption"]["device"] == ("cuda" if ray_session.cluster_resources().get("GPU") else "cpu")
    # curate inspect --uid explains a kept row and a rejected one
    stage = RecaptionStage(RecaptionConfig(**config))
    first = kept.slice(0, 1).to_pylist()[0]
    info = stage.explain(ds, first[schema.UID])
    assert info["recaption"] == first[schema.RECAPTION] and info["caption"] == first[schema.CAPTION]
    bad = ds.read_rejects(1).column(schema.UID)[0].as_py()
    assert stage.explain(ds, bad)["drop_reason"] == "recaption:undecodable"
    assert stage.explain(ds, "0" * 32) is None
    # the pointers still lead to the source's bytes
    source = pa.concat_tables([t for _, t in src.iter_shards()])
    by_uid = dict(zip(source.column(schema.UID).to_pylist(), read_images(source, src), strict=True))
    assert read_images(kept, ds) == [by_uid[u] for u in kept.column(schema.UID).to_pylist()]


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["blip", "blip2", "llava", "qwen2_vl", "idefics3"])
def test_bf16_on_gpu(tiny_vlms, tmp_path, arch):
    import torch

    ds = write_source(tmp_path / "src", shards=1, rows=8, corrupt=frozenset({(0, 3)}))
    stage = RecaptionStage(RecaptionConfig(model=tiny_vlms[arch], device="auto", engine="transformers",
                                           max_new_tokens=8, on_bad="flag"))
    stage.setup()
    assert stage.vlm.device == "cuda" and stage.vlm.dtype == torch.bfloat16
    assert next(stage.vlm.model.parameters()).dtype == torch.bfloat16
    out = stage.process(ds.read_shard(0), _ctx(ds))
    assert out.column(schema.DROP_REASON).to_pylist().count("recaption:undecodable") == 1
    assert stage.vlm.generate([], []) == []


def test_out_of_memory_retry_runs_after_the_failed_attempt_is_freed(tiny_vlms, tmp_path):
    """A real allocator failure inside the model's forward (torch's CPU allocator refusing a huge
    tensor, which raises like a device OOM does), not one raised before any work: when the halves are
    retried, the failed attempt's input tensors must already be gone. Retrying inside the ``except``
    block kept them alive through the traceback, so empty_cache() could free nothing."""
    import weakref

    import torch

    ds = write_source(tmp_path / "src", shards=1, rows=4)
    table = ds.read_shard(0)
    want = _stage(tiny_vlms["blip"], batch_size=4).process(table, _ctx(ds))
    stage = _stage(tiny_vlms["blip"], batch_size=4)
    failed: list[weakref.ref] = []
    alive_at_retry: list[bool] = []

    def hook(module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        if failed:
            alive_at_retry.append(failed[0]() is not None)
        elif pixels.shape[0] > 2:
            failed.append(weakref.ref(pixels))
            torch.empty(1 << 60, dtype=torch.uint8)  # the allocation that does not fit: a real failure

    handle = stage.vlm.model.vision_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = stage.process(table, _ctx(ds))
    finally:
        handle.remove()
    assert failed and alive_at_retry and not any(alive_at_retry)
    assert got.equals(want)  # the halves give what the unsplit batch gives


@pytest.mark.gpu
def test_real_cuda_out_of_memory_frees_the_failed_batch_before_the_retry(tiny_vlms, tmp_path):
    """A batch that really runs out of device memory (the forward allocates past what is free): at
    the retry the failed attempt's device tensors are gone and the allocator is back where it started;
    the halves give what the unsplit batch gives."""
    import weakref

    import torch

    ds = write_source(tmp_path / "src", shards=1, rows=8)
    table = ds.read_shard(0)
    stage = RecaptionStage(RecaptionConfig(model=tiny_vlms["blip"], device="cuda", dtype="float32",
                                           max_new_tokens=12, batch_size=8))
    stage.setup()
    want = stage.process(table, _ctx(ds))  # the unsplit batch on the same device
    failed: list[weakref.ref] = []
    at_retry: list[tuple[bool, int]] = []
    base = torch.cuda.memory_allocated()

    def hook(module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        if failed:
            at_retry.append((failed[0]() is not None, torch.cuda.memory_allocated()))
        elif pixels.shape[0] > 4:
            failed.append(weakref.ref(pixels))
            free, _ = torch.cuda.mem_get_info()
            torch.empty(free + 1024**3, dtype=torch.uint8, device="cuda")  # more than the device has

    handle = stage.vlm.model.vision_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        got = stage.process(table, _ctx(ds))
    finally:
        handle.remove()
    assert failed and at_retry and not any(alive for alive, _ in at_retry)
    assert at_retry[0][1] - base < 64 * 1024**2  # only the half batch's own inputs, not the failed batch's
    assert got.column(schema.RECAPTION).to_pylist() == want.column(schema.RECAPTION).to_pylist()
