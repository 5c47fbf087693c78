"""Which rows dedup drops: no chains, colour and CLIP confirmation, every engine the same.

Rows carry stored pHashes and colour signatures (as download / import write them), so each test
sets the exact distances it is about; images are tiny real PNGs only so the rows are real rows.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw
from test_dedup_stage import run_inline

from curate import phash, schema
from curate.dataset import Dataset
from curate.stages.dedup import DedupConfig, missing_confirmation
from curate.testing.datasets import IMAGE, write_image_dataset

ENGINES = ("sort", "faiss", "distributed")
GREY = bytes([200, 128, 128] * 16)  # a light grey in every cell of the colour grid


def _png(seed: int, size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (seed % 256, 7, 7)).save(buf, "PNG")
    return buf.getvalue()


def _flip(h: int, bits: range) -> int:
    for b in bits:
        h ^= 1 << b
    return h


def _row(i: int, h: int, size: int, color: bytes = GREY, crops: list[int] | None = None, **extra) -> dict:
    return {schema.UID: f"{i:032x}", schema.CAPTION: f"row {i}", IMAGE: _png(i), schema.IMAGE_FORMAT: "png",
            schema.WIDTH: size, schema.HEIGHT: size, schema.PHASH: h, schema.COLOR_SIG: color,
            schema.PHASH_CROPS: None if crops is None else phash.crops_to_bytes(crops), **extra}


def _decisions(tables: dict[int, pa.Table]) -> dict[str, tuple[str | None, str | None]]:
    rows = [r for t in tables.values() for r in t.to_pylist()]
    return {r[schema.UID]: (r[schema.DROP_REASON], r[schema.DUP_OF]) for r in rows}


A, B, C = (f"{i:032x}" for i in range(3))
H_A = 0x0123456789ABCDEF & ((1 << 63) - 1)
H_B = _flip(H_A, range(0, 5))  # 5 bits from A
H_C = _flip(H_B, range(10, 15))  # 5 bits from B, 10 from A


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    # A is the largest, so it is kept first; B is within 6 bits of A and of C; C is 10 bits from A.
    return write_image_dataset(str(root), [[_row(0, H_A, 300)], [_row(1, H_B, 200), _row(2, H_C, 100)]])


@pytest.mark.parametrize("engine", ENGINES)
def test_chain_keeps_both_ends(chain, tmp_path, engine):
    got = _decisions(run_inline(chain, tmp_path / engine, engine=engine, rows_per_partition=1000))
    assert got[A] == (None, None)
    assert got[B] == ("dedup:near", A)
    # connected components would drop C as a duplicate of A, 10 bits away
    assert got[C] == (None, None)


def test_middle_of_chain_kept_takes_both(chain, tmp_path):
    # keep=first keeps the lowest position; make B first by giving it the best clip score instead
    root = tmp_path / "in"
    ds = write_image_dataset(str(root), [[_row(1, H_B, 100, **{schema.CLIP_SCORE: 0.9}),
                                          _row(0, H_A, 100, **{schema.CLIP_SCORE: 0.1}),
                                          _row(2, H_C, 100, **{schema.CLIP_SCORE: 0.2})]])
    got = _decisions(run_inline(ds, tmp_path / "out", keep="clip_score"))
    assert got[B] == (None, None)
    assert got[A] == ("dedup:near", B) and got[C] == ("dedup:near", B)


def test_drops_never_beyond_radius_in_a_dense_group(tmp_path):
    # Hashes on a line, 3 bits apart: with radius 6, each kept row may only take rows <= 6 bits away.
    rng = np.random.default_rng(0)
    h = int(rng.integers(0, 2**62))
    rows = []
    for i in range(30):
        rows.append(_row(i, h, 100 + i))
        h = _flip(h, range(3 * i % 60, 3 * i % 60 + 3))
    ds = write_image_dataset(str(tmp_path / "in"), [rows[:15], rows[15:]])
    tables = run_inline(ds, tmp_path / "out")
    out = [r for t in tables.values() for r in t.to_pylist()]
    by_uid = {r[schema.UID]: r for r in out}
    dropped = [r for r in out if r[schema.DROP_REASON]]
    assert dropped
    for r in dropped:
        keeper = by_uid[r[schema.DUP_OF]]
        assert keeper[schema.DROP_REASON] is None
        assert phash.hamming(r[schema.PHASH], keeper[schema.PHASH]) <= 6
    # and connected components would have made it one cluster of 30 with one kept row
    assert sum(1 for r in out if r[schema.DROP_REASON] is None) > 1


def _equal_luma_pair() -> tuple[bytes, bytes]:
    """One drawing in red and in a green of the same luma: a recoloured variant that pHash (grey
    levels only) cannot tell apart."""
    imgs = []
    for color in ((255, 0, 0), (0, 130, 0)):
        im = Image.new("RGB", (256, 256), (255, 255, 255))
        d = ImageDraw.Draw(im)
        d.rectangle((20, 30, 150, 120), fill=color)
        d.ellipse((120, 140, 230, 240), fill=color)
        buf = io.BytesIO()
        im.save(buf, "PNG")
        imgs.append(buf.getvalue())
    return imgs[0], imgs[1]


@pytest.fixture(scope="module")
def recoloured(tmp_path_factory):
    red, green = _equal_luma_pair()
    rows = [{schema.UID: f"{i:032x}", schema.CAPTION: cap, IMAGE: data, schema.IMAGE_FORMAT: "png",
             schema.WIDTH: 256, schema.HEIGHT: 256}
            for i, (cap, data) in enumerate((("red shapes", red), ("green shapes", green)))]
    # no stored pHash: dedup hashes the bytes and takes the colour signature from the same decode
    return write_image_dataset(str(tmp_path_factory.mktemp("recolour")), [rows])


def test_recoloured_pair_is_not_a_duplicate(recoloured, tmp_path):
    red, green = _equal_luma_pair()
    (hr, cr, _), (hg, cg, _) = phash.signatures_bytes([red, green])
    assert phash.hamming(hr, hg) <= 2  # pHash alone calls them duplicates...
    assert phash.color_distance(np.frombuffer(cr, np.uint8), np.frombuffer(cg, np.uint8))[0] > 8
    got = _decisions(run_inline(recoloured, tmp_path / "color"))
    assert all(reason is None for reason, _ in got.values())
    # ...and without confirmation one of them is dropped: the rule, not the data, keeps them
    got = _decisions(run_inline(recoloured, tmp_path / "none", confirm="none"))
    assert sorted(reason or "" for reason, _ in got.values()) == ["", "dedup:near"]


def test_color_threshold_boundary(tmp_path):
    base = np.full((16, 3), (150, 128, 128), dtype=np.uint8)
    shifted = base.copy()
    shifted[:, 1] += 6  # a* + 6 in every cell: Delta-E exactly 6
    assert phash.color_distance(base, shifted)[0] == pytest.approx(6.0)
    ds = write_image_dataset(str(tmp_path / "in"), [[_row(0, H_A, 200, base.tobytes()),
                                                     _row(1, H_A ^ 1, 100, shifted.tobytes())]])
    assert _decisions(run_inline(ds, tmp_path / "at", color_threshold=6.0))[B][0] == "dedup:near"
    assert _decisions(run_inline(ds, tmp_path / "below", color_threshold=5.99))[B][0] is None


def test_brightness_shift_still_confirms():
    base = np.full((16, 3), (150, 140, 120), dtype=np.uint8)
    base[:8, 0] = 60
    brighter = base.copy()
    brighter[:, 0] += 30  # every cell 30/2.55 = 11.8 L* brighter
    assert phash.color_distance(base, brighter)[0] < 0.5


def test_identical_phash_other_colours_split_then_identical_rows_rejoin(tmp_path):
    red = bytes([140, 200, 180] * 16)
    blue = bytes([140, 150, 40] * 16)
    # rows 0 and 1: same hash, other colours (not duplicates); rows 2, 3: exact twins of row 1
    rows = [_row(0, H_A, 400, red), _row(1, H_A, 300, blue), _row(2, H_A, 200, blue), _row(3, H_A, 100, blue)]
    ds = write_image_dataset(str(tmp_path / "in"), [rows[:2], rows[2:]])
    outs = {e: _decisions(run_inline(ds, tmp_path / e, engine=e, rows_per_partition=1000)) for e in ENGINES}
    assert outs["sort"] == outs["faiss"] == outs["distributed"]
    got = outs["sort"]
    assert got[A] == (None, None) and got[B] == (None, None)
    assert got[f"{2:032x}"] == ("dedup:near", B) and got[f"{3:032x}"] == ("dedup:near", B)


def _emb_row(i: int, h: int, size: int, vec: np.ndarray) -> dict:
    v = (vec / np.linalg.norm(vec)).astype(np.float16)
    return {**_row(i, h, size), schema.IMAGE_EMBEDDING: v.tolist()}


def test_confirm_clip_uses_cosine(tmp_path):
    e0 = np.array([1.0, 0.0, 0.0, 0.0])
    close = np.array([1.0, 0.2, 0.0, 0.0])  # cosine 0.98
    far = np.array([0.5, 0.0, 0.866, 0.0])  # cosine 0.5
    ds = write_image_dataset(str(tmp_path / "in"), [[_emb_row(0, H_A, 300, e0), _emb_row(1, H_A ^ 1, 200, close),
                                                     _emb_row(2, H_A ^ 2, 100, far)]])
    t = ds.read_shard(0)
    t = t.set_column(t.column_names.index(schema.IMAGE_EMBEDDING), schema.IMAGE_EMBEDDING,
                     t.column(schema.IMAGE_EMBEDDING).cast(schema.embedding_type(4)))
    ds2 = Dataset(str(tmp_path / "in"))
    got = _decisions(run_inline(_with_table(ds2, t, tmp_path), tmp_path / "out", confirm="clip"))
    assert got[B] == ("dedup:near", A)
    assert got[C] == (None, None)


def _with_table(ds: Dataset, table: pa.Table, tmp_path) -> Dataset:
    from curate.testing.datasets import write_table_dataset

    return write_table_dataset(str(tmp_path / "emb"), [table], stage="clip")


def test_missing_color_column_is_named_with_the_fix():
    cfg = DedupConfig()
    why = missing_confirmation(cfg, [schema.UID, schema.PHASH])
    assert why is not None and "rehash=true" in why and "rerun import/download" in why
    assert "color_sig or phash_crops" in why and "--set confirm=none --set crop_radius=0" in why
    assert missing_confirmation(cfg, [schema.UID, schema.PHASH, schema.COLOR_SIG, schema.PHASH_CROPS]) is None
    only_crops = missing_confirmation(cfg, [schema.UID, schema.PHASH, schema.COLOR_SIG])
    assert "no phash_crops column" in only_crops and only_crops.endswith("--set crop_radius=0")
    assert missing_confirmation(DedupConfig(crop_radius=0), [schema.UID, schema.PHASH, schema.COLOR_SIG]) is None
    assert "no color_sig column" in missing_confirmation(cfg, [schema.UID, schema.PHASH, schema.PHASH_CROPS])
    assert missing_confirmation(cfg, [schema.UID]) is None  # no stored hash: all come from the bytes
    assert missing_confirmation(DedupConfig(rehash=True), [schema.UID, schema.PHASH]) is None
    assert missing_confirmation(DedupConfig(confirm="none", crop_radius=0), [schema.UID, schema.PHASH]) is None
    assert "no phash_crops column" in missing_confirmation(DedupConfig(confirm="none"), [schema.UID, schema.PHASH])
    assert missing_confirmation(DedupConfig(rules=["exact"]), [schema.UID, schema.PHASH]) is None
    assert "embeddings=true" in missing_confirmation(DedupConfig(confirm="clip"), [schema.PHASH, schema.PHASH_CROPS])


@pytest.fixture(scope="module")
def old_dataset(tmp_path_factory):
    red, green = _equal_luma_pair()
    rows = [{schema.UID: f"{i:032x}", schema.CAPTION: f"c{i}", IMAGE: data, schema.IMAGE_FORMAT: "png",
             schema.WIDTH: 256, schema.HEIGHT: 256, schema.PHASH: phash.phash_bytes([data])[0] >> 1}
            for i, data in enumerate((red, green))]
    return write_image_dataset(str(tmp_path_factory.mktemp("old")), [rows])


def test_cli_refuses_old_dataset_in_one_line_before_ray(old_dataset, tmp_path):
    code = (
        "import sys; from curate.cli import main; rc = main(sys.argv[1:]); "
        "print('RAY', 'ray' in sys.modules and __import__('ray').is_initialized()); sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, "dedup", "--input", old_dataset.url, "--output",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "no color_sig or phash_crops column" in err[0] and "rehash=true" in err[0], r.stderr
    assert "RAY False" in r.stdout
    assert not (tmp_path / "out").exists()


def test_rehash_computes_the_signature_and_confirms(old_dataset, tmp_path):
    got = _decisions(run_inline(old_dataset, tmp_path / "out", rehash=True))
    assert all(reason is None for reason, _ in got.values())  # red vs green: not duplicates
    # stored hashes are kept where they exist: only the colour came from the bytes
    t = run_inline(old_dataset, tmp_path / "out2", rehash=True)[0]
    assert t.column(schema.COLOR_SIG).null_count == 0
    assert t.column(schema.PHASH_CROPS).null_count == 0


def test_explain_shows_distance_and_confirmation(chain, tmp_path):
    from curate.stages.dedup import DedupStage

    run_inline(chain, tmp_path / "out")
    info = DedupStage(DedupConfig()).explain(Dataset(str(tmp_path / "out")), B)
    members = {m[schema.UID]: m for m in info["members"]}
    assert info["kept"] == A and info["size"] == 2  # C is not in A's cluster
    assert members[B]["distance"] == 5 and members[B]["confirm"] == pytest.approx(0.0)
    assert members[A]["distance"] is None


def test_report_and_inspect_show_dedup_clusters_with_distances(chain, tmp_path, ray_session):
    from curate.inspect import find
    from curate.report import build_report, render_html
    from curate.runner import run_stage

    out = str(tmp_path / "dedup")
    run_stage("dedup", chain.url, out)
    report = build_report(Dataset(out))
    (cluster,) = [c for c in report.data["duplicate_clusters"] if c["stage"] == "dedup"]
    assert cluster["representative"] == A and cluster["reasons"] == {"dedup:near": 1}
    assert cluster["notes"] == ["kept", "dedup:near, 5 bits from the kept row, colour Delta-E 0.00"]
    page = render_html(report)
    assert "dedup: cluster of 2 (dedup:near x1)" in page and "5 bits from the kept row" in page
    where, _, row = find(Dataset(out), B)
    assert where == "rejects" and row[schema.DUP_OF] == A
    # one stage further down, inspect follows the lineage back to the drop and its cluster
    from curate.inspect import trace

    later = str(tmp_path / "later")
    run_stage("curate.testing.stages:Passthrough", out, later)
    got = trace(Dataset(later), B)
    assert got["verdict"] == f"dropped at dedup: near: duplicate of {A} (5 bits from the kept row, confirm 0.00)"
    assert trace(Dataset(later), A)["verdict"] == f"kept in {Dataset(later).url}"


# -- crop matching -------------------------------------------------------------------------------
H_FAR = _flip(H_A, range(20, 32))  # 12 bits from A: no full-image pair


def _crop_rows(crop_bits: int, color: bytes = GREY, crop_of_far: bool = False) -> list[dict]:
    """A (largest) and B whose full hash is 12 bits away but one of whose crops is ``crop_bits``
    from A's full hash; with crop_of_far, C's crop matches B's crop only (a crop-to-crop pair)."""
    crops_b = [_flip(H_FAR, range(40, 50 + i)) for i in range(4)] + [_flip(H_A, range(40, 40 + crop_bits))]
    rows = [_row(0, H_A, 300, crops=[_flip(H_A, range(50, 60 + i)) for i in range(5)]),
            _row(1, H_FAR, 200, color=color, crops=crops_b)]
    if crop_of_far:
        rows.append(_row(2, _flip(H_A, range(0, 14)), 100, crops=[crops_b[4]] * 5))
    return rows


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("crop_bits", "crop_radius", "dropped"), [
    (3, 3, True), (2, 3, True), (4, 3, False), (4, 4, True), (0, 0, False)])
