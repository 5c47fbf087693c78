"""The ``curate`` command: one sub-command per stage, plus run, config, inspect, verify, report, remove, submit.

Heavy modules (pyarrow, ray, torch) are imported inside commands so ``curate --help`` is instant.
Usage errors are one line on stderr and exit code 2, before any work starts. Progress goes to
stderr: a live display on a terminal, a plain line every few seconds otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from curate import stages
from curate.progress import ProgressView

# The summary's wall time counts from here: imports and Ray's start-up are part of what a user waits.
# A later main() in the same process (tests, the demo) counts from its own start.
_STARTED = time.time()
_MAIN_CALLS = 0

EXIT_USAGE = 2
EXIT_FAILED = 1

# One line per stage for `curate --help`, so listing the commands imports no stage module.
STAGE_HELP = {
    "import": "Adopt existing WebDataset / img2dataset tars in place (no re-download).",
    "download": "Fetch the images of a URL list into tars + Parquet.",
    "filter": "Cheap row rules: size, aspect ratio, caption length, language, blocklists.",
    "dedup": "Exact, perceptual (pHash) and caption duplicates, global across shards.",
    "clip": "CLIP image-caption scores and embeddings; threshold or global top fraction.",
    "semdedup": "Semantic duplicates from CLIP embeddings (k-means + cosine).",
    "recaption": "A vision-language model writes a new caption per image.",
    "export": "Reshard kept samples into training tars + Parquet + .idx + sizes.json.",
    "safety": "Known-bad image hashes, NSFW/watermark/aesthetic heads on CLIP embeddings, caption rules.",
    "decontaminate": "Drop copies of evaluation-set images (ImageNet, COCO, ...) from the corpus.",
}
# Only download has failed rows worth fetching again.
RETRY_FAILED_STAGES = frozenset({"download"})
# Libraries whose INFO/WARNING chatter is hidden unless -v (their errors still show).
NOISY_LOGGERS = ("ray", "faiss", "transformers", "torch", "urllib3", "filelock", "fsspec", "PIL",
                 "matplotlib", "huggingface_hub", "open_clip", "numexpr", "asyncio", "botocore", "s3fs")


class UsageError(click.ClickException):
    exit_code = EXIT_USAGE

    def show(self, file=None) -> None:
        click.echo(f"curate: error: {self.message}", err=True)


def _fail_usage(message: str):
    from curate.redact import redact_text

    raise UsageError(redact_text(message))


# -- logging ------------------------------------------------------------------------------------
class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time, so a live progress display that redirects
    stderr prints log lines above itself instead of through it."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


def setup_logging(verbose: int) -> None:
    """curate's own events at INFO with -v (DEBUG with -vv); other libraries' chatter, Ray's worker
    output, transformers' and tqdm's bars stay hidden unless -v."""
    os.environ["CURATE_VERBOSE"] = str(verbose)
    if not verbose:
        for var, value in (("TQDM_DISABLE", "1"), ("TRANSFORMERS_VERBOSITY", "error"),
                           ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
            os.environ.setdefault(var, value)
    root = logging.getLogger()
    for h in list(root.handlers):
        # ours from an earlier call, or a plain one from logging.basicConfig (which would print every
        # line twice); test harnesses' capture handlers stay
        if isinstance(h, _StderrHandler) or type(h) is logging.StreamHandler:
            root.removeHandler(h)
    from curate.redact import RedactingFilter

    handler = _StderrHandler()
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.WARNING if verbose < 2 else logging.DEBUG)
    logging.getLogger("curate").setLevel(logging.WARNING if not verbose else
                                         logging.INFO if verbose == 1 else logging.DEBUG)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR if not verbose else
                                         logging.WARNING if verbose == 1 else logging.DEBUG)


# -- summary ------------------------------------------------------------------------------------
def print_summary(summaries: Sequence[dict[str, Any]]) -> None:
    """The end-of-run table on stdout, as wide as the terminal (80 columns when not on one); where
    each stage wrote goes below it, so long paths do not squeeze the numbers."""
    import posixpath

    from rich.console import Console
    from rich.table import Table

    table = Table(title="curate summary", expand=False)
    for col, kw in (("stage", {}), ("rows in", {"justify": "right"}), ("kept", {"justify": "right"}),
                    ("dropped", {"justify": "right"}), ("drops by reason", {}),
                    ("wall s", {"justify": "right", "no_wrap": True})):
        table.add_column(col, overflow="fold", **kw)
    for s in summaries:
        # a reason of the row's own stage without its "stage:" prefix, one per line: fits 80 columns
        drops = "\n".join(f"{k.split(':', 1)[1] if k.startswith(_short_stage(s['stage']) + ':') else k} {v:,}"
                          for k, v in s.get("drops", {}).items()) or "-"
        secs = "skipped (complete)" if s.get("skipped") else f"{s.get('wall_seconds', s.get('seconds', 0)):.1f}"
        table.add_row(s["stage"], f"{s['rows_in']:,}", f"{s['kept']:,}", f"{s['dropped']:,}", drops, secs)
    console = Console(stderr=False)
    console.print(table)
    outs = [_shown_path(s["output"]) for s in summaries]
    parents = {posixpath.dirname(o.rstrip("/")) for o in outs}
    if len(outs) > 1 and len(parents) == 1:
        console.print(f"written to {parents.pop()}/: {', '.join(posixpath.basename(o.rstrip('/')) for o in outs)}",
                      highlight=False, soft_wrap=True)
    else:
        for s, o in zip(summaries, outs, strict=True):
            console.print(f"{s['stage']} wrote {o}", highlight=False, soft_wrap=True)
    console.print(f"wall time {time.time() - _STARTED:.1f} s since the command started "
                  "(start-up and Ray's included)", highlight=False)


def _short_stage(stage: str) -> str:
    """The prefix a stage's drop reasons carry ("download", or "passthrough" for module:Class stages)."""
    return stage.rsplit(":", 1)[-1].lower() if ":" in stage else stage


