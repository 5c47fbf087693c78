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
