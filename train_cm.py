r"""
Consistency tuning (paper §4.3, Eq. 9–11): the flow-matching teacher becomes a few-step generator.

The consistency function of the flow is f_θ(x_t, t) = x_t − t·F_θ(x_t, t): the clean image predicted from any
point of the straight path x_t = (1 − t)·x + t·ε. A consistency model keeps f constant along the path, i.e. its
tangent df/dt = 0. Writing the tangent out (Eq. 9), with dx_t/dt = ε − x,
    df_θ⁻/dt = (ε − x) − F_θ⁻(x_t, t) − t·dF_θ⁻(x_t, t)/dt,
and following it with the weight w(t) = 1/t through the identity ∇E[F_θᵀy] = ½∇E‖F_θ − F_θ⁻ + y‖² (Eq. 10)
gives a regression of F_θ onto a stop-gradient target (Eq. 11):
    L_CM = ‖F_θ(x_t, t) − (ε − x − t·dF_θ⁻(x_t, t)/dt)‖²,
i.e. flow matching minus a correction t·T that bends the velocity so the predicted x0 stops moving along t.

The tangent T = dF_θ⁻/dt along the path is a *central finite difference* of two forward passes,
    T ≈ (F_θ⁻(x_{t+h}, t + h) − F_θ⁻(x_{t−h}, t − h)) / 2h,   both points on the same line (same x, ε),
instead of a Jacobian-vector product: it needs only plain forwards, so it runs with flash / memory-efficient
attention kernels and FSDP2-sharded parameters, neither of which torch.func.jvp supports. θ⁻ is the current
student under no_grad (a stop-gradient copy), not the EMA. The difference itself runs in fp64 and t stays fp32
(the official code rounds t to bf16, spacing ≈ 0.004 near 1, and still divides by 2h = 0.01). The paper's
h = 5·10⁻³ is too coarse to be a derivative here: the time embedding is a sinusoid of 1000·t whose fastest
periods are ≈ 0.006 in t, and on the toy teacher the h = 5·10⁻³ quotient is 26–97% off torch.func.jvp (h = 10⁻⁴:
0.1–0.5%, fp32; tests/test_cm.py checks the convergence), so the toy default is h = 10⁻⁴.

Official variants (public UniPic-3 trainer), each behind a flag:
  --tangent_norm  T / (‖T‖₂ + 0.1) per sample, fp64 (official). ‖T‖ ≫ 0.1, so only T's direction survives:
                  ≈ 1/√N per element, the objective becomes flow matching plus a small consistency nudge.
  --guidance g    the target gains g·(F_G(x_t, c) − F_G(x_t, " " + same images)): CFG baked into the student
                  (official g = 1.75, effective CFG 2.75, no norm rescale); --guidance_from "ema" (official: the
                  EMA of the model being trained) or "teacher" (the frozen teacher: no feedback loop).
  --cos_loss      + mean(1 − cos) over latent channels (official).
  --ema 0.95      per update (official); the EMA is exported and evaluated.
Why Eq. 11 as written diverges on the toy (measured, README): see `tangent` below.

    python train_cm.py                                                     # toy, one process
    torchrun --standalone --nproc_per_node=2 train_cm.py                   # toy, 2 processes (gloo)
    torchrun --nproc_per_node=8 train_cm.py --assets Qwen-Image-Edit --data train.jsonl --init Unipic3/transformer \
        --fsdp true --bf16 true --grad_ckpt true --lr 1e-6 --lr_min 1e-7 --fd_eps 5e-3 --tangent_norm true \
        --guidance 1.75 --guidance_from ema --cos_loss true --logit_mean 0 --batch 256 --micro_batch 1 --budget 1048576
"""
import copy
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import model as M
import train_common as T
from pack import pad_text_pair, target_rows
from sample import TOY_CKPT

# -----------------------------------------------------------------------------
# the objective


@torch.no_grad()
def tangent(model, x, noise, tgt, shapes, txt, txt_mask, t, h=5e-3):
    """dF(x_t, t)/dt along the path, by a central finite difference of two forwards (one batched call).
    Near the ends t ± h is clamped to [0, 1] and the difference divided by the actual Δt.

    Why the paper form diverges without normalisation: the difference quotient divides the model's own
    roughness by 2h = 0.01, so T carries the student's high-frequency error amplified 100×; the target then
    contains t·T, which the student (θ⁻ = itself) fits, making its next tangent rougher still — a feedback loop
    (README: ‖t·T‖ against ‖ε − x‖, and the loss curve)."""
    hi, lo = (t + h).clamp(max=1.0), (t - h).clamp(min=0.0)
    both = model(torch.cat([T.on_path(x, noise, tgt, hi), T.on_path(x, noise, tgt, lo)]), shapes + shapes,
                 torch.cat([txt, txt]), torch.cat([txt_mask, txt_mask]), torch.cat([hi, lo]))
    f_hi, f_lo = both.double().chunk(2)
    return (f_hi - f_lo) / (hi - lo).double()[:, None, None] * tgt