def _shown_path(url: str) -> str:
    """A local output below the working directory as a relative path (shorter in the table)."""
    if "://" in url and not url.startswith("file://"):
        return url
    path = url[len("file://"):] if url.startswith("file://") else url
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _run_one(stage: str, input: str | None, output: str, config_file: str | None, sets: Sequence[str],
             overwrite: bool, retry_failed: bool, config: dict | None = None,
             view: ProgressView | None = None) -> dict[str, Any]:
    from curate.config import ConfigError
    from curate.inputs import InputError
    from curate.runner import StageFailed, run_stage
    from curate.stage import RunOptions

    own = view is None
    view = view or ProgressView(stage, 1)
    t0 = time.time() if not own else _STARTED
    try:
        if own:
            view.__enter__()
        view.stage_started(stage)
        summary = run_stage(stage, input, output, config=config, sets=sets, config_file=config_file,
                            options=RunOptions(overwrite=overwrite, retry_failed=retry_failed),
                            progress=view.update)
        summary["wall_seconds"] = time.time() - t0
        view.stage_done(summary, summary["wall_seconds"])
    except (ConfigError, InputError) as e:
        _fail_usage(str(e))
    except StageFailed as e:
        raise click.ClickException(str(e)) from None
    finally:
        if own:
            view.__exit__(*sys.exc_info())
    if not summary.get("skipped"):
        from curate.dataset import Dataset

        summary["seconds"] = Dataset(output).manifest()["seconds"]
    return summary


class _Cli(click.Group):
    """Stage commands are built when asked for (they import their stage to list its keys); the
    command list shows them from STAGE_HELP so ``curate --help`` imports none."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*stages.names(), *sorted(self.commands)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in stages.REGISTRY:
            return _stage_command(name)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Stages (curate STAGE --help, curate config STAGE)"):
            formatter.write_dl([(n, STAGE_HELP.get(n, "")) for n in stages.names()])
        rows = [(n, c.get_short_help_str(80)) for n, c in sorted(self.commands.items()) if not c.hidden]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True,
              help="Show curate's own events (-v) and other libraries' logs and worker output (-vv).")
@click.version_option(package_name="curate")
def cli(verbose: int) -> None:
    """curate: turn raw image-text pairs into clean, deduplicated training shards."""
    setup_logging(verbose)


def _keys_table(name: str, cls: type | None) -> str:
    """The stage's keys as plain text lines (for --help; ``curate config`` prints a table)."""
    if cls is None:
        return ""
    from curate.config import config_keys

    lines = [f"Keys (--set KEY=VALUE, or a YAML file with --config FILE; table: curate config {name}):"]
    for key, typ, default, meaning in _ordered_keys(config_keys(cls.Config)):
        if typ == "section":
            continue
        lines.append(f"  {key} ({typ}, default {default}): {_one_line(meaning)}")
    return "\b\n" + "\n".join(lines)


