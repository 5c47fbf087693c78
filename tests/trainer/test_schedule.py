"""The LR schedule as numbers: each phase at, just before and just after its boundary.

The expected values are written out by hand from the formula in the docstring (linear warmup to
base_lr, then half a cosine down to final_lr), not computed with the function under test.
"""

from __future__ import annotations

import math

import pytest

from trainer.schedule import set_lr, warmup_cosine


def lr(step: int, warmup: int = 4, total: int = 12, base: float = 2.0, final: float = 0.5) -> float:
    return warmup_cosine(step, base_lr=base, warmup_steps=warmup, total_steps=total, final_lr=final)


@pytest.mark.parametrize(
    ("step", "want"),
    [
        (0, 0.5),  # base / warmup: the first step already learns
        (1, 1.0),
        (2, 1.5),
        (3, 2.0),  # the last warmup step reaches base_lr
        (4, 2.0),  # first decay step: progress 0, cos 0 = 1
        (5, 0.5 + 0.75 * (1 + math.cos(math.pi / 8))),  # 1 of 8 decay steps
        (8, 1.25),  # half way: the mean of base and final
        (11, 0.5 + 0.75 * (1 + math.cos(7 * math.pi / 8))),
        (12, 0.5),  # total_steps: final_lr
        (13, 0.5),  # past the end: clamped, never rising again
        (100, 0.5),
    ],
)
def test_warmup_cosine_values(step, want):
    assert lr(step) == pytest.approx(want, abs=1e-12)


def test_no_warmup_starts_at_base_and_default_final_is_zero():
    assert warmup_cosine(0, base_lr=3.0, warmup_steps=0, total_steps=10) == pytest.approx(3.0)
    assert warmup_cosine(5, base_lr=3.0, warmup_steps=0, total_steps=10) == pytest.approx(1.5)
    assert warmup_cosine(10, base_lr=3.0, warmup_steps=0, total_steps=10) == pytest.approx(0.0, abs=1e-12)


def test_one_warmup_step_is_already_base_lr():
    assert lr(0, warmup=1) == pytest.approx(2.0)
    assert lr(1, warmup=1, total=9) == pytest.approx(2.0)  # then the decay starts at progress 0


def test_total_not_beyond_warmup_decays_in_one_step():
    # decay_steps is at least 1: after warmup the next step is already at final_lr
    assert lr(3, warmup=4, total=4) == pytest.approx(2.0)
    assert lr(4, warmup=4, total=4) == pytest.approx(2.0)
    assert lr(5, warmup=4, total=4) == pytest.approx(0.5)
    assert lr(5, warmup=4, total=2) == pytest.approx(0.5)


def test_set_lr_writes_every_group():
    class Opt:
        param_groups = [{"lr": 1.0, "weight_decay": 0.1}, {"lr": 1.0, "weight_decay": 0.0}]

    opt = Opt()
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
