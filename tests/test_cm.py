"""train_cm.py: the finite-difference tangent is the JVP, the Eq. 11 loss and each official variant equal a
hand-written computation, resume is bit-identical, the export is a few-step checkpoint, bf16 autocast keeps the
time path in fp32."""
import json
import os

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import model as M
import sample as S
import train_cm as C
import train_common as T
from pack import target_rows

from conftest import torchrun, workers_said
from test_train import tiny_batch


def tiny_model(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    m = M.MMDiT(M.PRESETS["tiny"]).init_weights()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m.to(dtype)


def batch(dtype=torch.float64):
    x, shapes, txt, mask = tiny_batch()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    tgt = target_rows(shapes, x.shape[1], x.device)[..., None]
    return x.to(dtype), shapes, txt.to(dtype), mask, noise.to(dtype), tgt


def test_finite_difference_tangent_matches_jvp():
    """dF(x_t, t)/dt along the straight path: the central difference against torch.func.jvp in fp64. The JVP needs
    the composite (math) attention: the fused SDPA kernels have no forward-mode AD, which is why the trainer uses
    the finite difference. The difference quotient converges to the JVP; at the paper's h = 5e-3 it is far off,
    because the time embedding's sinusoid of 1000·t has periods down to 2π/1000 ≈ 0.006 in t."""
    model = tiny_model()
    x, shapes, txt, mask, noise, tgt = batch()
    t = torch.tensor([0.3, 0.6, 0.9], dtype=torch.float64)
    f = lambda tt: model(T.on_path(x, noise, tgt, tt), shapes, txt, mask, tt) * tgt
    with pytest.raises(NotImplementedError):  # the fused kernel the trainer runs on
        torch.func.jvp(f, (t,), (torch.ones_like(t),))
    with sdpa_kernel(SDPBackend.MATH):
        _, jvp = torch.func.jvp(f, (t,), (torch.ones_like(t),))
    rel = {h: ((C.tangent(model, x, noise, tgt, shapes, txt, mask, t, h) - jvp).norm() / jvp.norm()).item()
           for h in (5e-3, 1e-4, 1e-5)}
    print(f"finite difference vs jvp, relative error by h: {rel}")
    assert rel[1e-5] < 1e-3 and rel[1e-4] < 1e-2 and rel[5e-3] > 10 * rel[1e-4] and jvp.norm() > 1e-2


def test_tangent_clamps_at_the_ends():
    model = tiny_model()
    x, shapes, txt, mask, noise, tgt = batch()
    t = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    fd = C.tangent(model, x, noise, tgt, shapes, txt, mask, t)
    one_sided = (model(T.on_path(x, noise, tgt, t), shapes, txt, mask, t)
                 - model(T.on_path(x, noise, tgt, t - 5e-3), shapes, txt, mask, t - 5e-3)) / 5e-3
    assert torch.allclose(fd[0], (one_sided * tgt)[0], atol=1e-10) and torch.isfinite(fd).all()


@pytest.mark.parametrize("variant", ["paper", "tangent_norm", "guidance", "cos_loss", "all"])
def test_cm_loss_equals_hand_computation(variant):
    """Eq. 11 as the paper writes it, and each official flag, against the formula written out by hand."""
    cfg = C.Config(tangent_norm=variant in ("tangent_norm", "all"), cos_loss=variant in ("cos_loss", "all"),
                   guidance=1.75 if variant in ("guidance", "all") else 0.0)  # (the guide's source is the caller's)
    student, guide = tiny_model(0), tiny_model(1)
    x, shapes, txt, mask, noise, tgt = batch()
    neg, neg_mask = torch.randn(3, 2, 64, dtype=torch.float64), torch.ones(3, 2, dtype=torch.bool)
    t = torch.tensor([0.25, 0.5, 0.999], dtype=torch.float64)

    target, _ = C.cm_target(student, x, noise, tgt, shapes, txt, mask, t, cfg, guide, neg, neg_mask)
    loss = C.cm_loss(student, x, shapes, txt, mask, t, noise, target, cfg.cos_loss)

    # by hand, one sample at a time
    h, total = cfg.fd_eps, 0.0
    for b in range(3):
        n = sum(hh * ww for hh, ww in shapes[b][:1])  # this sample's target rows
        xb, eb, sb = x[b:b + 1], noise[b:b + 1], [shapes[b]]
        point = lambda s: torch.cat([(1 - s) * xb[:, :n] + s * eb[:, :n], xb[:, n:]], 1)
        F = lambda net, s, e=txt[b:b + 1], m=mask[b:b + 1]: net(point(s), sb, e, m, torch.tensor([s], dtype=torch.float64))[0, :n]
        tb = t[b].item()
        hi, lo = min(tb + h, 1.0), tb - h
        T_ = (F(student, hi) - F(student, lo)) / (hi - lo)
        if cfg.tangent_norm:
            T_ = T_ / (T_.norm() + 0.1)
        y = eb[0, :n] - xb[0, :n] - tb * T_
        if cfg.guidance:
            y = y + 1.75 * (F(guide, tb) - F(guide, tb, neg[b:b + 1], neg_mask[b:b + 1]))
        v = F(student, tb)
        lb = ((v - y) ** 2).mean()
        if cfg.cos_loss:
            lb = lb + (1 - torch.nn.functional.cosine_similarity(v, y, dim=-1)).mean()
        total += lb.item() / 3
    assert loss.item() == pytest.approx(total, rel=1e-6)


def test_paper_form_target_is_flow_matching_minus_t_tangent():
    """With a model whose output does not depend on t or x (zero tangent), Eq. 11's target is ε − x exactly."""
    model = tiny_model()
    with torch.no_grad():
        model.proj_out.weight.zero_()  # output = bias: constant in x_t and t
    x, shapes, txt, mask, noise, tgt = batch()
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    target, tnorm = C.cm_target(model, x, noise, tgt, shapes, txt, mask, t, C.Config(tangent_norm=False, guidance=0.0))
    assert tnorm == 0 and torch.allclose(target, ((noise - x) * tgt).float())


def test_bf16_autocast_keeps_the_time_path_in_fp32():
    """σ = 0.5 and 0.501 round to the same bf16 number; their time embeddings must still differ under autocast."""
    model = tiny_model(dtype=torch.float32)
    x, shapes, txt, mask, _, _ = batch(torch.float32)
    seen = []
    model.time_text_embed.timestep_embedder.register_forward_pre_hook(lambda mod, a: seen.append(a[0].float()))
    with torch.autocast("cpu", torch.bfloat16):
        for s in (0.5, 0.501):
            model(x, shapes, txt, mask, torch.full((3,), s))
    assert torch.tensor(0.5).bfloat16() == torch.tensor(0.501).bfloat16()
    assert (seen[0] - seen[1]).abs().max() > 0.05


def run_cm(tiny_pipeline, out, **kw):
    cfg = C.Config(assets=tiny_pipeline, n_data=8, budget=64 * 64, cache=os.path.join(out, "..", "cache"), out=out,
                   init=os.path.join(tiny_pipeline, "transformer"), steps=4, batch=4, micro_batch=2, lr=1e-3,
                   lr_min=1e-3, warmup=0, save_every=2, eval_every=0, eval_cases=0, log_every=1, seed=0,
                   guidance=1.0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    C.main(cfg)
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def test_cm_resume_is_bit_identical_and_exports_a_fewstep_checkpoint(tiny_pipeline, tmp_path):
    whole = run_cm(tiny_pipeline, str(tmp_path / "a"))
    run_cm(tiny_pipeline, str(tmp_path / "b"), steps=2)
    resumed = run_cm(tiny_pipeline, str(tmp_path / "b"), resume=True)
    assert [m["loss"] for m in resumed if m["step"] > 2] == [m["loss"] for m in whole if m["step"] > 2]
    assert all(m["tangent_norm"] > 0 for m in whole)
    a = M.load_mmdit(str(tmp_path / "a" / "ema_transformer")).state_dict()
    b = M.load_mmdit(str(tmp_path / "b" / "ema_transformer")).state_dict()
    assert all(torch.equal(a[k], v) for k, v in b.items())
    init = M.load_mmdit(os.path.join(tiny_pipeline, "transformer")).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    assert S.checkpoint_kind(str(tmp_path / "a" / "ema_transformer")) == "fewstep"


def test_cm_bad_flags_fail_before_any_work(tiny_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="guidance_from"):
        run_cm(tiny_pipeline, str(tmp_path / "x"), guidance_from="nope")
    with pytest.raises(SystemExit, match="--init .* is not a transformer folder"):
        run_cm(tiny_pipeline, str(tmp_path / "y"), init=str(tmp_path / "missing"))
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_train_cm_runs_under_torchrun_with_identical_ranks(tiny_pipeline, tmp_path):
    """Two gloo processes, two steps: it completes, exports, and both ranks end with the same weights."""
    out = str(tmp_path / "d")
    r = torchrun("train_cm.py", "--assets", tiny_pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache",
                 os.path.join(out, "cache"), "--out", out, "--init", os.path.join(tiny_pipeline, "transformer"),
                 "--steps", "2", "--batch", "4", "--micro_batch", "1", "--eval_cases", "0", "--save_every", "2",
                 "--guidance", "1.0")
    assert r.returncode == 0, workers_said(r)
    assert "ranks agree" in r.stdout
    M.load_mmdit(os.path.join(out, "ema_transformer"))
