"""GPU checks of trainer.eval (skipped without CUDA): bf16 zero-shot and retrieval agree with fp32 CPU."""

from __future__ import annotations

import json

import pytest
from conftest import read_metrics
from test_eval import sets, trained  # noqa: F401 - module fixtures shared with the CPU tests

from trainer import eval as E

pytestmark = pytest.mark.gpu


def test_cuda_bf16_eval_agrees_with_cpu(trained, sets, dataset, tmp_path):  # noqa: F811
    root = sets["root"]
    args = ["--checkpoint", str(trained / "model"), "--zeroshot", str(root / "real"), "--classnames",
            str(root / "classnames.txt"), "--templates", str(root / "templates.txt"), "--retrieval", dataset["val"]]
    assert E.main([*args, "--output", str(tmp_path / "gpu")]) == 0  # CUDA is present: bf16 autocast
    gpu = json.loads((tmp_path / "gpu" / "metrics.jsonl").read_text())
    _, evals = read_metrics(trained)  # the fixture trained and evaluated on the CPU
    cpu = evals[-1]
    n = cpu["eval/zeroshot/real/n"]
    # bf16 may flip a near tie or two; anything more is a bug
    assert abs(gpu["zeroshot/real/top1"] - cpu["eval/zeroshot/real/top1"]) <= 2 / n
    assert abs(gpu["eval/image_to_text_R@5"] - cpu["eval/image_to_text_R@5"]) <= 2 / 24
