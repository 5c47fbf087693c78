"""export --set blur_faces=true: faces blurred in a real photo, every other image byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow as pa
from PIL import Image
from safety_data import demo_images, encode, image_dataset

from curate import schema
from curate.cli import main
from curate.dataset import Dataset, read_images

# Where the astronaut's face is in skimage's astronaut() (Eileen Collins' NASA portrait, 512x512):
# read off the picture, not from any detector.
FACE_REGION = (165, 50, 285, 175)  # x0, y0, x1, y1


def _sharpness(gray: np.ndarray) -> float:
    """Variance of a discrete Laplacian: high for detailed pixels, near zero once blurred."""
    g = gray.astype(np.float64)
    lap = g[1:-1, 2:] + g[1:-1, :-2] + g[2:, 1:-1] + g[:-2, 1:-1] - 4 * g[1:-1, 1:-1]
    return float(lap.var())


def test_faces_blurred_in_a_real_photo_and_other_bytes_identical(ray_session, tmp_path):
    from skimage import data

    astronaut = data.astronaut()
    coffee = encode(data.coffee(), "JPEG", quality=90)  # a photo without a face
    rows = [(encode(astronaut, "PNG"), "astronaut"), (coffee, "coffee")]
    # drawings without people (fireworks, a bug, an arrow, a cow, an ornament) and one with skaters
    rows += [(b, f) for f, b, _, _ in demo_images()[:6]]
    src = image_dataset(tmp_path / "src", rows)
    source_bytes = {c: b for b, c in rows}
    out = tmp_path / "out"
    rc = main(["export", "--input", src.url, "--output", str(out), "--set", "blur_faces=true",
               "--set", "samples_per_shard=3"])
    assert rc == 0
    ds = Dataset(str(out))
    table = pa.concat_tables([t for _, t in ds.iter_shards()])
    got = dict(zip(table.column(schema.CAPTION).to_pylist(), read_images(table, ds), strict=True))
    rec = {r[schema.CAPTION]: r for r in table.to_pylist()}
    assert set(got) == set(source_bytes)

    # the photo with a face: re-encoded, face box over the face, the face region blurred
    a = rec["astronaut"]
    assert a[schema.FACE_BLURRED] is True and a[schema.FACE_COUNT] >= 1
    x, y, w, h = a[schema.FACE_BOXES][0]
    cx, cy = x + w / 2, y + h / 2
    assert FACE_REGION[0] < cx < FACE_REGION[2] and FACE_REGION[1] < cy < FACE_REGION[3]
    new = np.asarray(Image.open(io.BytesIO(got["astronaut"])).convert("RGB"))
    assert new.shape == astronaut.shape
    gray_old = astronaut.mean(axis=2)
    gray_new = new.astype(np.float64).mean(axis=2)
    assert _sharpness(gray_new[y:y + h, x:x + w]) < 0.1 * _sharpness(gray_old[y:y + h, x:x + w])
    # outside the (margin-grown) boxes the PNG's pixels are untouched
    mask = np.ones(astronaut.shape[:2], bool)
    for bx, by, bw, bh in a[schema.FACE_BOXES]:
        mx, my = int(bw * 0.15), int(bh * 0.15)
        mask[max(0, by - my):by + bh + my, max(0, bx - mx):bx + bw + mx] = False
    assert np.array_equal(new[mask], astronaut[mask])
    assert a[schema.SHA256] == hashlib.sha256(got["astronaut"]).hexdigest()
    assert a[schema.UNBLURRED_SHA256] == hashlib.sha256(source_bytes["astronaut"]).hexdigest()

    # images without people: no face found, the very same bytes
    for cap in ("coffee", *(f for _, f in rows[2:] if "pattinatrici" not in f)):
        assert got[cap] == source_bytes[cap], cap
        assert rec[cap][schema.FACE_BLURRED] is False and rec[cap][schema.FACE_COUNT] == 0
        assert rec[cap][schema.UNBLURRED_SHA256] is None
    # and the rule for every row: bytes change exactly when a face was found
    for cap, blob in got.items():
        assert (blob != source_bytes[cap]) == (rec[cap][schema.FACE_COUNT] > 0) == rec[cap][schema.FACE_BLURRED]

    # the manifest names the altered rows; the sample's json says what happened
    manifest = ds.manifest()
    blurred = sorted(r[schema.UID] for r in rec.values() if r[schema.FACE_BLURRED])
    assert a[schema.UID] in blurred and manifest["altered"]["rows"] == len(blurred)
    assert manifest["altered"]["uids"] == blurred
    assert manifest["altered"]["column"] == schema.FACE_BLURRED
    with tarfile.open(a[schema.IMAGE_TAR]) as tf:
        meta = json.loads(tf.extractfile(f"{a[schema.KEY]}.json").read())
    assert meta[schema.FACE_COUNT] == a[schema.FACE_COUNT] and meta[schema.SHA256] == a[schema.SHA256]
    # and the dataset verifies: pointers and sha256 agree with the blurred bytes
    assert main(["verify", str(out)]) == 0


def test_export_without_blur_leaves_face_columns_out(ray_session, tmp_path):
    from skimage import data

    src = image_dataset(tmp_path / "src", [(encode(data.astronaut(), "PNG"), "astronaut")])
    assert main(["export", "--input", src.url, "--output", str(tmp_path / "out")]) == 0
    ds = Dataset(str(tmp_path / "out"))
    assert schema.FACE_COUNT not in ds.schema().names and "altered" not in ds.manifest()


def test_an_image_that_cannot_be_checked_for_faces_is_not_published(ray_session, tmp_path):
    from skimage import data

    whole = encode(data.coffee(), "JPEG", quality=90)
    truncated = whole[: len(whole) // 2]  # a JPEG header and half the scan: sniffed as jpg, does not decode
    # image_dataset() opens every image, so this one is written by hand
    from curate.dataset import uid_for
    from curate.testing.datasets import IMAGE, write_image_dataset

    rows = [{IMAGE: b, schema.IMAGE_FORMAT: "jpg", schema.UID: uid_for("faces", i), schema.CAPTION: c}
            for i, (b, c) in enumerate([(whole, "coffee"), (truncated, "half")])]
    src = write_image_dataset(str(tmp_path / "src"), [rows])
    assert main(["export", "--input", src.url, "--output", str(tmp_path / "out"), "--set", "blur_faces=true"]) == 0
    ds = Dataset(str(tmp_path / "out"))
    rej = [r for _, t in ds.iter_rejects() for r in t.to_pylist()]
    assert [(r[schema.CAPTION], r[schema.DROP_REASON]) for r in rej] == [("half", "export:faces_unchecked")]
    assert [c for _, t in ds.iter_shards() for c in t.column(schema.CAPTION).to_pylist()] == ["coffee"]