def test_crop_hash_links_a_cropped_copy_at_its_limit(tmp_path, engine, crop_bits, crop_radius, dropped):
    ds = write_image_dataset(str(tmp_path / "in"), [_crop_rows(crop_bits)])
    got = _decisions(run_inline(ds, tmp_path / "out", engine=engine, crop_radius=crop_radius,
                                rows_per_partition=1000))
    assert got[A] == (None, None)
    assert got[B] == (("dedup:near", A) if dropped else (None, None))


def test_crop_pair_needs_the_colour_and_a_full_image(tmp_path):
    # recoloured B: its crop matches A's structure but the colours disagree
    red = bytes([128, 200, 200] * 16)
    ds = write_image_dataset(str(tmp_path / "in"), [_crop_rows(1, color=red)])
    assert _decisions(run_inline(ds, tmp_path / "out"))[B] == (None, None)
    # C shares only a crop with B's crop (no full image within reach of either): not a pair
    ds = write_image_dataset(str(tmp_path / "in2"), [_crop_rows(5, crop_of_far=True)])
    got = _decisions(run_inline(ds, tmp_path / "out2", crop_radius=4))
    assert got[C] == (None, None) and got[B] == (None, None)


def test_explain_names_a_crop_match(tmp_path):
    from curate.stages.dedup import DedupStage

    ds = write_image_dataset(str(tmp_path / "in"), [_crop_rows(2)])
    run_inline(ds, tmp_path / "out")
    info = DedupStage(DedupConfig()).explain(Dataset(str(tmp_path / "out")), B)
    members = {m[schema.UID]: m for m in info["members"]}
    assert members[B]["distance"] == 2 and members[B]["crop"] is True
    assert "a crop of one within 3" in info["rule"]
    # a full-image pair is not called a crop match
    run_inline(write_image_dataset(str(tmp_path / "in2"), [[_row(0, H_A, 300), _row(1, H_B, 200)]]),
               tmp_path / "out2")
    info = DedupStage(DedupConfig()).explain(Dataset(str(tmp_path / "out2")), B)
    assert {m[schema.UID]: m["crop"] for m in info["members"]}[B] is False