def _ordered_keys(rows):
    """The stage's own keys first, then resources (the same for every stage)."""
    return [r for r in rows if not r[0].startswith("resources")] + [r for r in rows if r[0].startswith("resources")]


def _one_line(text: str, width: int = 90) -> str:
    import re

    text = " ".join(text.split())
    first = re.split(r"(?<=[a-z0-9)\]'\"])\. (?=[A-Z])", text)[0].rstrip(".")
    return first if len(first) <= width else first[: width - 1] + "…"


_INPUT_HELP = {
    "download": "URL list: parquet, csv, tsv, json, jsonl or txt (gzipped too); a file, several, or a folder.",
    "import": "WebDataset / img2dataset tars: a .tar file or a folder of them (adopted in place).",
}


def _stage_command(name: str) -> click.Command:
    from curate.stage import Stage

    try:
        cls = stages.get(name)
    except (stages.UnknownStage, ImportError):
        cls = None  # running it reports why, as one line
    can_explain = cls is not None and cls.explain is not Stage.explain
    params = [
        click.Option(["--input", "input_"], metavar="IN", help=_INPUT_HELP.get(
            name, "A curate dataset: the output folder of an earlier stage.")),
        click.Option(["--output"], required=True, metavar="OUT", help="Output dataset directory (any fsspec URL)."),
        click.Option(["--config", "config_file"], metavar="FILE", help="YAML file with the stage's config."),
        click.Option(["--set", "sets"], multiple=True, metavar="KEY=VALUE",
                     help=f"Override one config key (list them: curate config {name})."),
        click.Option(["--overwrite"], is_flag=True, help="Replace an output made with another config or input."),
    ]
    if name in RETRY_FAILED_STAGES:
        params.append(click.Option(["--retry-failed"], is_flag=True,
                                   help="Fetch again the rows that failed transiently in a finished run."))
    if can_explain:
        params.append(click.Option(["--explain"], metavar="UID", help="Show why OUT kept or dropped this uid, then exit."))

    def callback(input_, output, config_file, sets, overwrite, retry_failed=False, explain=None):
        if explain:
            _print_json(_explain(output, explain))
            return
        summary = _run_one(name, input_, output, config_file, sets, overwrite, retry_failed)
        print_summary([summary])

    return click.Command(name, params=params, callback=callback,
                         help=STAGE_HELP.get(name, f"Run the {name} stage over every shard of --input."),
                         epilog=_keys_table(name, cls), short_help=STAGE_HELP.get(name))


@cli.command("config")
@click.argument("stage")
def config_cmd(stage: str) -> None:
    """List a stage's config keys: type, default and meaning."""
    from curate.config import ConfigError, config_keys, stage_and_config

    try:
        cls, _ = stage_and_config(stage)
    except ConfigError as e:
        _fail_usage(str(e))
    rows = [(k, t if len(t) <= 32 else t[:31] + "…", d if len(d) <= 24 else d[:23] + "…", _one_line(m))
            for k, t, d, m in _ordered_keys(config_keys(cls.Config)) if t != "section"]
    head = ("key", "type", "default", "meaning")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(3)]
    click.echo(f"curate {stage}: {STAGE_HELP.get(stage, '')}")
    click.echo("set keys with --set KEY=VALUE (nested: --set image.image_size=256) or a YAML file with --config FILE")
    click.echo("")
    for r in [head, *rows]:
        click.echo("  ".join(r[i].ljust(widths[i]) for i in range(3)) + "  " + r[3])


@cli.command("run")
@click.argument("pipeline", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="STEP.KEY=VALUE",
              help="Override a step's config key, e.g. filter.min_side=128.")
@click.option("--overwrite", is_flag=True, help="Redo steps whose output was made with another config.")
@click.option("--address", envvar="RAY_ADDRESS", metavar="http://HEAD:8265",
              help="Submit each stage as a Ray job to this cluster instead of running embedded.")
