"""
Plumbing shared by train_fm.py, train_cm.py and train_dmd.py — plain functions, no Trainer class: process groups (DDP,
or FSDP2 for the 20B model), AdamW without decay on 1-D params, the official quarter-cosine LR schedule, EMA, the
timestep sampler, the latent cache (one for all three trainers) and its batches, checkpoints, evals, metrics.

OUT/ holds ckpt/step_000100/ (a checkpoint: see the checkpoints section), ckpt/latest (names the last complete step
folder), transformer/ and ema_transformer/ (official layout: load_mmdit, diffusers). FSDP2 (--fsdp true under torchrun,
the 20B path) never puts a whole model on one rank: what only it needs (the meta-device build, per-rank reads, the
sharded checkpoint format dcp/, the streamed export, the memory plan) is sharded.py, never loaded on the toy path.

Failing fast and recovering (the same for the three trainers):
  - check_config: every flag and path checked before any process group, model or cache: one `error:` line;
  - atomic checkpoints: a step folder is written whole (temp + rename) before `latest` names it, so a run killed
    mid-write leaves the previous one loadable; the last --keep_ckpts stay, and --resume true verifies them newest
    first, falls back past a damaged one with a one-line warning and goes on bit-identically (resume);
  - SIGTERM / SIGUSR1: every rank finishes the same step, checkpoints and exits 0 (preemption_guard, end_of_step);
  - the latent cache: a killed build resumes at its first unfinished shard, a corrupt shard is one line naming
    the file and how to rebuild it (build_cache, data.cache_latents).
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

import data as D
import model as M
from pack import collate, pad_text, target_rows, unified_sequence
import eval as E
import sample as S
import text_encoder as TE
import toyworld
import vae as V
from sample import TOY_CKPT, SchedulerConfig, calculate_mu, parse_config, shift_value, time_shift

# -----------------------------------------------------------------------------
# config: dataclass defaults, overridden by --field value on the command line


@dataclass(kw_only=True)
class Config:
    """The flags the three trainers share; each trainer's Config adds its method's flags and sets its recipe (the
    fields without a default here, any default it changes). Every field is a flag (parse_config); its comment, here
    or in the trainer, is its --help."""
    assets: str = TOY_CKPT  # pipeline root with vae/, text_encoder/, tokenizer/ (frozen encoders)
    data: str = "toy:posed"  # "toy:posed" (what the toy models train on), "toy" (free layouts) or an official jsonl
    n_data: int = 12000  # toy samples to generate and cache (≈ 16 minutes once on 2 CPU processes; CM, DMD reuse it)
    budget: int = toyworld.TOY_BUDGET  # joint pixel budget of the inputs, and of the target (toy 128², official 1024²)
    cache: str = "data_cache/toy_fm"  # where encoded latents and embeddings go (one cache serves the three trainers)
    out: str  # run folder: ckpt/, transformer/, ema_transformer/, metrics.jsonl, eval_*/
    init: str  # the transformer folder training starts from
    steps: int  # optimiser steps
    batch: int = 16  # global batch; accumulation = batch / (micro_batch · processes)
    micro_batch: int = 8  # samples per forward; the rest of the batch is gradient accumulation
    lr: float  # AdamW learning rate after the warm-up
    lr_min: float  # the quarter-cosine decays the lr to this
    weight_decay: float = 0.05  # AdamW decay (not on biases and norms)
    grad_clip: float = 1.0  # global gradient-norm clip
    ema: float  # EMA decay per update (exported as ema_transformer/)
    logit_mean: float  # mean of the logit-normal t (official 0)
    logit_std: float = 1.0  # std of the logit-normal t
    fsdp: bool = False  # FSDP2 per block instead of DDP (the 20B model)
    bf16: bool = False  # bf16 autocast (fp32 master weights) / FSDP2 bf16 params (GPU)
    grad_ckpt: bool = False  # activation checkpointing per block of every trained network (memory for time)
    log_every: int = 10  # steps between metrics.jsonl lines
    save_every: int = 500  # steps between checkpoints and exported folders
    keep_ckpts: int = 2  # step folders kept under OUT/ckpt; resume falls back past a damaged newest one
    eval_every: int  # steps between validation evaluations
    eval_cases: int = 16  # ToyCom validation cases sampled at each eval (toy data only; never the bench)
    eval_steps: int = 4  # sampler steps at each evaluation
    eval_cfg: float = 1.0  # CFG at each evaluation
    seed: int = 0  # data order, noise, t and initial weights
    resume: bool = False  # continue from OUT/ckpt exactly


# what check_config knows of the flags; a flag a Config does not have is skipped
RANGES = ((("steps", "batch", "micro_batch", "n_data", "budget", "lr", "lr_fake", "grad_clip", "log_every",
            "save_every", "keep_ckpts", "fake_updates", "max_gen_steps", "fd_eps", "tangent_c", "logit_std"),
           "> 0", lambda v: v > 0),  # `not v > 0` also catches nan
          (("lr_min", "warmup", "weight_decay", "eval_cases", "lora_rank", "fake_lora_rank", "guidance"),
           ">= 0", lambda v: v >= 0),
          (("ema", "cond_drop"), "in [0, 1]", lambda v: 0 <= v <= 1))
CHOICES = {"preset": M.PRESETS, "guidance_from": ("teacher", "ema"), "weighting": ("official", "paper")}
TRANSFORMERS = ("init", "init2", "teacher")  # transformer folders (config.json + weights); empty: not used
ASSET_FOLDERS = ("vae", "text_encoder", "tokenizer", "processor")  # what the latent cache's encoders read


def check_config(cfg):
    """Every flag and path, before anything is built or written: SystemExit("error: …") naming the flag,
    one line (printed by rank 0 alone under torchrun), exit code 1."""
    if problem := config_problem(cfg, int(os.environ.get("WORLD_SIZE", 1))):
        raise SystemExit(f"error: {problem}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def config_problem(cfg, world):
    """The first problem with cfg as a one-line string, or None."""
    has = lambda name: hasattr(cfg, name)
    for names, rule, ok in RANGES:
        for name in filter(has, names):
            if not ok(getattr(cfg, name)):
                return f"--{name} must be {rule}, got {getattr(cfg, name)}"
    if cfg.eval_cases:
        for name in ("eval_every", "eval_steps"):
            if not getattr(cfg, name) > 0:
                return f"--{name} must be > 0 while --eval_cases is {cfg.eval_cases} (0 turns evaluation off)"
    for name, allowed in CHOICES.items():
        if has(name) and getattr(cfg, name) not in allowed:
            return f"--{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}"
    if cfg.batch % world or cfg.batch // world % cfg.micro_batch:
        return (f"--batch {cfg.batch} must split into {world} process(es) × a multiple of --micro_batch "
                f"{cfg.micro_batch}")
    for name in filter(has, TRANSFORMERS):
        path = getattr(cfg, name)
        required = name == "teacher" or (name == "init" and not has("preset"))  # FM can start from scratch
        if (path or required) and (problem := folder_problem(path)):
            return f"--{name} {path!r} is not a transformer folder ({problem})"
    if not os.path.isdir(cfg.assets):
        return f"--assets {cfg.assets!r} is not a folder"
    for sub in ASSET_FOLDERS:
        if not os.path.isdir(os.path.join(cfg.assets, sub)):
            return f"--assets {cfg.assets!r} has no {sub}/ folder (needs {', '.join(ASSET_FOLDERS)})"
    if problem := data_problem(cfg.data, cfg.budget):
        return problem
    for name in ("out", "cache"):
        if os.path.exists(getattr(cfg, name)) and not os.path.isdir(getattr(cfg, name)):
            return f"--{name} {getattr(cfg, name)!r} exists and is not a folder"
    return None


def folder_problem(path):
    """Why `path` is not a folder with a readable config.json, or None."""
    if not os.path.isdir(path):
        return "no such folder"
    try:
        with open(os.path.join(path, "config.json")) as f:
            json.load(f)
    except (OSError, ValueError) as e:
        return f"config.json: {one_line(e)}"
    return None


def data_problem(data, budget):
    """Why --data is unusable, or None: "toy" / "toy:LAYOUT", or a jsonl with at least one usable line (read up
    to the image headers; the bad lines' numbers are reported as the loader does)."""
    try:
        if D.toy_world_config(data):
            return None
    except ValueError as e:  # an unknown toy layout: the message names --data
        return one_line(e)
    if not os.path.isfile(data):
        return f"--data {data}: no such file (give a jsonl of triplets, or toy / toy:LAYOUT)"
    try:
        D.JsonlDataset(data, budget=budget, verify=False)
    except (OSError, ValueError) as e:
        return f"--data {data}: {one_line(e).removeprefix(data + ': ')}"
    return None


# -----------------------------------------------------------------------------
# processes: one plain process, or torchrun (DDP / FSDP2)


def setup_dist():
    """→ (rank, world, device). torchrun sets RANK/WORLD_SIZE; gloo on CPU, nccl on GPU."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if cuda else "cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def start_run(cfg):
    """Every trainer's start: flags checked, then processes, seeds, the output folder, the batch split and the latent
    cache. → (rank, world, device, per-rank batch, accumulation steps, dataset, each sample's row count)."""
    check_config(cfg)
    rank, world, device = setup_dist()
    torch.manual_seed(cfg.seed + rank)
    per_rank = cfg.batch // world
    os.makedirs(cfg.out, exist_ok=True)
    if rank == 0 and not cfg.resume and checkpoints(cfg.out):
        print(f"warning: {cfg.out} holds checkpoints of an earlier run; without --resume true this run starts at "
              f"step 0 and replaces them as it saves", file=sys.stderr)
    dataset = build_cache(cfg, rank, world)
    lengths = [d.length(i) for d in dataset.datasets for i in range(len(d))]  # rows per sample, for batch_indices
    return rank, world, device, per_rank, per_rank // cfg.micro_batch, dataset, lengths


def cleanup_dist():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def finish_run(pbar, model, rank):
    """After the loop: close the progress bar, check that the DDP ranks hold the same weights (a checksum per tensor,
    gathered), leave the group."""
    pbar.close()
    if dist.is_initialized() and not is_sharded(model):
        sums = [p.detach().double().sum().item() for p in unwrap(model).parameters()]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, sums)
        if any(g != gathered[0] for g in gathered):
            raise SystemExit("error: the processes ended with different weights")
        if rank == 0:
            print(f"ranks agree: identical weights on {len(gathered)} processes")
    cleanup_dist()


def freeze_unused(model):
    """The last block's text stream feeds nothing (its output is discarded, as in the official model), so its
    `to_add_out` and `txt_mlp` never get a gradient. Freezing them lets DDP run without unused-parameter search."""
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
    for n, p in model.named_parameters():
        if n.startswith(last) and (".attn.to_add_out." in n or ".txt_mlp." in n):
            p.requires_grad_(False)


def wrap(model, world, device, fsdp=False, bf16=False):
    """DDP for models whose AdamW state fits on one device; FSDP2 (`sharded.shard`) for the 20B model. Plain model
    when there is one process; a model already sharded (by sharded.py) is returned as it is."""
    if world == 1 or is_sharded(model):
        return model
    if fsdp:
        return _sharded().shard(model, device, bf16)
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_sync(model, last):
    """Gradient sync only on the last micro-step of an accumulation (DDP `no_sync`, FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    elif hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def _sharded():
    """sharded.py, imported only where a sharded model or checkpoint is met (never on the toy path)."""
    import sharded

    return sharded


def is_sharded(model):
    """True when FSDP2 has turned the parameters into DTensor shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model):
    """The whole model's weights on the CPU (gathered from FSDP2 shards when sharded), official names."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def mean_over_ranks(x):
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# preemption: a cluster scheduler sends SIGTERM (SLURM can send SIGUSR1 ahead of time) before it kills the job


@contextlib.contextmanager
def preemption_guard():
    """Around the training loop: SIGTERM / SIGUSR1 only append their name to the yielded list, so the loop can
    finish its step, checkpoint and exit 0 (see `end_of_step`). The previous handlers come back afterwards."""
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signal.Signals(signum).name))
           for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def end_of_step(cfg, step, caught, device, rank, pbar, meter, save, export, eval_model, sampler):
    """`save()` every --save_every steps, at the last step and at once when any rank was signalled; `export()` with
    the scheduled saves only (the grace period is short); a validation eval of `eval_model` every --eval_every steps
    on toy data. True when the loop must stop (preempted), after saying how to continue."""
    saving = step % cfg.save_every == 0 or step == cfg.steps
    flag = torch.tensor([float(len(caught) > 0)], device=device)
    if dist.is_initialized():  # one rank signalled: all stop after this step, whichever the scheduler signalled
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    stop = flag.item() > 0
    if saving or stop:
        save()
    if saving:
        export()
    if stop:
        pbar.close()
        if rank == 0:
            why = caught[0] if caught else "a signal to another process"
            print(f"stopped by {why} after step {step}: checkpoint {os.path.join(cfg.out, 'ckpt', f'step_{step:06d}')}"
                  f"; continue with --resume true", flush=True)
        return True
    if D.toy_world_config(cfg.data) and cfg.eval_cases and (step % cfg.eval_every == 0 or step == cfg.steps):
        # a sharded model: a plain copy on rank 0 (collective)
        net = _sharded().gathered(eval_model, rank) if is_sharded(eval_model) else unwrap(eval_model)
        if rank == 0:
            evaluate(cfg.assets, net, cfg.out, step, meter, cfg.eval_cases, cfg.eval_steps, cfg.eval_cfg, sampler)
    return False


# -----------------------------------------------------------------------------
# optimiser, schedule, EMA


def make_optimizer(model, lr, weight_decay=0.05, betas=(0.9, 0.95), eps=1e-8):
    """AdamW as the official trainers: no weight decay on 1-D parameters (biases, norm weights)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)  # one kernel: toy CPU step 16 → 4 ms


