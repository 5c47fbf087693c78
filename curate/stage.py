"""The stage protocol (ARCHITECTURE §4): one small class per stage, no Ray inside.

A stage is constructed cheaply from its typed, frozen config, ``setup()`` once per worker (model
load, index load), then ``process(table, ctx)`` once per shard. ``process`` returns the rows it
received (plus any new columns) with ``drop_reason`` set on those it rejects; the runner writes the
kept rows to ``shards/`` and the rest to ``rejects/``.

A global stage also implements ``plan(ctx)``: it runs once over the whole input before any shard is
applied, writes what it decided under ``ctx.plan_dir`` and returns the shard numbers to apply. Stages
that do not read a curate dataset (download reads URL lists, import reads tars) use ``plan`` to cut
their raw input into deterministic input shards and ``load`` to read one back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from curate.dataset import Dataset, PlanStore
    from curate.wds import TarWriter


class Frozen(BaseModel):
    """Base of every config model: immutable and strict about unknown keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(Frozen):
    """What one worker of a stage asks Ray for; also the knobs of the actor pool."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float | None = Field(None, gt=0)
    # How many shards run at once (tasks in flight, or actors in the pool). None: as many as the
    # cluster's CPUs (or GPUs, for a stage that asks for GPUs) allow.
    concurrency: int | None = Field(None, ge=1)
    # On a cluster (not an embedded Ray), how long to wait for a node that can hold one worker before
    # failing: an autoscaler may still be bringing GPU nodes up. 0 fails at once.
    wait_s: float = Field(600.0, ge=0)


class StageConfig(Frozen):
    """Base of every stage's config. Fields that do not change the output belong in ``resources``."""

    resources: Resources = Resources()


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """Per-invocation switches that are not part of the stage's resolved config."""

    overwrite: bool = False
    retry_failed: bool = False
    progress: bool = True


@dataclasses.dataclass
class PlanContext:
    """What ``Stage.plan`` sees. ``map`` runs a picklable function over items in parallel (on Ray)."""

    input_path: str | None
    input: Dataset | None
    output: Dataset
    plan_dir: str
    options: RunOptions
    # map(fn, items, num_cpus=1, num_gpus=0, model=False) -> results in order. With model=True the
    # calls run on a pool of actors holding the stage's plan-phase model resources (a GPU where the
    # model uses one), so whatever ``fn`` caches per process (a loaded model) serves many items.
    map: Callable[..., list[Any]]
    # Shard tasks the cluster runs at once for this stage (CPU or GPU slots / what one task asks).
    slots: int = 1
    # A stage that cuts its output into named splits (export: train, val) sets the shards of each
    # here; the runner records them in the plan, and each such shard's tar is named SPLIT-NNNNN.tar.
    splits: dict[str, list[int]] | None = None

    def plan_store(self, sub: str) -> PlanStore:
        """The stage's own plan files in the output (``_plan/<sub>/``)."""
        return self.output.plan_store(sub)


@dataclasses.dataclass
class ShardContext:
    """What ``Stage.load`` and ``Stage.process`` see for one shard.

    ``tar`` is set only for stages with ``writes_images``: the stage adds each kept sample's members
    to it and records the returned pointers; ``tar_url`` is the committed tar's final location, which
    is what ``image_tar`` must hold. ``stats`` is merged into the shard's ``stats.json``; ``timings``
    (seconds by phase) goes there too under ``timings``.
    """

    shard: int
    input_path: str | None
    input: Dataset | None
    output: Dataset
    plan_dir: str
    options: RunOptions
    tar: TarWriter | None = None
    tar_url: str | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    on_rows: Callable[[int], None] | None = None  # set by the runner when someone watches progress

    def plan_store(self, sub: str) -> PlanStore:
        """The stage's own plan files in the output (``_plan/<sub>/``), as its plan wrote them."""
        return self.output.plan_store(sub)

    def rows_done(self, n: int) -> None:
        """Tell the driver how many of this shard's rows are finished, for progress only (the
        count is shown, never stored). Cheap: the runner passes on at most two calls a second."""
        if self.on_rows is not None:
            self.on_rows(n)

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class Stage:
    """Base class: override ``process`` (and ``setup`` / ``plan`` / ``load`` where needed)."""

    name: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    # Model stages run as an actor pool that keeps the model loaded; others as one task per shard.
    uses_model: ClassVar[bool] = False
    # Stages that own image bytes (download, export) get a tar writer per shard.
    writes_images: ClassVar[bool] = False
    # False for stages whose --input is not a curate dataset (download: URL lists; import: tars).
    reads_dataset: ClassVar[bool] = True
    # Whether the raw input's files are fingerprinted into the run record (download's URL lists,
    # import's tars): an input changed in place is then another input, never "complete".
    fingerprints_input: ClassVar[bool] = False
    # Whether ``--retry-failed`` means something: the stage records failures worth trying again.
    retries_failed: ClassVar[bool] = False

    def __init__(self, config: StageConfig):
        self.config = config

    def model_device(self, phase: str) -> str | None:
        """The device setting ("auto", "cpu" or "cuda") of the model that ``phase`` ("plan" or
        "apply") loads in its workers, or None when that phase loads no model. The runner asks Ray for
        GPUs from this: a phase that loads no model, or a CPU model, reserves none."""
        return "auto" if (phase == "apply" and self.uses_model) else None

    def setup(self) -> None:
        """Heavy, once per worker: import torch, load models, open indexes."""

    def check(self, input: Dataset | None) -> None:
        """Cheap checks against the input before any work starts or anything is written (files the
        config names can be read, a model fits the input's embeddings). Raise
        ``curate.config.ConfigError`` with one line saying what is wrong and how to fix it."""

    def needs(self) -> dict[str, str]:
        """Columns this config reads from its input, each with the fix to name when no earlier step of a
        pipeline writes it; ``curate run`` checks every step against the steps before it, before any work."""
        return {}

    def columns_after(self, columns: set[str]) -> set[str]:
        """The columns of this stage's output given its input's. Only columns a stage adds or drops
        matter: the pipeline check follows what later steps ``need`` through them."""
        return columns

    def models(self) -> list[tuple[str, str, str | None]]:
        """The models this config loads, as ``("open_clip", model, pretrained)`` or
        ``("transformers", model, revision)``, for ``curate models`` to fetch ahead of a run."""
        return []

    def plan(self, ctx: PlanContext) -> list[int] | None:
        """Global step before the per-shard apply. Return the shard numbers to apply, or None to
        apply once per committed shard of the input dataset."""
        return None

    def load(self, shard: int, ctx: ShardContext) -> pa.Table:
        """The input rows of one shard. Default: that shard of the input dataset."""
        assert ctx.input is not None
        return ctx.input.read_shard(shard)

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        raise NotImplementedError

    def explain(self, output: Dataset, uid: str) -> dict[str, Any] | None:
        """Why a sample was kept or dropped, for ``curate inspect --uid`` (optional)."""
        return None
