"""Peer compatibility (RELIABILITY #20): the export is read unchanged by the webdataset library, HF
``datasets`` (webdataset builder), DALI's webdataset reader with our ``.idx`` files, and open_clip's own
training script, with the same count and keys as our Parquet says.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from curate import schema
from curate.dataset import Dataset
from curate.runner import run_stage
from curate.stages.export import split_shards

REPO = Path(__file__).resolve().parents[2]
# open_clip_torch[training] pins webdataset<=0.2.86: its trainer's group_by_keys_nothrow does not
# skip the end-of-shard marker ({}) that webdataset >= 0.2.96 yields (KeyError: 'fname';
# mlfoundations/open_clip#935, webdataset/webdataset#384). The trainer therefore runs with the
# webdataset its package declares, installed beside (not into) the project venv and put first on
# PYTHONPATH for that subprocess only.
OPEN_CLIP_WDS = "webdataset==0.2.86"
OPEN_CLIP_WDS_DIR = REPO / "bench" / ".cache" / "open_clip_train-webdataset-0.2.86"


def _export(curated, root: Path, **extra) -> Dataset:
    out = root / "export"
    config = {"samples_per_shard": 16, "seed": 1, "val_fraction": 0.01, "val_min_count": 12, **extra}
    run_stage("export", curated.url, str(out), config=config)
    return Dataset(str(out))


@pytest.fixture(scope="module")
def exported(curated, tmp_path_factory, ray_session) -> Dataset:
    return _export(curated, tmp_path_factory.mktemp("peers"))


def _expected(ds: Dataset, shards: list[int] | None = None) -> list[str]:
    shards = ds.shard_ids() if shards is None else shards
    return [k for n in shards for k in ds.read_shard(n, [schema.KEY]).column(schema.KEY).to_pylist()]


def _tars(ds: Dataset, shards: list[int] | None = None) -> list[str]:
    return [ds.shard_path(n, "tar") for n in (ds.shard_ids() if shards is None else shards)]


def test_mixed_formats_present(exported):
    formats = {f for _, t in exported.iter_shards([schema.IMAGE_FORMAT])
               for f in t.column(schema.IMAGE_FORMAT).to_pylist()}
    assert formats == {"jpg", "png"}  # so every reader below meets both


def test_webdataset_library(exported):
    import webdataset as wds

    samples = list(wds.WebDataset(_tars(exported), shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == _expected(exported)
    for s in samples:
        image = s.get("jpg") or s.get("png")
        assert image.size[0] >= 24 and isinstance(s["txt"], str) and s["json"]["key"] == s["__key__"]


def test_hf_datasets_webdataset_builder(exported, tmp_path, curated, ray_session):
    import datasets

    # Mixed jpg/png: the builder infers its columns from the first samples, so a mixed export is read
    # with the image columns declared (what HF documents for heterogeneous webdatasets).
    features = datasets.Features({
        "jpg": datasets.Image(), "png": datasets.Image(), "txt": datasets.Value("string"),
        "json": datasets.Value("string"), "__key__": datasets.Value("string"), "__url__": datasets.Value("string"),
    })
    ds = datasets.load_dataset("webdataset", data_files={"train": _tars(exported)}, split="train",
                               features=features, cache_dir=str(tmp_path / "hf"))
    assert ds["__key__"] == _expected(exported)
    images = [r["jpg"] or r["png"] for r in ds]
    assert all(im is not None and im.size[0] >= 24 for im in images)

    # image_extension=jpg names every image KEY.jpg, and the builder reads it with no help at all.
    single = _export(curated, tmp_path / "single", image_extension="jpg")
    splits = split_shards(single)
    hf = datasets.load_dataset(
        "webdataset", data_files={"train": _tars(single, splits["train"]), "validation": _tars(single, splits["val"])},
        cache_dir=str(tmp_path / "hf2"))
    assert hf["train"]["__key__"] == _expected(single, splits["train"])
    assert hf["validation"]["__key__"] == _expected(single, splits["val"])
    assert all(im is not None for im in hf["train"]["jpg"])
    assert {m["split"] for m in hf["validation"]["json"]} == {"val"}


def test_hf_datasets_reads_the_export_folder_with_nothing_declared(curated, tmp_path, ray_session):
    """What a user types first: the export's folder, no data_files, no features. Every row comes back,
    the held-out rows exactly as HF's validation split; the .parquet, .idx and .json files beside the
    tars are never opened as tars. (pHashes above 2**63 read the same way: test_export_stage.)"""
    import datasets

    single = _export(curated, tmp_path / "single", image_extension="jpg")
    splits = split_shards(single)
    assert splits["train"] and splits["val"]
    hf = datasets.load_dataset("webdataset", data_dir=single.path(), cache_dir=str(tmp_path / "hf"))
    assert set(hf) == {"train", "validation"}
    assert sorted(hf["train"]["__key__"]) == sorted(_expected(single, splits["train"]))
    # the oracle: the rows the export's Parquet marks val, not its shard list
    rows = pa.concat_tables([single.read_shard(n, [schema.KEY, schema.SPLIT]) for n in single.shard_ids()])
    val_keys = [k for k, s in zip(rows[schema.KEY].to_pylist(), rows[schema.SPLIT].to_pylist(), strict=True)
                if s == "val"]
    assert val_keys and sorted(hf["validation"]["__key__"]) == sorted(val_keys)
    assert len(hf["train"]) + len(hf["validation"]) == single.manifest()["totals"]["kept"]
    assert {m["split"] for m in hf["validation"]["json"]} == {"val"}


def test_trainer_finds_each_split_and_its_indexes(exported):
    """The trainer's shard discovery on a real export: each split's tars (from sizes.json and the
    manifest) paired with their .idx, whose samples are the keys the Parquet holds."""
    from trainer import data as D

    splits = split_shards(exported)
    for split in ("train", "val"):
        got = D.find_shards(exported.url, split)
        name = exported.shard_name
        assert got == [(exported.path("shards", f"{split}-{name(n)}.tar"), exported.path("shards", f"{name(n)}.idx"))
                       for n in splits[split]]
        keys = [s.key for shard in D.index_samples(got) for s in shard]
        assert keys == _expected(exported, splits[split])


def test_dali_webdataset_reader_with_our_idx(exported):
    from nvidia.dali import fn, pipeline_def

    tars = _tars(exported)
    # the index of shards/train-00000.tar is shards/00000.idx (an .idx named by split would be opened as
    # a tar by HF datasets' folder loading)
    idxs = [exported.path("shards", f"{exported.shard_name(n)}.idx") for n in exported.shard_ids()]
    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipe():
        image, text = fn.readers.webdataset(
            paths=tars, index_paths=idxs, ext=["jpg;png;webp", "txt"],
            missing_component_behavior="error", random_shuffle=False, pad_last_batch=True, name="reader")
        return fn.decoders.image(image, device="cpu"), text

    p = pipe()
    p.build()
    total = p.epoch_size("reader")
    keys, texts = [], []
    for _ in range(math.ceil(total / batch)):
        images, text = p.run()
        for i in range(len(images)):
            # source_info is "TAR:OFFSET:MEMBER"; the key is the member name up to its first dot.
            keys.append(text[i].source_info().rsplit(":", 1)[1].split(".")[0])
            texts.append(bytes(text.at(i)).decode())
            assert images.at(i).shape[2] == 3
    keys, texts = keys[:total], texts[:total]
    assert keys == _expected(exported)
    captions = []
    for n in exported.shard_ids():
        t = exported.read_shard(n, [schema.CAPTION, schema.RECAPTION, schema.CAPTION_SOURCE])
        for c, r, s in zip(*(t.column(i).to_pylist() for i in range(3)), strict=True):
            captions.append(r if s == "recaption" else c)
    assert texts == captions


def _open_clip_webdataset() -> Path:
    """A directory holding the webdataset version open_clip's trainer declares, installed once."""
    marker = OPEN_CLIP_WDS_DIR / "webdataset"
    if marker.exists():
        return OPEN_CLIP_WDS_DIR
    tmp = OPEN_CLIP_WDS_DIR.with_name(OPEN_CLIP_WDS_DIR.name + f".tmp{os.getpid()}")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp),
                        OPEN_CLIP_WDS], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot install {OPEN_CLIP_WDS} for open_clip's trainer: {r.stderr.strip()[-300:]}")
    try:
        tmp.rename(OPEN_CLIP_WDS_DIR)
    except OSError:  # another process won the race; its copy is as good
        pass
    return OPEN_CLIP_WDS_DIR


