"""Peak memory of one training step's contrastive loss: local logits vs global logits, 2 gloo ranks.

At global batch N over W ranks, each rank holds N/W image and text embeddings (D=512, fp32, L2-normalised,
leaf tensors that need gradients) and a learnable temperature. One step = loss forward + backward.

- ours: ``trainer.loss.Loss`` (softmax): embeddings gathered with gradients, each rank scores its own
  N/W rows against all N columns, so its logits are (N/W) x N.
- also shown, not in the ratio: local logits with torch's own ``F.cross_entropy`` (no recomputation),
  to separate what the local logits save from what rebuilding them in the backward saves.
- baseline: open_clip's ``ClipLoss(local_loss=False, gather_with_grad=True)``, what the trainer used
  before: every rank builds the full N x N logits of both directions.

Both runs check that the two losses agree (the local loss, averaged over ranks, is the global loss).
Each mode runs in two fresh processes (``torch.multiprocessing``, gloo on 127.0.0.1); a rank's peak is
its resident-set high-water mark (``getrusage``) minus its resident set just before the step; the
figure per mode is the larger of the two ranks'.

Last line: ``ratio: X.XX`` = baseline (global) peak / ours (local) peak.

Run: ``.venv/bin/python bench/train_loss_memory.py [--n 8192] [--dim 512]``
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WORLD = 2


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, mode: str, n: int, dim: int, port: int, out: dict) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    local = n // WORLD
    g = torch.Generator().manual_seed(rank)
    image = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(local, dim, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    if mode == "local":
        from trainer.loss import Loss

        loss_fn = Loss(kind="softmax", contrastive_weight=1.0, caption_weight=0.0, pad_id=0, rank=rank, world=WORLD)
        step = lambda: loss_fn.contrastive(image, text, scale)  # noqa: E731
    elif mode == "local_unfused":
        from trainer.loss import gather_with_grad

        def step():
            labels = torch.arange(local) + rank * local
            all_text, all_image = gather_with_grad(text, WORLD), gather_with_grad(image, WORLD)
            return (torch.nn.functional.cross_entropy(scale * image @ all_text.T, labels)
                    + torch.nn.functional.cross_entropy(scale * text @ all_image.T, labels)) / 2
    else:
        from open_clip.loss import ClipLoss

        clip = ClipLoss(local_loss=False, gather_with_grad=True, rank=rank, world_size=WORLD)
        step = lambda: clip(image, text, scale)  # noqa: E731
    dist.barrier()
    before = _rss_bytes()
    loss = step()
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    value = torch.tensor([loss.item()], dtype=torch.float64)
    dist.all_reduce(value)
    out[rank] = (peak, float(value) / WORLD, image.grad.norm().item())
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(mode: str, n: int, dim: int) -> tuple[int, float, float]:
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(mode, n, dim, _free_port(), out), nprocs=WORLD, join=True)
        results = [out[r] for r in range(WORLD)]
    return max(r[0] for r in results), results[0][1], results[0][2]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192, help="global batch")
    p.add_argument("--dim", type=int, default=512)
    args = p.parse_args(argv)
    global_peak, global_loss, global_grad = run("global", args.n, args.dim)
    local_peak, local_loss, local_grad = run("local", args.n, args.dim)
    unfused_peak, unfused_loss, _ = run("local_unfused", args.n, args.dim)
    assert abs(unfused_loss - local_loss) <= 1e-4 * abs(local_loss)
    # open_clip's global loss on every rank; ours: each rank's share, averaged here. The same number.
    assert abs(global_loss - local_loss) <= 1e-4 * abs(global_loss), (global_loss, local_loss)
    print(f"N={args.n} over {WORLD} gloo ranks, D={args.dim}, fp32; loss {local_loss:.5f} (both)")
    print(f"gradient norm of rank 0's image embeddings: global {global_grad:.6g}, local {local_grad:.6g}")
    for name, peak, logits in (("global N x N, open_clip ClipLoss      (baseline)", global_peak, args.n**2),
                               ("local N/W x N, F.cross_entropy       (shown)", unfused_peak, args.n**2 // WORLD),
                               ("local N/W x N, logits rebuilt in bwd (ours)", local_peak, args.n**2 // WORLD)):
        print(f"{name}: peak {peak / 2**20:8.1f} MiB per rank, {peak / logits:5.1f} bytes per logit held")
    print(f"ratio: {global_peak / local_peak:.2f}")


if __name__ == "__main__":
    main()
