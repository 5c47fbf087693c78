"""Running stages on a Ray cluster as Ray jobs: one job per stage, submitted and followed from here.

``curate run PIPELINE --address http://HEAD:8265`` (and ``curate submit``) call :func:`run_pipeline`.
For each step, on the client:

1. validate the stage and config and resolve the input (the previous step's output) exactly as the
   runner will, and compare with what the output already holds (:func:`curate.runner.check_output`):
   a complete output made with the same config and input is skipped without a job;
2. name the job: a deterministic prefix from the stage, its resolved config, its input and output,
   plus an attempt number (Ray refuses a submission id that was ever used, even by a failed job). A
   job of the same prefix that is still pending or running is followed instead of submitting a
   second writer to the same output;
3. submit ``curate <stage> --input .. --output .. --set key=value ...`` (the config travels in the
   entrypoint, so the job needs no file from this machine), then follow its logs and status;
4. stop at the first job that does not succeed, with its id and the tail of its log. Submitting
   again resumes: the new attempt's runner skips every shard the failed one committed.

Resources: the driver of a job reserves nothing (``entrypoint_num_cpus`` stays unset) so it never
takes a worker slot away from shards; each stage's ``resources`` (CPUs, GPUs, memory, concurrency)
are applied by the runner inside the job, to every shard task or actor it starts.

Code on the cluster: the entrypoint runs the ``curate`` installed on the cluster's nodes (the
Docker image of ``infra/``, or the same virtualenv for ``infra/local-cluster.sh``). To run code that
is not installed there, set ``CURATE_RUNTIME_ENV`` to a Ray runtime_env as JSON or a YAML/JSON file,
e.g. ``{"py_modules": ["./curate"]}`` or ``{"working_dir": ".", "pip": ["..."]}``. Credentials for
object storage come from the nodes (instance roles, mounted secrets), never from this client.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from curate import stages
from curate.config import ConfigError, fingerprint, merge, parse_sets
from curate.dataset import Dataset

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
LOG_TAIL_LINES = 40
MAX_POLL_MISSES = 30
ACTIVE = ("PENDING", "RUNNING")

Step = tuple[str, str | None, str, dict[str, Any], Sequence[str]]


class JobFailed(RuntimeError):
    """A stage's job ended in FAILED or STOPPED; the message names the job and ends with its log tail."""

    def __init__(self, message: str, job_id: str):
        super().__init__(message)
        self.job_id = job_id