def test_crop_radius_above_radius_is_refused():
    with pytest.raises(ValueError, match="crop_radius"):
        DedupConfig(radius=2, crop_radius=3)


# -- the clusters table and the decisions' edges, called in one process ---------------------------
def _clusters(out_root) -> pa.Table:
    import pyarrow.parquet as pq

    from curate.stages.dedup import _plan_path

    out = Dataset(str(out_root))
    return pq.read_table(_plan_path(out, "clusters.parquet"), filesystem=out.fs)


CLUSTER_TYPES = {"gid": pa.int64(), schema.UID: pa.string(), "cluster": pa.int64(), "kept": pa.bool_(),
                 "kind": pa.string(), schema.DUP_OF: pa.string(), schema.PHASH: pa.uint64(),
                 "pixels": pa.int64(), "distance": pa.int32(), "crop": pa.bool_(), "confirm": pa.float32()}


def test_clusters_table_has_fixed_types_with_and_without_duplicates(tmp_path):
    """clusters.parquet keeps one schema (the report and inspect read it): with a cluster, and with none
    (empty columns would otherwise come out untyped, null)."""
    run_inline(write_image_dataset(str(tmp_path / "in"), [[_row(0, H_A, 300), _row(1, H_B, 200)]]), tmp_path / "o1")
    t = _clusters(tmp_path / "o1")
    assert {f.name: f.type for f in t.schema} == CLUSTER_TYPES and t.num_rows == 2
    run_inline(write_image_dataset(str(tmp_path / "in2"), [[_row(0, H_A, 300), _row(1, H_FAR, 200)]]), tmp_path / "o2")
    t = _clusters(tmp_path / "o2")
    assert {f.name: f.type for f in t.schema} == CLUSTER_TYPES and t.num_rows == 0


