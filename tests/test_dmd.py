"""train_dmd.py: Eq. 13 is the reverse-KL gradient (checked on Gaussians with analytic scores), Eq. 14 hands
exactly g to the sample, the teacher's CFG, the fake score's loss and one student update equal a hand computation on
a tiny MMDiT, the LoRA fake score shares the teacher's tensors, resume is bit-identical, two gloo processes agree."""
import json
import math
import os

import numpy as np
import pytest
import torch

import lora
import model as M
import sample as S
import train_common as T
import train_dmd as DMD
from pack import target_rows

from conftest import torchrun, workers_said

# -----------------------------------------------------------------------------
# a 1-D world with analytic scores: teacher = a mixture of two Gaussians, student G_θ(ε) = μ + σ·ε


TEACHER = [(0.5, -1.5, 0.4), (0.5, 2.0, 0.6)]  # (weight, mean, std) of p_teacher(x0)


def noised(components, t):
    """x_t = (1 − t)·x0 + t·ε of a Gaussian mixture is a Gaussian mixture."""
    return [(w, (1 - t) * m, math.sqrt(((1 - t) * s) ** 2 + t ** 2)) for w, m, s in components]


def log_pdf(components, x):
    parts = [np.log(w) - 0.5 * ((x - m) / s) ** 2 - np.log(s * math.sqrt(2 * math.pi)) for w, m, s in components]
    return np.logaddexp.reduce(parts, axis=0)


def score(components, x):
    p = np.stack([np.exp(np.log(w) - 0.5 * ((x - m) / s) ** 2 - np.log(s)) for w, m, s in components])
    d = np.stack([-(x - m) / s ** 2 for w, m, s in components])
    return (p * d).sum(0) / p.sum(0)


def velocity(components, x, t):
    """The flow-matching velocity at time t of data distributed as the mixture `components`, from the score of
    the noised mixture: ∇log p_t(x_t) = −(x_t + (1 − t)·F) / t."""
    return -(t * score(noised(components, t), x) + x) / (1 - t)


def kl(student, teacher, t, grid=np.linspace(-12, 12, 20001)):
    a, b = noised(student, t), noised(teacher, t)
    p = np.exp(log_pdf(a, grid))
    return float(np.trapezoid(p * (log_pdf(a, grid) - log_pdf(b, grid)), grid))


def eq13_gradient(mu, sigma, t, n=400_000, seed=0):
    """E[g · ∂x0/∂θ] with g from Eq. 13 (the paper weighting), teacher and fake velocities analytic."""
    rng = np.random.default_rng(seed)
    eps, eps_hat = rng.standard_normal(n), rng.standard_normal(n)
    x0 = mu + sigma * eps
    xt = (1 - t) * x0 + t * eps_hat
    student = [(1.0, mu, sigma)]
    g = DMD.dmd_grad(torch.tensor(velocity(TEACHER, xt, t))[None, :, None],
                     torch.tensor(velocity(student, xt, t))[None, :, None],
                     torch.tensor([t]), torch.tensor(x0)[None, :, None], torch.tensor(eps_hat)[None, :, None],
                     "paper")[0, :, 0].double().numpy()
    return np.array([g.mean(), (g * eps).mean()])  # ∂x0/∂μ = 1, ∂x0/∂σ = ε


@pytest.mark.parametrize("t", [0.3, 0.6])
def test_eq13_is_the_reverse_kl_gradient(t):
    """On Gaussians with analytic scores, E[g·∂G/∂θ] from Eq. 13 points where the true ∇θ KL(p_θ,t ‖ p_teacher,t)
    points (finite differences of the exact KL by quadrature), up to the positive factor 1/(1 − t)."""
    mu, sigma = 0.5, 1.2
    est = eq13_gradient(mu, sigma, t)
    h = 1e-4
    true = np.array([(kl([(1, mu + h, sigma)], TEACHER, t) - kl([(1, mu - h, sigma)], TEACHER, t)) / (2 * h),
                     (kl([(1, mu, sigma + h)], TEACHER, t) - kl([(1, mu, sigma - h)], TEACHER, t)) / (2 * h)])
    cos = est @ true / np.linalg.norm(est) / np.linalg.norm(true)
    print(f"t={t}: Eq. 13 {est}, true ∇KL {true}, cos {cos:.5f}, ratio {np.linalg.norm(true) / np.linalg.norm(est):.4f}")
    assert cos > 0.999
    assert np.linalg.norm(true) / np.linalg.norm(est) == pytest.approx(1 - t, rel=0.02)


