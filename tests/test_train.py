"""train_fm.py and train_common.py: the objective learns, resume is exact, DDP and FSDP2 agree with one process,
LoRA trains only adapters, a checkpoint killed mid-write leaves the previous one, a NaN loss stops cleanly."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import train_common as T
import train_fm as F
from conftest import torchrun, workers_said

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [[(2, 3), (2, 2)], [(3, 2)], [(2, 2), (1, 3), (2, 1)]]
    N = max(sum(h * w for h, w in s) for s in shapes)
    x = torch.randn(3, N, 64, generator=g)
    return x, shapes, torch.randn(3, 4, 64, generator=g), torch.ones(3, 4, dtype=torch.bool)


def test_fm_loss_decreases_on_a_fixed_batch():
    """Eq. (1) must be learnable: 40 AdamW steps on one batch (fixed noise and t) cut the loss by half."""
    torch.manual_seed(0)
    model = M.MMDiT(M.PRESETS["tiny"]).init_weights()
    opt = T.make_optimizer(model, 3e-3, weight_decay=0.0)
    x, shapes, txt, mask = tiny_batch()
    t, noise = torch.tensor([0.3, 0.6, 0.9]), torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(40):
        loss = T.fm_loss(model, x, shapes, txt, mask, t, noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_compiled_blocks_give_the_eager_loss_and_gradients():
    """--compile (M.compile_blocks: torch.compile per block, dynamic shapes) computes the same Eq. (1) loss and
    gradients as eager, for two batches of different sequence lengths (one graph serves both), and keeps the
    parameter names, so checkpoints and exports are unchanged."""
    torch.manual_seed(0)
    eager = M.MMDiT(M.PRESETS["tiny"]).init_weights()
    for p in eager.parameters():  # away from the zero init, so every path carries gradient
        p.data.add_(0.02 * torch.randn_like(p))
    compiled = M.MMDiT(eager.cfg)
    compiled.load_state_dict(eager.state_dict())
    M.compile_blocks(compiled)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for seed in (0, 1):
        x, shapes, txt, mask = tiny_batch(seed)
        if seed:
            x, shapes = x[:2, :8], [[(2, 3)], [(2, 2), (2, 2)]]  # other lengths
        t, noise = torch.tensor([0.3, 0.6, 0.9])[: len(shapes)], torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        losses = []
        for m in (eager, compiled):
            m.zero_grad()
            loss = T.fm_loss(m, x, shapes, txt[: len(shapes)], mask[: len(shapes)], t, noise)
            loss.backward()
            losses.append(loss)
        assert torch.allclose(losses[0], losses[1], rtol=1e-5, atol=1e-6), losses
        grad = lambda p: p.grad if p.grad is not None else torch.zeros_like(p)  # (unused: None eager, 0 compiled)
        for (n, a), b in zip(eager.named_parameters(), compiled.parameters()):
            assert torch.allclose(grad(a), grad(b), rtol=1e-3, atol=1e-5), n  # (fp32, another fusion order)


def test_fm_loss_ignores_references_and_padding():
    """Only target rows are noised and scored: changing a reference's prediction target cannot change the loss
    unless it changes the model input, and padding rows never count."""
    torch.manual_seed(0)
    model = M.MMDiT(M.PRESETS["tiny"]).init_weights()
    x, shapes, txt, mask = tiny_batch()
    t, noise = torch.tensor([0.3, 0.6, 0.9]), torch.randn(x.shape)
    base = T.fm_loss(model, x, shapes, txt, mask, t, noise)
    noise2 = noise.clone()
    noise2[0, 6:] = 1e3  # sample 0's reference rows and padding: noise never reaches them
    noise2[1, 6:] = 1e3  # sample 1's padding
    assert torch.equal(T.fm_loss(model, x, shapes, txt, mask, t, noise2), base)


def test_timesteps_logit_normal_and_shifted():
    shapes = [[(32, 32)]] * 4000  # 1024 target tokens: shift = exp(μ(1024)) > 1 pushes t up
    t = T.sample_t(shapes, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert 0.5 < t.median() < 0.65  # the median of sigmoid(N(0,1)) is 0.5; the shift moves it to shift/(1+shift)
    # the toy recipe's logit mean 1 moves the median to the shifted sigmoid(1) and puts ~10x more mass near t = 1
    t1 = T.sample_t([[(8, 8)]] * 4000, torch.Generator().manual_seed(0), mean=1.0)
    t0 = T.sample_t([[(8, 8)]] * 4000, torch.Generator().manual_seed(0), mean=0.0)
    assert 0.78 < t1.median() < 0.86 and (t1 > 0.95).float().mean() > 5 * (t0 > 0.95).float().mean()


def test_batches_cover_the_data_and_group_similar_lengths():
    """batch_indices: deterministic in the step (so resume needs only the step), every sample once per epoch
    (pools that do not straddle an epoch), and a batch spans far less of the length range than a random one."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(50, 250, (1024,), generator=g).tolist()
    steps = [T.batch_indices(s, lengths, 16, seed=3) for s in range(64)]  # 64 steps × 16 = one epoch, 8 pools
    assert steps == [T.batch_indices(s, lengths, 16, seed=3) for s in range(64)]
    assert sorted(i for b in steps for i in b) == list(range(1024))
    assert steps != [T.batch_indices(s, lengths, 16, seed=4) for s in range(64)]
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in steps]
    assert sum(spread) / len(spread) < 0.2 * 200  # random batches of 16 span ~175 of the 200