def test_identical_hashes_of_different_colours_keep_distance_zero_and_keep_first_keeps_the_earliest(tmp_path):
    """A near pair at 0 bits records distance 0 (not null); keep: first keeps the row that comes first,
    whatever the sizes; the confirmation score is the Delta-E, and null with confirm: none."""
    near_grey = bytes([200, 130, 128] * 16)  # 2 units of a*: confirmed, yet not colour-identical
    rows = [[_row(0, H_A, 100), _row(1, H_A, 300, color=near_grey), _row(2, H_FAR, 100),
             _row(3, H_FAR, 300, color=near_grey)]]
    got = _decisions(run_inline(write_image_dataset(str(tmp_path / "in"), rows), tmp_path / "o1", keep="first"))
    assert got[A] == (None, None) and got[B] == ("dedup:near", A)
    assert got[C] == (None, None) and got[f"{3:032x}"] == ("dedup:near", C)
    t = {r[schema.UID]: r for r in _clusters(tmp_path / "o1").to_pylist()}
    assert t[B]["distance"] == 0 and t[A]["distance"] is None and t[B]["confirm"] == pytest.approx(2.0, abs=0.01)
    got = _decisions(run_inline(write_image_dataset(str(tmp_path / "in2"), rows), tmp_path / "o2"))
    assert got[B] == (None, None) and got[A] == ("dedup:near", B)  # keep: resolution (default)
    run_inline(write_image_dataset(str(tmp_path / "in3"), rows), tmp_path / "o3", confirm="none")
    assert {r[schema.UID]: r["confirm"] for r in _clusters(tmp_path / "o3").to_pylist()}[A] is None