def test_dmd_steps_reduce_the_kl_of_a_misspecified_student():
    """A single Gaussian cannot match the two-mode teacher; Eq. 13 steps still cut the KL (mode-seeking: it
    settles near one mode rather than blurring both)."""
    mu, sigma, t = -3.0, 0.3, 0.5
    before = kl([(1, mu, sigma)], TEACHER, 0.02)
    for k in range(40):
        gm, gs = eq13_gradient(mu, sigma, t, n=20_000, seed=k)
        mu, sigma = mu - 0.5 * gm, max(0.05, sigma - 0.5 * gs)
    after = kl([(1, mu, sigma)], TEACHER, 0.02)
    print(f"KL {before:.3f} -> {after:.3f} (mu {mu:.2f}, sigma {sigma:.2f})")
    assert after < 0.5 * before


def test_eq14_hands_exactly_g_to_the_sample():
    x0 = torch.randn(2, 5, 3, requires_grad=True)
    g = torch.randn(2, 5, 3)
    tgt = torch.ones(2, 5, 1, dtype=torch.bool)
    tgt[1, 3:] = False
    DMD.dmd_loss(x0, g * tgt, tgt).backward()
    n = tgt.sum((1, 2), keepdim=True) * 3 * 2  # elements per sample × batch
    assert torch.allclose(x0.grad * n, g * tgt, atol=1e-6)


def test_official_weighting_is_the_dmd_normaliser():
    v_t, v_f, x0, eps = (torch.randn(2, 4, 3) for _ in range(4))
    g = DMD.dmd_grad(v_t, v_f, torch.tensor([0.3, 0.7]), x0, eps, "official")
    norm = (x0 - eps + v_t).abs().mean((1, 2), keepdim=True)
    assert torch.allclose(g, (v_t - v_f) / norm, atol=1e-6)
    g = DMD.dmd_grad(v_t, v_f, torch.tensor([0.3, 0.7]), x0, eps, "paper")
    assert torch.allclose(g, (v_t - v_f) * torch.tensor([0.7 / 0.3, 0.3 / 0.7])[:, None, None], atol=1e-6)


def test_lora_fake_score_shares_the_teachers_tensors(tiny_pipeline):
    init = os.path.join(tiny_pipeline, "transformer")
    cfg = DMD.Config(teacher=init, init=init, fake_lora_rank=4)
    student, ema, teacher, fake = DMD.build_models(cfg, torch.device("cpu"))
    assert fake is teacher
    base = M.load_mmdit(init).state_dict()
    ptrs = {n: p.data_ptr() for n, p in teacher.named_parameters()}
    fake_ptrs = {n: p.data_ptr() for n, p in fake.named_parameters()}
    assert set(base) <= set(fake_ptrs) and all(fake_ptrs[n] == ptrs[n] for n in base)
    assert {n for n, p in fake.named_parameters() if p.requires_grad} == {n for n in fake_ptrs if ".lora_" in n}
    with torch.no_grad():  # train the adapters a little: LoRA on differs, LoRA off is the teacher exactly
        for n, p in fake.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)
    x, shapes = torch.randn(1, 6, 64), [[(2, 2), (1, 2)]]
    txt, mask, t = torch.randn(1, 3, 64), torch.ones(1, 3, dtype=torch.bool), torch.tensor([0.5])
    ref = M.load_mmdit(init)(x, shapes, txt, mask, t)
    with lora.lora_off(teacher):
        assert torch.equal(teacher(x, shapes, txt, mask, t), ref)
    assert not torch.allclose(fake(x, shapes, txt, mask, t), ref)


def run_dmd(tiny_pipeline, out, **kw):
    init = os.path.join(tiny_pipeline, "transformer")
    cfg = DMD.Config(assets=tiny_pipeline, n_data=8, budget=64 * 64, cache=os.path.join(out, "..", "cache"), out=out,
                     teacher=init, init=init, steps=4, batch=2, micro_batch=1, fake_updates=2, save_every=2,
                     eval_every=0, eval_cases=0, log_every=1, seed=0, lr=1e-3, lr_min=1e-3, lr_fake=1e-3)
    for k, v in kw.items():
        setattr(cfg, k, v)
    DMD.main(cfg)
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