def run_cmd(pipeline: str, sets: tuple[str, ...], overwrite: bool, address: str | None) -> None:
    """Run a pipeline YAML: each stage reads the previous stage's output."""
    from curate.config import ConfigError, load_pipeline

    try:
        pipe = load_pipeline(pipeline)
        steps = _pipeline_steps(pipe, sets)
    except ConfigError as e:
        _fail_usage(str(e))
    _validate_steps(steps)
    if address and address.startswith("http"):
        from curate import jobs

        try:
            summaries = jobs.run_pipeline(pipe, steps, address, overwrite=overwrite)
        except ConfigError as e:
            _fail_usage(str(e))
        except jobs.JobFailed as e:
            raise click.ClickException(str(e)) from None
    else:
        summaries = []
        with ProgressView(pipe.name, len(steps)) as view:
            for stage, inp, out, config, step_sets in steps:
                summaries.append(_run_one(stage, inp, out, None, step_sets, overwrite, False, config=config,
                                          view=view))
    print_summary(summaries)
    last = steps[-1][2]
    click.echo(f"output: {last}")


def _pipeline_steps(pipe, sets: Sequence[str]):
    """(stage, input, output, inline config, sets) per step, inputs chained."""
    import posixpath

    from curate.config import ConfigError

    by_step: dict[str, list[str]] = {}
    names = {s.dirname for s in pipe.stages}
    for item in sets:
        step, _, rest = item.partition(".")
        if step not in names or not rest:
            raise ConfigError(f"--set {item}: expected STEP.KEY=VALUE with STEP one of {sorted(names)}")
        by_step.setdefault(step, []).append(rest)
    steps = []
    prev = pipe.input
    for s in pipe.stages:
        out = posixpath.join(pipe.output, s.dirname)
        inp = s.input or prev
        steps.append((s.stage, inp, out, dict(s.config), by_step.get(s.dirname, [])))
        prev = out
    return steps


def _validate_steps(steps) -> None:
    """Every step's stage and config, and the columns each step needs from the steps before it, are
    checked before the first one runs."""
    import posixpath

    from curate.config import ConfigError, check_columns, stage_and_config

    try:
        checked = []
        for stage, inp, out, config, step_sets in steps:
            cls, cfg = stage_and_config(stage, None, config, step_sets)
            checked.append((posixpath.basename(out), stage, inp, out, cls, cfg))
        check_columns(checked)
    except ConfigError as e:
        _fail_usage(str(e))


def _explain(output: str, uid: str) -> dict[str, Any]:
    from curate.inspect import trace

    return trace(_dataset_or_fail(output, allow_unfinished=True), uid)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


def _dataset_or_fail(path: str, allow_unfinished: bool):
    """The Dataset at ``path``; one line and exit 2 when it is not one curate wrote (a URL list, a
    folder of tars, someone else's folder), with the command that makes it one."""
    from curate.dataset import Dataset
    from curate.inputs import dataset_problem

    problem = dataset_problem(path)
    if problem and not (allow_unfinished and "unfinished curate dataset" in problem):
        _fail_usage(problem)
    return Dataset(path)


@cli.command("models")
@click.argument("pipeline", type=click.Path())
@click.option("--set", "sets", multiple=True, metavar="STEP.KEY=VALUE", help="Override a step's config key.")
def models_cmd(pipeline: str, sets: tuple[str, ...]) -> None:
    """Fetch every model a pipeline loads into this machine's cache (HF_HOME), ahead of a run."""
    from curate.config import ConfigError, load_pipeline
    from curate.weights import fetch, pipeline_models

    try:
        found = pipeline_models(_pipeline_steps(load_pipeline(pipeline), sets))
        if not found:
            click.echo(f"{pipeline} loads no models")
        for step, kind, model, extra in found:
            where = fetch(kind, model, extra)
            click.echo(f"{step}: {kind} {model}{f' ({extra})' if extra else ''} -> {where}")
    except ConfigError as e:
        _fail_usage(str(e))