def lr_at(step, lr, lr_min, warmup, total):
    """Linear warmup, then the official "cosine": a quarter cosine max(cos(π·x/2), lr_min/lr)·lr."""
    if step < warmup:
        return lr * (step + 1) / warmup
    x = (step - warmup) / max(1, total - warmup)
    return lr * max(math.cos(math.pi * x / 2), lr_min / lr)


def set_lr(opt, lr):
    """Set every parameter group of opt to lr (the step's lr_at); returns lr."""
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def ema_decay(step, decay):
    """EMA warm-up: min(decay, (1 + step) / (10 + step)), so a short run's EMA is not dominated by the init
    (0.998 alone still weighs the init 25% after 700 steps)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema ← decay·ema + (1 − decay)·model, over the full weights. Under FSDP2 the EMA is sharded like the model
    and each rank updates its own rows (sharded.ema_update)."""
    if is_sharded(model):
        return _sharded().ema_update(ema, model, decay)
    src = unwrap(model).state_dict()
    if not src:
        return
    for k, v in ema.state_dict().items():
        v.lerp_(src[k].to(v.device, v.dtype), 1 - decay)


# -----------------------------------------------------------------------------
# flow matching (Eq. 1), the one implementation: train_fm.py's objective, the regression of train_cm.py's Eq. 11
# and of train_dmd.py's fake score


