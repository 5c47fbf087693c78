"""Docs as tests: every command in README.md, trainer/README.md and the headers of infra/ is accounted
for, and run here where it can be, on tiny data.

The commands are read from the docs themselves (fenced blocks of the READMEs, the indented command
lines of infra/'s comment headers), so an edited or added command is run, or fails
``test_every_documented_command_is_accounted_for`` until someone says how it is covered. A command
runs with the fewest substitutions that make it run here, each listed beside the block it applies to:
no weights can be downloaded (the tiny random demo models stand in for hub models), no GPU (model
steps ask for none), the web is the demo corpus on 127.0.0.1. What cannot run here at all (a real
AWS account, a Kubernetes cluster, a container registry) is named with the test that checks the
files it would use instead.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.verify import verify

ROOT = Path(__file__).resolve().parents[2]
STARTS = ("curate", "python", "make", "pip", ".venv/bin/", "torchrun", "docker", "ray", "kubectl",
          "infra/", "RAY_AUTH_TOKEN=")


# -- reading the docs -------------------------------------------------------------------------------
def _join(lines: list[str]) -> list[str]:
    """Backslash-continued lines joined, trailing `# comments` dropped, blanks left out."""
    out, cur = [], ""
    for line in lines:
        cur += line.rstrip()
        if cur.endswith("\\"):
            cur = cur[:-1] + " "
            continue
        cmd = re.sub(r"\s+#\s.*$", "", cur).strip()
        cur = ""
        if cmd and not cmd.startswith("#"):
            out.append(" ".join(cmd.split()))
    return out


def readme_blocks(path: Path) -> list[tuple[str, list[str]]]:
    """(the heading above it, its commands) for every fenced shell block of a README."""
    heading, out = "", []
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", path.read_text(), re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("# ").strip()
        elif m.group(2) in ("", "sh", "bash"):
            cmds = [c for c in _join(m.group(3).splitlines()) if c.startswith(STARTS)]
            if cmds:
                out.append((heading, cmds))
    return out


def infra_commands() -> list[tuple[str, str]]:
    """(file, command) for the command lines of infra/'s comment headers (``#   command``)."""
    out = []
    for path in sorted((ROOT / "infra").rglob("*")):
        if not path.is_file() or path.suffix not in ("", ".yaml", ".sh", ".py"):
            continue
        lines = [ln for ln in path.read_text().splitlines()]
        comment = [re.sub(r"^#( |$)", "", ln) if ln.startswith("#") else None for ln in lines]
        if path.suffix == ".py":  # a module docstring: its indented lines
            comment = lines
        block: list[str] = []
        for c in [*comment, None]:
            if c is not None and re.match(r"^ {2,}\S", c) and (block or c.strip().startswith(STARTS)):
                block.append(c)
                continue
            if block:
                out += [(str(path.relative_to(ROOT)), cmd) for cmd in _join(block) if cmd.startswith(STARTS)]
                block = []
    return out


def all_commands() -> list[tuple[str, str]]:
    out = []
    for doc in ("README.md", "trainer/README.md"):
        for heading, cmds in readme_blocks(ROOT / doc):
            out += [(f"{doc} / {heading}", c) for c in cmds]
    return out + infra_commands()


