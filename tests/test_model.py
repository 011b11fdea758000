"""model.py against diffusers' QwenImageTransformer2DModel (the independent reference), on tiny random models
saved in the official layout. If a parity test fails, our MMDiT computes something other than the official one."""
import json
import os

import pytest
import torch

import lora
import model as M
from pack import collate, pack, unified_sequence

diffusers = pytest.importorskip("diffusers")

CONFIGS = {
    "small": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), in_channels=16, out_channels=4),
    "wide": dict(num_layers=1, attention_head_dim=32, num_attention_heads=3, joint_attention_dim=40, axes_dims_rope=(8, 12, 12), in_channels=64, out_channels=16),
}


def random_reference(cfg, seed=0):
    torch.manual_seed(seed)
    ref = diffusers.QwenImageTransformer2DModel(**cfg)
    with torch.no_grad():  # diffusers' default init leaves some outputs trivially zero; perturb everything
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 2 else 0.2))
    return ref.eval()


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    ref = random_reference(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(folder, max_shard_size="50KB")  # sharded + index, as the official folders are
    assert os.path.exists(folder / "diffusion_pytorch_model.safetensors.index.json")
    return ref, M.load_mmdit(str(folder), dtype=torch.float32), folder


def run_ref(ref, x, shapes, txt, mask, t):
    with torch.no_grad():
        return ref(x, txt, mask, t, img_shapes=[[(1, h, w) for h, w in shapes]]).sample


# (target, references...) token grids: non-square, 0–5 references of different sizes
CASES = [
    [(3, 4)],
    [(4, 4), (2, 6)],
    [(2, 5), (3, 3), (6, 2)],
    [(5, 3), (2, 2), (4, 1), (1, 7), (3, 2), (2, 3)],
]


@pytest.mark.parametrize("shapes", CASES)
def test_parity_with_diffusers_per_sample(pair, shapes):
    """Same weights, same inputs, padded text mask → ≤1e-5. Failing means a wrong block, RoPE or embedding."""
    ref, ours, _ = pair
    cfg = ours.cfg
    torch.manual_seed(len(shapes))
    N, L = sum(h * w for h, w in shapes), 9
    x, txt = torch.randn(1, N, cfg.in_channels), torch.randn(1, L, cfg.joint_attention_dim)
    mask = torch.ones(1, L, dtype=torch.bool)
    mask[0, 6:] = False  # three padded text tokens
    t = torch.tensor([0.63])
    expect = run_ref(ref, x, shapes, txt, mask, t)
    with torch.no_grad():
        got = ours(x, [shapes], txt, mask, t)
    assert expect.abs().max() > 0.1  # a meaningful output, not a trivially zero one
    assert (got - expect).abs().max().item() <= 1e-5


def test_mixed_shape_batch_matches_each_sample_alone(pair):
    """One batch, per-sample H, different reference counts and text lengths. Each sample must equal
    diffusers run on it alone; padding rows and padded text must not change any real row."""
    ref, ours, _ = pair
    cfg = ours.cfg
    torch.manual_seed(1)
    samples = [(CASES[b], 4 + 3 * b) for b in range(4)]
    seqs, txts = [], []
    for shapes, L in samples:
        seqs.append(torch.randn(sum(h * w for h, w in shapes), cfg.in_channels))
        txts.append(torch.randn(L, cfg.joint_attention_dim))
    shapes = [s for s, _ in samples]
    x = collate(seqs, shapes)
    Lmax = max(L for _, L in samples)
    txt = torch.zeros(4, Lmax, cfg.joint_attention_dim)
    mask = torch.zeros(4, Lmax, dtype=torch.bool)
    for b, e in enumerate(txts):
        txt[b, : len(e)], mask[b, : len(e)] = e, True
    t = torch.tensor([0.1, 0.5, 0.77, 1.0])
    with torch.no_grad():
        out = ours(x, shapes, txt, mask, t)
        # garbage in every padded place must change nothing real
        x2, txt2 = x.clone(), txt.clone()
        for b, s in enumerate(seqs):
            x2[b, len(s):] = 100 * torch.randn_like(x2[b, len(s):])
        txt2[~mask] = 100 * torch.randn_like(txt2[~mask])
        out2 = ours(x2, shapes, txt2, mask, t)
    for b, (s, e) in enumerate(zip(seqs, txts)):
        n = len(s)
        alone = run_ref(ref, s[None], shapes[b], e[None], torch.ones(1, len(e), dtype=torch.bool), t[b : b + 1])
        assert (out[b, :n] - alone[0]).abs().max().item() <= 1e-5, f"sample {b} differs from running it alone"
        assert (out2[b, :n] - out[b, :n]).abs().max().item() <= 1e-5, f"padding leaked into sample {b}"
        assert not out[b, n:].any()  # padding rows predict zero


def test_save_roundtrip_loads_in_diffusers(pair, tmp_path):
    """save_mmdit writes a folder diffusers loads with identical outputs (and shards + index when asked)."""
    _, ours, _ = pair
    M.save_mmdit(ours, str(tmp_path / "t"), max_shard_bytes=40_000)
    assert os.path.exists(tmp_path / "t" / "diffusion_pytorch_model.safetensors.index.json")
    theirs = diffusers.QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "t")).eval()
    again = M.load_mmdit(str(tmp_path / "t"))
    shapes = [(3, 2), (2, 4)]
    torch.manual_seed(3)
    x, txt = torch.randn(1, 14, ours.cfg.in_channels), torch.randn(1, 5, ours.cfg.joint_attention_dim)
    mask, t = torch.ones(1, 5, dtype=torch.bool), torch.tensor([0.4])
    with torch.no_grad():
        a, b = ours(x, [shapes], txt, mask, t), again(x, [shapes], txt, mask, t)
    assert (a - b).abs().max().item() <= 1e-5  # same weights; BLAS paths may differ by memory alignment
    assert (run_ref(theirs, x, shapes, txt, mask, t) - a).abs().max().item() <= 1e-5
    # a second save with one shard must not leave the old index shadowing the new weights
    M.save_mmdit(ours, str(tmp_path / "t"))
    assert sorted(f for f in os.listdir(tmp_path / "t")) == ["config.json", "diffusion_pytorch_model.safetensors"]