def test_a_row_without_a_colour_signature_is_never_confirmed(tmp_path):
    """Confirmation needs both signatures: one missing means no duplicate, not a comparison with zeros."""
    rows = [[_row(0, H_A, 300), _row(1, H_B, 200, color=None), _row(2, _flip(H_A, range(40, 42)), 100)]]
    got = _decisions(run_inline(write_image_dataset(str(tmp_path / "in"), rows), tmp_path / "out"))
    assert got[B] == (None, None) and got[C] == ("dedup:near", A)


def test_crop_distance_when_only_one_side_has_crops(tmp_path):
    """A has no crop hashes, B's crop is 3 bits from A's full image: linked at crop_radius 3, and the
    distance recorded is those 3 bits (the side without crops contributes nothing)."""
    rows = _crop_rows(3)
    rows[0][schema.PHASH_CROPS] = None
    run_inline(write_image_dataset(str(tmp_path / "in"), [rows]), tmp_path / "out", crop_radius=3)
    t = {r[schema.UID]: r for r in _clusters(tmp_path / "out").to_pylist()}
    assert t[B]["distance"] == 3 and t[B]["crop"] is True and t[B][schema.DUP_OF] == A


def test_clip_confirmation_at_exactly_its_threshold(tmp_path):
    e0 = np.array([1.0, 0.0, 0.0, 0.0])
    half = np.array([0.5, 0.0, 0.8660254, 0.0])  # cosine 0.5, exact in float16 (0.5 * 1.0)
    t = write_image_dataset(str(tmp_path / "in"), [[_emb_row(0, H_A, 300, e0), _emb_row(2, H_A ^ 2, 100, half)]]).read_shard(0)
    t = t.set_column(t.column_names.index(schema.IMAGE_EMBEDDING), schema.IMAGE_EMBEDDING,
                     t.column(schema.IMAGE_EMBEDDING).cast(schema.embedding_type(4)))
    ds = _with_table(Dataset(str(tmp_path / "in")), t, tmp_path)
    assert _decisions(run_inline(ds, tmp_path / "o1", confirm="clip", clip_threshold=0.5))[C] == ("dedup:near", A)
    assert _decisions(run_inline(ds, tmp_path / "o2", confirm="clip", clip_threshold=0.51))[C] == (None, None)


