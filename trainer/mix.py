"""Weighted mixing of several datasets into one training stream, sampled with replacement.

    python -m trainer.train --data A:0.7 --data B:0.3 ...       # or data.mix: [{path: A, weight: 0.7}, ...]

The loaders cut one endless stream of sample positions into per-rank micro-batches and ask their source
for the samples at those positions. ``MixSource`` is such a source over several datasets:

- The stream is split into blocks of ``block`` positions. Block b gives dataset i exactly
  ``alloc_i(b + 1) - alloc_i(b)`` of its positions, where ``alloc_i(B)`` is the largest-remainder rounding
  of ``w_i * B * block``: after every whole block each dataset has its share to within one sample. Inside
  a block, which position goes to which dataset is a seeded permutation.
- Dataset i's k-th position in the stream is position k of that dataset's own endless stream (its own
  seeded epoch order, looping). A small dataset is thus repeated and a large one only partly seen:
  sampling with replacement at the given weights, like open_clip's resampled datasets with upsampling
  factors.

Everything is a function of the position, so resuming needs only the loader's position, and the
per-dataset sample counts up to any position are computed (``counts``), not accumulated.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np


@dataclass(frozen=True)
class Part:
    name: str
    path: str
    weight: float


def parse_data(specs: Sequence[str]) -> list[Part]:
    """``PATH`` or ``PATH:WEIGHT`` per dataset (``s3://b/x:0.3`` too); names from the last path component."""
    parts = []
    for spec in specs:
        path, weight = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
                path = head
            except ValueError:
                pass  # a URL scheme or a Windows drive, not a weight
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"--data {spec}: the weight must be a positive number")
        parts.append(Part(_name(path), path, weight))
    names = [p.name for p in parts]
    for i, p in enumerate(parts):  # the same folder name twice: number them
        if names.count(p.name) > 1:
            parts[i] = Part(f"{p.name}_{i}", p.path, p.weight)
    return parts


def _name(path: str) -> str:
    name = PurePosixPath(path.rstrip("/").replace(os.sep, "/")).name
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "data"


def allocation(weights: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, each the floor of its share or one more (largest remainder)."""
    target = weights * total
    counts = np.floor(target).astype(np.int64)
    short = total - int(counts.sum())
    if short:
        order = np.argsort(-(target - counts), kind="stable")  # biggest remainders first, ties by index
        counts[order[:short]] += 1
    return counts


class MixSource:
    """Several sources (each with ``samples_at``) as one, at fixed weights; see the module docstring."""

    def __init__(self, parts: Sequence[Part], sources: Sequence, *, seed: int = 0, block: int = 4096):
        if len(parts) != len(sources) or not parts:
            raise ValueError("one source per part")
        self.parts, self.sources, self.seed = list(parts), list(sources), seed
        w = np.array([p.weight for p in parts], dtype=np.float64)
        self.weights = w / w.sum()
        # every dataset gets at least one position per block, which keeps each one's allocation monotone
        self.block = max(block, math.ceil(1 / self.weights.min()))
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)

    def _alloc(self, b: int) -> np.ndarray:
        return allocation(self.weights, b * self.block)

    def _block_layout(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dataset of each offset, its occurrence number among that dataset's offsets, each dataset's
        count before the block) for block b."""
        found = self._blocks.get(b)
        if found is None:
            base = self._alloc(b)
            per = self._alloc(b + 1) - base
            which = np.repeat(np.arange(len(per)), per)
            which = which[np.random.default_rng([self.seed, b, 7]).permutation(len(which))]
            nth = np.empty(len(which), dtype=np.int64)
            for i in range(len(per)):
                mask = which == i
                nth[mask] = np.arange(int(mask.sum()))
            if len(self._blocks) > 8:
                self._blocks.clear()
            found = self._blocks[b] = (which, nth, base)
        return found

    def locate(self, position: int) -> tuple[int, int]:
        """(dataset index, position in that dataset's own stream) of a stream position."""
        b, o = divmod(position, self.block)
        which, nth, base = self._block_layout(b)
        i = int(which[o])
        return i, int(base[i] + nth[o])

    def samples_at(self, positions) -> list:
        located = [self.locate(int(p)) for p in positions]
        out: list = [None] * len(located)
        for i, source in enumerate(self.sources):
            mine = [j for j, (k, _) in enumerate(located) if k == i]
            if mine:
                for j, sample in zip(mine, source.samples_at([located[j][1] for j in mine]), strict=True):
                    out[j] = sample
        return out

    def counts(self, position: int) -> dict[str, int]:
        """Samples each dataset contributed to stream positions [0, position)."""
        b, o = divmod(position, self.block)
        which, _, base = self._block_layout(b)
        c = base + np.bincount(which[:o], minlength=len(self.parts))
        return {p.name: int(n) for p, n in zip(self.parts, c, strict=True)}


def count_row(source, position: int) -> dict[str, float]:
    """``data/NAME_samples`` per dataset for a metrics row (empty for a single dataset)."""
    if not isinstance(source, MixSource):
        return {}
    return {f"data/{k}_samples": v for k, v in source.counts(position).items()}


def resolve(specs: Sequence[str], recipe):
    """(recipe, first dataset) from ``--data`` specs and the recipe's ``data.mix``.

    Several ``--data`` or one with a weight become the recipe's mix (so the run records it and a resume
    with another mix is refused); one plain ``--data`` is a single dataset; none takes the recipe's mix."""
    from trainer.config import MixEntry

    if not specs:
        if not recipe.data.mix:
            raise ValueError("no data: give --data EXPORT (or several: --data A:0.7 --data B:0.3) or data.mix")
        return recipe, recipe.data.mix[0].path
    parts = parse_data(specs)
    if len(parts) == 1 and parts[0].path == specs[0]:  # one dataset, no weight
        if recipe.data.mix:
            raise ValueError("the recipe has data.mix and --data names one dataset: give one or the other")
        return recipe, parts[0].path
    mix = [MixEntry(path=p.path, weight=p.weight) for p in parts]
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"mix": mix})}), parts[0].path


def make_source(recipe, data: str, seed: int):
    """The training source: the one dataset, or a ``MixSource`` over the recipe's ``data.mix``."""
    from trainer import data as datamod

    if not recipe.data.mix:
        return datamod.make_source(datamod.find_shards(data), recipe.data, seed=seed)
    parts = parse_data([f"{e.path}:{e.weight!r}" for e in recipe.data.mix])
    # each dataset its own order: seeds drawn from (seed, index), not the same permutation for all
    sources = [datamod.make_source(datamod.find_shards(p.path), recipe.data,
                                   seed=int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))
               for i, p in enumerate(parts)]
    return MixSource(parts, sources, seed=seed)
