"""The ``curate`` command: one sub-command per stage, plus run, inspect, verify, report, remove, submit.

Heavy modules (pyarrow, ray, torch) are imported inside commands so ``curate --help`` is instant.
Usage errors are one line on stderr and exit code 2, before any work starts.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import click

from curate import stages

EXIT_USAGE = 2
EXIT_FAILED = 1


class UsageError(click.ClickException):
    exit_code = EXIT_USAGE

    def show(self, file=None) -> None:
        click.echo(f"curate: error: {self.message}", err=True)


def _fail_usage(message: str):
    raise UsageError(message)


def _progress_bar(label: str):
    """A callback for run_stage that draws a shard progress bar on stderr when it is a terminal."""
    if not sys.stderr.isatty():
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn("shards"),
                    TimeElapsedColumn(), transient=True)
    task = prog.add_task(label, total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    return prog, update


def print_summary(summaries: Sequence[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="curate summary")
    for col in ("stage", "rows in", "kept", "dropped", "drops by reason", "seconds", "output"):
        table.add_column(col, overflow="fold")
    for s in summaries:
        drops = ", ".join(f"{k} {v}" for k, v in s.get("drops", {}).items()) or "-"
        secs = "skipped (complete)" if s.get("skipped") else f"{s.get('seconds', 0):.1f}"
        table.add_row(s["stage"], str(s["rows_in"]), str(s["kept"]), str(s["dropped"]), drops, secs,
                      s["output"])
    Console(stderr=False, width=160).print(table)


def _run_one(stage: str, input: str | None, output: str, config_file: str | None, sets: Sequence[str],
             overwrite: bool, retry_failed: bool, config: dict | None = None) -> dict[str, Any]:
    from curate.config import ConfigError
    from curate.runner import StageFailed, run_stage
    from curate.stage import RunOptions

    prog, update = _progress_bar(stage)
    try:
        if prog:
            prog.start()
        summary = run_stage(stage, input, output, config=config, sets=sets, config_file=config_file,
                            options=RunOptions(overwrite=overwrite, retry_failed=retry_failed),
                            progress=update)
    except ConfigError as e:
        _fail_usage(str(e))
    except StageFailed as e:
        raise click.ClickException(str(e)) from None
    finally:
        if prog:
            prog.stop()
    if not summary.get("skipped"):
        from curate.dataset import Dataset

        summary["seconds"] = Dataset(output).manifest()["seconds"]
    return summary


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.version_option(package_name="curate")
def cli(verbose: int) -> None:
    """curate: turn raw image-text pairs into clean, deduplicated training shards."""
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _stage_command(name: str) -> click.Command:
    @click.command(name=name, help=f"Run the {name} stage over every shard of --input.")
    @click.option("--input", "input_", metavar="IN", help="Input dataset (or raw input for download/import).")
    @click.option("--output", required=True, metavar="OUT", help="Output dataset directory (any fsspec URL).")
    @click.option("--config", "config_file", metavar="FILE", help="YAML file with the stage's config.")
    @click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override one config key.")
    @click.option("--overwrite", is_flag=True, help="Replace an output made with another config or input.")
    @click.option("--retry-failed", is_flag=True, help="Re-fetch failed rows of a finished run (download).")
    @click.option("--explain", metavar="UID", help="Show why OUT kept or dropped this uid, then exit.")
    def command(input_, output, config_file, sets, overwrite, retry_failed, explain):
        if explain:
            _print_json(_explain(output, explain))
            return
        summary = _run_one(name, input_, output, config_file, sets, overwrite, retry_failed)
        print_summary([summary])

    return command


for _name in stages.names():
    cli.add_command(_stage_command(_name))


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
    if address and address.startswith("http"):
        from curate import jobs

        try:
            summaries = jobs.run_pipeline(pipe, steps, address, overwrite=overwrite)
        except ConfigError as e:
            _fail_usage(str(e))
        except jobs.JobFailed as e:
            raise click.ClickException(str(e)) from None
    else:
        _validate_steps(steps)
        summaries = []
        for stage, inp, out, config, step_sets in steps:
            summaries.append(_run_one(stage, inp, out, None, step_sets, overwrite, False, config=config))
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
    """Every step's stage and config are checked before the first one runs."""
    from curate.config import ConfigError, stage_and_config

    for stage, _inp, _out, config, step_sets in steps:
        try:
            stage_and_config(stage, None, config, step_sets)
        except ConfigError as e:
            _fail_usage(str(e))


def _explain(output: str, uid: str) -> dict[str, Any]:
    from curate.dataset import Dataset
    from curate.inspect import explain

    ds = Dataset(output)
    if not ds.fs.exists(ds.root):
        _fail_usage(f"dataset {output} does not exist")
    return explain(ds, uid)


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=1, default=str))


@cli.command("inspect")
@click.argument("dataset")
@click.option("--uid", help="Show this sample: its row, where it went and why.")
@click.option("--rows", default=5, show_default=True, help="How many rows to show.")
def inspect_cmd(dataset: str, uid: str | None, rows: int) -> None:
    """Counts, schema and a few rows of a dataset."""
    from curate.dataset import Dataset
    from curate.inspect import describe

    ds = Dataset(dataset)
    if not ds.fs.exists(ds.root):
        _fail_usage(f"dataset {dataset} does not exist")
    if uid:
        _print_json(_explain(dataset, uid))
        return
    click.echo(describe(ds, rows))


@cli.command("verify")
@click.argument("dataset")
def verify_cmd(dataset: str) -> None:
    """Check every committed shard: Parquet and tar agree, pointers land on the right member, sha256."""
    from curate.dataset import Dataset
    from curate.verify import verify

    ds = Dataset(dataset)
    if not ds.fs.exists(ds.root):
        _fail_usage(f"dataset {dataset} does not exist")
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
    from curate.dataset import Dataset
    from curate.report import build_report, write_html

    ds = Dataset(dataset)
    if not ds.is_complete():
        _fail_usage(f"dataset {dataset} is not a complete curate dataset (no _manifest.json)")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code instead of exiting (tests call it directly)."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="curate", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"curate: error: {e.format_message()}", err=True)
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