def test_official_bin_loads_same_tensors(pair, tmp_path):
    """The official release is one torch.save'd .bin; it must load (weights_only, mmap) to the same tensors."""
    ref, ours, folder = pair
    d = tmp_path / "bin"
    d.mkdir()
    (d / "config.json").write_text((folder / "config.json").read_text())
    torch.save({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}, d / "diffusion_pytorch_model.bin")
    got = M.load_mmdit(str(d))
    for k, v in got.state_dict().items():
        assert v.dtype == torch.bfloat16  # dtype=None keeps what is stored
        assert torch.equal(v, ref.state_dict()[k].to(torch.bfloat16)), k
    assert M.load_mmdit(str(d), dtype=torch.float32).proj_out.weight.dtype == torch.float32


def test_bad_checkpoints_give_one_line_errors(pair, tmp_path):
    ref, ours, folder = pair
    sd = {k: v.clone() for k, v in ref.state_dict().items()}
    cfg = json.loads((folder / "config.json").read_text())

    def folder_with(tensors, name="diffusion_pytorch_model.bin"):
        d = tmp_path / f"case{len(os.listdir(tmp_path))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        torch.save(tensors, d / name)
        return str(d)

    extra = dict(sd, **{"transformer_blocks.0.attn.bogus": torch.zeros(1)})
    missing = {k: v for k, v in sd.items() if k != "proj_out.bias"}
    wrong = dict(sd, **{"img_in.weight": torch.zeros(3, 3)})
    for tensors, words in [(extra, "unexpected"), (missing, "missing"), (wrong, "wrong shape")]:
        with pytest.raises(ValueError, match=words) as e:
            M.load_mmdit(folder_with(tensors))
        assert "\n" not in str(e.value)

    # a truncated safetensors shard
    d = tmp_path / "trunc"
    M.save_mmdit(ours, str(d))
    f = d / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model") as e:
        M.load_mmdit(str(d))
    assert "\n" not in str(e.value)

    with pytest.raises(ValueError, match="no config.json"):
        M.load_mmdit(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unsupported"):
        M.MMDiTConfig.from_dict(dict(cfg, zero_cond_t=True))


def test_forward_rejects_inconsistent_inputs(pair):
    _, ours, _ = pair
    cfg = ours.cfg
    x, txt = torch.randn(1, 10, cfg.in_channels), torch.randn(1, 4, cfg.joint_attention_dim)
    mask, t = torch.ones(1, 4, dtype=torch.bool), torch.tensor([0.5])
    with pytest.raises(ValueError, match="describe 12 tokens but x has 10 rows"):
        ours(x, [[(3, 4)]], txt, mask, t)
    with pytest.raises(ValueError, match="channels"):
        ours(torch.randn(1, 10, cfg.in_channels + 1), [[(2, 5)]], txt, mask, t)
    with pytest.raises(ValueError, match="entries for a batch"):
        ours(x, [[(2, 5)], [(2, 5)]], txt, mask, t)


def test_gradient_checkpointing_same_gradients(pair):
    """Checkpointing recomputes activations; it must not change the loss or any gradient."""
    _, ours, _ = pair
    cfg = ours.cfg
    torch.manual_seed(5)
    x, txt = torch.randn(2, 10, cfg.in_channels), torch.randn(2, 3, cfg.joint_attention_dim)
    mask, t = torch.ones(2, 3, dtype=torch.bool), torch.tensor([0.3, 0.9])
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.gradient_checkpointing = ckpt
        ours(x, [[(2, 5)], [(2, 3), (2, 2)]], txt, mask, t).pow(2).mean().backward()
        # the last block's text-stream output is discarded (as in the official model): those weights get no grad
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert len(grads[0]) == len(grads[1]) > 0
    ours.gradient_checkpointing = False
    ours.zero_grad()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_lora_starts_as_identity_and_merges_exactly(pair, tmp_path):
    _, ours, folder = pair
    model = M.load_mmdit(str(folder), dtype=torch.float32)
    torch.manual_seed(7)
    x, txt = torch.randn(1, 6, model.cfg.in_channels), torch.randn(1, 3, model.cfg.joint_attention_dim)
    args = (x, [[(2, 3)]], txt, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.5]))
    with torch.no_grad():
        base = model(*args)
        params = lora.add_lora(model, rank=4, alpha=8)
        assert torch.equal(model(*args), base)  # B = 0 at init
        assert all(p.requires_grad for p in params) and not model.img_in.weight.requires_grad
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
        with_lora = model(*args)
        assert (with_lora - base).abs().max() > 1e-3
        lora.merge_lora(model)
        assert not any(".lora_" in k for k in model.state_dict())
        assert (model(*args) - with_lora).abs().max().item() <= 1e-5