def run_pipeline(pipe: Any, steps: Sequence[Step], address: str, overwrite: bool = False,
                 stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Run each step as its own Ray job on the cluster at ``address``, in order; return summaries.

    ``steps`` are (stage, input, output, inline config, --set overrides), inputs already chained.
    ``pipe`` (the parsed pipeline, or None for ``curate submit``) is only used for log lines.
    """
    stream = stream if stream is not None else sys.stderr
    # Every step's stage, config and paths are checked before the first job is submitted.
    for stage, inp, out, config, sets in steps:
        _stage_config(stage, config, sets)
        for path in (inp, out):
            _check_cluster_path(stage, path, address)
    submit_options = driver_resources()
    client = connect(address)
    summaries = []
    for step in steps:
        summaries.append(run_step(client, step, overwrite=overwrite, stream=stream, submit_options=submit_options))
    if pipe is not None:
        log.info("pipeline %s: %d step(s) done", getattr(pipe, "name", "?"), len(steps))
    return summaries


def connect(address: str):
    from curate.runner import job_client

    try:
        return job_client(address)
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cannot reach the Ray job API at {address}: {str(e).splitlines()[0]}") from None


def run_step(client, step: Step, overwrite: bool = False, stream: TextIO | None = None,
             submit_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Skip, submit or re-attach to one step's job, follow it to the end; return its summary.
    ``submit_options`` are the job's entrypoint resources (``driver_resources``)."""
    from curate.runner import check_output, prepare

    stream = stream if stream is not None else sys.stderr
    stage, inp, out, config, sets = step
    data = _stage_data(config, sets)
    out_ds = Dataset(out)
    _cls, _cfg, record = prepare(stage, inp, out_ds.url, data, check=False)
    replace = False
    try:
        state = check_output(out_ds, record)
    except ConfigError:
        if not overwrite:
            raise
        from curate.runner import refuse_foreign_overwrite

        refuse_foreign_overwrite(out_ds)
        state, replace = "replace", True
    if state == "complete":
        log.info("%s: output %s is complete with the same config and input; no job", stage, out_ds.url)
        return _summary(stage, out_ds, job_id=None, skipped=True)

    from curate.redact import secret_in

    if secret_in([inp, out_ds.url, data]):
        # anyone who can list the cluster's jobs reads an entrypoint: a secret never goes into one
        raise ConfigError(
            f"{stage}: an input, output or setting of this step holds a credential (a URL password, "
            "a signed query or a token); a cluster job would show it in its entrypoint. Give the "
            "cluster its credentials through its environment (e.g. an IAM role or AWS_* variables) "
            "and drop them from the URL")
    prefix = submission_prefix(stage, record, out_ds.url)
    jobs = _jobs_with_prefix(client, prefix)
    running = [j for j in jobs if str(j.status) in ACTIVE]
    if running:
        job_id = running[0].submission_id
        _say(stream, f"{stage}: following job {job_id}, already {running[0].status}")
    else:
        job_id = f"{prefix}-{1 + max((a for a, _ in _attempts(jobs, prefix)), default=0)}"
        entry = entrypoint(stage, inp, out_ds.url, data, overwrite=replace)
        client.submit_job(
            entrypoint=entry,
            submission_id=job_id,
            runtime_env=runtime_env(),
            metadata={"curate_stage": stage, "curate_output": out_ds.url},
            **(submit_options or {}),
        )
        _say(stream, f"{stage}: submitted job {job_id}: {entry}")
    status = follow(client, job_id, stream)
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        tail = "\n".join(client.get_job_logs(job_id).rstrip().splitlines()[-LOG_TAIL_LINES:])
        raise JobFailed(
            f"stage {stage}: job {job_id} {status}: {info.message or ''}\n"
            f"--- last lines of the log of {job_id} ---\n{tail}\n---\n"
            "Run the same command again to resume: shards that job committed are kept.",
            job_id,
        )
    out_ds.refresh()
    if not out_ds.is_complete():
        raise JobFailed(f"stage {stage}: job {job_id} succeeded but {out_ds.url} has no manifest", job_id)
    return _summary(stage, out_ds, job_id=job_id, skipped=False)


def follow(client, job_id: str, stream: TextIO) -> str:
    """Copy the job's new log lines to ``stream`` until it reaches a terminal status; return it.

    Polling ``get_job_logs`` rather than the websocket tail keeps this synchronous and lets an
    interrupted client re-attach later (the job itself keeps running on the cluster).
    """
    shown = 0
    misses = 0
    while True:
        try:
            status = str(client.get_job_status(job_id))
            text = client.get_job_logs(job_id)
            misses = 0
        except (ConnectionError, RuntimeError, OSError) as e:
            # The head's HTTP API can blip (restart, overload); the job itself goes on. Give up
            # only after a sustained outage, naming the job so the user can re-attach.
            misses += 1
            if misses > MAX_POLL_MISSES:
                raise JobFailed(f"lost contact with the job API while following {job_id}: {e}; "
                                "run the same command again to re-attach", job_id) from None
            time.sleep(POLL_SECONDS * misses)
            continue
        if len(text) > shown:
            for line in text[shown:].splitlines():
                stream.write(f"[{job_id}] {line}\n")
            stream.flush()
            shown = len(text)
        if status not in ACTIVE:
            return status
        time.sleep(POLL_SECONDS)


def submission_prefix(stage: str, record: dict[str, Any], output: str) -> str:
    """``curate-<stage>-<16 hex>``: the same stage, resolved config, input and output give the same
    prefix on every machine; any change to them gives another."""
    short = stage.rsplit(":", 1)[-1].lower()
    slug = re.sub(r"[^a-z0-9]+", "-", short).strip("-") or "stage"
    return f"curate-{slug}-{fingerprint({'record': record, 'output': output})}"


def _attempts(jobs, prefix: str) -> list[tuple[int, Any]]:
    out = []
    for j in jobs:
        tail = (j.submission_id or "")[len(prefix) + 1:]
        if tail.isdigit():
            out.append((int(tail), j))
    return sorted(out, key=lambda t: t[0])


def _jobs_with_prefix(client, prefix: str) -> list[Any]:
    return [j for _, j in _attempts(
        [j for j in client.list_jobs() if (j.submission_id or "").startswith(prefix + "-")], prefix)]


def entrypoint(stage: str, inp: str | None, out: str, data: dict[str, Any], overwrite: bool = False) -> str:
    """The shell command a job runs. Registered stages are CLI commands of their own; any other
    (``module:Class``) goes through the hidden generic ``curate stage NAME`` command."""
    argv = ["curate", stage] if stage in stages.names() else ["curate", "stage", stage]
    if inp is not None:
        argv += ["--input", inp]
    argv += ["--output", out]
    for key, value in data.items():
        argv += ["--set", f"{key}={yaml_value(value)}"]
    if overwrite:
        argv.append("--overwrite")
    return " ".join(shlex.quote(a) for a in argv)


def yaml_value(value: Any) -> str:
    """A value as the one-line YAML that ``--set`` parses back to the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[: -len("...")].rstrip()
    return text


def runtime_env() -> dict[str, Any]:
    """Unbuffered output so the log follows the job live, plus whatever CURATE_RUNTIME_ENV adds."""
    env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    extra = os.environ.get("CURATE_RUNTIME_ENV", "").strip()
    if extra:
        if extra.startswith("{"):
            more = json.loads(extra)
        else:
            with open(extra) as f:
                more = yaml.safe_load(f) or {}
        if not isinstance(more, dict):
            raise ConfigError(f"CURATE_RUNTIME_ENV must be a mapping, got {type(more).__name__}")
        env = merge(env, more)
    return env


def _stage_config(stage: str, config: dict[str, Any], sets: Sequence[str]):
    from curate.config import stage_and_config

    return stage_and_config(stage, None, config, sets)[1]


def _stage_data(config: dict[str, Any] | None, sets: Sequence[str]) -> dict[str, Any]:
    data = dict(config or {})
    if sets:
        data = merge(data, parse_sets(sets))
    return data


def _check_cluster_path(stage: str, path: str | None, address: str) -> None:
    """A job runs on the cluster, so a relative path would name a folder there relative to wherever the
    job starts; making it absolute here would name this machine's folder instead. Refuse it: object
    storage, or an absolute path on a filesystem every node mounts, are what a cluster reads."""
    if path is None or "://" in path or os.path.isabs(path):
        return
    raise ConfigError(f"{stage}: {path!r} is a relative local path, and the stage runs as a job on the cluster at "
                      f"{address}: give an object-store URL (s3://..., gs://...) or an absolute path that "
                      "every node of the cluster mounts")


def driver_resources() -> dict[str, Any]:
    """Where each stage's job driver runs: ``CURATE_DRIVER_RESOURCES``, a JSON mapping of Ray
    resources (``{"driver": 1}`` puts it on infra/kuberay's driver group; ``CPU``, ``GPU`` and
    ``memory`` in bytes are reserved as such), as the job API's ``entrypoint_*`` arguments. Unset: the
    driver reserves nothing and runs on the head node, where Ray places unreserved drivers."""
    raw = os.environ.get("CURATE_DRIVER_RESOURCES", "").strip()
    if not raw:
        return {}
    try:
        wanted = json.loads(raw)
    except ValueError:
        wanted = None
    if not isinstance(wanted, dict) or not wanted or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and v > 0 for v in wanted.values()):
        raise ConfigError(f"CURATE_DRIVER_RESOURCES={raw!r}: expected a JSON mapping of resource names to "
                          'positive numbers, e.g. \'{"driver": 1}\' or \'{"CPU": 4, "memory": 34359738368}\'')
    out: dict[str, Any] = {}
    custom = dict(wanted)
    for key, arg in (("CPU", "entrypoint_num_cpus"), ("GPU", "entrypoint_num_gpus")):
        if key in custom:
            out[arg] = custom.pop(key)
    if "memory" in custom:
        out["entrypoint_memory"] = int(custom.pop("memory"))
    if custom:
        out["entrypoint_resources"] = custom
    return out


def _summary(stage: str, ds: Dataset, job_id: str | None, skipped: bool) -> dict[str, Any]:
    m = ds.manifest()
    return {**m["totals"], "stage": stage, "output": ds.url, "skipped": skipped,
            "seconds": m.get("seconds", 0.0), "job_id": job_id}


def _say(stream: TextIO, line: str) -> None:
    stream.write(line + "\n")
    stream.flush()
