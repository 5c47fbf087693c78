"""`curate models PIPELINE`: every model a pipeline loads is fetched into HF_HOME (or found there, or as a
local folder) before a run; a model that is neither is one line and exit 2. The hub is not reachable
here, so the cache is filled the way the hub client lays it out (``hub/models--ORG--NAME/refs/main``
naming a snapshot folder) and the command runs with ``HF_HUB_OFFLINE=1``: it must find exactly those
files through HF_HOME, which is what a node volume holds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _models(args: list[str], cwd: Path, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "curate.cli", "models", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def _cache(hf_home: Path, repo: str, files: dict[str, bytes]) -> Path:
    """``repo``'s files as the hub client caches them; returns the snapshot folder."""
    base = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = base / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return snap


def test_models_come_from_the_hf_cache_and_nothing_else(tmp_path):
    hf = tmp_path / "hf"
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "output": str(tmp_path / "out"), "input": "urls.parquet", "stages": [
        {"stage": "download"},
        # an open_clip pretrained tag: its weights live in the hub repo open_clip's table names
        {"stage": "clip", "config": {"model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"}},
        {"stage": "recaption", "config": {"model": "someorg/tiny-captioner",
                                          "clip_model": "ViT-B-32", "clip_pretrained": "laion2b_s34b_b79k"}},
    ]}))
    proc = _models([str(pipe)], tmp_path, hf)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "ViT-B-32" in err and "not in the cache" in err

    clip = _cache(hf, "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {"open_clip_pytorch_model.bin": b"w"})
    proc = _models([str(pipe)], tmp_path, hf)
    assert proc.returncode == 2 and "someorg/tiny-captioner" in proc.stderr, proc.stderr
    vlm = _cache(hf, "someorg/tiny-captioner", {"config.json": b"{}", "model.safetensors": b"w"})
    proc = _models([str(pipe)], tmp_path, hf)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    # each model once (recaption's scorer is the clip step's model), each resolved inside HF_HOME
    assert lines == [f"clip: open_clip ViT-B-32 (laion2b_s34b_b79k) -> {clip / 'open_clip_pytorch_model.bin'}",
                     f"recaption: transformers someorg/tiny-captioner -> {vlm}"], lines


def test_the_demo_pipelines_models_are_its_local_folders(docs_env):
    proc = _models([str(ROOT / "pipelines" / "demo.yaml")], docs_env.root, docs_env.root / "hf")
    assert proc.returncode == 0, proc.stderr
    models = docs_env.out / "models"
    assert proc.stdout.strip().splitlines() == [
        f"clip: open_clip demo-output/models/clip -> {models / 'clip'}",
        f"safety: transformers demo-output/models/text_classifier -> {models / 'text_classifier'}",
        f"recaption: transformers demo-output/models/vlm/blip -> {models / 'vlm' / 'blip'}",
    ]
    assert not (docs_env.root / "hf").exists()  # nothing was fetched for them


def test_a_model_that_is_nowhere_is_one_line(tmp_path):
    pipe = tmp_path / "p.yaml"
    pipe.write_text(yaml.safe_dump({"name": "p", "output": "out", "input": "in", "stages": [
        {"stage": "clip", "config": {"model": "models/missing-clip"}}]}))
    proc = _models([str(pipe)], tmp_path, tmp_path / "hf")
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "models/missing-clip" in err, err
    proc = _models([str(pipe), "--set", "clip.pretrained=no_such_tag", "--set", "clip.model=ViT-B-32"],
                   tmp_path, tmp_path / "hf")
    assert proc.returncode == 2 and "no pretrained tag 'no_such_tag'" in proc.stderr, proc.stderr