# How each documented command is covered: (pattern, how). ``run:`` a test here runs it; ``test:`` a
# test elsewhere runs it; ``cannot:`` it needs what this machine has not (and what checks its files).
COVERAGE = [
    (r"make (demo|test)$", "run:test_make_targets_are_the_documented_commands"),
    (r"curate <stage> |curate run pipelines/demo\.yaml \[|curate (inspect|verify|config) [A-Z]",
     "run:test_cli_synopses_name_real_options"),
    (r"python -m trainer\.train --data DATASET |python -m trainer\.(eval|tokenizer) |curate compare ",
     "run:test_cli_synopses_name_real_options"),
    (r"torchrun --nproc-per-node 8 -m trainer\.eval \.\.\.",
     "test:tests/trainer/test_eval.py::test_two_ranks_split_the_eval_and_agree_with_one"),
    (r"curate (download|import|filter|dedup|clip|safety|decontaminate|recaption|export) |curate verify data/"
     r"|python -m trainer\.train --data data/train", "run:test_readme_tour"),
    (r"python -m curate\.heads ", "run:test_readme_safety_heads_block"),
    (r"\.venv/bin/", "run:test_contributing_block"),
    (r"curate models ", "test:tests/docs/test_models_prestage.py::test_models_come_from_the_hf_cache_and_nothing_else"),
    (r"pip install -c infra/constraints\.txt",
     "test:tests/ops/test_infra.py::test_dockerfile_installs_exactly_what_the_readme_says"),
    (r"torchrun --nproc-per-node 8 -m trainer\.train \.\.\.",
     "test:tests/trainer/test_trainer_run.py::test_torchrun_two_processes_gloo_ddp_and_fsdp_equal_one_process"),
    (r"infra/local-cluster\.sh (start|stop)", "test:tests/ops/conftest.py::cluster"),
    (r"infra/local-cluster\.sh status",
     "test:tests/ops/test_infra.py::test_the_probed_endpoint_answers_without_the_token_and_the_job_api_does_not"),
    (r"(RAY_AUTH_TOKEN=\S+ )?(CURATE_DRIVER_RESOURCES='[^']*' )?curate run pipelines/\w+\.yaml --address",
     "test:tests/ops/test_cluster_jobs.py::test_pipeline_one_job_per_stage_equals_embedded"),
    (r"python infra/kuberay/schemas/from_crd\.py", "run:test_schema_converter_command"),
    (r"docker build ", "cannot:no registry with the CUDA base image is reachable here; "
     "tests/ops/test_infra.py::test_dockerfile_lints_clean_with_hadolint and the Dockerfile tests"),
    (r"ray (up|dashboard) ", "cannot:needs an AWS account; tests/ops/test_infra.py::"
     "test_cluster_launcher_image_ami_and_node_types"),
    (r"kubectl ", "cannot:needs a Kubernetes cluster; tests/ops/test_infra.py::"
     "test_kuberay_manifests_validate_against_the_crd_schemas"),
]


def _coverage(cmd: str) -> list[str]:
    return [how for pattern, how in COVERAGE if re.match(pattern, cmd)]


def test_every_documented_command_is_accounted_for():
    cmds = all_commands()
    sources = {src.split(" / ")[0] for src, _ in cmds}
    assert {"README.md", "trainer/README.md", "infra/Dockerfile", "infra/aws-cluster.yaml",
            "infra/local-cluster.sh", "infra/kuberay/raycluster.yaml"} <= sources, sources
    missing = [f"{src}: {cmd}" for src, cmd in cmds if len(_coverage(cmd)) != 1]
    assert not missing, "commands with no (or two) ways of being covered:\n" + "\n".join(missing)
    here = Path(__file__).read_text()
    for _, how in COVERAGE:
        kind, _, what = how.partition(":")
        if kind == "run":
            assert f"def {what}(" in here, what
        elif kind == "test":
            path, _, name = what.partition("::")
            assert re.search(rf"def {name}\(", (ROOT / path).read_text()), what


def _block(doc: str, heading: str) -> list[str]:
    (cmds,) = [c for h, c in readme_blocks(ROOT / doc) if h == heading]
    return cmds


def _sub(cmd: str, subs: list[tuple[str, str]]) -> str:
    for old, new in subs:
        cmd = cmd.replace(old, new)
    return cmd


# -- the CLI synopses and make ----------------------------------------------------------------------
def test_cli_synopses_name_real_options(capsys):
    """`curate <stage> ... [--config stage.yaml]` and the like: every option a synopsis names is one
    the command takes (its --help lists it), for every stage where it says <stage>."""
    from curate import stages

    synopses = [c for src, c in all_commands()
                if re.match(r"curate <stage> |curate \w+ \[?[A-Z]|curate run .*\[|curate compare ", c)]
    assert len(synopses) >= 5, synopses
    for syn in synopses:
        words = syn.split()
        names = stages.names() if words[1] == "<stage>" else [words[1]]
        for name in names:
            assert main([name, "--help"]) == 0
            text = capsys.readouterr().out
            for opt in re.findall(r"--[a-z][a-z-]*", syn):
                assert opt in text, (syn, name, opt)
    for syn in [c for _, c in all_commands() if re.match(r"python -m trainer\.(train --data DATASET|eval |tokenizer )", c)]:
        module = syn.split()[2]
        proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-1000:]
        for opt in re.findall(r"--[a-z][a-z-]*", syn):
            assert opt in proc.stdout, (syn, opt)


