"""The training losses: contrastive (softmax or sigmoid) over the global batch, and CoCa's caption loss.

Contrastive losses are *local*: each rank scores only its own rows against the whole gathered batch,
so its logits are (N/W) x N, not N x N. Features are gathered with gradients (the backward of the
gather sums every rank's gradient into the owner's slot), so after DDP's gradient average the step is
the exact gradient of the full-batch loss, which is the mean of the ranks' local losses:

- softmax (CLIP): cross-entropy of image->text and text->image rows, halved; every rank holds N/W rows of
  each direction, so the mean over ranks of the local means is the global mean.
- sigmoid (SigLIP): ``-sum log sigmoid(z * (scale * <i, t> + bias)) / n`` with z = +1 on matching pairs,
  -1 elsewhere, over this rank's image rows against every text; the mean over ranks is the full-batch loss
  (the sum over all N x N pairs divided by N).

The caption loss is a token mean over non-padding labels. With accumulation it is computed per
micro-batch as a *sum* over that micro-batch's tokens divided by the token count of the whole local
batch, so the full-vocabulary logits of one micro-batch at a time exist and the sum over micro-batches
is the full-batch mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_with_grad(x: torch.Tensor, world: int) -> torch.Tensor:
    """Concatenate ``x`` from every rank in rank order; gradients flow back to each owner."""
    if world == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()))


class _ScaledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of the rows of ``scale * a @ b.T`` against column ``labels``.

    Same value and gradients as ``F.cross_entropy(scale * a @ b.T, labels)``, but autograd keeps only
    ``a``, ``b`` and one log-sum-exp per row: the (n, N) logits are rebuilt in the backward and turned
    into the gradient in place, so one (n, N) fp32 matrix exists at a time instead of the logits, the
    log-softmax and two gradients of that size.
    """

    @staticmethod
    def forward(ctx, a, b, scale, labels):
        ctx.save_for_backward(a, b, scale, labels)
        with torch.autocast(a.device.type, enabled=False):  # fp32 logits in both passes, so they agree
            logits = _logits(a, b, scale)
            picked = logits[torch.arange(len(labels), device=labels.device), labels]
            lse = torch.logsumexp(logits, dim=1)
        ctx.lse = lse
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad):
        a, b, scale, labels = ctx.saved_tensors
        n = len(labels)
        with torch.autocast(a.device.type, enabled=False):
            # softmax - one_hot, times d(loss)/d(logit) of the mean: the gradient w.r.t. the scaled logits
            p = _logits(a, b, scale).sub_(ctx.lse[:, None]).exp_()
            p[torch.arange(n, device=p.device), labels] -= 1
            p.mul_(grad.float() / n)
            pb = p @ b.float()  # (n, D)
            grad_a = (pb * scale.float()).to(a.dtype)
            grad_b = (p.T @ a.float()).mul_(scale.float()).to(b.dtype)
            grad_scale = (pb * a.float()).sum().to(scale.dtype).reshape(scale.shape)
        return grad_a, grad_b, grad_scale, None


def _logits(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (a.float() @ b.float().T).mul_(scale.float())


class Loss:
    """The recipe's loss for one rank; see the module docstring for the maths."""

    def __init__(self, *, kind: str, contrastive_weight: float, caption_weight: float, pad_id: int,
                 rank: int = 0, world: int = 1):
        if kind not in ("softmax", "sigmoid"):
            raise ValueError(f"unknown contrastive loss {kind!r}")
        self.kind, self.pad_id, self.rank, self.world = kind, pad_id, rank, world
        self.contrastive_weight, self.caption_weight = contrastive_weight, caption_weight

    def contrastive(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    logit_bias: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's share of the full-batch contrastive loss, weighted (rows: this rank's pairs)."""
        n = image_features.shape[0]
        all_text = gather_with_grad(text_features, self.world)
        # Logits are (n, N): this rank's rows only. They are left unnamed, so each direction's logits are
        # freed once its log-softmax has its output (which is all the backward keeps).
        if self.kind == "sigmoid":
            if logit_bias is None:
                raise ValueError("the sigmoid loss needs a model with a logit_bias")
            logits = (logit_scale * image_features @ all_text.T + logit_bias).float()
            # z * logit with z = -1 everywhere but the matching pairs (+1)
            logits = -logits.index_put((torch.arange(n), torch.arange(n) + self.rank * n),
                                       -logits.diagonal(self.rank * n), accumulate=False)
            loss = -F.logsigmoid(logits).sum() / n
        else:
            all_image = gather_with_grad(image_features, self.world)
            labels = torch.arange(n, device=image_features.device) + self.rank * n
            loss = (_ScaledCrossEntropy.apply(image_features, all_text, logit_scale, labels)
                    + _ScaledCrossEntropy.apply(text_features, all_image, logit_scale, labels)) / 2
        return self.contrastive_weight * loss

    def caption_tokens(self, texts: torch.Tensor) -> int:
        """Non-padding label tokens of a batch of token ids (labels are the ids shifted by one)."""
        return int((texts[:, 1:] != self.pad_id).sum())

    def caption(self, logits: torch.Tensor, labels: torch.Tensor, total_tokens: int) -> torch.Tensor:
        """Weighted token cross-entropy of one micro-batch, summed and divided by the batch's tokens."""
        ce = F.cross_entropy(logits.float().permute(0, 2, 1), labels, ignore_index=self.pad_id, reduction="sum")
        return self.caption_weight * ce / max(total_tokens, 1)
