"""infra/: the manifests parse, name entrypoints and files that exist and one image, built by the
Dockerfile, whose install commands are the README's."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from curate.cli import cli

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
MANIFESTS = [INFRA / "kuberay" / "raycluster.yaml", INFRA / "kuberay" / "rayjob.yaml", INFRA / "aws-cluster.yaml"]


def _docs(path: Path) -> list[dict]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path
    return docs


def _walk(obj, key):
    """Every value stored under ``key`` anywhere in a parsed YAML tree."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v, key)


def _project() -> dict:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _built_tag() -> str:
    m = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", (INFRA / "Dockerfile").read_text())
    assert m, "the Dockerfile's header must say how it is built and tagged"
    return m.group(1)


def _pip_commands(lines) -> list[str]:
    """`pip install ...` commands, normalised (python -m prefix and cache flags dropped)."""
    out = []
    for line in lines:
        line = re.sub(r"^(python3? -m )", "", line.strip())
        if line.startswith("pip install"):
            out.append(" ".join(w for w in line.split() if w not in ("--no-cache-dir", "-q")))
    return out


def test_every_file_parses_and_the_image_is_the_one_the_dockerfile_builds():
    tag = _built_tag()
    assert tag == f"curate:{_project()['version']}"
    images = []
    for path in MANIFESTS:
        for doc in _docs(path):
            images += list(_walk(doc, "image"))
    assert images and set(images) == {tag}


def test_dockerfile_base_matches_the_dali_cuda_build_and_copies_what_exists():
    text = (INFRA / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu\d\d\.\d\d", base)
    assert m, base
    dali = next(d for d in _project()["dependencies"] if d.startswith("nvidia-dali-cuda"))
    # DALI wheels are named by CUDA major version: nvidia-dali-cuda130 runs on CUDA 13.x
    cuda = re.match(r"nvidia-dali-cuda(\d+)0\b", dali)
    assert cuda and cuda.group(1) == m.group(1), (dali, base)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for item in src.split():
            assert (ROOT / item).exists(), f"Dockerfile copies {item}, which does not exist"


def test_dockerfile_installs_exactly_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ *Install on a cluster.*?\n```[a-z]*\n(.*?)```", readme, re.M | re.S)
    assert m, "README.md needs an 'Install on a cluster' section with a fenced block of pip commands"
    want = _pip_commands(m.group(1).splitlines())
    runs = [ln[len("RUN "):] for ln in (INFRA / "Dockerfile").read_text().splitlines() if ln.startswith("RUN pip")]
    assert want and _pip_commands(runs) == want


def test_raycluster_has_cpu_and_gpu_groups_with_autoscaling_bounds():
    (rc,) = _docs(INFRA / "kuberay" / "raycluster.yaml")
    assert rc["kind"] == "RayCluster" and rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # drivers only
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for g in groups.values():
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu_limits = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu_limits["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_job_entrypoints_exist():
    jobs = _docs(INFRA / "kuberay" / "rayjob.yaml")
    assert {j["kind"] for j in jobs} == {"RayJob"}
    (rc,) = _docs(INFRA / "kuberay" / "raycluster.yaml")
    seen = set()
    for job in jobs:
        assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
        argv = shlex.split(job["spec"]["entrypoint"])
        if argv[0] == "curate":
            assert argv[1] in cli.commands, argv  # a real sub-command of the console script
            files = [a for a in argv[2:] if a.endswith(".yaml")]
            seen.add("curate")
        else:
            assert argv[:3] == ["python", "-m", "trainer.train"], argv
            assert importlib.util.find_spec("trainer.train") is not None
            files = [argv[argv.index("--recipe") + 1]]
            seen.add("trainer")
        for f in files:
            assert (ROOT / f).exists(), f"{job['metadata']['name']} names {f}, which does not exist"
    assert seen == {"curate", "trainer"}
    assert _project()["scripts"]["curate"] == "curate.cli:main"


def test_cluster_launcher_node_types_and_bounds():
    (cfg,) = _docs(INFRA / "aws-cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu_worker", "gpu_worker"} <= set(types)
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    for name in ("cpu_worker", "gpu_worker"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert cfg["max_workers"] >= types["cpu_worker"]["max_workers"] + types["gpu_worker"]["max_workers"]


def test_local_cluster_script_usage_refusal_and_stop_without_ray(tmp_path):
    """The script's own paths that need no Ray: usage errors exit 2, a second start over a recorded
    cluster is refused before anything starts, and stop removes its state folder and nothing else.
    (Starting a real cluster with it is tests/ops/conftest.py's job.)"""
    script = str(INFRA / "local-cluster.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    state = tmp_path / "state"
    env = {**os.environ, "CURATE_CLUSTER_DIR": str(state)}

    def sh(*args):
        return subprocess.run(["bash", script, *args], env=env, capture_output=True, text=True, timeout=60)

    for args in ((), ("restart",)):
        r = sh(*args)
        assert r.returncode == 2 and r.stderr.startswith("usage:"), r
    assert sh("stop").returncode == 0 and not state.exists()  # nothing recorded: nothing to do
    state.mkdir()
    (state / "pids").write_text("")
    neighbour = tmp_path / "keep.txt"
    neighbour.write_text("not the script's")
    r = sh("start", "1")
    assert r.returncode == 1 and "already recorded" in r.stderr and "stop" in r.stderr, r
    assert sorted(p.name for p in state.iterdir()) == ["pids"]  # refused before any work
    assert sh("stop").returncode == 0
    assert not state.exists() and neighbour.read_text() == "not the script's"