def sample_t(shapes, generator, mean=0.0, std=1.0, sched=SchedulerConfig()):
    """Logit-normal t, then the same dynamic shift as sampling, from each sample's target token count."""
    t = torch.sigmoid(torch.randn(len(shapes), generator=generator) * std + mean)
    shift = torch.tensor([shift_value(calculate_mu(hw[0][0] * hw[0][1], sched), sched) for hw in shapes])
    return time_shift(t, shift)


def on_path(x, noise, tgt, t):
    """The straight path at time t [B]: x_t = (1 − t)·x + t·ε on the target rows (tgt [B, N, 1]), references clean."""
    tt = t[:, None, None]
    return torch.where(tgt, (1 - tt) * x + tt * noise, x)


def fm_loss(model, x, shapes, txt, txt_mask, t, noise, target=None, cos_loss=False):
    """Eq. (1) on the target rows: ‖F(x_t, t) − (ε − x)‖²; x (clean), noise [B, N, C] zero-padded, t [B] in (0, 1).
    Per-sample mean, then the batch mean (the official trainers run batch 1 per GPU). target [B, N, C] (fp32): in
    place of ε − x (CM's Eq. 11); cos_loss: + mean(1 − cos) over latent channels (the official CM, DMD trainers)."""
    tgt = target_rows(shapes, x.shape[1], x.device)[..., None]  # [B, N, 1]
    v = model(on_path(x, noise, tgt, t), shapes, txt, txt_mask, t).float()
    target = (noise - x).float() if target is None else target
    loss = (((v - target).pow(2) * tgt).sum((1, 2)) / (tgt.sum((1, 2)) * x.shape[2])).mean()
    if cos_loss:
        cos = torch.nn.functional.cosine_similarity(v, target, dim=-1, eps=1e-8)[..., None]  # [B, N, 1]
        loss = loss + ((1 - cos) * tgt).sum((1, 2)).div(tgt.sum((1, 2))).mean()
    return loss


