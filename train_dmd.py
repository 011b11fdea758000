r"""
Distribution matching distillation (paper §4.3, Eq. 12–14): the few-step student's samples are pushed towards
the CFG teacher's distribution.

DMD minimises the reverse KL(p_θ ‖ p_teacher) between the student's output distribution and the teacher's. Its
gradient with respect to the student is an expectation over the student's own samples x = G_θ(ε), re-noised to
x_t = (1 − t)·x + t·ε̂ (Eq. 12):
    ∇_θ KL = E[ −w(t)·(∇log p_teacher(x_t) − ∇log p_θ(x_t)) · ∂G_θ/∂θ ].
Both scores come from velocity networks through ∇log p(x_t) = −(x_t + (1 − t)·F(x_t, t)) / t: the teacher's (with
CFG) and a *fake score* F_φ trained by flow matching on the student's samples, which tracks p_θ (the student's
own score is intractable). The x_t terms cancel in the difference, leaving (Eq. 13)
    g = (1 − t)/t · (F_teacher^CFG(x_t, t) − F_φ(x_t, t)),
and the student follows it through a stop-gradient regression whose gradient on G_θ is exactly g (Eq. 14):
    L_DMD = ½‖G_θ − sg(G_θ − g)‖².
Reverse KL is mode-seeking: the student may drop modes (placements) but not blur them, which is what removes the
few-step blur the consistency model leaves.

Each student update (official ratio): `fake_updates` flow-matching updates of F_φ on fresh student samples, then one
student update. The generator is sampled by *backward simulation* (DMD2 §4.5): n = 1…4 steps cycling on the
few-step grid, the first n − 1 under no_grad with the few-step update of the sampler (sample.fewstep_update) and
fresh noise, the gradient through the last step only — the student is trained at the inputs it meets at inference.

Official variants (public UniPic-3 trainer), each behind a flag:
  --weighting official  g = (v_T − v_φ) / mean|x0 − ε̂ + v_T| per sample, fp64, floor 1e-5 (DMD's normaliser
                        1/mean|x0 − x̂0_teacher| in velocity form); "paper" = (1 − t)/t.
  --fake_lora_rank 0    the fake score is a full copy of the teacher (official code); r > 0: the paper's LoRA on
                        the teacher, sharing its base tensors (teacher calls run with the adapters off).
  --teacher_cfg 6       true CFG of the teacher (paper); --cfg_rescale false as the official trainer (the sampler's
                        per-token norm rescale is on at inference).
  --fake_cos_loss       + mean(1 − cos) in the fake score's loss (official); --renoise_clamp: t in [0.02, 0.98].
  --init2 PATH          start from the 50/50 average of --init and PATH (the released DMD averaged CM checkpoints).

    python train_dmd.py                                                    # toy, one process
    torchrun --standalone --nproc_per_node=2 train_dmd.py                  # toy, 2 processes (gloo)
    torchrun --nproc_per_node=8 train_dmd.py --assets Qwen-Image-Edit --data train.jsonl \
        --teacher Unipic3/transformer --init CM_RUN/ema_transformer --fsdp true --bf16 true --grad_ckpt true \
        --fake_lora_rank 64 --lr 2e-6 --lr_fake 2e-6 --teacher_cfg 6 --batch 64 --micro_batch 1 --budget 1048576
                                            # 20B on 8 GPUs: the LoRA fake score fits 80 GB (sharded.memory_plan)
"""
import contextlib
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
from sample import TOY_CKPT, SchedulerConfig, cfg_combine, fewstep_times, fewstep_update

# -----------------------------------------------------------------------------
# the objective


def fake_score_loss(fake, x0, shapes, txt, txt_mask, t, noise, cos_loss=True):
    """The fake score F_φ learns the student's distribution by flow matching (Eq. 1, T.fm_loss) on the student's
    samples x0 [B, N, C], re-noised with `noise` at t [B]; --fake_cos_loss adds mean(1 − cos) over channels (the
    official trainer); a non-finite loss becomes finite (nan_to_num), as train_cm.py's."""
    return torch.nan_to_num(T.fm_loss(fake, x0, shapes, txt, txt_mask, t, noise, cos_loss=cos_loss))


