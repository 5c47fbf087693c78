"""``curate compare``: judge curation choices by the model trained on them.

Trains the same model with the same budget (recipe, steps, global batch: the same samples seen) on each
variant (an export, or one pipeline run with two settings of one step), once per seed, evaluates every run
on the same held-out pairs (and zero-shot sets when given), and reports each variant's mean and the
paired difference to the baseline with a 95% Student-t confidence interval over seeds, as a table and a
plot in one HTML page.

The held-out set must be one no variant trains on: its images' sha256 are checked against every
variant's training split before anything trains. Runs live under ``OUT/runs/VARIANT/seedN``; a finished
run is never repeated and an interrupted one resumes from its checkpoint (the trainer's own resume), so
killing ``curate compare`` and rerunning it gives the same result.

This module drives ``python -m trainer.train`` (``torchrun`` with ``nproc`` > 1) in subprocesses; it
imports neither torch nor Ray.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import html
import io
import json
import logging
import math
import os
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

RECALLS = [f"eval/{d}_R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)]
PRIMARY = "retrieval"  # mean of the six recalls
PLAN_FILE = "plan.json"


class CompareError(ValueError):
    """A user mistake, reported as one line."""


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    path: str


@dataclasses.dataclass(frozen=True)
class Plan:
    variants: tuple[Variant, ...]
    held_out: str
    out: str
    recipe: str | None = None
    sets: tuple[str, ...] = ()
    seeds: int = 3
    baseline: str | None = None
    zeroshot: tuple[str, ...] = ()
    classnames: str | None = None
    templates: str | None = None
    nproc: int = 1
    pipeline: str | None = None  # with vary: the variants are this pipeline's runs, one per value
    vary: str | None = None  # STEP.KEY=V1,V2,...

    @property
    def base(self) -> str:
        return self.baseline or self.variants[0].name


def parse_variant(spec: str) -> Variant:
    """``NAME=PATH`` or ``PATH`` (named after its folder)."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        path, name = spec, Path(spec.rstrip("/")).name
    return Variant(name, path)


def validate(plan: Plan) -> None:
    from trainer.data import find_shards

    names = [v.name for v in plan.variants]
    if len(names) < 2:
        raise CompareError("compare needs at least two variants (NAME=EXPORT ...)")
    if len(set(names)) != len(names):
        raise CompareError(f"variant names repeat ({', '.join(names)}); name them: NAME=EXPORT")
    if plan.base not in names:
        raise CompareError(f"--baseline {plan.base} is not one of the variants ({', '.join(names)})")
    if plan.seeds < 2:
        raise CompareError("--seeds must be at least 2: a confidence interval needs repeated runs")
    if plan.recipe and not Path(plan.recipe).is_file():
        raise CompareError(f"--recipe {plan.recipe}: no such file")
    for v in plan.variants:
        try:
            find_shards(v.path)
        except (OSError, ValueError) as e:
            raise CompareError(f"variant {v.name}: {e}") from None
    if not held_out_shards(plan.held_out):
        raise CompareError(f"--held-out {plan.held_out}: no shards to evaluate on")
    for z in plan.zeroshot:
        if not Path(z).exists():
            raise CompareError(f"--zeroshot {z}: no such folder")


def held_out_shards(path: str) -> list[tuple[str, str | None]]:
    from trainer.data import find_shards

    try:
        return find_shards(path, "val") or find_shards(path, None)
    except (OSError, ValueError) as e:
        raise CompareError(f"--held-out {path}: {e}") from None


# ---------------------------------------------------------------- variants from one pipeline


