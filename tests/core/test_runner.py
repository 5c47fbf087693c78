"""The runner on a real embedded Ray: commit, skip, resume after SIGKILL, failures, verify, S3."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from curate import schema
from curate.cli import main
from curate.config import ConfigError
from curate.dataset import Dataset
from curate.runner import StageFailed, run_stage
from curate.stage import RunOptions
from curate.verify import verify

SYNTH = "curate.testing.stages:Synth"
PASS = "curate.testing.stages:Passthrough"


def _uids(ds: Dataset) -> tuple[list[str], list[str]]:
    kept, dropped = [], []
    for _, t in ds.iter_shards([schema.UID]):
        kept += t.column(0).to_pylist()
    for _, t in ds.iter_rejects([schema.UID]):
        dropped += t.column(0).to_pylist()
    return kept, dropped


def test_stage_chain_commits_every_row_once(ray_session, tmp_path):
    src = str(tmp_path / "src")
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 4, "rows_per_shard": 7})
    assert (s["rows_in"], s["kept"]) == (28, 28)
    ds = Dataset(src)
    assert ds.shard_ids() == [0, 1, 2, 3]
    assert ds.read_json("shards", "sizes.json") == {f"0000{i}.tar": 7 for i in range(4)}
    assert verify(ds) == ([], 28)

    out = str(tmp_path / "pt")
    s = run_stage(PASS, src, out, config={"drop_every": 3})
    kept, dropped = _uids(Dataset(out))
    src_uids = _uids(ds)[0]
    assert sorted(kept + dropped) == sorted(src_uids)
    assert len(set(kept + dropped)) == 28
    assert all(int(u, 16) % 3 == 0 for u in dropped) and dropped
    assert s["drops"] == {"passthrough:divisible": len(dropped)}
    assert schema.DROP_REASON not in Dataset(out).schema().names
    # the pointers of a Parquet-only stage still resolve to the source's bytes
    assert verify(Dataset(out)) == ([], len(kept))


def test_complete_output_is_skipped_and_other_config_refused(ray_session, tmp_path):
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 3})
    before = Path(src, "_manifest.json").read_text()
    again = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 3})
    assert again["skipped"] and Path(src, "_manifest.json").read_text() == before
    with pytest.raises(ConfigError, match="different config"):
        run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 4})
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 4},
                  options=RunOptions(overwrite=True))
    assert s["kept"] == 8


def test_failing_shard_names_itself_and_other_shards_stay_committed(ray_session, tmp_path):
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": 4, "rows_per_shard": 2})
    out = str(tmp_path / "out")
    with pytest.raises(StageFailed, match="shard 2: RuntimeError: injected failure on shard 2"):
        run_stage(PASS, src, out, config={"fail_on_shard": 2})
    ds = Dataset(out)
    assert not ds.is_complete() and 2 not in ds.shard_ids()
    assert all(not p.endswith(".tmp") for p in ds.fs.find(ds.root))


def _pipeline(tmp_path: Path, shards: int, sleep: float) -> Path:
    pipe = {
        "name": "kill-test",
        "output": str(tmp_path / "out"),
        "input": str(tmp_path),
        "stages": [
            {"stage": SYNTH, "name": "synth",
             "config": {"shards": shards, "rows_per_shard": 6, "sleep_per_shard": sleep,
                        "resources": {"concurrency": 1}}},
            {"stage": PASS, "name": "pass", "config": {"drop_every": 2, "sleep_per_shard": sleep,
                                                       "resources": {"concurrency": 1}}},
        ],
    }
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump(pipe))
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in (".parquet", ".tar", ".idx") or p.name == "sizes.json"}


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(ray_session, tmp_path):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    clean.mkdir()
    killed.mkdir()
    assert main(["run", str(_pipeline(clean, 6, 0.0))]) == 0

    pipe = _pipeline(killed, 6, 0.6)
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "curate.cli", "run", str(pipe)], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stats = killed / "out" / "synth" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(stats.glob("*.stats.json"))) < 2:
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray workers, mid-stage
    proc.wait()
    partial = Dataset(str(killed / "out" / "synth"))
    assert not partial.is_complete() and 2 <= len(partial.shard_ids()) < 6

    assert main(["run", str(pipe)]) == 0
    for step in ("synth", "pass"):
        a, b = _files(clean / "out" / step), _files(killed / "out" / step)
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            if name.endswith(".parquet") and step == "synth":
                # pointers name each run's own tar; everything else is equal
                ta, tb = pq.read_table(clean / "out" / step / name), pq.read_table(killed / "out" / step / name)
                assert ta.drop_columns([schema.IMAGE_TAR]).equals(tb.drop_columns([schema.IMAGE_TAR]))
            elif step == "synth" or not name.endswith(".parquet"):
                assert a[name] == b[name], name
        ds = Dataset(str(killed / "out" / step))
        kept, dropped = _uids(ds)
        assert len(kept) + len(dropped) == 36 == len(set(kept + dropped))
        assert verify(ds)[0] == []
        assert not [p for p in (killed / "out" / step).rglob("*.tmp")]


def test_verify_names_truncated_tar_and_flipped_byte(ray_session, tmp_path, capsys):
    src = tmp_path / "src"
    run_stage(SYNTH, str(tmp_path), str(src), config={"shards": 3, "rows_per_shard": 4})
    ds = Dataset(str(src))
    row = ds.read_shard(1).slice(2, 1).to_pylist()[0]
    tar1 = src / "shards" / "00001.tar"
    raw = bytearray(tar1.read_bytes())
    raw[row[schema.IMAGE_OFFSET] + 40] ^= 0xFF
    tar1.write_bytes(bytes(raw))
    tar2 = src / "shards" / "00002.tar"
    tar2.write_bytes(tar2.read_bytes()[:3000])

    assert main(["verify", str(src)]) == 1
    out = capsys.readouterr().out
    assert f"shard 00001 row 2 (uid {row[schema.UID]}" in out and "sha256" in out
    assert "shard 00002: tar" in out and "damaged" in out
    assert "shard 00000" not in out


def test_s3_dataset_through_ray_workers(ray_session, s3_bucket):
    src = f"s3://{s3_bucket}/src"
    run_stage(SYNTH, "/", src, config={"shards": 2, "rows_per_shard": 3})
    out = f"s3://{s3_bucket}/pt"
    s = run_stage(PASS, src, out, config={"drop_every": 2})
    assert s["rows_in"] == 6
    ds = Dataset(out)
    assert ds.is_complete() and ds.url.startswith("s3://")
    assert verify(ds)[0] == [] and verify(Dataset(src))[0] == []


def test_empty_shards_flow_through_every_step(ray_session, tmp_path):
    src = str(tmp_path / "src")
    s = run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 0})
    assert (s["rows_in"], s["kept"]) == (0, 0)
    out = str(tmp_path / "pt")
    s = run_stage(PASS, src, out, config={"drop_every": 2})
    ds = Dataset(out)
    assert ds.is_complete() and ds.shard_ids() == [0, 1] and s["kept"] == 0
    assert verify(ds) == ([], 0)


# -- GPU resources per phase (issue 21) ------------------------------------------------------------
def test_every_model_worker_asks_ray_for_the_gpu_it_uses_and_no_other_does(tmp_path):
    """Ray's own task table, on a Ray that declares 2 GPUs: clip's top_fraction plan scores in an
    actor pool (one model per actor, a GPU each, not one task per shard), its Parquet-only apply
    holds no GPU; device: cpu and an explicit num_gpus: 0 reserve none and their workers see none."""
    probe = Path(__file__).with_name("ray_gpu_probe.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(probe), str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = __import__("json").loads(proc.stdout.strip().splitlines()[-1])

    def asks(run: str, name: str) -> list[dict]:
        return [t["resources"] for t in runs[run] if t["name"] == name]

    def hidden(run: str, name: str) -> list[bool]:
        return [t["env"].get("CUDA_VISIBLE_DEVICES") == "" for t in runs[run] if t["name"] == name]

    top = "top_fraction_auto"
    assert asks(top, "_MapActor.__init__") == [{"CPU": 1.0, "GPU": 1.0}] * 2  # 2 GPUs: 2 actors for 3 shards
    assert len(asks(top, "_MapActor.call")) == 3
    assert not asks(top, "_score_shard")  # never a per-shard GPU task
    assert asks(top, "_shard_task") == [{"CPU": 1.0}] * 3  # the apply reads Parquet only
    assert all("GPU" not in r for t in runs[top] if t["name"] != "_MapActor.__init__" for r in [t["resources"]])
    assert asks("pool_auto", "_ShardActor.__init__") == [{"CPU": 1.0, "GPU": 1.0}] * 2
    for run in ("pool_cpu", "pool_auto_zero_gpus"):
        assert asks(run, "_ShardActor.__init__") == [{"CPU": 1.0}] * 3
        assert all(hidden(run, "_ShardActor.__init__"))
    assert not any(hidden("pool_auto", "_ShardActor.__init__"))


def test_phase_resources_follow_the_model_device():
    from curate.runner import phase_resources
    from curate.stages.clip import ClipConfig, ClipStage
    from curate.stages.recaption import RecaptionConfig, RecaptionStage

    def gpus(stage, phase, cluster_gpus=2.0):
        return phase_resources(stage, phase, cluster_gpus).num_gpus

    top = ClipStage(ClipConfig(top_fraction=0.3))
    assert (gpus(top, "plan"), gpus(top, "apply")) == (1.0, 0.0)
    pool = ClipStage(ClipConfig())
    assert (gpus(pool, "plan"), gpus(pool, "apply")) == (0.0, 1.0)
    assert gpus(pool, "apply", cluster_gpus=0) == 0.0  # auto on a cluster without GPUs
    assert gpus(ClipStage(ClipConfig(device="cuda")), "apply", cluster_gpus=0) == 1.0  # waits for GPU nodes
    assert gpus(ClipStage(ClipConfig(device="cpu")), "apply") == 0.0
    half = ClipStage(ClipConfig.model_validate({"resources": {"num_gpus": 0.5}}))
    assert gpus(half, "apply") == 0.5
    # a phase without a model never holds a GPU, whatever resources say
    top_gpu = ClipStage(ClipConfig.model_validate({"top_fraction": 0.3, "resources": {"num_gpus": 1}}))
    assert gpus(top_gpu, "apply") == 0.0 and gpus(top_gpu, "plan") == 1.0
    assert gpus(RecaptionStage(RecaptionConfig(model="m", device="cpu")), "apply") == 0.0
    with pytest.raises(ConfigError, match="device: cpu"):
        phase_resources(ClipStage(ClipConfig.model_validate({"device": "cpu", "resources": {"num_gpus": 1}})),
                        "apply", 2)
    with pytest.raises(ConfigError, match="device: cuda"):
        phase_resources(ClipStage(ClipConfig.model_validate({"device": "cuda", "resources": {"num_gpus": 0}})),
                        "apply", 2)


def test_missing_resource_is_judged_per_node():
    from curate.runner import missing_resource

    nodes = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}},
             {"Alive": False, "Resources": {"CPU": 64.0, "GPU": 8.0}}]
    assert missing_resource({"CPU": 2, "GPU": 1}, nodes) is None
    # 2 GPUs in the cluster, but no node holds 2 for one actor; the dead node does not count
    assert "GPU: 2 per worker, but the largest node offers 1" in missing_resource({"GPU": 2}, nodes)
    mixed = [{"Resources": {"CPU": 16.0}}, {"Resources": {"CPU": 2.0, "GPU": 1.0}}]
    assert "together on one node" in missing_resource({"CPU": 4, "GPU": 1}, mixed)
    assert "memory" in missing_resource({"CPU": 1, "memory": 64 * 1024**3}, nodes)


def test_unsatisfiable_request_fails_at_once_naming_the_resource(ray_session, tmp_path, capsys):
    """The session's embedded Ray has 2 CPUs and no GPU: a GPU model or a 64-CPU worker cannot run.
    Before the fix Ray queued them forever; now the run stops before any shard, with one line."""
    src = str(tmp_path / "src")
    run_stage(SYNTH, str(tmp_path), src, config={"shards": 2, "rows_per_shard": 3})
    with pytest.raises(ConfigError, match=r"no node .* GPU: 1 per worker, but the largest node offers 0"):
        run_stage("clip", src, str(tmp_path / "gpu"), config={"model": str(tmp_path), "pretrained": None,
                                                             "device": "cuda"})
    with pytest.raises(ConfigError, match=r"CPU: 64 per worker, but the largest node offers 2"):
        run_stage(PASS, src, str(tmp_path / "cpu"), config={"resources": {"num_cpus": 64}})
    assert not Dataset(str(tmp_path / "cpu")).shard_ids()
    # through the CLI: exit 2, one line, no traceback
    code = main(["filter", "--input", src, "--output", str(tmp_path / "cli"),
                 "--set", "resources.num_cpus=64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "CPU: 64 per worker" in err and "Traceback" not in err