def dmd_grad(v_teacher, v_fake, t, x0, noise, weighting="official", floor=1e-5):
    """Eq. 13: the per-element gradient g on the student's sample x0 [B, N, C] (rows outside the target are the
    caller's to mask). v_teacher, v_fake: velocities at x_t; t [B]; noise: the re-noising ε̂."""
    diff = (v_teacher.double() - v_fake.double())
    if weighting == "paper":
        tt = t.double()[:, None, None]
        return ((1 - tt) / tt * diff).float()
    # official: divide by the mean |x0 − ε̂ + v_T| of each sample, in fp64, with a floor
    norm = (x0.double() - noise.double() + v_teacher.double()).abs().flatten(1).mean(1).clamp(min=floor)
    return (diff / norm[:, None, None]).float()


def dmd_loss(x0, g, tgt):
    """Eq. 14: ½‖x0 − sg(x0 − g)‖² over the target rows, per-sample mean then batch mean: autograd gives
    ∂L/∂x0 = g / (elements · batch) — the direction g exactly."""
    err = (x0 - (x0 - g).detach()).pow(2) * tgt
    return 0.5 * (err.sum((1, 2)) / (tgt.sum((1, 2)) * x0.shape[2])).mean()


def backward_simulate(student, noise, x, tgt, shapes, txt, txt_mask, n, sched, generator, grad=True):
    """A student sample with n few-step updates from pure noise on the target rows (references clean): the
    first n − 1 under no_grad with fresh noise, the last one with the gradient (if grad). Returns x0 [B, N, C]."""
    times = torch.stack([fewstep_times(n, hw[0][0] * hw[0][1], sched) for hw in shapes]).float()  # [B, n+1]
    xt = torch.where(tgt, noise, x)
    for i in range(n):
        t = times[:, i].to(x.device)
        last = i == n - 1
        with torch.set_grad_enabled(grad and last):
            v = student(xt, shapes, txt, txt_mask, t)
            if last:
                return torch.where(tgt, xt - t[:, None, None] * v, x)
        fresh = torch.randn(x.shape, generator=generator).to(x.device)
        with torch.no_grad():
            xt = torch.where(tgt, fewstep_update(xt, v, t[:, None, None], times[:, i + 1].to(x.device)[:, None, None],
                                                 fresh), x)


def teacher_velocity(teacher, xt, shapes, txt, txt_mask, neg, neg_mask, t, scale, rescale):
    """F_teacher^CFG: cond and uncond (" " with the same images) in one forward."""
    v = teacher(torch.cat([xt, xt]), shapes + shapes, *pad_text_pair(txt, txt_mask, neg, neg_mask), torch.cat([t, t]))
    v_c, v_u = v.chunk(2)
    return cfg_combine(v_c, v_u, scale) if rescale else v_u + scale * (v_c - v_u)


# -----------------------------------------------------------------------------
# config


@dataclass
class Config(T.Config):
    """train_dmd's flags: the shared ones (T.Config) with the distillation recipe, and the objective's variants."""
    out: str = "runs/dmd"
    teacher: str = os.path.join(TOY_CKPT, "transformer")  # frozen; also the fake score's init
    init: str = os.path.join(TOY_CKPT, "transformer_cm")  # the student's init: the consistency model
    init2: str = ""  # if set: the student starts from the 50/50 average of init and init2
    steps: int = 200  # student updates (toy, teacher CFG 1, val at 2 steps: 100 / 200 / 400 → 0.665 / 0.692 / 0.631)
    batch: int = 8
    micro_batch: int = 4
    lr: float = 2e-5  # student (official 2e-6 at 20B); quarter-cosine to lr_min
    lr_min: float = 2e-6
    lr_fake: float = 2e-5  # fake score (the official code uses the student's lr; the paper says 4e-7)
    fake_updates: int = 4  # fake-score updates per student update (official 4)
    fake_lora_rank: int = 0  # 0: full copy of the teacher (official code); r > 0: LoRA on the shared teacher
    fake_lora_alpha: float = 16.0  # LoRA scale of the fake score
    fake_cos_loss: bool = True  # + mean(1 − cos) in the fake score's flow-matching loss (official)
    teacher_cfg: float = 1.0  # toy: 1, its few-step samples' best (CFG 2 at 1 step: editing 0.74 → 0.08); paper 6.0
    cfg_rescale: bool = False  # the sampler's per-token norm rescale in the teacher's CFG (official trainer: off)
    weighting: str = "official"  # "official" (the DMD normaliser) or "paper" ((1 − t)/t, Eq. 13)
    max_gen_steps: int = 4  # backward simulation cycles n = 1 … max_gen_steps; 1 = no backward simulation
    renoise_clamp: bool = True  # re-noise t clamped to [0.02, 0.98] (DMD2 practice)
    logit_mean: float = 0.0  # mean of the logit-normal t of the fake score's loss and the re-noise
    ema: float = 0.95  # per student update (official)
    log_every: int = 5
    save_every: int = 100
    eval_every: int = 100


