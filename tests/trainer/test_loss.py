"""The trainer's loss code on a toy two-tower model: fast (no open_clip model, no data), exact.

Oracles: the contrastive loss written out with plain torch (cross-entropy of scaled cosine logits,
both directions, averaged) and the caption loss as torch's cross-entropy ignoring the pad token; the
accumulated step is checked against one step over the whole batch.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from trainer.config import load_recipe
from trainer.train import Dist, make_loss, train_step


def clip_reference(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# model configs as make_loss reads them: a CoCa has a multimodal tower, a CLIP does not
CLIP_CFG: dict = {}
COCA_CFG: dict = {"multimodal_cfg": {}}


def _parts(loss, img, txt, scale, logits=None, labels=None) -> dict[str, torch.Tensor]:
    """The loss's parts for one whole batch, as the training step adds them up."""
    out = {"contrastive_loss": loss.contrastive(img, txt, scale)}
    if logits is not None:
        out["caption_loss"] = loss.caption(logits, labels, int((labels != loss.pad_id).sum()))
    return out


def _features(n: int = 6, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return img, txt, torch.tensor(7.5)


@pytest.mark.parametrize("weight", [1.0, 0.5, 0.0])
def test_clip_loss_is_the_weighted_symmetric_cross_entropy(weight):
    r = load_recipe(None, [f"loss.contrastive_weight={weight}"])
    loss = make_loss(r, Dist(), CLIP_CFG, pad_id=0)
    img, txt, scale = _features()
    got = _parts(loss, img, txt, scale)
    assert set(got) == {"contrastive_loss"}
    assert got["contrastive_loss"].item() == pytest.approx(weight * clip_reference(img, txt, scale).item(), rel=1e-6)
    # a matched batch scores lower than the same batch with its captions shuffled
    if weight:
        shuffled = _parts(loss, img, txt.roll(1, 0), scale)
        assert shuffled["contrastive_loss"] > _parts(loss, img, img, scale)["contrastive_loss"]


def test_caption_weight_on_a_clip_model_is_refused():
    r = load_recipe(None, ["loss.caption_weight=0.5"])
    with pytest.raises(ValueError, match="caption_weight needs a CoCa model"):
        make_loss(r, Dist(), CLIP_CFG, pad_id=0)


@pytest.mark.parametrize(("cw", "kw"), [(1.0, 2.0), (0.25, 1.0), (0.0, 1.0)])
def test_coca_loss_weights_both_parts_and_ignores_padding(cw, kw):
    r = load_recipe(None, [f"loss.contrastive_weight={cw}", f"loss.caption_weight={kw}"])
    pad = 0
    loss = make_loss(r, Dist(), COCA_CFG, pad_id=pad)
    img, txt, scale = _features(4)
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, 11, generator=g)
    labels = torch.randint(1, 11, (4, 7), generator=g)
    labels[:, 5:] = pad
    got = _parts(loss, img, txt, scale, logits, labels)
    cap = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=pad)
    assert got["caption_loss"].item() == pytest.approx(kw * cap.item(), rel=1e-6)
    assert got["contrastive_loss"].item() == pytest.approx(cw * clip_reference(img, txt, scale).item(), rel=1e-6)