def test_bf16_close_to_fp32(pair):
    """The official casts keep a bf16 forward close to fp32 (a loose check: bf16 has 8 mantissa bits)."""
    _, ours, folder = pair
    low = M.load_mmdit(str(folder), dtype=torch.bfloat16)
    torch.manual_seed(9)
    x, txt = torch.randn(1, 12, ours.cfg.in_channels), torch.randn(1, 5, ours.cfg.joint_attention_dim)
    args = ([[(3, 4)]], torch.ones(1, 5, dtype=torch.bool), torch.tensor([0.7]))
    with torch.no_grad():
        a = ours(x, args[0], txt, args[1], args[2])
        b = low(x.bfloat16(), args[0], txt.bfloat16(), args[1], args[2])
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() / a.abs().max() < 0.05


def test_unified_sequence_feeds_the_model():
    """pack → unified_sequence gives the rows and H the model expects (Eq. 6–8)."""
    zs = [torch.randn(4, 6, 8), torch.randn(4, 4, 4)]
    seq, shapes = unified_sequence(zs[0], zs[1:])
    assert shapes == [(3, 4), (2, 2)] and seq.shape == (16, 16)
    assert torch.equal(seq[:12], pack(zs[0][None])[0])


def test_param_count_of_official_config():
    """The released config must give the 20,430,401,088 parameters of the official checkpoint."""
    with torch.device("meta"):
        m = M.MMDiT(M.PRESETS["qwen-image"])
    assert sum(p.numel() for p in m.parameters()) == 20_430_401_088


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    """Every temp-then-rename site writes through model.atomic_write: a write that dies halfway leaves the previous
    file and no temp behind."""
    path = str(tmp_path / "f.json")
    M.atomic_write(path, "old")

    def dies(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        M.atomic_write(path, dies)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.json"]
    M.atomic_write(path, lambda tmp: torch.save({"x": torch.zeros(1)}, tmp))
    assert torch.load(path)["x"].shape == (1,) and os.listdir(tmp_path) == ["f.json"]