def cm_target(model, x, noise, tgt, shapes, txt, txt_mask, t, cfg, guide=None, neg=None, neg_mask=None):
    """The stop-gradient regression target of Eq. 11, ε − x − t·T, with the official variants of cfg.
    Returns (target fp32, the mean per-sample ‖T‖ before normalisation)."""
    T_ = tangent(model, x, noise, tgt, shapes, txt, txt_mask, t, cfg.fd_eps)  # fp64
    norm = T_.flatten(1).norm(dim=1)  # one norm per sample over all its target latents
    if cfg.tangent_norm:
        T_ = T_ / (norm + cfg.tangent_c)[:, None, None]
    target = (noise - x).double() - t.double()[:, None, None] * T_
    if cfg.guidance:
        with torch.no_grad():
            xt = T.on_path(x, noise, tgt, t)
            v = guide(torch.cat([xt, xt]), shapes + shapes, *pad_text_pair(txt, txt_mask, neg, neg_mask), torch.cat([t, t]))
            v_c, v_u = v.double().chunk(2)
        target = target + cfg.guidance * (v_c - v_u)
    return (target * tgt).float(), norm.mean().item()


def cm_loss(model, x, shapes, txt, txt_mask, t, noise, target, cos_loss=False):
    """Eq. 11: flow matching (Eq. 1, T.fm_loss) with cm_target's ε − x − t·T in place of ε − x; --cos_loss adds
    mean(1 − cos) over channels; a non-finite loss becomes finite (nan_to_num), as in the official trainer."""
    return torch.nan_to_num(T.fm_loss(model, x, shapes, txt, txt_mask, t, noise, target, cos_loss))


# -----------------------------------------------------------------------------
# config


@dataclass
class Config(T.Config):
    """train_cm's flags: the shared ones (T.Config) with the consistency recipe, and the objective's variants."""
    out: str = "runs/cm"
    init: str = os.path.join(TOY_CKPT, "transformer")  # the teacher (student init, and the frozen guidance source)
    steps: int = 600  # toy: ≈ 6 minutes on 2 CPU processes (val flat from step 200: 0.74 / 0.71 / 0.73)
    lr: float = 1e-4  # official 1e-6 at 20B
    lr_min: float = 1e-5
    warmup: int = 100  # linear lr warm-up steps
    ema: float = 0.95  # official, per update
    fd_eps: float = 1e-4  # h of the central difference. Paper / official 5e-3, but the toy teacher's dF/dt has
    #   sinusoid periods near 0.006 in t: at 5e-3 the quotient is 26-97% off the JVP, at 1e-4 0.1-0.5% (fp32)
    tangent_norm: bool = True  # official T / (‖T‖ + tangent_c); false = Eq. 11 exactly as the paper writes it
    tangent_c: float = 0.1  # c in T / (‖T‖ + c)
    guidance: float = 0.5  # g: + g·(F(c) − F(" ")) in the target; g = w − 1 distils CFG w (official g 1.75). Toy:
    #   CFG 1.5; CFG 2 (g = 1) overshoots at few steps: that CM edits 0.059 ± 0.026 worse at 8 steps (full bench)
    guidance_from: str = "teacher"  # "teacher" (frozen) or "ema" (official: the EMA of the student)
    cos_loss: bool = False  # + mean(1 − cos) over channels (official)
    logit_mean: float = 1.0  # as the toy teacher (official 0)
    eval_every: int = 200


# -----------------------------------------------------------------------------
# training