def build_models(cfg, device, sharded=False):
    """student (init, or the average of init and init2), its EMA, the frozen teacher and the fake score F_φ
    (a full copy of the teacher, or LoRA adapters on the teacher itself: then `fake is teacher`).
    sharded (FSDP2): no rank holds a whole model (sharded.dmd_models)."""
    if sharded:
        import sharded as SH  # FSDP2 only: the toy path never loads it

        return SH.dmd_models(cfg, device)
    student = M.load_mmdit(cfg.init, dtype=torch.float32)
    if cfg.init2:
        other = M.load_mmdit(cfg.init2, dtype=torch.float32).state_dict()
        student.load_state_dict({k: 0.5 * (v + other[k]) for k, v in student.state_dict().items()})
    T.freeze_unused(student)
    ema = copy.deepcopy(student).requires_grad_(False).eval()
    teacher = M.load_mmdit(cfg.teacher, dtype=torch.float32).requires_grad_(False).eval()
    if cfg.fake_lora_rank:  # lora.py, imported only then
        import lora

        lora.add_lora(teacher, cfg.fake_lora_rank, cfg.fake_lora_alpha)  # only the adapters train
        fake = teacher
    else:
        fake = copy.deepcopy(teacher).requires_grad_(True).train()
        T.freeze_unused(fake)
    return student.to(device), ema, teacher.to(device), fake.to(device)


# -----------------------------------------------------------------------------
# training


