"""The parts of job submission that need no cluster: entrypoints, --set round trips, job naming."""

from __future__ import annotations

import shlex

import pytest

from curate import jobs
from curate.config import ConfigError, parse_sets
from curate.runner import prepare

PASS = "curate.testing.stages:Passthrough"


@pytest.mark.parametrize("value", [3, 1e-05, 0.5, True, None, "abc", "a b: c", "2024-01-01", "", "yes",
                                   [1, "x"], {"num_cpus": 2, "memory_gb": 1.5}, "x=y", "#not a comment"])
def test_set_values_round_trip(value):
    assert parse_sets([f"k={jobs.yaml_value(value)}"]) == {"k": value}


def test_entrypoint_registered_and_module_stages(tmp_path):
    data = {"drop_every": 3, "resources": {"concurrency": 1}, "note": "it's a test"}
    entry = jobs.entrypoint(PASS, "/in put", str(tmp_path / "out"), data)
    argv = shlex.split(entry)
    assert argv[:3] == ["curate", "stage", PASS]
    assert argv[argv.index("--input") + 1] == "/in put"
    sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert parse_sets(sets) == data
    assert shlex.split(jobs.entrypoint("export", "/a", "/b", {}, overwrite=True)) == [
        "curate", "export", "--input", "/a", "--output", "/b", "--overwrite"]


def test_submission_prefix_is_deterministic_and_tracks_config_input_output(ray_session, tmp_path):
    from curate.runner import run_stage

    src = str(tmp_path / "src")
    run_stage("curate.testing.stages:Synth", str(tmp_path), src, config={"shards": 1, "rows_per_shard": 2})
    _, _, rec = prepare(PASS, src, str(tmp_path / "o"), {"drop_every": 2}, check=False)
    p = jobs.submission_prefix(PASS, rec, str(tmp_path / "o"))
    assert p.startswith("curate-passthrough-") and len(p.rsplit("-", 1)[1]) == 16
    assert p == jobs.submission_prefix(PASS, rec, str(tmp_path / "o"))
    _, _, rec_res = prepare(PASS, src, str(tmp_path / "o"), {"drop_every": 2, "resources": {"num_cpus": 2}},
                            check=False)
    assert jobs.submission_prefix(PASS, rec_res, str(tmp_path / "o")) == p  # resources: same output
    _, _, rec2 = prepare(PASS, src, str(tmp_path / "o"), {"drop_every": 3}, check=False)
    assert jobs.submission_prefix(PASS, rec2, str(tmp_path / "o")) != p
    assert jobs.submission_prefix(PASS, rec, str(tmp_path / "o2")) != p


def test_bad_config_is_refused_before_any_job(monkeypatch):
    def no_cluster(address):
        raise AssertionError("must not connect before every step validated")

    monkeypatch.setattr(jobs, "connect", no_cluster)
    with pytest.raises(ConfigError, match="drop_every"):
        jobs.run_pipeline(None, [(PASS, "/x", "/y", {"drop_every": -1}, [])], "http://127.0.0.1:1")
    with pytest.raises(ConfigError, match="unknown stage"):
        jobs.run_pipeline(None, [("nope", "/x", "/y", {}, [])], "http://127.0.0.1:1")


def test_runtime_env_from_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("CURATE_RUNTIME_ENV", raising=False)
    assert jobs.runtime_env() == {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    monkeypatch.setenv("CURATE_RUNTIME_ENV", '{"py_modules": ["./curate"], "env_vars": {"A": "1"}}')
    assert jobs.runtime_env() == {"py_modules": ["./curate"], "env_vars": {"PYTHONUNBUFFERED": "1", "A": "1"}}
    f = tmp_path / "env.yaml"
    f.write_text("working_dir: .\n")
    monkeypatch.setenv("CURATE_RUNTIME_ENV", str(f))
    assert jobs.runtime_env()["working_dir"] == "."


def test_a_relative_path_is_refused_before_the_cluster_is_contacted(tmp_path, capsys):
    from curate.cli import main

    # no server listens on port 9: the check must come first
    code = main(["submit", PASS, "--input", "data/in", "--output", str(tmp_path / "o"),
                 "--address", "http://127.0.0.1:9"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'data/in' is a relative local path" in err and "s3://" in err
    # never rewritten to this machine's absolute path
    assert str(tmp_path.cwd()) not in err
    code = main(["submit", PASS, "--input", str(tmp_path / "in"), "--output", "o",
                 "--address", "http://127.0.0.1:9"])
    assert code == 2 and "'o' is a relative local path" in capsys.readouterr().err


def test_driver_resources_from_the_environment(monkeypatch):
    monkeypatch.delenv("CURATE_DRIVER_RESOURCES", raising=False)
    assert jobs.driver_resources() == {}
    monkeypatch.setenv("CURATE_DRIVER_RESOURCES", '{"driver": 1}')
    assert jobs.driver_resources() == {"entrypoint_resources": {"driver": 1}}
    monkeypatch.setenv("CURATE_DRIVER_RESOURCES", '{"CPU": 4, "GPU": 0.5, "memory": 1e9, "x": 2}')
    assert jobs.driver_resources() == {"entrypoint_num_cpus": 4, "entrypoint_num_gpus": 0.5,
                                       "entrypoint_memory": 1_000_000_000, "entrypoint_resources": {"x": 2}}
    for bad in ("driver", "[1]", '{"driver": 0}', '{"driver": "1"}', "{}"):
        monkeypatch.setenv("CURATE_DRIVER_RESOURCES", bad)
        with pytest.raises(ConfigError, match="CURATE_DRIVER_RESOURCES"):
            jobs.driver_resources()