# -----------------------------------------------------------------------------
# data: encode once, then batches of unified sequences (shared by the three trainers: one latent cache)


def build_cache(cfg, rank, world):
    """Each process encodes its share (i ≡ rank mod world) into cache/<fingerprint>/part{rank}of{world}; returns the
    full dataset. The fingerprint covers the data, its size, the world version and the encoder files (a changed VAE
    is never reused); a complete cache written by any number of processes is reused. Killed builds resume."""
    files = [os.path.join(cfg.assets, d, f) for d in ("vae", "text_encoder")
             for f in sorted(os.listdir(os.path.join(cfg.assets, d)))]
    key = json.dumps([cfg.data, cfg.n_data, cfg.budget, cfg.seed, toyworld.WORLD_VERSION]
                     + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files])
    root = os.path.join(cfg.cache, hashlib.sha1(key.encode()).hexdigest()[:12])
    complete = lambda w: all(os.path.exists(os.path.join(root, f"part{r}of{w}", "index.json")) for r in range(w))
    built = sorted(int(d.rpartition("of")[2]) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if d.startswith("part0of") and complete(int(d.rpartition("of")[2])))
    W = built[0] if built else world  # a cache built by another number of processes is the same data: reuse it
    parts = [os.path.join(root, f"part{r}of{W}") for r in range(W)]
    if W == world and not os.path.exists(os.path.join(parts[rank], "index.json")):
        vae = V.load_vae(os.path.join(cfg.assets, "vae"))
        te = TE.load_text_encoder(cfg.assets)
        toy = D.toy_world_config(cfg.data)
        ds = (D.ToyDataset(cfg.n_data, seed=toyworld.TRAIN_SEED + cfg.seed, budget=cfg.budget, cfg=toy) if toy
              else D.JsonlDataset(cfg.data, budget=cfg.budget))
        shard = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
        if rank == 0:  # the one-time cost, said up front
            print(f"latent cache: encoding {len(ds)} samples into {root} ({world} process(es)); reused by every "
                  f"later run with the same --data/--n_data/--budget/--seed and encoders", flush=True)
        # references arrive jointly resized already (pixel_budget=None: only the 28/32 copy for the encoder);
        # the posterior mean is cached (the official trainers draw a VAE sample each time)
        D.cache_latents(shard, lambda x: vae.normalize(vae.encode(x)),
                        lambda p, ims: te.encode(p, ims, pixel_budget=None),
                        parts[rank], shard_size=D.CACHE_SHARD, null_prompt=" ")
    if dist.is_initialized():
        dist.barrier()
    try:
        return torch.utils.data.ConcatDataset([D.LatentDataset(p) for p in parts])
    except ValueError as e:  # a corrupt shard: one line naming it and how to rebuild it
        raise SystemExit(f"error: {e}" if rank == 0 else 1) from None