@cli.command("inspect")
@click.argument("dataset")
@click.option("--uid", help="Follow this sample through the lineage: where it was kept, where and why it left.")
@click.option("--url", help="The same, for the sample(s) with this URL.")
@click.option("--rows", default=5, show_default=True, help="How many rows to show.")
def inspect_cmd(dataset: str, uid: str | None, url: str | None, rows: int) -> None:
    """Counts, schema and a few rows of a dataset; or one sample's path through its lineage."""
    from curate.inspect import describe, trace, uids_for_url

    ds = _dataset_or_fail(dataset, allow_unfinished=True)
    if uid and url:
        _fail_usage("give --uid or --url, not both")
    if url:
        uids = uids_for_url(ds, url)
        if not uids:
            _fail_usage(f"no row with url {url} in {ds.url} or any dataset it was made from")
        found = [trace(ds, u) for u in uids]
        for f in found:
            click.echo(f"{f['uid']}: {f['verdict']}", err=True)
        _print_json(found[0] if len(found) == 1 else found)
        return
    if uid:
        found = trace(ds, uid)
        click.echo(f"{uid}: {found['verdict']}", err=True)
        _print_json(found)
        return
    click.echo(describe(ds, rows))


@cli.command("verify")
@click.argument("dataset")
def verify_cmd(dataset: str) -> None:
    """Check every committed shard: Parquet and tar agree, pointers land on the right member, sha256."""
    from curate.verify import verify

    ds = _dataset_or_fail(dataset, allow_unfinished=True)
    problems, checked = verify(ds)
    for p in problems:
        click.echo(f"BAD {p}")
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {ds.url} ({checked} rows checked)")
    click.echo(f"ok: {ds.url}: {checked} rows checked")


@cli.command("stage", hidden=True)
@click.argument("name")
@click.option("--input", "input_", metavar="IN")
@click.option("--output", required=True, metavar="OUT")
@click.option("--config", "config_file", metavar="FILE")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--overwrite", is_flag=True)
def stage_cmd(name, input_, output, config_file, sets, overwrite) -> None:
    """Run any stage, registered or ``module:Class`` (the entrypoint of a submitted job)."""
    print_summary([_run_one(name, input_, output, config_file, sets, overwrite, False)])


@cli.command("submit")
@click.argument("stage")
@click.option("--input", "input_", metavar="IN", help="Input dataset (or raw input for download/import).")
@click.option("--output", required=True, metavar="OUT", help="Output dataset directory (any fsspec URL).")
@click.option("--config", "config_file", metavar="FILE", help="YAML file with the stage's config.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key.")
@click.option("--overwrite", is_flag=True, help="Replace an output made with another config or input.")
@click.option("--address", envvar="RAY_ADDRESS", required=True, metavar="http://HEAD:8265",
              help="The cluster's job API (dashboard) address.")
def submit_cmd(stage, input_, output, config_file, sets, overwrite, address) -> None:
    """Run one stage as a Ray job on a cluster and follow it."""
    from curate import jobs
    from curate.config import ConfigError, read_yaml

    try:
        config = read_yaml(config_file) if config_file else {}
        summaries = jobs.run_pipeline(None, [(stage, input_, output, config, list(sets))], address,
                                      overwrite=overwrite)
    except ConfigError as e:
        _fail_usage(str(e))
    except jobs.JobFailed as e:
        raise click.ClickException(str(e)) from None
    print_summary(summaries)


@cli.command("report")
@click.argument("dataset")
@click.option("--out", "out_file", metavar="FILE", help="HTML file to write (default: DATASET_report.html).")
@click.option("--json", "json_file", metavar="FILE", help="Also write the report's numbers as JSON.")
def report_cmd(dataset: str, out_file: str | None, json_file: str | None) -> None:
    """One self-contained HTML page: funnel over the lineage, histograms, sample grids, throughput."""
    from curate.report import build_report, write_html

    ds = _dataset_or_fail(dataset, allow_unfinished=False)
    report = build_report(ds)
    local = "://" not in ds.url
    html_path = out_file or (ds.root.rstrip("/") + "_report.html" if local
                             else ds.root.rstrip("/").rsplit("/", 1)[-1] + "_report.html")
    write_html(report, html_path)
    if json_file:
        with open(json_file, "w") as f:
            json.dump(report.data, f, indent=1, default=str)
    click.echo(f"report: {html_path}" + (f"  json: {json_file}" if json_file else ""))