@pytest.mark.parametrize("lora", [0, 4])
def test_dmd_resume_is_bit_identical(tiny_pipeline, tmp_path, lora):
    whole = run_dmd(tiny_pipeline, str(tmp_path / "a"), fake_lora_rank=lora)
    run_dmd(tiny_pipeline, str(tmp_path / "b"), steps=2, fake_lora_rank=lora)
    resumed = run_dmd(tiny_pipeline, str(tmp_path / "b"), resume=True, fake_lora_rank=lora)
    key = lambda ms: [(m["loss"], m["fake_loss"]) for m in ms if m["step"] > 2]
    assert key(resumed) == key(whole) and len(key(whole)) == 2
    assert [m["n_gen"] for m in whole] == [1, 2, 3, 4]  # backward simulation cycles the rollout length
    a = M.load_mmdit(str(tmp_path / "a" / "ema_transformer")).state_dict()
    b = M.load_mmdit(str(tmp_path / "b" / "ema_transformer")).state_dict()
    assert all(torch.equal(a[k], v) for k, v in b.items())
    init = M.load_mmdit(os.path.join(tiny_pipeline, "transformer")).state_dict()
    assert any(not torch.equal(a[k], init[k]) for k in a)
    # --grad_ckpt (the 20B recipe) recomputes the student's and the fake score's blocks: the same run
    ckpt = run_dmd(tiny_pipeline, str(tmp_path / "c"), fake_lora_rank=lora, grad_ckpt=True)
    flat = lambda ms: [m[k] for m in ms for k in ("loss", "fake_loss")]
    assert len(ckpt) == len(whole) and flat(ckpt) == pytest.approx(flat(whole), rel=1e-5)


def test_dmd_bad_flags_fail_before_any_work(tiny_pipeline, tmp_path):
    with pytest.raises(SystemExit, match="--init .* is not a transformer folder"):
        run_dmd(tiny_pipeline, str(tmp_path / "x"), init=str(tmp_path / "missing"))
    with pytest.raises(SystemExit, match="--weighting"):
        run_dmd(tiny_pipeline, str(tmp_path / "y"), weighting="nope")
    assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "y")


def test_train_dmd_runs_under_torchrun(tiny_pipeline, tmp_path):
    out = str(tmp_path / "d")
    init = os.path.join(tiny_pipeline, "transformer")
    r = torchrun("train_dmd.py", "--assets", tiny_pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache",
                 os.path.join(out, "cache"), "--out", out, "--teacher", init, "--init", init, "--steps", "2",
                 "--batch", "2", "--micro_batch", "1", "--fake_updates", "1", "--eval_cases", "0", "--save_every", "2")
    assert r.returncode == 0, workers_said(r)
    assert "ranks agree" in r.stdout
    M.load_mmdit(os.path.join(out, "ema_transformer"))


# -----------------------------------------------------------------------------
# the DMD update on a tiny MMDiT, against the formulas written out by hand


def tiny_nets():
    from test_cm import tiny_model

    return [tiny_model(seed, dtype=torch.float32) for seed in (0, 1, 2)]  # student, teacher, fake score


@pytest.mark.parametrize("rescale", [False, True])
def test_teacher_cfg_with_and_without_rescale(rescale):
    """teacher_velocity runs cond and uncond in one padded forward; by hand: two separate forwards, then
    v_u + w·(v_c − v_u), and with the rescale each token's norm set to the cond velocity's."""
    from test_train import tiny_batch

    _, teacher, _ = tiny_nets()
    x, shapes, txt, mask = tiny_batch()
    neg, neg_mask = torch.randn(3, 2, 64), torch.ones(3, 2, dtype=torch.bool)
    t = torch.tensor([0.2, 0.5, 0.9])
    with torch.no_grad():
        got = DMD.teacher_velocity(teacher, x, shapes, txt, mask, neg, neg_mask, t, 3.0, rescale)
        v_c, v_u = teacher(x, shapes, txt, mask, t), teacher(x, shapes, neg, neg_mask, t)
    comb = v_u + 3.0 * (v_c - v_u)
    if rescale:
        comb = comb * v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)
    tgt = target_rows(shapes, x.shape[1])[..., None].expand_as(got)  # (padding rows have no norm to rescale to)
    assert torch.allclose(got[tgt], comb[tgt], atol=1e-5)


