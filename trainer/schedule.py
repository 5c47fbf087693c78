"""Learning-rate schedule as pure functions of the step (no state to checkpoint but the step)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, base_lr: float, warmup_steps: int, total_steps: int, final_lr: float = 0.0) -> float:
    """Linear warmup from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to ``final_lr``.

    ``step`` counts optimiser steps from 0; the LR returned is the one to use for that step. Warmup
    starts at ``base_lr / warmup_steps`` rather than 0 so the first step is not wasted.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    """Write ``lr`` into every param group (groups differ only in weight decay here)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