@cli.command("remove")
@click.argument("datasets", nargs=-1, required=True)
@click.option("--uids", "uids_file", metavar="FILE", help="One uid per line.")
@click.option("--urls", "urls_file", metavar="FILE", help="One URL per line.")
@click.option("--domains", "domains_file", metavar="FILE", help="One domain per line (subdomains too).")
@click.option("--sha256", "sha_file", metavar="FILE", help="One image sha256 per line.")
@click.option("--reason", default="removal request", show_default=True, help="Recorded in each manifest.")
@click.option("--by", "by", default=None, help="Who asked (recorded); default: $USER.")
def remove_cmd(datasets, uids_file, urls_file, domains_file, sha_file, reason, by) -> None:
    """Remove samples from every dataset given: tars, Parquet, rejects, plans, indexes, manifests."""
    from curate.removal import RemovalError, Request, remove

    given = [f for f in (uids_file, urls_file, domains_file, sha_file) if f]
    if len(given) != 1:
        _fail_usage("give exactly one of --uids, --urls, --domains, --sha256")
    try:
        request = Request.from_files(uids=uids_file, urls=urls_file, domains=domains_file, sha256=sha_file,
                                     reason=reason, by=by)
        results = remove(list(datasets), request)
    except RemovalError as e:
        _fail_usage(str(e))
    for r in results:
        click.echo(f"{r['dataset']}: removed {r['removed']} row(s)"
                   + (f", {r['tar_rewritten']} tar(s) rewritten" if r.get("tar_rewritten") else "")
                   + (f", {r['pointers_moved']} pointer(s) moved" if r.get("pointers_moved") else "")
                   + (f"; NOTE {r['note']}" if r.get("note") else ""))


@cli.command("compare")
@click.argument("variants", nargs=-1, metavar="NAME=EXPORT...")
@click.option("--held-out", "held_out", required=True, metavar="DATASET",
              help="Image-text pairs no variant trains on (an export's val split, or a whole dataset).")
@click.option("--out", "out_dir", required=True, metavar="DIR", help="Runs, compare.json and compare.html go here.")
@click.option("--recipe", metavar="FILE", help="Trainer recipe (trainer/recipes/*.yaml); the same for every run.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Recipe override for every run.")
@click.option("--seeds", default=3, show_default=True, help="Runs per variant (seeds 0..N-1).")
@click.option("--baseline", metavar="NAME", help="Variant the others are compared with (default: the first).")
@click.option("--zeroshot", multiple=True, metavar="DIR", help="Zero-shot classification set (repeatable).")
@click.option("--classnames", metavar="FILE", help="Class names for --zeroshot (one per line, or 'imagenet').")
@click.option("--templates", metavar="FILE", help="Prompt templates for --zeroshot (or 'openai' / 'simple').")
@click.option("--nproc", default=1, show_default=True, help="Processes per run (torchrun; one per GPU).")
@click.option("--pipeline", metavar="FILE", help="Make the variants by running this pipeline (ending in export)...")
@click.option("--vary", metavar="STEP.KEY=V1,V2", help="... once per value of one step's setting.")
def compare_cmd(variants, held_out, out_dir, recipe, sets, seeds, baseline, zeroshot, classnames, templates,
                nproc, pipeline, vary) -> None:
    """Train the same model on each curated variant over several seeds; differences with confidence intervals."""
    from curate.compare import CompareError, Plan, compare, parse_variant, text_table

    plan = Plan(variants=tuple(parse_variant(v) for v in variants), held_out=held_out, out=out_dir, recipe=recipe,
                sets=tuple(sets), seeds=seeds, baseline=baseline, zeroshot=tuple(zeroshot), classnames=classnames,
                templates=templates, nproc=nproc, pipeline=pipeline, vary=vary)
    try:
        summary = compare(plan, progress=lambda line: click.echo(line, err=True))
    except CompareError as e:
        _fail_usage(str(e))
    except RuntimeError as e:
        raise click.ClickException(str(e)) from None
    click.echo(text_table(summary))
    click.echo(f"report: {out_dir}/compare.html  json: {out_dir}/compare.json")


def _option_hint(e: click.UsageError) -> str:
    """Where an option left off a stage does live: one clause appended to click's message."""
    msg = e.format_message()
    if "--retry-failed" in msg:
        return " (only `curate download` retries failed rows)"
    if "--explain" in msg:
        return " (this stage records no per-sample explanation; use `curate inspect OUT --uid UID`)"
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting (tests call it directly)."""
    global _STARTED, _MAIN_CALLS
    if _MAIN_CALLS:
        _STARTED = time.time()
    _MAIN_CALLS += 1
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="curate", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"curate: error: {e.format_message()}{_option_hint(e)}", err=True)
        return EXIT_USAGE
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
