"""decontaminate: copies of evaluation images are dropped, named by reference set; nothing else is."""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.testing.datasets import write_table_dataset
from curate.testing.safety import reference_copy, write_reference_copies

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "safety"))
from safety_data import demo_images, embedding_dataset, image_dataset  # noqa: E402

# Evaluation images: corpus items, chosen by name; the corpus' own metadata (`of`) says which other
# entries are copies of them, which is the oracle for what must go.
EVAL_A = ["images/0000-fireworks-ganson.png", "images/0005-pattinatrici-sul-ghiacc-01.png",
          "images/0007-dinosauri-architetto-fra-01.jpg"]
EVAL_B = ["images/0001-punaisa-01.png", "images/0035-manga-girl-dirk-struve-01.jpg",
          "images/0067-owl-on-branch-ganson.jpg"]


def _tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_demo_corpus_copies_of_reference_images_and_nothing_else(ray_session, tmp_path):
    rows = demo_images()
    by_file = {f: b for f, b, _, _ in rows}
    ds = image_dataset(tmp_path / "corpus", [(b, f) for f, b, _, _ in rows], shard_size=100)  # caption = file
    # set A: a folder of resized (70%) JPEG q75 copies; set B: a WebDataset tar of 50% q60 copies
    ref_a = write_reference_copies(tmp_path / "eval_a", {f: by_file[f] for f in EVAL_A})
    ref_b = _tar(tmp_path / "eval_b.tar", {f"{i:06d}.jpg": reference_copy(by_file[f], 0.5, 60)
                                           for i, f in enumerate(EVAL_B)})
    out = tmp_path / "out"
    rc = main(["decontaminate", "--input", ds.url, "--output", str(out),
               "--set", f"reference={{eval_a: {ref_a}, eval_b: {ref_b}}}"])
    assert rc == 0
    res = Dataset(str(out))
    rejected = {r[schema.CAPTION]: r for _, t in res.iter_rejects() for r in t.to_pylist()}
    expect = {f: "a" for f in EVAL_A} | {f: "b" for f in EVAL_B}
    for f, _, _, of in rows:
        if of in expect:
            expect[f] = expect[of]
    assert set(rejected) == set(expect)
    assert len(expect) > len(EVAL_A) + len(EVAL_B)  # the corpus' own copies of them went too
    for f, which in expect.items():
        r = rejected[f]
        assert r[schema.DROP_REASON] == f"decontaminate:eval_{which}"
        origin = f if f in EVAL_A + EVAL_B else next(of for g, _, _, of in rows if g == f)
        item = Path(origin).stem + ".jpg" if which == "a" else f"eval_b.tar/{EVAL_B.index(origin):06d}.jpg"
        assert r[schema.DECONTAM_MATCH] == f"eval_{which}:{item}"
        assert 0 <= r[schema.DECONTAM_PHASH_DISTANCE] <= 4
    kept = sum(t.num_rows for _, t in res.iter_shards())
    assert kept + len(rejected) == len(rows)
    # the report's table of hits per reference set
    from curate.report import build_report, render_html

    report = build_report(res)
    (sec,) = report.data["decontamination"]
    hits = {r["reference"]: (r["images"], r["hits"]) for r in sec["references"]}
    assert hits == {"eval_a": (3, sum(v == "a" for v in expect.values())),
                    "eval_b": (3, sum(v == "b" for v in expect.values()))}
    assert "Decontamination" in render_html(report)


def test_curate_dataset_reference_by_embedding(tmp_path):
    """A curate dataset as the reference: rows without images match by CLIP cosine."""
    from curate.stage import ShardContext
    from curate.stages.decontaminate import DecontaminateConfig, DecontaminateStage

    corpus, x, uids = embedding_dataset(tmp_path / "corpus", [50], 16)
    rng = np.random.default_rng(5)
    # the reference holds near copies of corpus rows 3, 17, 41 and 20 unrelated vectors
    near = x[[3, 17, 41]] + rng.normal(0, 0.05, (3, 16)).astype(np.float32)
    other = rng.normal(size=(20, 16)).astype(np.float32)
    ref = np.concatenate([near, other])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    ref16 = ref.astype(np.float16)
    ref_ds = write_table_dataset(str(tmp_path / "ref"), [pa.table({
        schema.UID: [f"{i:032x}" for i in range(len(ref))],
        schema.IMAGE_EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(ref16.reshape(-1), pa.float16()), 16),
    })], "clip")
    cfg = DecontaminateConfig(reference={"coco": ref_ds.url}, clip_threshold=0.95)
    stage = DecontaminateStage(cfg)
    stage.check(corpus)
    out = Dataset(str(tmp_path / "out"))
    from curate.stage import PlanContext

    stage.plan(PlanContext(input_path=corpus.url, input=corpus, output=out, plan_dir=out.path("_plan"),
                           options=None, map=None))
    ctx = ShardContext(shard=0, input_path=corpus.url, input=corpus, output=out, plan_dir="", options=None)
    t = stage.process(corpus.read_shard(0), ctx)
    cos = x @ ref16.astype(np.float32).T  # the oracle: plain cosine over the stored float16 vectors
    want = [("decontaminate:coco" if cos[i].max() >= 0.95 else None) for i in range(50)]
    assert t.column(schema.DROP_REASON).to_pylist() == want
    assert [i for i, w in enumerate(want) if w] == [3, 17, 41]
    assert t.column(schema.DECONTAM_MATCH).to_pylist()[17] == f"coco:{1:032x}"


@pytest.mark.parametrize("case", ["empty_folder", "missing", "tar_without_images"])
def test_empty_reference_set_is_refused(tmp_path, capsys, case):
    rows = demo_images()[:3]
    ds = image_dataset(tmp_path / "corpus", [(b, f) for f, b, _, _ in rows])
    if case == "empty_folder":
        ref = tmp_path / "empty"
        ref.mkdir()
        (ref / "README.txt").write_text("no images here\n")
    elif case == "missing":
        ref = tmp_path / "nowhere"
    else:
        ref = _tar(tmp_path / "t.tar", {"000.txt": b"caption", "000.json": json.dumps({}).encode()})
    out = tmp_path / "out"
    rc = main(["decontaminate", "--input", ds.url, "--output", str(out), "--set", f"reference={ref}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(ref) in err and ("holds no images" in err or "does not exist" in err)
    assert not out.exists()
