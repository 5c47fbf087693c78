"""Hash blocklists of known-bad images: sha256 exact, pHash within a radius, unreadable lists refused."""

from __future__ import annotations

import hashlib
import io

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from safety_data import image_dataset

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.hashindex import HashIndex


def _photos() -> dict[str, Image.Image]:
    from skimage import data

    return {n: Image.fromarray(getattr(data, n)()).convert("RGB")
            for n in ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry")}


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _small_edit(img: Image.Image) -> Image.Image:
    """What a re-upload does: downscaled, a little brighter, recompressed (below)."""
    e = img.resize((int(img.width * 0.85), int(img.height * 0.85)), Image.Resampling.BILINEAR)
    return ImageEnhance.Brightness(e).enhance(1.05)


def test_hash_index_is_exact_against_brute_force():
    rng = np.random.default_rng(0)
    ref = rng.integers(0, 2**63, 300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300, dtype=np.uint64)
    # queries: exact copies, copies with 1..10 flipped bits, and random hashes
    q = []
    for i in range(400):
        h = int(ref[i % 300])
        for b in rng.choice(64, size=int(rng.integers(0, 11)), replace=False):
            h ^= 1 << int(b)
        q.append(h)
    q += rng.integers(0, 2**63, 200, dtype=np.uint64).tolist()
    q = np.array(q, dtype=np.uint64)
    for radius in (0, 3, 6):
        best, dist = HashIndex(ref, radius).query(q)
        d = np.bitwise_count(q[:, None] ^ ref[None, :]).astype(np.int64)
        for i in range(len(q)):
            within = np.flatnonzero(d[i] <= radius)
            if not within.size:
                assert best[i] == -1 and dist[i] == -1
            else:
                m = d[i][within].min()
                assert dist[i] == m and best[i] == within[d[i][within] == m].min()


def test_sha256_and_phash_blocklists_catch_exact_and_edited_copies(ray_session, tmp_path):
    photos = _photos()
    rows = [(_jpeg(p), name) for name, p in photos.items() if name != "astronaut"]
    edited = _jpeg(_small_edit(photos["astronaut"]), quality=80)
    rows.append((edited, "astronaut, re-uploaded"))
    ds = image_dataset(tmp_path / "in", rows)
    # the lists are made by an independent implementation (imagehash / hashlib) of the ORIGINAL images
    bad_sha = hashlib.sha256(rows[0][0]).hexdigest()  # coffee, exactly as stored
    (tmp_path / "sha.txt").write_text(f"# known bad\n{bad_sha}\n{'0' * 64}\n")
    astro = str(imagehash.phash(photos["astronaut"]))
    far = str(imagehash.phash(Image.fromarray(np.full((64, 64, 3), 128, np.uint8))))
    (tmp_path / "phash.txt").write_text(f"{astro}\n{far}  # a flat grey image\n")
    out = tmp_path / "out"
    rc = main(["safety", "--input", ds.url, "--output", str(out),
               "--set", f"sha256_blocklist_files=[{tmp_path / 'sha.txt'}]",
               "--set", f"phash_blocklist_files=[{tmp_path / 'phash.txt'}]", "--set", "phash_radius=6"])
    assert rc == 0
    res = Dataset(str(out))
    rej = {r[schema.CAPTION]: r for _, t in res.iter_rejects() for r in t.to_pylist()}
    assert set(rej) == {"coffee", "astronaut, re-uploaded"}
    assert rej["coffee"][schema.DROP_REASON] == "safety:sha256_blocklist"
    assert rej["coffee"][schema.BLOCKLIST_MATCH] == bad_sha
    assert rej["astronaut, re-uploaded"][schema.DROP_REASON] == "safety:phash_blocklist"
    assert rej["astronaut, re-uploaded"][schema.BLOCKLIST_MATCH] == astro
    kept = [c for _, t in res.iter_shards() for c in t.column(schema.CAPTION).to_pylist()]
    assert sorted(kept) == ["chelsea", "immunohistochemistry", "rocket"]


@pytest.mark.parametrize("case", ["missing", "directory", "s3", "bad_line"])
def test_unreadable_blocklist_stops_the_stage_before_any_work(tmp_path, capsys, case, request):
    ds = image_dataset(tmp_path / "in", [(_jpeg(_photos()["coffee"]), "coffee")])
    if case == "missing":
        url, key = str(tmp_path / "nope.txt"), "phash_blocklist_files"
    elif case == "directory":
        (tmp_path / "dir").mkdir()
        url, key = str(tmp_path / "dir"), "sha256_blocklist_files"
    elif case == "s3":
        request.getfixturevalue("s3_server")
        url, key = "s3://no-such-bucket-here/bad.txt", "sha256_blocklist_files"
    else:
        (tmp_path / "bad.txt").write_text("0123456789abcdef\nnot-a-hash\n")
        url, key = str(tmp_path / "bad.txt"), "phash_blocklist_files"
    out = tmp_path / "out"
    rc = main(["safety", "--input", ds.url, "--output", str(out), "--set", f"{key}=[{url}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert url in err
    assert ("entry 2" in err) if case == "bad_line" else ("does not run without it" in err)
    assert not out.exists()


def test_filter_refuses_an_unreadable_sha256_list(tmp_path, capsys):
    ds = image_dataset(tmp_path / "in", [(_jpeg(_photos()["coffee"]), "coffee")])
    out = tmp_path / "out"
    rc = main(["filter", "--input", ds.url, "--output", str(out),
               "--set", f"sha256_blocklist_files=[{tmp_path / 'missing.txt'}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "missing.txt" in err
    assert not out.exists()