@functools.lru_cache(maxsize=2)
def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def batch_indices(step, lengths, global_batch, seed, pool=8):
    """The global batch of a step. Each epoch is a fresh permutation, so the data position is just the step.
    Every `pool` consecutive batches are sorted by sequence length and dealt out again in a random order: a
    micro-batch then holds samples of similar length, which cuts collation padding (toy: 17% → 8% of rows)."""
    n, first = len(lengths), step // pool * pool
    idx = [epoch_order(n, seed, k // n)[k % n] for k in range(first * global_batch, (first + pool) * global_batch)]
    idx.sort(key=lambda i: lengths[i])
    order = torch.randperm(pool, generator=torch.Generator().manual_seed(seed * 1000 + first)).tolist()
    j = order[step - first]
    return idx[j * global_batch : (j + 1) * global_batch]


def make_batch(items, cond_drop, generator, device, with_neg=False):
    """Cached items → x [B, N, C], shapes, txt [B, L, D], txt_mask; the instruction is dropped to " " at cond_drop.
    with_neg: also the null-prompt condition (" ", same images) as (neg [B, L', D], neg_mask), for guidance."""
    drop = torch.rand(len(items), generator=generator) < cond_drop
    seqs, shapes = map(list, zip(*(unified_sequence(it["target"], it["refs"]) for it in items)))
    txt, txt_mask = pad_text([it["neg"] if d else it["txt"] for it, d in zip(items, drop)])
    out = (collate(seqs, shapes).to(device), shapes, txt.to(device), txt_mask.to(device))
    if with_neg:
        neg, neg_mask = pad_text([it["neg"] for it in items])
        out += (neg.to(device), neg_mask.to(device))
    return out


@torch.no_grad()
def evaluate(assets, model, out, step, meter, n_cases, steps, cfg, sampler):
    """A few ToyCom validation cases (never the bench) with the given sampler, steps and CFG: a metrics line,
    a table and a PNG grid under OUT/eval_STEP/."""
    was = model.training
    pipe = S.load_pipeline(assets, transformer=model.eval())
    cases = E.toycom_cases(n=n_cases, n_edit=0, split="val")
    table = E.evaluate(E.model_generate(pipe, steps, cfg, sampler), cases, os.path.join(out, f"eval_{step:06d}"))
    meter.log(step=step, eval=table)
    print(f"\nstep {step}:\n{E.format_table(table)}")
    model.train(was)


# -----------------------------------------------------------------------------
# checkpoints: OUT/ckpt/step_N/ holds state.json (step, info, world size, the model's tensor shapes) and
# checkpoint.pt (one dict: model, optim, ema, each extra network and its optimiser, every rank's RNG states); a
# sharded model keeps its weights and optimiser in dcp/ beside it (sharded.py) and checkpoint.pt holds the RNGs.


def trainable_names(model):
    return {n for n, p in unwrap(model).named_parameters() if p.requires_grad}


def save_checkpoint(out, step, model, ema, opt, info, generator=None, rank=0, keep=2, extra=None):
    """Everything needed to resume exactly; `info` is a json-able dict (data position, config, …). extra: {name:
    (model, optimizer)} for further trained networks (DMD's fake score), in the same step folder so that one switch
    of `latest` covers them all. Written as step_N.tmp, renamed whole, then `latest` switched to it (atomic). The
    `keep` newest step folders up to this step stay; newer ones belong to an abandoned run (restarted, or resumed
    from before them) and go. A sharded model writes dcp/, each rank its own shards (sharded.save_dcp)."""
    root, name = os.path.join(out, "ckpt"), f"step_{step:06d}"
    tmp = os.path.join(root, name + ".tmp")
    shapes = {k: list(v.shape) for k, v in unwrap(model).state_dict().items()}  # DTensors: the global shapes
    if is_sharded(model):
        _sharded().save_dcp(tmp, model, ema, opt, rank, extra)  # collective
        ck = {}
    else:
        ck = {"model": full_state_dict(model), "optim": opt.state_dict()}
        if ema is not None:
            ck["ema"] = ema.state_dict()
        for n, (m, o) in (extra or {}).items():
            # only what its optimiser changes (a LoRA model's adapters: its base is shared with a frozen teacher)
            train = trainable_names(m)
            ck[n], ck[f"{n}_optim"] = {k: v for k, v in full_state_dict(m).items() if k in train}, o.state_dict()
    mine = [torch.get_rng_state()] + ([generator.get_state()] if generator is not None else [])
    ck["rng"] = [mine]
    if dist.is_initialized():  # every rank's RNG states (collective), so each gets its own noise streams back
        ck["rng"] = [None] * dist.get_world_size()
        dist.all_gather_object(ck["rng"], mine)
    if rank != 0:
        return
    if not is_sharded(model):
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.save(ck, os.path.join(tmp, "checkpoint.pt"))
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump({"step": step, "info": info, "world": len(ck["rng"]), "model": shapes}, f)
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.replace(tmp, os.path.join(root, name))
    M.atomic_write(os.path.join(root, "latest"), name)
    kept = [c for c in checkpoints(out) if checkpoint_step(c) <= step][:keep]
    for c in set(checkpoints(out)) - set(kept):
        shutil.rmtree(c, ignore_errors=True)


def checkpoints(out):
    """The complete step folders under OUT/ckpt (a step folder appears whole, by rename), newest first."""
    root = os.path.join(out, "ckpt")
    names = [d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)] if os.path.isdir(root) else []
    return sorted((os.path.join(root, d) for d in names), key=checkpoint_step, reverse=True)


def checkpoint_step(folder):
    return int(os.path.basename(folder)[len("step_"):])


def latest_checkpoint(out):
    path = os.path.join(out, "ckpt", "latest")
    return os.path.join(out, "ckpt", open(path).read().strip()) if os.path.exists(path) else None


def is_dcp(folder):
    """True for a checkpoint written by a sharded (FSDP2) run."""
    return os.path.isdir(os.path.join(folder, "dcp"))


def read_checkpoint(folder, mmap=False):
    """(state.json, checkpoint.pt's dict); raises on a missing, torn or truncated file."""
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    missing = [k for k in ("step", "info", "world", "model") if k not in state]
    if missing:
        raise ValueError(f"state.json lacks {', '.join(missing)} (an older checkpoint format?)")
    return state, torch.load(os.path.join(folder, "checkpoint.pt"), map_location="cpu", weights_only=True, mmap=mmap)


def checkpoint_problem(folder, groups):
    """Why the checkpoint in `folder` cannot be resumed from, in a few words, or None: state.json and checkpoint.pt
    must read whole and hold every one of `groups` (the entries a resume needs; in dcp/ if sharded)."""
    try:
        _, ck = read_checkpoint(folder, mmap=True)  # reads the header, not the tensors
    except Exception as e:  # missing file, torn write, truncated data
        return one_line(e)
    missing = [g for g in (["rng"] if is_dcp(folder) else groups + ["rng"]) if g not in ck]
    if missing:
        return f"checkpoint.pt holds no {', '.join(missing)}"
    if is_dcp(folder):
        return _sharded().dcp_problem(os.path.join(folder, "dcp"), groups)
    return None


def one_line(e):
    return " ".join(str(e).split())


def _load_full(model, sd, strict=True):
    """A whole state dict into a plain or a sharded model (each rank keeps its rows: sharded.load_full)."""
    if is_sharded(model):
        _sharded().load_full(model, sd, strict)
    else:
        unwrap(model).load_state_dict(sd, strict=strict)


def _load_full_optimizer(model, opt, osd):
    """A whole optimiser state dict into the optimiser of a plain or a sharded model (sharded.load_full_optimizer)."""
    if is_sharded(model):
        _sharded().load_full_optimizer(model, opt, osd)
    else:
        opt.load_state_dict(osd)


def load_checkpoint(folder, model, ema, opt, generator=None, extra=None):
    """Restore model, EMA, optimiser, the `extra` {name: (model, optimizer)} and RNG states in place (each rank
    its own streams); returns (step, info). A sharded checkpoint (dcp/) loads into sharded or plain models, each
    rank reading only what it holds; checkpoint.pt is read whole by every rank (toy scale)."""
    state, ck = read_checkpoint(folder)
    if is_dcp(folder):
        _sharded().load_dcp(folder, model, ema, opt, extra)
    else:
        _load_full(model, ck["model"])
        _load_full_optimizer(model, opt, ck["optim"])
        if ema is not None:
            _load_full(ema, ck["ema"])
        for n, (m, o) in (extra or {}).items():
            missing = trainable_names(m) - set(ck.get(n, {}))
            if missing:
                raise ValueError(f"{folder}: checkpoint of {n} is incomplete ({len(missing)} tensors missing)")
            _load_full(m, ck[n], strict=False)
            _load_full_optimizer(m, o, ck[f"{n}_optim"])
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = ck["rng"][rank if rank < len(ck["rng"]) else 0]
    torch.set_rng_state(mine[0])
    if generator is not None and len(mine) > 1:
        generator.set_state(mine[1])
    return state["step"], state["info"]


def resume(cfg, model, ema, opt, generator, rank, extra=None):
    """With --resume true: restore everything in place from the newest usable checkpoint under cfg.out (an unusable
    one is named in a warning and the one before it tried); returns the step to go on from (0: no checkpoint). None
    usable, or one of another model: one error line. A sharded checkpoint resumes with any number of processes, with
    or without --fsdp (dcp reshards); bit-identical to an uninterrupted run with the same number."""
    if not cfg.resume:
        return 0
    found = checkpoints(cfg.out)
    if not found:
        if rank == 0:
            print(f"no checkpoint under {os.path.join(cfg.out, 'ckpt')}: starting at step 0")
        return 0
    groups = (["model", "optim"] + (["ema"] if ema is not None else [])  # the entries a resume needs
              + [f"{n}{s}" for n in extra or {} for s in ("", "_optim")])
    for folder in found:
        problem = checkpoint_problem(folder, groups)
        if problem is None:
            break
        if rank == 0:
            print(f"warning: checkpoint {folder} is unusable ({problem}); trying the one before it", file=sys.stderr)
    else:
        raise SystemExit(f"error: none of the {len(found)} checkpoints under {os.path.join(cfg.out, 'ckpt')} is "
                         f"usable; remove them, or run without --resume true to start over" if rank == 0 else 1)
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    live = {k: list(v.shape) for k, v in unwrap(model).state_dict().items()}
    if state["model"] != live:
        diff = sorted(set(live) ^ set(state["model"])) or [k for k in live if live[k] != state["model"][k]]
        raise SystemExit(f"error: checkpoint {folder} holds another model than these flags build ({len(diff)} "
                         f"tensors differ, e.g. {diff[0]}); resume with the flags it was written with (its "
                         f"state.json, info.config)" if rank == 0 else 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0 and state["world"] != world:
        print(f"warning: {folder} was written by {state['world']} process(es), resumed by {world}: the noise "
              f"streams differ from those of an uninterrupted run", file=sys.stderr)
    step, _ = load_checkpoint(folder, model, ema, opt, generator, extra)
    if rank == 0:
        print(f"resumed from step {step} ({folder})")
    return step


def export(out, model, ema, kind="teacher", rank=0):
    """Write OUT/transformer and OUT/ema_transformer in the official layout (official names, no prefixes).
    Sharded models are streamed, one tensor gathered at a time (sharded.export_sharded)."""
    for name, m in (("transformer", model), ("ema_transformer", ema)):
        if m is None:
            continue
        if is_sharded(model):
            _sharded().export_sharded(m, os.path.join(out, name), f"nanounipic-{kind}", rank)
        elif rank == 0:
            with torch.device("meta"):
                net = M.MMDiT(unwrap(model).cfg)
            net.load_state_dict(full_state_dict(m), strict=True, assign=True)
            M.save_mmdit(net, os.path.join(out, name), name_or_path=f"nanounipic-{kind}")


# -----------------------------------------------------------------------------
# logging


class Meter:
    """One fixed log line per step and a jsonl of metrics (rank 0 only)."""

    def __init__(self, out, rank=0):
        self.path, self.rank, self.t0 = os.path.join(out, "metrics.jsonl"), rank, time.time()

    def log(self, **m):
        if self.rank != 0:
            return
        m["time"] = round(time.time() - self.t0, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(m) + "\n")