def test_open_clip_trainer_trains_on_the_export(exported, tmp_path):
    pytest.importorskip("open_clip_train")
    from curate.testing.tiny_models import write_tiny_clip

    model = write_tiny_clip(tmp_path / "tiny", image_size=32, patch_size=8)
    splits = split_shards(exported)
    train, val = splits["train"], splits["val"]
    assert len(train) >= 2 and len(val) == 1
    name = exported.shard_name
    train_urls = str(Path(exported.path("shards")) / f"train-{{{name(train[0])}..{name(train[-1])}}}.tar")
    val_rows = exported.read_shard(val[0]).num_rows
    env = {**os.environ, "PYTHONPATH": str(_open_clip_webdataset()), "CUDA_VISIBLE_DEVICES": ""}
    # No --train-num-samples: open_clip reads the sample count from our sizes.json.
    cmd = [
        sys.executable, "-m", "open_clip_train.main", "--dataset-type", "webdataset",
        "--train-data", train_urls, "--val-data", exported.shard_path(val[0], "tar"),
        "--val-num-samples", str(val_rows), "--model", f"local-dir:{model}", "--batch-size", "8",
        "--workers", "2", "--epochs", "1", "--lr", "1e-3", "--warmup", "2", "--precision", "fp32",
        "--logs", str(tmp_path / "logs"), "--name", "peer", "--save-frequency", "0",
        "--zeroshot-frequency", "0", "--log-every-n-steps", "1", "--seed", "0",
    ]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    log = (tmp_path / "logs" / "peer" / "out.log").read_text() if (tmp_path / "logs" / "peer" / "out.log").exists() else ""
    assert r.returncode == 0, (r.stderr or r.stdout)[-3000:]
    sizes = json.loads(Path(exported.path("shards", "sizes.json")).read_text())
    n_train = sum(sizes[f"train-{name(n)}.tar"] for n in train)
    # open_clip rounds the epoch up to whole batches per worker: ceil(ceil(n/8)/2)*2 batches of 8.
    steps = math.ceil(math.ceil(n_train / 8) / 2) * 2
    assert f"[{steps * 8}/{steps * 8} (100%)]" in log
    assert "Handling webdataset error" not in log + r.stderr
    assert f"num_samples: {val_rows}" in log  # open_clip's eval read the whole val shard


def test_split_shards_lists_every_shard(exported):
    splits = split_shards(exported)
    assert sorted(splits["train"] + splits["val"]) == exported.shard_ids()
    rows = pa.concat_tables([exported.read_shard(n, [schema.SPLIT]) for n in splits["val"]])
    assert set(rows.column(schema.SPLIT).to_pylist()) == {"val"}
