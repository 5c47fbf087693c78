"""``curate compare`` finds a planted quality difference: clean captions vs 50% shuffled among samples.

Two training variants hold the same images (coloured shapes on grey noise, ``curate.testing.shapes``):
``clean`` with the true captions, ``shuffled`` with half of the samples' captions permuted among those
samples. A third set, written from other seeds, is the held-out split neither trains on. ``curate compare``
trains the same tiny CLIP (recipe (a) shrunk with ``--set``) with the same budget on each, over
``--seeds`` seeds, and reports held-out retrieval with paired 95% confidence intervals.

The baseline named in this run is the ``shuffled`` variant. Last line: ``ratio: X.XX`` = the clean
variant's mean held-out retrieval (mean of image->text and text->image recall@1/5/10) / the shuffled
variant's. The run fails (exit 1) unless clean wins with an interval that excludes zero.

Run: ``.venv/bin/python bench/compare.py [--seeds 4] [--steps 40] [--copies 8] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from curate.cli import main as curate_main  # noqa: E402
from curate.testing.shapes import write_shapes  # noqa: E402

RECIPE = REPO / "trainer" / "recipes" / "clip_vit_l14_336.yaml"


def budget(steps: int) -> list[str]:
    return ["model.tiny=true", "model.grad_checkpointing=false", "data.workers=1", "train.device=cpu",
            f"train.steps={steps}", "train.global_batch=16", "train.accum=1", "train.log_every=10",
            "train.ckpt_every=0", "optim.lr=2e-3", "optim.warmup_steps=5", "optim.weight_decay=0.1",
            "data.color_jitter=null", "data.loader=torch"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--copies", type=int, default=8, help="training samples per (colour, shape) pair (24 pairs)")
    ap.add_argument("--out", help="work folder (default: a temporary one, removed at the end)")
    args = ap.parse_args(argv)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        t0 = time.perf_counter()
        clean = write_shapes(work / "clean", args.copies, seed=1)
        shuffled = write_shapes(work / "shuffled", args.copies, seed=1, shuffle=0.5)
        write_shapes(work / "held_out", 1, seed=2, image_seed=3)
        print(f"variants: clean ({clean['n']} samples), shuffled ({shuffled['shuffled']} of {shuffled['n']} captions "
              f"moved); held-out 24 pairs; {args.seeds} seeds x {args.steps} steps x batch 16", flush=True)
        cmd = ["compare", f"shuffled={work / 'shuffled'}", f"clean={work / 'clean'}", "--held-out",
               str(work / "held_out"), "--out", str(work / "compare"), "--recipe", str(RECIPE),
               "--seeds", str(args.seeds), *[a for s in budget(args.steps) for a in ("--set", s)]]
        rc = curate_main(cmd)
        wall = time.perf_counter() - t0
        if rc:
            return rc
        summary = json.loads((work / "compare" / "compare.json").read_text())
        primary = next(e for e in summary["table"] if e["metric"] == summary["primary"])["variants"]
        d = primary["clean"]["delta"]
        print(f"wall: {wall:.0f} s for {2 * args.seeds} training runs")
        print(f"held-out retrieval: clean {primary['clean']['mean']:.3f}, shuffled {primary['shuffled']['mean']:.3f}; "
              f"difference {d['mean']:+.3f}, 95% CI [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]")
        if not d["ci"][0] > 0:
            print("FAIL: clean does not win with an interval above zero", file=sys.stderr)
            return 1
        print(f"ratio: {primary['clean']['mean'] / primary['shuffled']['mean']:.2f}")
        return 0
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