def main(cfg):
    rank, world, device, per_rank, accum, dataset, lengths = T.start_run(cfg)

    student, ema, teacher, fake = build_models(cfg, device, sharded=cfg.fsdp and world > 1)
    student.gradient_checkpointing = fake.gradient_checkpointing = cfg.grad_ckpt  # (a LoRA fake is the teacher)
    dstudent = T.wrap(student, world, device, fsdp=cfg.fsdp, bf16=cfg.bf16)
    dfake = T.wrap(fake, world, device, fsdp=cfg.fsdp, bf16=cfg.bf16)
    opt = T.make_optimizer(dstudent, cfg.lr, cfg.weight_decay)
    opt_fake = T.make_optimizer(dfake, cfg.lr_fake, cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + rank)
    sched = SchedulerConfig.from_folder(cfg.assets)
    teacher_off = contextlib.nullcontext
    if cfg.fake_lora_rank:  # a LoRA fake score is the teacher with adapters: teacher calls run with them off
        import lora

        teacher_off = lora.lora_off

    step = T.resume(cfg, dstudent, ema, opt, g, rank, extra={"fake": (dfake, opt_fake)})
    meter = T.Meter(cfg.out, rank)
    if rank == 0:
        print(f"DMD of {cfg.init} towards {cfg.teacher} (CFG {cfg.teacher_cfg}): {len(dataset)} cached samples, "
              f"{world} process(es), fake score {'LoRA r=%d' % cfg.fake_lora_rank if cfg.fake_lora_rank else 'full copy'}")
    pbar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="dmd")
    t_last, logged, micro = time.time(), step, 0

    def next_batch():  # the data position is (step, micro-batch counter): resume-exact
        nonlocal micro
        idx = T.batch_indices(step * (cfg.fake_updates + 1) + micro, lengths, cfg.batch, cfg.seed)
        micro = (micro + 1) % (cfg.fake_updates + 1)
        idx = idx[rank * per_rank : (rank + 1) * per_rank]
        return [[dataset[i] for i in idx[m * cfg.micro_batch : (m + 1) * cfg.micro_batch]] for m in range(accum)]

    def renoise_t(shapes):
        t = T.sample_t(shapes, g, cfg.logit_mean, cfg.logit_std).to(device)
        return t.clamp(0.02, 0.98) if cfg.renoise_clamp else t

    with T.preemption_guard() as caught:
        while step < cfg.steps:
            lr = T.set_lr(opt, T.lr_at(step, cfg.lr, cfg.lr_min, 0, cfg.steps))
            n_gen = step % cfg.max_gen_steps + 1  # backward simulation: 1, 2, 3, 4, 1, …
            # 1. the fake score F_φ: flow matching (Eq. 1) on fresh student samples
            fake_loss = 0.0
            for _ in range(cfg.fake_updates):
                for m, items in enumerate(next_batch()):
                    x, shapes, txt, txt_mask = T.make_batch(items, 0.0, g, device)
                    tgt = target_rows(shapes, x.shape[1], device)[..., None]
                    with torch.no_grad():
                        x0 = backward_simulate(T.unwrap(dstudent), torch.randn(x.shape, generator=g).to(device), x, tgt,
                                               shapes, txt, txt_mask, n_gen, sched, g, grad=False)
                    t, eps = renoise_t(shapes), torch.randn(x.shape, generator=g).to(device)
                    with T.no_sync(dfake, last=m == accum - 1):
                        loss = fake_score_loss(dfake, x0, shapes, txt, txt_mask, t, eps, cfg.fake_cos_loss)
                        (loss / accum).backward()
                    fake_loss += loss.item() / accum / cfg.fake_updates
                torch.nn.utils.clip_grad_norm_(dfake.parameters(), cfg.grad_clip)
                opt_fake.step()
                opt_fake.zero_grad(set_to_none=True)
            # 2. the student: Eq. 13–14 through its last few-step update
            stats = dict(loss=0.0, g_abs=0.0, x0_mean=0.0, x0_std=0.0)
            for m, items in enumerate(next_batch()):
                x, shapes, txt, txt_mask, neg, neg_mask = T.make_batch(items, 0.0, g, device, with_neg=True)
                tgt = target_rows(shapes, x.shape[1], device)[..., None]
                with T.no_sync(dstudent, last=m == accum - 1):
                    x0 = backward_simulate(dstudent, torch.randn(x.shape, generator=g).to(device), x, tgt, shapes, txt,
                                           txt_mask, n_gen, sched, g)
                    t, eps = renoise_t(shapes), torch.randn(x.shape, generator=g).to(device)
                    with torch.no_grad():
                        xt = T.on_path(x0.detach(), eps, tgt, t)
                        with teacher_off(teacher):
                            v_t = teacher_velocity(teacher, xt, shapes, txt, txt_mask, neg, neg_mask, t,
                                                   cfg.teacher_cfg, cfg.cfg_rescale)
                        v_f = T.unwrap(dfake)(xt, shapes, txt, txt_mask, t)
                        grad = dmd_grad(v_t, v_f, t, x0.detach(), eps, cfg.weighting) * tgt
                    loss = dmd_loss(x0, grad, tgt)
                    (loss / accum).backward()
                real = x0.detach()[tgt.expand_as(x0)]
                for k, v in (("loss", loss.item()), ("g_abs", grad[tgt.expand_as(grad)].abs().mean().item()),
                             ("x0_mean", real.mean().item()), ("x0_std", real.std().item())):
                    stats[k] += v / accum
            loss_avg = T.mean_over_ranks(torch.tensor(stats["loss"])).item()
            if not math.isfinite(loss_avg) or not math.isfinite(fake_loss):
                raise SystemExit(f"error: loss is {loss_avg} (fake {fake_loss}) at step {step}; stopped. Last good "
                                 f"checkpoint: {T.latest_checkpoint(cfg.out)}")
            gnorm = torch.nn.utils.clip_grad_norm_(dstudent.parameters(), cfg.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            opt_fake.zero_grad(set_to_none=True)  # the student's pass must leave nothing in the fake score's grads
            T.ema_update(ema, dstudent, cfg.ema)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t_last
                meter.log(step=step, loss=loss_avg, fake_loss=round(fake_loss, 5), lr=lr, grad_norm=round(gnorm, 4),
                          n_gen=n_gen, **{k: round(v, 4) for k, v in stats.items() if k != "loss"},
                          steps_per_min=round((step - logged) * 60 / dt, 2))
                pbar.set_postfix(loss=f"{loss_avg:.4f}", fake=f"{fake_loss:.3f}", x0_std=f"{stats['x0_std']:.2f}")
                t_last, logged = time.time(), step
            pbar.update(1)
            # checkpoint (the fake score and its optimiser too) / export / validation eval; stop after a
            # checkpoint if the scheduler sent SIGTERM
            if T.end_of_step(cfg, step, caught, device, rank, pbar, meter,
                             save=lambda: T.save_checkpoint(cfg.out, step, dstudent, ema, opt, {"config": asdict(cfg)},
                                                            g, rank, cfg.keep_ckpts, extra={"fake": (dfake, opt_fake)}),
                             export=lambda: T.export(cfg.out, dstudent, ema, "dmd", rank),
                             eval_model=ema, sampler="fewstep"):
                break
    T.finish_run(pbar, dstudent, rank)


if __name__ == "__main__":
    main(T.parse_config(Config, doc=__doc__))