def _apply(inp: Dataset, out_root, shard: int, table: pa.Table, **cfg) -> tuple[pa.Table, dict]:
    """Apply one shard of a dedup plan already made under ``out_root`` (by run_inline) to ``table``."""
    from curate.stage import RunOptions, ShardContext
    from curate.stages.dedup import DedupStage

    out = Dataset(str(out_root))
    sctx = ShardContext(shard=shard, input_path=inp.url, input=inp, output=out, plan_dir=out.path("_plan"),
                        options=RunOptions())
    return DedupStage(DedupConfig(**cfg)).process(table, sctx), sctx.stats


def test_apply_counts_duplicates_and_refuses_a_changed_shard(tmp_path):
    rows = [[_row(0, H_A, 300), _row(1, H_B, 200), _row(2, H_FAR, 100)], [_row(3, H_A, 50)]]
    ds = write_image_dataset(str(tmp_path / "in"), rows)
    run_inline(ds, tmp_path / "out")
    _, stats = _apply(ds, tmp_path / "out", 0, ds.read_shard(0))
    assert stats["duplicates"] == 1  # B; C is far from everything
    _, stats = _apply(ds, tmp_path / "out", 1, ds.read_shard(1))
    assert stats["duplicates"] == 1  # the row of shard 1, a copy of A
    with pytest.raises(RuntimeError, match=r"^dedup: input shard 0 changed since the plan; rerun with --overwrite$"):
        _apply(ds, tmp_path / "out", 0, ds.read_shard(0).slice(0, 2))  # a row fewer
    other = ds.read_shard(0)
    uids = other.column(schema.UID).to_pylist()
    other = other.set_column(other.column_names.index(schema.UID), schema.UID, pa.array(uids[::-1], pa.string()))
    with pytest.raises(RuntimeError, match="changed since the plan"):
        _apply(ds, tmp_path / "out", 0, other)  # same count, other rows