def test_ema_warmup():
    """The EMA decay ramps up, (1 + step) / (10 + step), to its configured value: the init fades from a short run."""
    assert T.ema_decay(0, 0.998) == pytest.approx(0.1)
    assert T.ema_decay(90, 0.998) == pytest.approx(0.91)
    assert T.ema_decay(10_000, 0.998) == 0.998
    ema, model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w0 = ema.weight.detach().clone()
    T.ema_update(ema, model, T.ema_decay(0, 0.998))  # the first update keeps only a tenth of the init
    assert torch.allclose(ema.weight, 0.1 * w0 + 0.9 * model.weight.detach())


def run_fm(tiny_pipeline, out, **kw):
    cfg = F.Config(assets=tiny_pipeline, n_data=8, budget=64 * 64, cache=os.path.join(out, "cache"), out=out,
                   preset="tiny", steps=4, batch=4, micro_batch=2, lr=1e-3, lr_min=1e-3, warmup=0, save_every=2,
                   eval_every=0, eval_cases=0, log_every=1, seed=0)
    for k, v in kw.items():
        setattr(cfg, k, v)
    F.main(cfg)
    return [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def test_resume_gives_bit_identical_losses(tiny_pipeline, tmp_path):
    """Model, EMA, AdamW state, the noise generator and the data position all come back: the losses after a
    resume equal those of an uninterrupted run exactly."""
    whole = run_fm(tiny_pipeline, str(tmp_path / "a"), steps=4)
    run_fm(tiny_pipeline, str(tmp_path / "b"), steps=2)
    resumed = run_fm(tiny_pipeline, str(tmp_path / "b"), steps=4, resume=True)
    assert [m["loss"] for m in resumed if m["step"] > 2] == [m["loss"] for m in whole if m["step"] > 2]
    a = M.load_mmdit(str(tmp_path / "a" / "ema_transformer"))
    b = M.load_mmdit(str(tmp_path / "b" / "ema_transformer"))
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
    assert "teacher" in json.load(open(tmp_path / "a" / "transformer" / "config.json"))["_name_or_path"]


def test_checkpoint_killed_mid_write_keeps_the_previous(tiny_pipeline, tmp_path, monkeypatch):
    out = str(tmp_path / "k")
    run_fm(tiny_pipeline, out, steps=2)
    before = T.latest_checkpoint(out)
    real_save = torch.save

    def dying_save(obj, path, *a, **kw):  # the process "dies" halfway through writing checkpoint.pt
        real_save(obj, path, *a, **kw)
        os.truncate(path, os.path.getsize(path) // 2)
        raise KeyboardInterrupt

    monkeypatch.setattr(T.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        run_fm(tiny_pipeline, out, steps=4, resume=True)
    monkeypatch.undo()
    assert T.latest_checkpoint(out) == before
    model = M.MMDiT(M.PRESETS["tiny"])
    ema = M.MMDiT(M.PRESETS["tiny"])
    T.freeze_unused(model)
    step, _ = T.load_checkpoint(before, model, ema, T.make_optimizer(model, 1e-3))
    assert step == 2


def test_nan_loss_stops_with_a_message(tiny_pipeline, tmp_path, monkeypatch):
    out = str(tmp_path / "n")
    real = T.fm_loss
    calls = []

    def poisoned(*a):
        calls.append(1)
        loss = real(*a)
        return loss * float("nan") if len(calls) > 4 else loss  # steps 1-2 fine, step 3 NaN

    monkeypatch.setattr(T, "fm_loss", poisoned)
    with pytest.raises(SystemExit, match="loss is nan at step 2.*step_000002"):
        run_fm(tiny_pipeline, out, steps=4)


def test_lora_run_changes_only_lora_targets(tiny_pipeline, tmp_path):
    """A LoRA run from an existing transformer: the merged export differs from the init only in the LoRA
    target Linears (to_q, to_k, to_v, to_out.0)."""
    init = os.path.join(tiny_pipeline, "transformer")
    run_fm(tiny_pipeline, str(tmp_path / "l"), steps=2, init=init, lora_rank=4, lora_alpha=4.0)
    a, b = M.load_mmdit(init).state_dict(), M.load_mmdit(str(tmp_path / "l" / "transformer")).state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")) for k in changed)


def test_ddp_and_fsdp2_match_one_process():
    """Two gloo processes: DDP and FSDP2 (with no-sync accumulation) make the same update as one process on the
    whole batch, and the DDP ranks hold identical weights."""
    r = torchrun(os.path.join(ROOT, "tests", "dist_check.py"), ROOT)
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
    assert line, workers_said(r)
    res = json.loads(line[0][7:])
    assert res["moved"] > 1e-3  # the steps did something
    assert res["ddp_vs_single"] < 1e-5 and res["fsdp_vs_ddp"] < 1e-5 and res["ranks_differ"] == 0.0


def test_train_fm_runs_under_torchrun(tiny_pipeline, tmp_path):
    """The real script, two processes, two steps: it completes and exports loadable folders."""
    out = str(tmp_path / "d")
    r = torchrun("train_fm.py", "--assets", tiny_pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache",
                 os.path.join(out, "cache"), "--out", out, "--preset", "tiny", "--steps", "2", "--batch", "4",
                 "--micro_batch", "1", "--eval_cases", "0", "--save_every", "2")
    assert r.returncode == 0, workers_said(r)
    M.load_mmdit(os.path.join(out, "ema_transformer"))


def test_lr_warms_up_linearly_then_follows_a_quarter_cosine_to_its_floor():
    lr = lambda s: T.lr_at(s, 1.0, 0.1, 10, 110)
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])  # warm-up: (step + 1) / warmup
    assert lr(10) == pytest.approx(1.0) and lr(60) == pytest.approx(math.cos(math.pi / 4))
    assert lr(100) == pytest.approx(math.cos(0.45 * math.pi))  # x = 0.9: 0.156, still above the floor
    assert lr(105) == pytest.approx(0.1) and lr(110) == pytest.approx(0.1)  # cos(π·x/2) < 0.1 → the floor
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_condition_dropout_swaps_in_the_null_prompt():
    """make_batch drops the instruction to the cached " " embedding (same images) with probability cond_drop;
    with_neg also returns the null prompt for every sample."""
    g = torch.Generator().manual_seed(0)
    item = lambda k: dict(target=torch.randn(4, 4, 4), refs=[torch.randn(4, 2, 4)], txt=torch.full((3, 8), float(k)),
                          neg=torch.full((2, 8), -1.0))
    items = [item(k) for k in range(200)]
    kept = lambda txt, mask: [(txt[b][mask[b]] != -1).all().item() for b in range(len(items))]
    assert all(kept(*T.make_batch(items, 0.0, g, "cpu")[2:4]))
    assert not any(kept(*T.make_batch(items, 1.0, g, "cpu")[2:4]))
    share = 1 - np.mean(kept(*T.make_batch(items, 0.1, g, "cpu")[2:4]))
    assert 0.04 < share < 0.18  # 0.1 ± 3 standard errors of 200 draws
    *_, neg, neg_mask = T.make_batch(items[:2], 0.0, g, "cpu", with_neg=True)
    assert neg.shape == (2, 2, 8) and (neg == -1).all() and neg_mask.all()


def test_the_toy_path_leaves_scale_machinery_and_builders_unloaded():
    """What `import train_fm, train_cm, train_dmd, sample` loads (the toy path a reader follows) holds no FSDP2
    module (sharded.py), no LoRA (lora.py: --lora_rank / --fake_lora_rank only) and no asset builder, and its
    project files, eval.py apart, total at most 4,000 lines (issue 27)."""
    code = ("import os, sys, train_fm, train_cm, train_dmd, sample; "
            "print(sorted(m for m in ('sharded', 'lora', 'toy_assets', 'bench', 'reproduce') if m in sys.modules)); "
            "import json; print(json.dumps(sorted({os.path.basename(f) for f in (getattr(m, '__file__', None) "
            "for m in list(sys.modules.values())) if f and os.path.dirname(os.path.abspath(f)) == os.getcwd() "
            "and os.path.exists(f)} - {'eval.py'})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    unloaded, files = out.stdout.strip().splitlines()
    assert unloaded == "[]"
    lines = {f: sum(1 for _ in open(os.path.join(ROOT, f))) for f in json.loads(files)}
    print(lines)
    assert "train_fm.py" in lines and sum(lines.values()) <= 4000, sum(lines.values())