def _tag(key: str, value: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{key.rsplit('.', 1)[-1]}-{value}")


def pipeline_variants(pipeline: str, vary: str, out: str, run: Callable[[list[str]], int] | None = None
                      ) -> list[Variant]:
    """Run ``pipeline`` once per value of ``vary`` (``STEP.KEY=V1,V2``) and return its exports.

    The steps before STEP are shared (written once, then found complete); STEP and every later step write
    to their own folder per value (``NAME-KEY-VALUE``), so the variants differ in that one setting only.
    """
    import posixpath

    import yaml

    from curate.config import ConfigError, load_pipeline

    try:
        pipe = load_pipeline(pipeline)
    except ConfigError as e:
        raise CompareError(str(e)) from None
    target, _, values_text = vary.partition("=")
    step, _, key = target.partition(".")
    names = [s.dirname for s in pipe.stages]
    values = [v for v in values_text.split(",") if v]
    if step not in names or not key or len(values) < 2:
        raise CompareError(f"--vary {vary}: expected STEP.KEY=V1,V2 with STEP one of {names} and two values or more")
    if pipe.stages[-1].stage != "export":
        raise CompareError(f"{pipeline}: its last step must be an export (the trainer reads its tars)")
    first = names.index(step)
    run = run or _run_pipeline
    variants = []
    for value in values:
        tag = _tag(key, value)
        stages = [s.model_dump() for s in pipe.stages]
        for s in stages[first:]:
            s["name"] = f"{s['name'] or s['stage']}-{tag}"
        file = Path(out) / "pipelines" / f"{tag}.yaml"
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(yaml.safe_dump({**pipe.model_dump(), "name": f"{pipe.name}-{tag}", "stages": stages},
                                       sort_keys=False))
        rc = run(["run", str(file), "--set", f"{stages[first]['name']}.{key}={value}"])
        if rc:
            raise RuntimeError(f"the pipeline for {step}.{key}={value} failed (exit {rc}); see {file}")
        variants.append(Variant(tag, posixpath.join(pipe.output, stages[-1]["name"])))
    return variants


def _run_pipeline(argv: list[str]) -> int:
    from curate.cli import main

    return main(argv)


# ---------------------------------------------------------------- held-out leakage


def _image_hashes(shards: Sequence[tuple[str, str | None]]) -> set[str]:
    """sha256 of every image of the shards: from the export's Parquet when it has the column, else the tars."""
    import pyarrow.parquet as pq

    from curate import schema

    out: set[str] = set()
    for tar, _ in shards:
        # beside the tar with its stem, or under the shard number alone (export's train-00000.tar)
        stem = Path(tar).stem
        parquet = next((p for p in (Path(tar).with_name(f"{s}.parquet") for s in (stem, stem.rsplit("-", 1)[-1]))
                        if p.is_file()), Path(tar).with_suffix(".parquet"))
        if parquet.is_file() and schema.SHA256 in pq.ParquetFile(parquet).schema_arrow.names:
            out.update(h for h in pq.read_table(parquet, columns=[schema.SHA256]).column(0).to_pylist() if h)
            continue
        with tarfile.open(tar) as tf:
            for info in tf:
                if info.isreg() and info.name.rsplit(".", 1)[-1].lower() in ("jpg", "jpeg", "png", "webp"):
                    out.add(hashlib.sha256(tf.extractfile(info).read()).hexdigest())
    return out


def check_leakage(plan: Plan) -> dict[str, int]:
    """Held-out images found in each variant's training split; raises when any variant trains on one."""
    from trainer.data import find_shards

    held = _image_hashes(held_out_shards(plan.held_out))
    found = {v.name: len(held & _image_hashes(find_shards(v.path))) for v in plan.variants}
    leaks = {k: n for k, n in found.items() if n}
    if leaks:
        raise CompareError("the held-out set is not held out: " + ", ".join(
            f"{k} trains on {n} of its {len(held)} images" for k, n in leaks.items())
            + "; give a --held-out that no variant was made from")
    return found


# ---------------------------------------------------------------- the runs


def run_dir(plan: Plan, variant: Variant, seed: int) -> Path:
    return Path(plan.out) / "runs" / variant.name / f"seed{seed}"


def _zeroshot_set(plan: Plan) -> list[str]:
    if not plan.zeroshot:
        return []
    entries = []
    for z in plan.zeroshot:
        fields = [f"path: {json.dumps(str(Path(z).resolve()))}"]
        fields += [f"{k}: {json.dumps(v)}" for k, v in (("classnames", plan.classnames),
                                                         ("templates", plan.templates)) if v]
        entries.append("{" + ", ".join(fields) + "}")
    return [f"eval.zeroshot=[{', '.join(entries)}]"]


def train_command(plan: Plan, variant: Variant, seed: int) -> list[str]:
    launcher = [sys.executable, "-m", "trainer.train"]
    if plan.nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={plan.nproc}",
                    "-m", "trainer.train"]
    cmd = [*launcher, "--data", variant.path, "--val-data", plan.held_out, "--output", str(run_dir(plan, variant, seed))]
    if plan.recipe:
        cmd += ["--recipe", plan.recipe]
    return [*cmd, "--set", *plan.sets, *_zeroshot_set(plan), f"train.seed={seed}"]