def test_make_targets_are_the_documented_commands():
    """`make demo` and `make test` as make would run them (``make -n`` prints, runs nothing): the demo
    module's `all` and pytest without the gpu tests. The demo pipeline itself runs in
    test_demo_pipeline; the suite is this suite."""
    proc = subprocess.run(["make", "-n", "-B", "demo", "test"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"-m curate\.demo all$", proc.stdout, re.M)
    assert re.search(r"-m pytest -q -m \"not gpu\"( --durations=\d+)?$", proc.stdout, re.M)


# -- README: Safety heads -----------------------------------------------------------------------------
def test_readme_safety_heads_block(tmp_path, monkeypatch):
    """The three conversions and `show`, on files in the published layouts at their real widths
    (ViT-L/14: 768): a linear head, the improved predictor's Linear/Dropout stack, Keras Dense weights
    with a Normalization layer."""
    import numpy as np
    import torch

    from curate import heads
    from curate.heads import load_head

    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    torch.save(torch.nn.Linear(768, 1).state_dict(), "sa_0_4_vit_l_14_linear.pth")
    mlp = torch.nn.Sequential(torch.nn.Linear(768, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                              torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                              torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    torch.save(mlp.state_dict(), "sac+logos+ava1-l14-linearMSE.pth")
    rng = np.random.default_rng(0)
    np.savez("nsfw.npz", mean=rng.normal(size=768), variance=rng.uniform(0.5, 2, size=768),
             kernel_0=rng.normal(size=(768, 64)), bias_0=rng.normal(size=64),
             kernel_1=rng.normal(size=(64, 1)), bias_1=rng.normal(size=1))
    Path("heads").mkdir()
    cmds = _block("README.md", "Safety heads")
    assert len(cmds) == 4
    for cmd in cmds:
        argv = shlex.split(cmd)
        assert argv[:3] == ["python", "-m", "curate.heads"], cmd
        assert heads.main(argv[3:]) == 0, cmd
    for name in ("aesthetic", "aesthetic_v2", "nsfw"):
        head = load_head(f"heads/{name}.safetensors")
        assert head.meta.embedding_model == "ViT-L-14" and head.meta.embedding_dim == 768
    x = rng.normal(size=(4, 768)).astype(np.float32)
    with torch.no_grad():  # the MLP converted with --activation none scores as the module does
        want = mlp.eval()(torch.from_numpy(x)).numpy()[:, 0]
    np.testing.assert_allclose(load_head("heads/aesthetic_v2.safetensors").score(x), want, rtol=1e-4, atol=1e-4)


# -- README: Contributing -----------------------------------------------------------------------------
def test_contributing_block():
    """The single-test command runs that test; the whole-file and whole-suite commands collect (running
    them is this suite's own job); ruff checks the tree as written."""
    cmds = _block("README.md", "Contributing")
    assert len(cmds) == 4
    for cmd in cmds:
        argv = [sys.executable if a == ".venv/bin/python" else a for a in shlex.split(cmd)]
        if argv[0] == ".venv/bin/ruff":
            argv[0:1] = [sys.executable, "-m", "ruff"]
        elif "::" not in cmd:
            argv.append("--collect-only")
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-2000:])
        if "::" in cmd:
            assert re.search(r"\b1 passed\b", proc.stdout), proc.stdout[-500:]


def test_schema_converter_command(tmp_path):
    """infra/kuberay/schemas/from_crd.py on a CRD of KubeRay's shape: descriptions gone, strict objects."""
    import json

    import yaml

    (cmd,) = [c for _, c in infra_commands() if "from_crd.py" in c]
    crd = {"spec": {"names": {"kind": "RayThing"}, "versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
        "type": "object", "description": "d", "properties": {"spec": {"type": "object", "properties": {
            "a": {"type": "string", "description": "d"}}}, "metadata": {"type": "object"}}}}}]}}
    (tmp_path / "ray.io_raythings.yaml").write_text(yaml.safe_dump(crd))
    argv = shlex.split(cmd)
    argv = [sys.executable, str(ROOT / argv[1]), "--out", str(tmp_path), argv[2], str(tmp_path / "ray.io_raythings.yaml")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = json.loads((tmp_path / "raything_v1.json").read_text())
    assert "description" not in json.dumps(got)
    assert got["properties"]["spec"]["additionalProperties"] is False
    assert "additionalProperties" not in got["properties"]["metadata"]  # lists no properties: left open
    assert got["x-source"].startswith("KubeRay v1.7.0")


# -- README: A tour --------------------------------------------------------------------------------
# Each substitution and why. The URL list is the demo corpus on 127.0.0.1, which download refuses
# unless exempted; the import line adopts the tars the download just wrote (a second folder, since
# both lines name data/raw as alternatives); the UID is one dedup dropped; hub models become the tiny
# demo models (no weights can be downloaded here), with the clip threshold opened up (a random model's
# scores mean nothing); the heads (with the demo's threshold for its random nsfw head) and the reference
# set are the demo's; the trainer runs the recipe at
# tiny size for two steps on the CPU (trainer/README.md's shrink).
TOUR_SUBS = [
    ("--input urls.parquet", "--input demo-output/urls.parquet --set 'fetch.allowed_networks=[127.0.0.1/32]'"),
    ("--input /data/laion-wds/ --output data/raw", "--input data/raw/shards --output data/imported"),
    ("--set model=ViT-B-32 --set pretrained=laion2b_s34b_b79k --set min_score=0.28",
     "--set model=demo-output/models/clip --set pretrained=null --set min_score=-1"),
    ("path: heads/nsfw.safetensors, drop_above: 0.5", "path: demo-output/models/heads/nsfw.safetensors, "
     "drop_above: 0.9895"),  # the demo head is random: pipelines/demo.yaml's threshold for it
    ("reference=/data/eval/coco-val2017", "reference=demo-output/reference/demo_eval"),
    ("model=Salesforce/blip-image-captioning-large", "model=demo-output/models/vlm/blip --set max_new_tokens=8"),
    ("--recipe trainer/recipes/clip_vit_l14_336.yaml", f"--recipe {ROOT}/trainer/recipes/clip_vit_l14_336.yaml "
     "--output data/runs --set model.tiny=true train.global_batch=16 train.accum=2 train.steps=2 "
     "train.device=cpu data.workers=1"),
]


_RUNNER = """
import shlex, sys
from curate.cli import main
from trainer.train import main as train_main
for cmd in sys.argv[1:]:
    for part in cmd.split(" && "):
        argv = shlex.split(part)
        rc = main(argv[1:]) if argv[0] == "curate" else train_main(argv[3:])
        if rc:
            sys.exit(f"exit {rc}: {part}")
"""


def _run_documented(cmds: list[str], cwd: Path) -> None:
    """The commands in order, in ``cwd``, in one process of their own (one embedded Ray for all of
    them, started there, as each command would start it): ``curate X`` is the console script's
    ``main``, ``python -m trainer.train`` the trainer's."""
    for cmd in cmds:
        argv = shlex.split(cmd.split(" && ")[0])
        assert argv[0] == "curate" or argv[:3] == ["python", "-m", "trainer.train"], cmd
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _RUNNER, *cmds], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=900)
        # Ray gives its own node 30 s to register (not configurable in 2.60); on an overloaded machine
        # that can pass. Rerunning the commands resumes: complete outputs are skipped.
        if proc.returncode == 0 or "timed out during startup" not in proc.stderr:
            break
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


@pytest.mark.slow
@pytest.mark.timeout(1800)  # several embedded-Ray runs of a whole pipeline; minutes on a loaded machine
def test_readme_tour(docs_env):
    cmds = _block("README.md", "A tour")
    assert len(cmds) == 13, cmds
    cmds = [_sub(cmd, TOUR_SUBS) for cmd in cmds]
    (explain,) = [i for i, cmd in enumerate(cmds) if "--explain UID" in cmd]
    with docs_env.cwd() as here:
        _run_documented(cmds[:explain], here)
        dropped = pq.read_table(here / "data/deduped/rejects", columns=[schema.UID, schema.DUP_OF])
        uid = dropped.filter(dropped.column(schema.DUP_OF).is_valid())[schema.UID][0].as_py()
        cmds[explain] = cmds[explain].replace("UID", uid)
        _run_documented(cmds[explain:], here)
        train = Dataset(str(here / "data/train"))
        assert verify(train)[0] == [] and train.manifest()["totals"]["kept"] > 0
        assert (here / "data/train_report.html").stat().st_size > 0
        assert (here / "data/runs/model/open_clip_model.safetensors").exists()