def main(cfg):
    rank, world, device, per_rank, accum, dataset, lengths = T.start_run(cfg)

    sharded = cfg.fsdp and world > 1  # FSDP2: no rank ever holds the whole model (sharded.py, imported only then)
    if sharded:
        import sharded as SH
    model = SH.meta_mmdit(cfg.init) if sharded else M.load_mmdit(cfg.init, dtype=torch.float32, device="cpu")
    model.gradient_checkpointing = cfg.grad_ckpt
    T.freeze_unused(model)
    teacher = None
    if sharded:  # each rank reads its own rows; the EMA and the frozen teacher are sharded alike
        SH.fill_shards(SH.shard(model, device, cfg.bf16), [SH.weight_tensors(cfg.init)], cfg.init)
        ema = SH.sharded_copy(model, device, cfg.bf16)
        if cfg.guidance and cfg.guidance_from == "teacher":
            teacher = SH.sharded_teacher(cfg.init, device, cfg.bf16)
    else:
        ema = copy.deepcopy(model).requires_grad_(False).eval()
        if cfg.guidance and cfg.guidance_from == "teacher":
            teacher = copy.deepcopy(model).requires_grad_(False).eval().to(device)
        if cfg.guidance and cfg.guidance_from == "ema":
            ema.to(device)
        model.to(device)
    dmodel = T.wrap(model, world, device, fsdp=cfg.fsdp, bf16=cfg.bf16)
    opt = T.make_optimizer(dmodel, cfg.lr, cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + rank)

    step = T.resume(cfg, dmodel, ema, opt, g, rank)
    meter = T.Meter(cfg.out, rank)
    if rank == 0:
        print(f"consistency tuning of {cfg.init}: {len(dataset)} cached samples, {world} process(es), batch "
              f"{cfg.batch}, tangent_norm={cfg.tangent_norm}, guidance={cfg.guidance} from {cfg.guidance_from}")
    pbar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="cm")
    t_last, logged = time.time(), step
    with T.preemption_guard() as caught:
        while step < cfg.steps:
            lr = T.set_lr(opt, T.lr_at(step, cfg.lr, cfg.lr_min, cfg.warmup, cfg.steps))
            idx = T.batch_indices(step, lengths, cfg.batch, cfg.seed)[rank * per_rank : (rank + 1) * per_rank]
            loss_sum = tnorm_sum = 0.0
            for m in range(accum):
                items = [dataset[i] for i in idx[m * cfg.micro_batch : (m + 1) * cfg.micro_batch]]
                x, shapes, txt, txt_mask, neg, neg_mask = T.make_batch(items, 0.0, g, device, with_neg=True)
                t = T.sample_t(shapes, g, cfg.logit_mean, cfg.logit_std).to(device)
                noise = torch.randn(x.shape, generator=g).to(device)
                tgt = target_rows(shapes, x.shape[1], device)[..., None]
                with torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                    guide = teacher if cfg.guidance_from == "teacher" else ema
                    target, tnorm = cm_target(T.unwrap(dmodel), x, noise, tgt, shapes, txt, txt_mask, t, cfg, guide,
                                              neg, neg_mask)
                    with T.no_sync(dmodel, last=m == accum - 1):
                        loss = cm_loss(dmodel, x, shapes, txt, txt_mask, t, noise, target, cfg.cos_loss)
                        (loss / accum).backward()
                loss_sum += loss.item() / accum
                tnorm_sum += tnorm / accum
            loss_avg = T.mean_over_ranks(torch.tensor(loss_sum)).item()
            if not math.isfinite(loss_avg):
                raise SystemExit(f"error: loss is {loss_avg} at step {step}; stopped. Last good checkpoint: "
                                 f"{T.latest_checkpoint(cfg.out)}")
            gnorm = torch.nn.utils.clip_grad_norm_(dmodel.parameters(), cfg.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            T.ema_update(ema, dmodel, cfg.ema)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t_last
                meter.log(step=step, loss=loss_avg, lr=lr, grad_norm=round(gnorm, 4), tangent_norm=round(tnorm_sum, 4),
                          samples_per_s=round((step - logged) * cfg.batch / dt, 2))
                pbar.set_postfix(loss=f"{loss_avg:.4f}", T=f"{tnorm_sum:.2f}", gn=f"{gnorm:.2f}")
                t_last, logged = time.time(), step
            pbar.update(1)
            # checkpoint / export / validation eval; stop after a checkpoint if the scheduler sent SIGTERM
            if T.end_of_step(cfg, step, caught, device, rank, pbar, meter,
                             save=lambda: T.save_checkpoint(cfg.out, step, dmodel, ema, opt, {"config": asdict(cfg)},
                                                            g, rank, cfg.keep_ckpts),
                             export=lambda: T.export(cfg.out, dmodel, ema, "cm", rank),
                             eval_model=ema, sampler="fewstep"):
                break
    T.finish_run(pbar, dmodel, rank)


if __name__ == "__main__":
    main(T.parse_config(Config, doc=__doc__))
