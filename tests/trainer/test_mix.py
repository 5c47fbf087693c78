"""Weighted mixing of several datasets (trainer/mix.py): proportions, order, resume, and a real run."""

from __future__ import annotations

import pytest

from trainer.mix import MixSource, allocation, parse_data


class Numbered:
    """A source whose sample at position p is (name, p): shows which stream position each pick used."""

    def __init__(self, name: str):
        self.name = name

    def __len__(self) -> int:
        return 10

    def samples_at(self, positions):
        return [(self.name, int(p)) for p in positions]


def _mix(weights, seed=0, block=4096):
    parts = parse_data([f"/data/{n}:{w}" for n, w in weights.items()])
    return MixSource(parts, [Numbered(p.name) for p in parts], seed=seed, block=block)


@pytest.mark.parametrize("block", [4096, 64])
def test_a_70_30_mix_is_within_2_percent_over_2000_samples(block):
    mix = _mix({"A": 0.7, "B": 0.3}, block=block)
    picked = mix.samples_at(range(2000))
    share = sum(name == "A" for name, _ in picked) / 2000
    assert abs(share - 0.7) <= 0.02, share
    assert mix.counts(2000) == {"A": round(share * 2000), "B": 2000 - round(share * 2000)}
    # and at every prefix, the logged counts are what was actually handed out
    for n in (1, 17, 999, 1500):
        assert mix.counts(n) == {k: sum(name == k for name, _ in picked[:n]) for k in ("A", "B")}


def test_each_dataset_streams_its_own_positions_in_order_without_gaps():
    mix = _mix({"A": 3, "B": 1, "C": 0.5}, block=256)  # weights need not sum to 1
    picked = mix.samples_at(range(5000))
    for name in "ABC":
        mine = [p for n, p in picked if n == name]
        assert mine == list(range(len(mine)))  # the dataset's stream: every position once, in order
    shares = {n: sum(x == n for x, _ in picked) / 5000 for n in "ABC"}
    assert shares == pytest.approx({"A": 3 / 4.5, "B": 1 / 4.5, "C": 0.5 / 4.5}, abs=0.01)


def test_positions_are_interleaved_and_seeded():
    a, b = _mix({"A": 0.5, "B": 0.5}, seed=0), _mix({"A": 0.5, "B": 0.5}, seed=1)
    first = [n for n, _ in a.samples_at(range(64))]
    assert first != ["A"] * 32 + ["B"] * 32 and len(set(first[:8])) == 2  # mixed within a batch
    assert first != [n for n, _ in b.samples_at(range(64))]


def test_any_position_is_reached_without_the_ones_before_it():
    # resume: a fresh MixSource asked for positions 9,000-9,100 gives what a long-running one gives
    long_running = _mix({"A": 0.7, "B": 0.3}, block=512)
    long_running.samples_at(range(9100))
    assert _mix({"A": 0.7, "B": 0.3}, block=512).samples_at(range(9000, 9100)) == long_running.samples_at(
        range(9000, 9100))


def test_allocation_is_exact_and_monotone():
    w = __import__("numpy").array([0.7, 0.2, 0.1])
    prev = allocation(w, 0)
    for total in range(1, 400):
        cur = allocation(w, total)
        assert cur.sum() == total and all(abs(cur - w * total) < 1)
        assert all(cur >= prev)
        prev = cur


def test_parse_data():
    parts = parse_data(["/x/a:0.7", "s3://bucket/b", "/y/a:0.3"])
    assert [(p.name, p.path, p.weight) for p in parts] == [
        ("a_0", "/x/a", 0.7), ("b", "s3://bucket/b", 1.0), ("a_2", "/y/a", 0.3)]
    for bad in ("/x/a:0", "/x/a:-1", "/x/a:nan"):
        with pytest.raises(ValueError, match="positive number"):
            parse_data([bad])


# ---------------------------------------------------------------- with the trainer


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    from conftest import PAIRS, write_dataset

    root = tmp_path_factory.mktemp("mix")
    a = write_dataset(root / "A", PAIRS[:12] * 2, per_shard=12, seed=1)  # 24 samples
    b = write_dataset(root / "B", PAIRS[12:] * 4, per_shard=24, seed=2)  # 48 samples
    return root, set(a), set(b)


def test_mixing_real_exports_draws_70_30_with_replacement(two_exports):
    from trainer.config import load_recipe
    from trainer.mix import MixSource, make_source, resolve

    root, keys_a, keys_b = two_exports
    recipe, first = resolve([f"{root / 'A'}:0.7", f"{root / 'B'}:0.3"], load_recipe(None))
    assert first == str(root / "A") and [(e.path, e.weight) for e in recipe.data.mix] == [
        (str(root / "A"), 0.7), (str(root / "B"), 0.3)]
    source = make_source(recipe, first, seed=0)
    assert isinstance(source, MixSource)
    samples = source.samples_at(range(2000))
    from_a = [s for s in samples if s.tar.startswith(str(root / "A"))]
    assert abs(len(from_a) / 2000 - 0.7) <= 0.02
    assert {s.key for s in from_a} == keys_a  # A (24 samples) is repeated: ~58 times each
    assert {s.key for s in samples if s not in from_a} == keys_b
    assert source.counts(2000) == {"A": len(from_a), "B": 2000 - len(from_a)}


def test_a_mixed_run_logs_counts_and_resumes_exactly(two_exports, tmp_path):
    import json

    from conftest import TINY, read_metrics

    from trainer.train import main

    root, _, _ = two_exports
    data = ["--data", f"{root / 'A'}:0.7", "--data", f"{root / 'B'}:0.3"]
    sets = [*TINY, "data.loader=torch", "train.steps=8", "train.global_batch=8", "optim.lr=1e-3"]
    assert main([*data, "--output", str(tmp_path / "full"), "--set", *sets]) == 0
    assert main([*data, "--output", str(tmp_path / "cut"), "--set", *sets, "train.stop_at=4"]) == 0
    assert main([*data, "--output", str(tmp_path / "cut"), "--set", *sets]) == 0
    full, _ = read_metrics(tmp_path / "full")
    cut, _ = read_metrics(tmp_path / "cut")
    assert [r["loss"] for r in cut] == pytest.approx([r["loss"] for r in full], abs=1e-6)
    last = full[-1]
    assert last["data/A_samples"] + last["data/B_samples"] == 64
    # what the logged counts say is what the stream handed out in those 64 positions
    from trainer.config import Recipe
    from trainer.mix import make_source

    recipe = json.loads((tmp_path / "full" / "recipe.json").read_text())
    handed = make_source(Recipe.model_validate(recipe), str(root / "A"), seed=0).samples_at(range(64))
    assert last["data/A_samples"] == sum(s.tar.startswith(str(root / "A")) for s in handed)
    assert [m["weight"] for m in recipe["data"]["mix"]] == [0.7, 0.3]
    # a resume with another mix is refused
    other = ["--data", f"{root / 'A'}:0.5", "--data", f"{root / 'B'}:0.5"]
    with pytest.raises(SystemExit, match="different recipe"):
        main([*other, "--output", str(tmp_path / "full"), "--set", *sets, "train.steps=9"])


def test_data_mistakes_exit_2(two_exports, tmp_path):
    from trainer.train import main

    root, _, _ = two_exports
    for data in (["--data", f"{root / 'A'}:0"], ["--data", f"{root / 'A'}:0.7", "--data", str(tmp_path / "none")], []):
        assert main([*data, "--output", str(tmp_path / "x"), "--set", "model.tiny=true"]) == 2, data
