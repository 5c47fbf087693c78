"""Heads on CLIP embeddings: the file format, conversion of published heads, thresholds, refusals."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safety_data import embedding_dataset

from curate import schema
from curate.cli import main
from curate.dataset import Dataset
from curate.heads import HeadError, HeadMeta, convert, load_head
from curate.runner import run_stage
from curate.testing.safety import write_head

DIM = 24


def _mlp(dim: int, seed: int) -> torch.nn.Sequential:
    """The layout of LAION's improved aesthetic predictor (Linear/Dropout stack), at toy widths."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8),
                               torch.nn.ReLU(), torch.nn.Linear(8, 1)).eval()


def _nsfw_head(tmp_path, seed: int = 0):
    """A converted torch MLP (relu between layers, sigmoid out) and the module itself as the oracle."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(DIM, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)).eval()
    with torch.no_grad():
        net[0].weight.mul_(6.0)
    src = tmp_path / "nsfw.pth"
    torch.save(net.state_dict(), src)
    out = convert(str(src), str(tmp_path / "nsfw.safetensors"),
                  HeadMeta("ViT-L-14", DIM, "image", "relu", "sigmoid", "nsfw", "openai"))
    return out, lambda x: torch.sigmoid(net(torch.from_numpy(x))).detach().numpy()[:, 0]


def test_converted_heads_score_like_the_original_modules(tmp_path):
    # a single Linear (LAION's sa_0_4 aesthetic head layout: keys weight/bias), identity output
    lin = torch.nn.Linear(DIM, 1)
    torch.save(lin.state_dict(), tmp_path / "lin.pth")
    h = load_head(convert(str(tmp_path / "lin.pth"), str(tmp_path / "lin.safetensors"),
                          HeadMeta("ViT-L-14", DIM, output="identity")))
    x = np.random.default_rng(0).normal(size=(7, DIM)).astype(np.float32)
    np.testing.assert_allclose(h.score(x), lin(torch.from_numpy(x)).detach().numpy()[:, 0], rtol=1e-5, atol=1e-6)
    # the improved-aesthetic MLP: layers.N keys, Dropout in between, no activation except where given
    mlp = _mlp(DIM, 1)
    torch.save({"layers." + k: v for k, v in mlp.state_dict().items()}, tmp_path / "mlp.pth")
    h = load_head(convert(str(tmp_path / "mlp.pth"), str(tmp_path / "mlp.safetensors"),
                          HeadMeta("ViT-L-14", DIM, activation="none", output="identity")))
    # our "none" activation means no activation at all; the oracle module has one ReLU -> remove it
    plain = torch.nn.Sequential(mlp[0], mlp[2], mlp[4]).eval()
    np.testing.assert_allclose(h.score(x), plain(torch.from_numpy(x)).detach().numpy()[:, 0], rtol=1e-4, atol=1e-5)
    # Keras Dense kernels ([in, out]) with a Normalization layer in front, sigmoid out
    rng = np.random.default_rng(2)
    k0, b0, k1, b1 = rng.normal(size=(DIM, 5)), rng.normal(size=5), rng.normal(size=(5, 1)), rng.normal(size=1)
    mean, var = rng.normal(size=DIM), rng.uniform(0.5, 2.0, size=DIM)
    np.savez(tmp_path / "k.npz", kernel_0=k0, bias_0=b0, kernel_1=k1, bias_1=b1, mean=mean, variance=var)
    h = load_head(convert(str(tmp_path / "k.npz"), str(tmp_path / "k.safetensors"), HeadMeta("ViT-L-14", DIM)))
    z = (x - mean) / np.sqrt(var)
    want = 1 / (1 + np.exp(-(np.maximum(z @ k0 + b0, 0) @ k1 + b1)[:, 0]))
    np.testing.assert_allclose(h.score(x), want, rtol=1e-4, atol=1e-5)


def test_torch_format_loads_with_weights_only(tmp_path):
    w = np.random.default_rng(0).normal(size=(1, DIM)).astype(np.float32)
    torch.save({"format": "curate-head/1", "metadata": {"format": "curate-head/1", "embedding_model": "ViT-B-32",
                                                          "embedding_dim": str(DIM), "output": "identity"},
                "tensors": {"layer0.weight": torch.from_numpy(w), "layer0.bias": torch.zeros(1)}}, tmp_path / "h.pt")
    h = load_head(str(tmp_path / "h.pt"))
    x = np.eye(DIM, dtype=np.float32)[:3]
    np.testing.assert_allclose(h.score(x), w[0, :3], rtol=1e-6)
    # a bare state dict does not say what embedding it wants: refused, pointing at the converter
    torch.save(torch.nn.Linear(DIM, 1).state_dict(), tmp_path / "bare.pt")
    with pytest.raises(HeadError, match="convert"):
        load_head(str(tmp_path / "bare.pt"))


def test_threshold_drops_exactly_the_rows_above_it(ray_session, tmp_path):
    ds, x, uids = embedding_dataset(tmp_path / "in", [40, 35], DIM)
    head, oracle = _nsfw_head(tmp_path)
    want = oracle(x)
    threshold = float(np.median(want))
    above = {u for u, s in zip(uids, want, strict=True) if s > threshold}
    assert 20 <= len(above) <= 55
    summary = run_stage("safety", ds.url, str(tmp_path / "out"),
                        config={"heads": [{"name": "nsfw", "path": str(head), "drop_above": threshold}]})
    out = Dataset(str(tmp_path / "out"))
    rejected = [t for _, t in out.iter_rejects()]
    kept = [t for _, t in out.iter_shards()]
    rej_uids = {u for t in rejected for u in t.column(schema.UID).to_pylist()}
    assert rej_uids == above
    assert summary["drops"] == {"safety:nsfw": len(above)}
    for t in rejected:
        assert set(t.column(schema.DROP_REASON).to_pylist()) == {"safety:nsfw"}
    # every row, kept or dropped, carries its score in LAION's column name
    got = {u: s for t in kept + rejected
           for u, s in zip(t.column(schema.UID).to_pylist(), t.column(schema.PUNSAFE).to_pylist(), strict=True)}
    np.testing.assert_allclose([got[u] for u in uids], want, rtol=1e-4, atol=1e-5)
    assert all(pc.max(t.column(schema.PUNSAFE)).as_py() <= threshold for t in kept)
    # the report's safety section: drops by rule, the head's scores over kept and dropped rows
    from curate.report import build_report, render_html

    report = build_report(out)
    (sec,) = report.data["safety"]
    assert sec["drops"] == {"safety:nsfw": len(above)}
    h = sec["heads"]["nsfw"]
    assert h["column"] == schema.PUNSAFE and h["rejected_n"] == len(above) and h["kept_max"] <= threshold
    assert "Content safety" in render_html(report)


def test_several_heads_user_head_and_text_input(tmp_path):
    """Arrow in, Arrow out: nsfw (drop_above), aesthetic (drop_below), a user head on text embeddings."""
    from curate.stage import ShardContext
    from curate.stages.safety import SafetyConfig, SafetyStage

    ds, x, uids = embedding_dataset(tmp_path / "in", [60], DIM)
    nsfw = write_head(tmp_path / "n.safetensors", DIM, "ViT-L-14", hidden=(8,), seed=1)
    aes = write_head(tmp_path / "a.safetensors", DIM, "ViT-L-14", activation="none", output="identity", seed=2,
                     bias=5.0)
    clicks = write_head(tmp_path / "c.safetensors", DIM, "ViT-L-14", input="text", seed=3)
    cfg = SafetyConfig(heads=[{"name": "nsfw", "path": str(nsfw), "drop_above": 0.7},
                              {"name": "aesthetic", "path": str(aes), "drop_below": 4.5},
                              {"name": "clickbait", "path": str(clicks)}])
    stage = SafetyStage(cfg)
    stage.check(ds)
    stage.setup()
    table = ds.read_shard(0)
    ctx = ShardContext(shard=0, input_path=ds.url, input=ds, output=Dataset(str(tmp_path / "o")), plan_dir="",
                       options=None)
    out = stage.process(table, ctx)
    n = np.array(out.column(schema.PUNSAFE).to_pylist())
    a = np.array(out.column(schema.AESTHETIC_SCORE).to_pylist())
    c = out.column(schema.head_column("clickbait")).to_pylist()
    assert schema.head_column("clickbait") == "clickbait_score" and len(c) == 60
    want = [("safety:nsfw" if n[i] > 0.7 else "safety:aesthetic" if a[i] < 4.5 else None) for i in range(60)]
    assert out.column(schema.DROP_REASON).to_pylist() == want
    assert 0 < want.count(None) < 60 and "safety:aesthetic" in want and "safety:nsfw" in want
    # the text head read the text embeddings, not the image ones
    t = np.array(table.column(schema.TEXT_EMBEDDING).to_pylist(), np.float32)
    np.testing.assert_allclose(c, load_head(str(clicks)).score(t), rtol=1e-5, atol=1e-6)


def _cli(args) -> int:
    return main(args)


@pytest.mark.parametrize("case", ["missing", "width", "model"])
def test_bad_heads_are_refused_before_any_work(tmp_path, capsys, case):
    ds, _, _ = embedding_dataset(tmp_path / "in", [5], DIM)
    path = tmp_path / "h.safetensors"
    if case == "width":
        write_head(path, DIM * 2, "ViT-L-14")
    elif case == "model":
        write_head(path, DIM, "ViT-B-32")
    out = tmp_path / "out"
    rc = _cli(["safety", "--input", ds.url, "--output", str(out), "--set", f"heads=[{{name: nsfw, path: {path}}}]"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    expect = {"missing": "head file not found", "width": f"takes {DIM * 2}-d embeddings", "model": "ViT-B-32"}[case]
    assert expect in err and str(path) in err
    assert not out.exists()


def test_heads_on_computed_embeddings_match_stored_ones(tmp_path, tiny_clip_dir):
    """Without embedding columns the stage computes them with the clip stage's own code."""
    from safety_data import demo_images, image_dataset

    from curate.stage import ShardContext
    from curate.stages.clip import ClipConfig, ClipStage
    from curate.stages.safety import SafetyConfig, SafetyStage
    from curate.testing.safety import tiny_clip_dim

    rows = [(b, c) for _, b, c, _ in demo_images()[:12]]
    ds = image_dataset(tmp_path / "img", rows)
    dim = tiny_clip_dim(tiny_clip_dir)
    head = write_head(tmp_path / "h.safetensors", dim, tiny_clip_dir, hidden=(8,))
    ctx = ShardContext(shard=0, input_path=ds.url, input=ds, output=Dataset(str(tmp_path / "o")), plan_dir="",
                       options=None)
    stage = SafetyStage(SafetyConfig(heads=[{"name": "nsfw", "path": str(head)}], model=tiny_clip_dir))
    stage.check(ds)
    stage.setup()
    got = stage.process(ds.read_shard(0), ctx).column(schema.PUNSAFE).to_numpy()
    clip = ClipStage(ClipConfig(model=tiny_clip_dir, pretrained=None, embeddings=True))
    emb = np.array(clip.score(ds.read_shard(0), ds).column(schema.IMAGE_EMBEDDING).to_pylist(), np.float32)
    np.testing.assert_allclose(got, load_head(str(head)).score(emb), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_computed_embeddings_on_gpu_give_the_cpu_scores(tmp_path, tiny_clip_dir):
    from safety_data import demo_images, image_dataset

    from curate.stage import ShardContext
    from curate.stages.safety import SafetyConfig, SafetyStage
    from curate.testing.safety import tiny_clip_dim

    ds = image_dataset(tmp_path / "img", [(b, c) for _, b, c, _ in demo_images()[:8]])
    head = write_head(tmp_path / "h.safetensors", tiny_clip_dim(tiny_clip_dir), tiny_clip_dir, hidden=(8,))
    got = {}
    for device in ("cpu", "cuda"):
        stage = SafetyStage(SafetyConfig(heads=[{"name": "nsfw", "path": str(head)}], model=tiny_clip_dir,
                                         device=device))
        stage.setup()
        ctx = ShardContext(shard=0, input_path=ds.url, input=ds, output=Dataset(str(tmp_path / "o")), plan_dir="",
                           options=None)
        got[device] = stage.process(ds.read_shard(0), ctx).column(schema.PUNSAFE).to_numpy()
    # GPU decodes with DALI and runs bf16: close to the CPU scores, not bit-equal
    np.testing.assert_allclose(got["cuda"], got["cpu"], atol=0.05)


def test_convert_command(tmp_path, capsys):
    from curate import heads

    lin = torch.nn.Linear(DIM, 1)
    torch.save(lin.state_dict(), tmp_path / "sa_0_4_linear.pth")
    out = tmp_path / "aesthetic.safetensors"
    assert heads.main(["convert", str(tmp_path / "sa_0_4_linear.pth"), str(out), "--embedding-model", "ViT-L-14",
                       "--embedding-pretrained", "openai", "--embedding-dim", str(DIM), "--output", "identity"]) == 0
    assert heads.main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert '"embedding_dim": "24"' in shown and '"layers": [\n  [\n   1,\n   24' in shown
    # a width that does not match the state dict is refused with one line and exit 2
    assert heads.main(["convert", str(tmp_path / "sa_0_4_linear.pth"), str(tmp_path / "bad.safetensors"),
                       "--embedding-model", "ViT-L-14", "--embedding-dim", "768"]) == 2
    assert "768" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["aesthetic.safetensors", "sa_0_4_linear.pth"]