def final_eval(run: Path) -> dict | None:
    """The eval row a finished run wrote at its last step (None while it is unfinished)."""
    recipe, metrics = run / "recipe.json", run / "metrics.jsonl"
    if not recipe.is_file() or not metrics.is_file():
        return None
    steps = json.loads(recipe.read_text())["train"]["steps"]
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    done = [r for r in rows if r["step"] == steps and any(k.startswith("eval/") for k in r)]
    return done[-1] if done else None


def run_all(plan: Plan, launch: Callable[[list[str], Path], int] | None = None,
            progress: Callable[[str], None] = lambda s: None) -> dict[str, dict[int, dict]]:
    """Every (variant, seed) run's final eval row; seeds outer so a partial result covers all variants."""
    launch = launch or _launch
    results: dict[str, dict[int, dict]] = {v.name: {} for v in plan.variants}
    total, i = plan.seeds * len(plan.variants), 0
    for seed in range(plan.seeds):
        for v in plan.variants:
            i += 1
            run = run_dir(plan, v, seed)
            row = final_eval(run)
            if row is None:
                t = time.perf_counter()
                progress(f"run {i}/{total}: {v.name} seed {seed} ...")
                run.mkdir(parents=True, exist_ok=True)
                rc = launch(train_command(plan, v, seed), run)
                row = final_eval(run)
                if rc or row is None:
                    raise RuntimeError(f"training {v.name} seed {seed} failed (exit {rc}); see {run / 'train.log'}")
                progress(f"run {i}/{total}: {v.name} seed {seed} done in {time.perf_counter() - t:.0f} s, "
                         f"{PRIMARY} {metric_values(row)[PRIMARY]:.3f}")
            else:
                progress(f"run {i}/{total}: {v.name} seed {seed} already done")
            results[v.name][seed] = row
    return results


def _launch(cmd: list[str], run: Path) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    with open(run / "train.log", "ab") as log_file:
        return subprocess.call(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)


# ---------------------------------------------------------------- statistics


def metric_values(row: dict) -> dict[str, float]:
    """The numbers compared: the six recalls, their mean (the primary), mean ranks, zero-shot accuracies."""
    out = {PRIMARY: sum(row[k] for k in RECALLS) / len(RECALLS)} if all(k in row for k in RECALLS) else {}
    for k, v in row.items():
        if k.startswith("eval/") and not k.endswith("/n") and k != "eval/n" and "median" not in k:
            out[k[len("eval/"):]] = float(v)
    return out


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _natural(text: str) -> list:
    """R@5 before R@10."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def summarize(plan: Plan, results: dict[str, dict[int, dict]]) -> dict:
    """Per metric: each variant's mean and interval, and its per-seed paired difference to the baseline."""
    values = {name: {seed: metric_values(row) for seed, row in runs.items()} for name, runs in results.items()}
    base = values[plan.base]
    metrics = sorted({m for runs in values.values() for row in runs.values() for m in row},
                     key=lambda m: (m != PRIMARY, m.startswith("zeroshot"), _natural(m)))
    table = []
    for m in metrics:
        entry = {"metric": m, "variants": {}}
        for name, runs in values.items():
            seeds = sorted(s for s in runs if m in runs[s])
            own = [runs[s][m] for s in seeds]
            mean, lo, hi = t_interval(own)
            item = {"mean": mean, "ci": [lo, hi], "per_seed": own}
            if name != plan.base:
                diffs = [runs[s][m] - base[s][m] for s in seeds if s in base and m in base[s]]
                d, dlo, dhi = t_interval(diffs)
                item["delta"] = {"mean": d, "ci": [dlo, dhi], "per_seed": diffs,
                                 "excludes_zero": bool(dlo > 0 or dhi < 0)}
            entry["variants"][name] = item
        table.append(entry)
    return {"baseline": plan.base, "seeds": plan.seeds, "primary": PRIMARY,
            "variants": {v.name: v.path for v in plan.variants}, "held_out": plan.held_out,
            "budget": {"recipe": plan.recipe, "sets": list(plan.sets)}, "table": table}


# ---------------------------------------------------------------- report


def text_table(summary: dict) -> str:
    base = summary["baseline"]
    lines = [f"{'metric':<28} {'variant':<16} {'mean':>8} {'95% CI':>19} {'delta vs ' + base:>16} {'95% CI':>19}"]
    for entry in summary["table"]:
        for name, item in entry["variants"].items():
            ci = f"[{item['ci'][0]:.3f}, {item['ci'][1]:.3f}]"
            d = item.get("delta")
            dtext = f"{d['mean']:+.3f}" if d else "(baseline)"
            dci = f"[{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}]" + ("*" if d["excludes_zero"] else " ") if d else ""
            lines.append(f"{entry['metric']:<28} {name:<16} {item['mean']:>8.3f} {ci:>19} {dtext:>16} {dci:>20}")
    return "\n".join(lines)


