"""Bad usage gives one clear line and a non-zero exit, before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curate.cli import main
from curate.runner import run_stage

SYNTH = "curate.testing.stages:Synth"


def _one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("curate: error:"), err
    for n in needles:
        assert n in err, err
    return err


def _pipeline(tmp_path: Path, config: dict, stage: str = SYNTH, input: str | None = None) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"name": "t", "output": str(tmp_path / "out"),
                                    "input": input or str(tmp_path),
                                    "stages": [{"stage": stage, "name": "s", "config": config}]}))
    return str(path)


PASS = "curate.testing.stages:Passthrough"


def test_missing_input(tmp_path, capsys):
    code = main(["run", _pipeline(tmp_path, {}, stage=PASS, input=str(tmp_path / "nope"))])
    _one_line_error(capsys, code, "nope", "does not exist")
    assert not (tmp_path / "out").exists()


def test_input_that_is_not_a_finished_dataset(tmp_path, capsys):
    (tmp_path / "half").mkdir()
    code = main(["run", _pipeline(tmp_path, {}, stage=PASS, input=str(tmp_path / "half"))])
    _one_line_error(capsys, code, "is not a curate dataset (no _manifest.json)")


def test_unknown_stage(tmp_path, capsys):
    _one_line_error(capsys, main(["frobnicate", "--input", "x"]), "frobnicate")
    code = main(["run", _pipeline(tmp_path, {}, stage="frobnicate")])
    _one_line_error(capsys, code, "unknown stage 'frobnicate'")


def test_unknown_config_key(tmp_path, capsys):
    code = main(["run", _pipeline(tmp_path, {"shardz": 3})])
    _one_line_error(capsys, code, "shardz", "unknown key")


def test_mistyped_config_value(tmp_path, capsys):
    code = main(["run", _pipeline(tmp_path, {"shards": "many"})])
    _one_line_error(capsys, code, "shards", "'many'")
    code = main(["run", _pipeline(tmp_path, {}), "--set", "s.rows_per_shard=-4"])
    _one_line_error(capsys, code, "rows_per_shard", "greater than or equal to 0")
    code = main(["run", _pipeline(tmp_path, {}), "--set", "nosuchstep.x=1"])
    _one_line_error(capsys, code, "nosuchstep")
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    code = main(["run", str(tmp_path / "missing.yaml")])
    _one_line_error(capsys, code, "missing.yaml")


def test_output_belonging_to_another_stage(ray_session, tmp_path, capsys):
    out = tmp_path / "out" / "s"
    run_stage(SYNTH, str(tmp_path), str(out), config={"shards": 1, "rows_per_shard": 2})
    code = main(["run", _pipeline(tmp_path, {}, stage=PASS, input=str(out))])
    _one_line_error(capsys, code, "holds a complete curate.testing.stages:Synth run", "--overwrite")


def test_output_that_is_something_else(tmp_path, capsys):
    (tmp_path / "out" / "s").mkdir(parents=True)
    (tmp_path / "out" / "s" / "precious.txt").write_text("keep me")
    code = main(["run", _pipeline(tmp_path, {})])
    _one_line_error(capsys, code, "not a curate dataset")
    assert (tmp_path / "out" / "s" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("argv", [["--help"], ["inspect", "--help"]])
def test_help_is_fast_and_lists_commands(argv):
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "curate.cli", *argv],
                       capture_output=True, text=True, check=True)
    assert "Usage:" in r.stdout
    heavy = [mod for mod in ("pyarrow", "ray", "torch", "open_clip") if f" {mod}\n" in r.stderr]
    assert heavy == [], f"--help imported {heavy}"
