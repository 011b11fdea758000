r"""
Flow-matching training of the MMDiT (paper §4.2, §5.1, Eq. 1): the teacher of UniPic 3.0.

Each example is one unified sequence [target ‖ ref_1 ‖ … ‖ ref_K]: only the target tokens are noised,
x_t = (1 − t)·x + t·ε, the references stay clean, and the loss is the velocity error on the target rows,
‖F_θ(x_t, t) − (ε − x)‖² (Eq. 1: `fm_loss` in train_common.py, the one implementation, which train_cm.py and
train_dmd.py share). Single-image editing and multi-image composition are the same problem here; the toy world
mixes both.

    torchrun --standalone --nproc_per_node=2 train_fm.py --compile true    # the v3 toy teacher, 2 processes (gloo)
    python train_fm.py --preset toy --steps 2000                         # a short run, one process, CPU
    torchrun --nproc_per_node=8 train_fm.py --assets Qwen-Image-Edit --data train.jsonl --init Unipic3/transformer \
        --fsdp true --bf16 true --grad_ckpt true --lr 1e-4 --lr_min 1e-5 --warmup 100 --logit_mean 0 \
        --batch 64 --micro_batch 1 --budget 1048576                                              # 20B, GPUs

Data: the toy world (default) or an official jsonl; either is encoded once (VAE latents + condition
embeddings of the instruction and of the null prompt " " with the same images) into a safetensors cache.
Every flag is a field of Config below. A bad flag or path stops the run with one `error:` line before any work;
SIGTERM / SIGUSR1 finish the step, write a checkpoint and exit 0, and --resume true continues exactly (the three
trainers share this: train_common.py).
"""
import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

import model as M
import train_common as T

# -----------------------------------------------------------------------------
# config


@dataclass
class Config(T.Config):
    """train_fm's flags: the shared ones (T.Config: data, batch, optimiser, precision, checkpoints, evaluation) with
    the teacher's recipe, and the flow-matching ones."""
    out: str = "runs/fm"
    init: str = ""  # a transformer folder to fine-tune (official or ours); empty: from scratch
    preset: str = "toy-144"  # the config when starting from scratch (the v3 toy teacher's; "toy" is width 96)
    steps: int = 16000  # the v3 toy teacher: 80 minutes on 2 CPU processes with --compile true (cache apart)
    lr: float = 3e-3  # ~1/width: 4e-3 at width 96, 3e-3 at 144, 2e-3 beat 1e-3 at 192 (ToyCom 0.202 vs 0.136)
    lr_min: float = 3e-5  # the quarter-cosine decays the lr to this
    warmup: int = 100  # linear lr warm-up steps
    ema: float = 0.998  # EMA decay per step (exported as ema_transformer/)
    cond_drop: float = 0.1  # instruction → " " (same images), so true CFG works at inference
    logit_mean: float = 1.0  # official 0 (use it for real data). The toy target is fully determined by the
    #   references, a skill only high t trains (at mid t the noisy target gives the colours away): with 0, the
    #   x0 error at t = 1 stalled at 0.59 (of 0.75 variance); with 1.0 it fell to 0.38 in the same steps
    lora_rank: int = 0  # > 0: train LoRA adapters only (merged into the exported folders)
    lora_alpha: float = 16.0  # LoRA scale alpha / rank
    compile: bool = False  # torch.compile each block (M.compile_blocks): 1.23× the samples/s at width 144 on this
    #   CPU after ≈ 90 s of compiling, so on for long runs (the teacher's command) and off for short ones and tests
    eval_every: int = 7000
    eval_steps: int = 20  # sampler steps at each evaluation
    eval_cfg: float = 2.0  # the toy teacher's best guidance (validation: CFG 1.5 / 2 / 3 → 0.597 / 0.614 / 0.587)


# -----------------------------------------------------------------------------
# training


