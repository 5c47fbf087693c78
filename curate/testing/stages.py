"""Small real stages for exercising the runner: they go through the exact same protocol as any stage.

``Passthrough`` keeps or drops rows by a rule on the uid, optionally sleeping per shard (so a test can
kill a run mid-way) or raising on one shard (so a test can see a failure reported with its shard).
"""

from __future__ import annotations

import time

import pyarrow as pa
from pydantic import Field

from curate import schema
from curate.stage import ShardContext, Stage, StageConfig


class PassthroughConfig(StageConfig):
    drop_every: int = Field(0, ge=0)  # reject rows whose uid, read as hex, is divisible by this
    sleep_per_shard: float = Field(0.0, ge=0)
    fail_on_shard: int | None = None


class Passthrough(Stage):
    name = "passthrough"
    Config = PassthroughConfig

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        cfg = self.config
        if cfg.fail_on_shard is not None and ctx.shard == cfg.fail_on_shard:
            raise RuntimeError(f"injected failure on shard {ctx.shard}")
        if cfg.sleep_per_shard:
            time.sleep(cfg.sleep_per_shard)
        reasons = [None] * table.num_rows
        if cfg.drop_every:
            uids = table.column(schema.UID).to_pylist()
            reasons = [schema.reason("passthrough", "divisible") if int(u, 16) % cfg.drop_every == 0 else None
                       for u in uids]
        return schema.with_column(table, schema.DROP_REASON, reasons)


class SynthConfig(StageConfig):
    shards: int = Field(3, ge=1)
    rows_per_shard: int = Field(10, ge=0)
    size: int = Field(32, ge=8)
    seed: int = 0
    sleep_per_shard: float = Field(0.0, ge=0)


class Synth(Stage):
    """A source stage that owns its bytes: small PNG images with captions, deterministic by seed.
    Its --input is ignored beyond existing; it stands in for download where a test needs a dataset."""

    name = "synth"
    Config = SynthConfig
    reads_dataset = False
    writes_images = True

    def plan(self, ctx) -> list[int]:
        return list(range(self.config.shards))

    def load(self, shard: int, ctx: ShardContext) -> pa.Table:
        from curate.dataset import uid_for

        n = self.config.rows_per_shard
        return pa.table({
            schema.UID: [uid_for("synth", self.config.seed, shard, i) for i in range(n)],
            schema.CAPTION: [f"synthetic picture {shard} {i}" for i in range(n)],
        })

    def process(self, table: pa.Table, ctx: ShardContext) -> pa.Table:
        import hashlib
        import io

        import numpy as np
        from PIL import Image

        from curate.dataset import make_key

        if self.config.sleep_per_shard:
            time.sleep(self.config.sleep_per_shard)
        s = self.config.size
        cols: dict[str, list] = {k: [] for k in (schema.KEY, schema.SHA256, schema.WIDTH, schema.HEIGHT,
                                                  schema.IMAGE_TAR, schema.IMAGE_OFFSET, schema.IMAGE_LENGTH,
                                                  schema.IMAGE_FORMAT)}
        for i, (uid, caption) in enumerate(zip(table.column(schema.UID).to_pylist(),
                                               table.column(schema.CAPTION).to_pylist(), strict=True)):
            rng = np.random.default_rng(int(uid[:8], 16) ^ self.config.seed)
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8)).save(buf, "PNG")
            data = buf.getvalue()
            key = make_key(ctx.shard, i, ctx.output.shard_digits)
            where = ctx.tar.add(key, {"png": data, "txt": caption})
            for col, v in ((schema.KEY, key), (schema.SHA256, hashlib.sha256(data).hexdigest()),
                           (schema.WIDTH, s), (schema.HEIGHT, s), (schema.IMAGE_TAR, ctx.tar_url),
                           (schema.IMAGE_OFFSET, where["png"][0]), (schema.IMAGE_LENGTH, where["png"][1]),
                           (schema.IMAGE_FORMAT, "png")):
                cols[col].append(v)
        for col, values in cols.items():
            table = schema.with_column(table, col, values)
        return table