def test_apply_adds_no_crop_column_the_input_did_not_have(tmp_path):
    """Without crop matching (crop_radius 0) and an input without crop hashes, the output gains no
    all-null crop column; with stored crop hashes the column is kept."""
    rows = [[_row(0, H_A, 300), _row(1, H_B, 200)]]
    t = write_image_dataset(str(tmp_path / "in"), rows).read_shard(0).drop_columns([schema.PHASH_CROPS])
    from curate.testing.datasets import write_table_dataset

    ds = write_table_dataset(str(tmp_path / "bare"), [t], stage="import")
    out = run_inline(ds, tmp_path / "out", crop_radius=0)
    assert schema.PHASH_CROPS not in out[0].column_names
    crops = [[_row(0, H_A, 300, crops=[1, 2, 3, 4, 5]), _row(1, H_B, 200, crops=[6, 7, 8, 9, 10])]]
    out = run_inline(write_image_dataset(str(tmp_path / "in2"), crops), tmp_path / "out2", crop_radius=0)
    assert out[0].column(schema.PHASH_CROPS).null_count == 0


def test_a_full_image_pair_at_the_radius_is_not_called_a_crop_match(tmp_path):
    """B is exactly at the radius (6 bits) from A and one of its crops is 2 bits from A: the pair is a
    full-image one, recorded as 6 bits and not as a crop match."""
    h_b = _flip(H_A, range(0, 6))
    rows = [_row(0, H_A, 300, crops=[_flip(H_A, range(50, 60 + i)) for i in range(5)]),
            _row(1, h_b, 200, crops=[_flip(H_A, range(40, 42))] * 5)]
    got = _decisions(run_inline(write_image_dataset(str(tmp_path / "in"), [rows]), tmp_path / "out"))
    assert got[B] == ("dedup:near", A)
    t = {r[schema.UID]: r for r in _clusters(tmp_path / "out").to_pylist()}
    assert t[B]["distance"] == 6 and t[B]["crop"] is False