def test_fake_score_loss_is_flow_matching_on_the_students_samples():
    """The fake score's loss (Eq. 1 with the official 1 − cos term) against the formula, one sample at a time."""
    from test_train import tiny_batch

    _, _, fake = tiny_nets()
    x0, shapes, txt, mask = tiny_batch(1)
    eps, t = torch.randn(x0.shape, generator=torch.Generator().manual_seed(2)), torch.tensor([0.3, 0.6, 0.95])
    got = DMD.fake_score_loss(fake, x0, shapes, txt, mask, t, eps, cos_loss=True)
    total = 0.0
    for b in range(3):
        n = shapes[b][0][0] * shapes[b][0][1]
        xt = x0[b:b + 1].clone()
        xt[:, :n] = (1 - t[b]) * x0[b:b + 1, :n] + t[b] * eps[b:b + 1, :n]
        v = fake(xt, [shapes[b]], txt[b:b + 1], mask[b:b + 1], t[b:b + 1])[0, :n]
        y = eps[b, :n] - x0[b, :n]
        total += (((v - y) ** 2).mean() + (1 - torch.nn.functional.cosine_similarity(v, y, dim=-1)).mean()) / 3
    assert got.item() == pytest.approx(total.item(), rel=1e-5)


def test_dmd_student_update_by_hand():
    """One student update (n = 1: x0 = ε − 1·G_θ(ε) on the target rows), against a hand computation: the student's
    parameter gradient from Eq. 14 is the vector-Jacobian product of its sample with g / (elements · batch), g =
    (1 − t)/t · (F_teacher^CFG − F_φ) at the re-noised sample (Eq. 12–13, the paper weighting, CFG 2 without
    rescale), teacher and fake score evaluated by separate forwards."""
    from test_train import tiny_batch

    student, teacher, fake = tiny_nets()
    x, shapes, txt, mask = tiny_batch(3)
    neg, neg_mask = torch.randn(3, 2, 64), torch.ones(3, 2, dtype=torch.bool)
    tgt = target_rows(shapes, x.shape[1])[..., None]
    noise, eps = (torch.randn(x.shape, generator=torch.Generator().manual_seed(s)) for s in (4, 5))
    t = torch.tensor([0.25, 0.5, 0.75])
    sched = S.SchedulerConfig()

    # the trainer's path: backward simulation with one step, Eq. 12–14
    x0 = DMD.backward_simulate(student, noise, x, tgt, shapes, txt, mask, 1, sched, torch.Generator())
    with torch.no_grad():
        xt = T.on_path(x0.detach(), eps, tgt, t)
        g = DMD.dmd_grad(DMD.teacher_velocity(teacher, xt, shapes, txt, mask, neg, neg_mask, t, 2.0, False),
                         fake(xt, shapes, txt, mask, t), t, x0.detach(), eps, "paper") * tgt
    DMD.dmd_loss(x0, g, tgt).backward()
    got = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in student.parameters()]
    assert sum(float(a.abs().sum()) for a in got) > 0

    # by hand
    student.zero_grad()
    xin = torch.where(tgt, noise, x)
    sample = xin - 1.0 * student(xin, shapes, txt, mask, torch.ones(3))  # t = 1 at the first few-step time
    with torch.no_grad():
        re = sample.clone()
        for b in range(3):
            n = shapes[b][0][0] * shapes[b][0][1]
            re[b, :n] = (1 - t[b]) * sample[b, :n] + t[b] * eps[b, :n]
            re[b, n:] = x[b, n:]
        v_c, v_u = teacher(re, shapes, txt, mask, t), teacher(re, shapes, neg, neg_mask, t)
        v_t = v_u + 2.0 * (v_c - v_u)
        g_hand = ((1 - t) / t)[:, None, None] * (v_t - fake(re, shapes, txt, mask, t)) * tgt
        scale = (tgt.sum((1, 2), keepdim=True) * x.shape[2] * 3).float()  # elements per sample × batch
    assert torch.allclose(g, g_hand, atol=1e-5)
    want = torch.autograd.grad(sample, list(student.parameters()), grad_outputs=g_hand / scale, allow_unused=True)
    for a, b in zip(got, want):
        b = torch.zeros_like(a) if b is None else b
        assert torch.allclose(a, b, atol=1e-7, rtol=1e-4)