class Toy(torch.nn.Module):
    """Two towers and a learned temperature, returning what open_clip's CLIP returns."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.img = torch.nn.Linear(6, 5)
        self.txt = torch.nn.Embedding(20, 5)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, images, texts):
        return {
            "image_features": F.normalize(self.img(images), dim=-1),
            "text_features": F.normalize(self.txt(texts).mean(1), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_step_equals_one_whole_batch_step(k):
    r = load_recipe(None, [])
    loss = make_loss(r, Dist(), CLIP_CFG, pad_id=0)
    g = torch.Generator().manual_seed(2)
    images, texts = torch.randn(8, 6, generator=g), torch.randint(0, 20, (8, 3), generator=g)
    model = Toy()
    whole = train_step(model, loss, [(images, texts)], contextlib.nullcontext)
    want = _grads(model)
    with torch.no_grad():
        out = model(images, texts)
        ref = clip_reference(out["image_features"], out["text_features"], out["logit_scale"])
    assert whole["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert whole["contrastive_loss"] == pytest.approx(whole["loss"])
    model.zero_grad(set_to_none=True)
    step = 8 // k
    micro = [(images[i:i + step], texts[i:i + step]) for i in range(0, 8, step)]
    got = train_step(model, loss, micro, contextlib.nullcontext)
    assert got["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert set(got) == {"loss", "contrastive_loss"}
    grads = _grads(model)
    assert grads.keys() == want.keys()
    for name in want:
        # the temperature's gradient is counted once, not once per micro-batch
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-7, msg=name)
    assert want["logit_scale"].abs() > 1e-4  # so the check above can see a k-fold count


class SyncToy(Toy):
    """Records, per forward pass, whether gradient sync was on: DDP's ``no_sync`` context, or FSDP2's
    ``set_requires_gradient_sync`` switch (``style``), and outputs a logit bias as SigLIP models do."""

    def __init__(self, style: str):
        super().__init__()
        self.logit_bias = torch.nn.Parameter(torch.tensor(-1.0))
        self.sync, self.seen, self.style = True, [], style

    @contextlib.contextmanager
    def _no_sync(self):
        self.sync = False
        try:
            yield
        finally:
            self.sync = True

    def __getattr__(self, name):
        if name == "no_sync" and self.__dict__.get("style") == "ddp":
            return self._no_sync
        if name == "set_requires_gradient_sync" and self.__dict__.get("style") == "fsdp":
            return lambda on: self.__dict__.__setitem__("sync", on)
        return super().__getattr__(name)

    def forward(self, images, texts):
        self.seen.append(self.sync)
        return {**super().forward(images, texts), "logit_bias": self.logit_bias}


@pytest.mark.parametrize("style", ["ddp", "fsdp", "none"])
def test_gradients_sync_on_the_last_micro_batch_only(style):
    loss = make_loss(load_recipe(None, []), Dist(), CLIP_CFG, pad_id=0)
    g = torch.Generator().manual_seed(3)
    images, texts = torch.randn(8, 6, generator=g), torch.randint(0, 20, (8, 3), generator=g)
    model = SyncToy(style)
    micro = [(images[i:i + 2], texts[i:i + 2]) for i in range(0, 8, 2)]
    got = train_step(model, loss, micro, contextlib.nullcontext)
    # pass 1 (no gradients) then pass 2: sync off for every backward but the last
    off = style != "none"
    assert model.seen == [True] * 4 + [not off] * 3 + [True]
    assert model.sync is True  # switched back on afterwards
    whole = SyncToy(style)
    want = train_step(whole, loss, [(images, texts)], contextlib.nullcontext)
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)


class CocaToy(Toy):
    """A toy CoCa: also next-token logits over a 20-token vocabulary and the labels they predict."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(5, 20)

    def forward(self, images, texts):
        out = super().forward(images, texts)
        tokens = self.txt(texts) + self.img(images)[:, None, :]
        return {**out, "logits": self.head(tokens)[:, :-1], "labels": texts[:, 1:]}


@pytest.mark.parametrize("k", [1, 2])
def test_coca_step_reports_both_losses_and_accumulates_exactly(k):
    r = load_recipe(None, ["loss.caption_weight=2.0"])
    loss = make_loss(r, Dist(), COCA_CFG, pad_id=0)
    g = torch.Generator().manual_seed(4)
    images, texts = torch.randn(4, 6, generator=g), torch.randint(0, 20, (4, 5), generator=g)
    whole_model = CocaToy()
    whole = train_step(whole_model, loss, [(images, texts)], contextlib.nullcontext)
    assert set(whole) == {"loss", "contrastive_loss", "caption_loss"}
    assert whole["loss"] == pytest.approx(whole["contrastive_loss"] + whole["caption_loss"], rel=1e-6)
    with torch.no_grad():
        out = whole_model(images, texts)
        cap = F.cross_entropy(out["logits"].reshape(-1, 20), out["labels"].reshape(-1), ignore_index=0)
    assert whole["caption_loss"] == pytest.approx(2.0 * cap.item(), rel=1e-5)
    model = CocaToy()
    step = 4 // k
    got = train_step(model, loss, [(images[i:i + step], texts[i:i + step]) for i in range(0, 4, step)],
                     contextlib.nullcontext)
    assert got == pytest.approx(whole, rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, dict(whole_model.named_parameters())[name].grad, rtol=1e-4,
                                   atol=1e-6, msg=name)