def plot_png(summary: dict) -> bytes:
    """The baseline-relative difference of each metric per variant, with its interval and per-seed points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [n for n in summary["variants"] if n != summary["baseline"]]
    metrics = [e for e in summary["table"] if not e["metric"].endswith("mean_rank")]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(metrics) * len(others) + 1.4))
    y = 0
    labels = []
    for entry in metrics:
        for name in others:
            d = entry["variants"][name]["delta"]
            ax.errorbar(d["mean"], y, xerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]], fmt="o",
                        color="C0" if d["excludes_zero"] else "C7", capsize=3)
            ax.scatter(d["per_seed"], [y] * len(d["per_seed"]), s=10, color="C1", zorder=3)
            labels.append(f"{entry['metric']} ({name})")
            y += 1
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"difference to {summary['baseline']} (mean, 95% CI over {summary['seeds']} seeds; dots: seeds)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def write_html(summary: dict, path: Path) -> None:
    base = summary["baseline"]
    rows = []
    for entry in summary["table"]:
        for name, item in entry["variants"].items():
            d = item.get("delta")
            delta = (f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d else "baseline")
            style = ' style="font-weight:bold"' if d and d["excludes_zero"] else ""
            seeds = ", ".join(f"{v:.3f}" for v in item["per_seed"])
            rows.append(f"<tr><td>{html.escape(entry['metric'])}</td><td>{html.escape(name)}</td>"
                        f"<td>{item['mean']:.4f} [{item['ci'][0]:.4f}, {item['ci'][1]:.4f}]</td>"
                        f"<td{style}>{delta}</td><td>{seeds}</td></tr>")
    png = base64.b64encode(plot_png(summary)).decode()
    variants = "".join(f"<li>{html.escape(n)}: {html.escape(p)}</li>" for n, p in summary["variants"].items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>curate compare</title>
<style>body{{font-family:sans-serif;margin:2em}} td,th{{padding:2px 10px;text-align:left}}
tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>curate compare</h1>
<p>Same model and budget on each variant ({html.escape(json.dumps(summary['budget']))}), {summary['seeds']} seeds,
evaluated on the held-out set {html.escape(summary['held_out'])}. Differences are paired by seed against
<b>{html.escape(base)}</b>; intervals are 95% Student-t over seeds; bold: the interval excludes zero.
<b>{PRIMARY}</b> is the mean of image-to-text and text-to-image recall@1/5/10.</p>
<ul>{variants}</ul>
<img alt="differences" src="data:image/png;base64,{png}">
<table><tr><th>metric</th><th>variant</th><th>mean [95% CI]</th><th>difference to {html.escape(base)} [95% CI]</th>
<th>per seed</th></tr>{''.join(rows)}</table></body></html>
"""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)


def _plan_record(plan: Plan) -> dict:
    d = dataclasses.asdict(plan)
    d.pop("out")
    return json.loads(json.dumps(d))  # as it reads back from plan.json (tuples become lists)


def compare(plan: Plan, launch=None, progress: Callable[[str], None] = lambda s: None) -> dict:
    """Validate, check the held-out set, train every run (or reuse finished ones), write the report."""
    if plan.pipeline or plan.vary:
        if not (plan.pipeline and plan.vary) or plan.variants:
            raise CompareError("give --pipeline with --vary STEP.KEY=V1,V2, or exports as variants, not both")
        held_out_shards(plan.held_out)
        plan = dataclasses.replace(plan, variants=tuple(pipeline_variants(plan.pipeline, plan.vary, plan.out)))
    validate(plan)
    out = Path(plan.out)
    record = out / PLAN_FILE
    if record.is_file() and json.loads(record.read_text()) != _plan_record(plan):
        raise CompareError(f"{out} holds a comparison with other variants or settings; use another --out")
    if out.exists() and not record.is_file() and any(out.iterdir()):
        raise CompareError(f"{out} exists and is not a curate compare folder; use another --out")
    check_leakage(plan)
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(_plan_record(plan), indent=1))
    summary = summarize(plan, run_all(plan, launch, progress))
    tmp = out / "compare.json.tmp"
    tmp.write_text(json.dumps(summary, indent=1))
    os.replace(tmp, out / "compare.json")
    write_html(summary, out / "compare.html")
    return summary