def main(cfg):
    rank, world, device, per_rank, accum, dataset, lengths = T.start_run(cfg)

    sharded = cfg.fsdp and world > 1  # FSDP2: no rank ever holds the whole model (sharded.py, imported only then)
    if sharded:
        import sharded as SH

        model = SH.meta_mmdit(cfg.init or M.PRESETS[cfg.preset])
    elif cfg.init:
        model = M.load_mmdit(cfg.init, dtype=torch.float32, device="cpu")
    else:
        torch.manual_seed(cfg.seed)  # every rank builds the same initial weights
        model = M.MMDiT(M.PRESETS[cfg.preset]).init_weights()
    model.gradient_checkpointing = cfg.grad_ckpt
    if cfg.compile:
        M.compile_blocks(model)
    if cfg.lora_rank:  # adapters only (lora.py, imported only then)
        import lora

        lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha)
    T.freeze_unused(model)
    if sharded:  # each rank reads its own rows of --init (from scratch: drawn whole, as one process would)
        if cfg.init:
            source = SH.weight_tensors(cfg.init)
        else:
            torch.manual_seed(cfg.seed)
            source = M.MMDiT(M.PRESETS[cfg.preset]).init_weights().state_dict()
        SH.fill_shards(SH.shard(model, device, cfg.bf16), [source], cfg.init, cfg.seed)
        del source
        ema = SH.sharded_copy(model, device, cfg.bf16) if not cfg.lora_rank else None
    else:
        ema = M.MMDiT(model.cfg) if not cfg.lora_rank else None
        if ema is not None:
            ema.load_state_dict(model.state_dict())
            ema.requires_grad_(False).eval()
        model.to(device)
    dmodel = T.wrap(model, world, device, fsdp=cfg.fsdp, bf16=cfg.bf16)
    opt = T.make_optimizer(dmodel, cfg.lr, cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed * 7919 + rank)  # noise, t and condition dropout

    step = T.resume(cfg, dmodel, ema, opt, g, rank)
    meter = T.Meter(cfg.out, rank)
    params = sum(p.numel() for p in model.parameters())
    if rank == 0:
        print(f"{params / 1e6:.2f}M params, {len(dataset)} cached samples, {world} process(es), "
              f"batch {cfg.batch} = {world} × {accum} × {cfg.micro_batch}")
    pbar = tqdm(total=cfg.steps, initial=step, disable=rank != 0, desc="fm")
    t_last, tokens, rows, padded, logged = time.time(), 0, 0, 0, step
    with T.preemption_guard() as caught:
        while step < cfg.steps:
            lr = T.set_lr(opt, T.lr_at(step, cfg.lr, cfg.lr_min, cfg.warmup, cfg.steps))
            idx = T.batch_indices(step, lengths, cfg.batch, cfg.seed)[rank * per_rank : (rank + 1) * per_rank]
            loss_sum = 0.0
            for m in range(accum):
                items = [dataset[i] for i in idx[m * cfg.micro_batch : (m + 1) * cfg.micro_batch]]
                x, shapes, txt, txt_mask = T.make_batch(items, cfg.cond_drop, g, device)
                t = T.sample_t(shapes, g, cfg.logit_mean, cfg.logit_std).to(device)
                noise = torch.randn(x.shape, generator=g).to(device)
                with T.no_sync(dmodel, last=m == accum - 1), \
                        torch.autocast(device.type, torch.bfloat16, enabled=cfg.bf16):
                    loss = T.fm_loss(dmodel, x, shapes, txt, txt_mask, t, noise)
                    (loss / accum).backward()
                loss_sum += loss.item() / accum
                real = sum(sum(h * w for h, w in hw) for hw in shapes)  # image tokens
                batch_rows = x.shape[0] * (x.shape[1] + txt.shape[1])  # image + text rows, padding included
                tokens, rows = tokens + real, rows + batch_rows
                padded += batch_rows - real - int(txt_mask.sum())
            loss_avg = T.mean_over_ranks(torch.tensor(loss_sum)).item()
            if not math.isfinite(loss_avg):
                last = T.latest_checkpoint(cfg.out)
                raise SystemExit(f"error: loss is {loss_avg} at step {step}; stopped. Last good checkpoint: {last}")
            gnorm = torch.nn.utils.clip_grad_norm_(dmodel.parameters(), cfg.grad_clip).item()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                T.ema_update(ema, dmodel, T.ema_decay(step, cfg.ema))
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t_last
                tok_s = T.mean_over_ranks(torch.tensor(float(tokens))).item() * world / dt
                meter.log(step=step, loss=loss_avg, lr=lr, grad_norm=round(gnorm, 4), tokens_per_s=round(tok_s),
                          samples_per_s=round((step - logged) * cfg.batch / dt, 2),
                          padded=round(padded / max(1, rows), 3))
                pbar.set_postfix(loss=f"{loss_avg:.4f}", lr=f"{lr:.1e}", tok_s=f"{tok_s:.0f}")
                t_last, tokens, rows, padded, logged = time.time(), 0, 0, 0, step
            pbar.update(1)
            # checkpoint / export / validation eval; stop after a checkpoint if the scheduler sent SIGTERM
            if T.end_of_step(cfg, step, caught, device, rank, pbar, meter,
                             save=lambda: T.save_checkpoint(cfg.out, step, dmodel, ema, opt, {"config": asdict(cfg)},
                                                            g, rank, cfg.keep_ckpts),
                             export=lambda: (lora.export_merged(dmodel, cfg.out, rank, cfg.lora_rank, cfg.lora_alpha)
                                             if cfg.lora_rank else T.export(cfg.out, dmodel, ema, "teacher", rank)),
                             eval_model=ema if ema is not None else dmodel, sampler="euler"):
                break
    T.finish_run(pbar, dmodel, rank)


if __name__ == "__main__":
    main(T.parse_config(Config, doc=__doc__))
