"""
Plumbing shared by train_fm.py, train_cm.py and train_dmd.py — plain functions, no Trainer class:
process groups (DDP, or FSDP2 for the 20B model), AdamW without decay on 1-D params, the official quarter-cosine
LR schedule, EMA, the timestep sampler, the latent cache and the batches drawn from it (one cache serves all three
trainers), atomic safetensors checkpoints with exact resume, periodic evaluation on the validation split, metrics.

Checkpoint layout under OUT/:
    ckpt/step_000100/{model,ema,optim}.safetensors + state.json    (everything needed to resume exactly)
    ckpt/step_000100/{fake,fake_optim}.safetensors                   (DMD: further named models and optimisers)
    ckpt/latest                                                     (names the last complete step folder)
    transformer/, ema_transformer/                                  (official layout: load_mmdit, diffusers)
A step folder is written completely before `latest` is switched to it (temp file + rename), so a run killed
mid-write leaves the previous checkpoint loadable.

FSDP2 (--fsdp true under torchrun, the 20B path) never puts a whole model on one rank: models are built on the
meta device, sharded, and each rank reads only its rows of the weight files (fill_shards); the EMA and frozen
teachers are sharded alike; a checkpoint is ckpt/step_N/dcp/ (torch.distributed.checkpoint: each rank writes
and reads its own shards; it also loads with another number of processes) + rng.safetensors + state.json; the
exported folders are streamed one gathered tensor at a time (export_sharded). memory_plan: the per-GPU budget.

Failing fast and recovering (the same for the three trainers):
  - check_config: every flag and path checked before any process group, model or cache: one `error:` line;
  - the last --keep_ckpts checkpoints stay; --resume true verifies them newest first and falls back past a
    damaged one with a one-line warning (resume);
  - SIGTERM / SIGUSR1: the step finishes, a checkpoint is written, exit 0; every rank stops after the same
    step (preemption_guard, preempted);
  - the latent cache: a killed build resumes at its first unfinished shard, a corrupt shard is one line naming
    the file and how to rebuild it (build_cache, data.cache_latents).
"""
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import sys
import time
import warnings
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import data as D
import model as M
from pack import collate, pad_text, unified_sequence
import eval as E
import sample as S
import text_encoder as TE
import vae as V
from sample import SchedulerConfig, calculate_mu, parse_config, shift_value, time_shift

# -----------------------------------------------------------------------------
# config: dataclass defaults, overridden by --field value on the command line


# what check_config knows of each trainer's flags; a flag a Config does not have is skipped
POSITIVE = ("steps", "batch", "micro_batch", "n_data", "budget", "lr", "lr_fake", "grad_clip", "log_every",
            "save_every", "keep_ckpts", "fake_updates", "max_gen_steps", "fd_eps", "tangent_c", "logit_std")
NON_NEGATIVE = ("lr_min", "warmup", "weight_decay", "eval_cases", "lora_rank", "fake_lora_rank", "guidance")
UNIT = ("ema", "cond_drop")  # in [0, 1]
CHOICES = {"preset": M.PRESETS, "guidance_from": ("teacher", "ema"), "weighting": ("official", "paper")}
TRANSFORMERS = ("init", "init2", "teacher")  # transformer folders (config.json + weights); empty: not used
ASSET_FOLDERS = ("vae", "text_encoder", "tokenizer", "processor")  # what the latent cache's encoders read


def check_config(cfg):
    """Every flag and path, before anything is built or written: SystemExit("error: …") naming the flag,
    one line (printed by rank 0 alone under torchrun), exit code 1."""
    problem = config_problem(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if problem:
        raise SystemExit(f"error: {problem}" if int(os.environ.get("RANK", 0)) == 0 else 1)


def config_problem(cfg, world):
    """The first problem with cfg as a one-line string, or None."""
    has = lambda name: hasattr(cfg, name)
    for name in POSITIVE:
        if has(name) and not getattr(cfg, name) > 0:  # `not >` also catches nan
            return f"--{name} must be > 0, got {getattr(cfg, name)}"
    for name in NON_NEGATIVE:
        if has(name) and not getattr(cfg, name) >= 0:
            return f"--{name} must be >= 0, got {getattr(cfg, name)}"
    for name in UNIT:
        if has(name) and not 0 <= getattr(cfg, name) <= 1:
            return f"--{name} must be in [0, 1], got {getattr(cfg, name)}"
    if has("eval_cases") and cfg.eval_cases:
        for name in ("eval_every", "eval_steps"):
            if not getattr(cfg, name) > 0:
                return f"--{name} must be > 0 while --eval_cases is {cfg.eval_cases} (0 turns evaluation off)"
    for name, allowed in CHOICES.items():
        if has(name) and getattr(cfg, name) not in allowed:
            return f"--{name} must be one of {', '.join(allowed)}; got {getattr(cfg, name)!r}"
    if cfg.batch % world or cfg.batch // world % cfg.micro_batch:
        return (f"--batch {cfg.batch} must split into {world} process(es) × a multiple of --micro_batch "
                f"{cfg.micro_batch}")
    for name in (n for n in TRANSFORMERS if has(n)):
        path = getattr(cfg, name)
        required = name == "teacher" or (name == "init" and not has("preset"))  # FM can start from scratch
        if path or required:
            problem = folder_problem(path)
            if problem:
                return f"--{name} {path!r} is not a transformer folder ({problem})"
    if not os.path.isdir(cfg.assets):
        return f"--assets {cfg.assets!r} is not a folder"
    for sub in ASSET_FOLDERS:
        if not os.path.isdir(os.path.join(cfg.assets, sub)):
            return f"--assets {cfg.assets!r} has no {sub}/ folder (needs {', '.join(ASSET_FOLDERS)})"
    problem = data_problem(cfg.data, cfg.budget)
    if problem:
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
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    return rank, world, device


def start_run(cfg):
    """What every trainer does first: every flag checked (check_config), then processes, seeds, the output folder,
    the batch split and the latent cache. Returns (rank, world, device, per-rank batch, accumulation steps,
    dataset, each sample's row count)."""
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
    """After the loop: close the progress bar, check that the ranks hold the same weights, leave the group."""
    pbar.close()
    check_ranks_agree(model, rank)
    cleanup_dist()


def freeze_unused(model):
    """The last block's text stream feeds nothing (its output is discarded, as in the official model), so its
    `to_add_out` and `txt_mlp` never get a gradient. Freezing them lets DDP run without unused-parameter search."""
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
    for n, p in model.named_parameters():
        if n.startswith(last) and (".attn.to_add_out." in n or ".txt_mlp." in n):
            p.requires_grad_(False)


def wrap(model, world, device, fsdp=False, bf16=False):
    """DDP for models whose AdamW state fits on one device; FSDP2 (`shard`) for the 20B model. Plain model when
    there is one process; a model already sharded (by `sharded_mmdit`) is returned as it is."""
    if world == 1 or is_sharded(model):
        return model
    if fsdp:
        return shard(model, device, bf16)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_sync(model, last):
    """Gradient sync only on the last micro-step of an accumulation (DDP `no_sync`, FSDP2 flag)."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def is_sharded(model):
    """True when FSDP2 has turned the parameters into DTensor shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def full_state_dict(model):
    """The whole model's weights on the CPU (gathered from FSDP2 shards when sharded), official names."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()}


def check_ranks_agree(model, rank):
    """After training under DDP: every rank must hold the same weights (a checksum per tensor, gathered)."""
    if not dist.is_initialized() or is_sharded(model):
        return
    sums = [p.detach().double().sum().item() for p in unwrap(model).parameters()]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sums)
    if any(g != gathered[0] for g in gathered):
        raise SystemExit("error: the processes ended with different weights")
    if rank == 0:
        print(f"ranks agree: identical weights on {len(gathered)} processes")


def mean_over_ranks(x):
    if dist.is_initialized():
        x = x.detach().clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


# -----------------------------------------------------------------------------
# FSDP2 without a full copy on any rank (the 20B path): the model is built on the meta device (no memory), sharded
# (each rank allocates its own rows of every tensor), then each rank reads only those rows from the weight files.


def meta_mmdit(source):
    """An MMDiT on the meta device, holding no memory: `source` is a transformer folder (only its config.json is
    read) or an MMDiTConfig."""
    if not isinstance(source, M.MMDiTConfig):
        with open(os.path.join(source, "config.json")) as f:
            source = M.MMDiTConfig.from_dict(json.load(f))
    with torch.device("meta"):
        return M.MMDiT(source)


def shard(model, device, bf16=False, frozen_dtype=None):
    """FSDP2: `fully_shard` per block, then the root; bf16 all-gathers under --bf16, fp32 gradient reduction. A model
    on the meta device then allocates only this rank's shards, uninitialised: fill them (fill_shards, copy_shards).
    frozen_dtype: the dtype frozen parameters are stored in (a teacher in bf16 under --bf16: it is gathered in bf16
    anyway, so the forward is the same and the memory half)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if frozen_dtype is not None:
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(frozen_dtype)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
    for blk in model.transformer_blocks:
        fully_shard(blk, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device=device)
    return model


def local(p):
    """This rank's rows of a (sharded) parameter, as a plain tensor sharing its storage."""
    return p.to_local() if isinstance(p, DTensor) else p


def shard_start(p):
    """The first row of this rank's shard of p: FSDP2 splits dim 0 as torch.chunk does (0 when not sharded)."""
    if not isinstance(p, DTensor):
        return 0
    assert len(p.placements) == 1 and p.placements[0].is_shard(0), p.placements
    n, world = p.shape[0], p.device_mesh.size()
    return min(n, p.device_mesh.get_local_rank() * -(-n // world))


def weight_tensors(folder):
    """{official key: lazy tensor} over a transformer folder's weight files: only the headers are read here;
    `t[a:b]` then reads rows a..b-1 alone, in the stored dtype (a safetensors slice, or a memory-mapped .bin)."""
    tensors = {}
    for f in M.weight_files(folder):
        tensors.update(M.open_weights(f))
    return tensors


def _shape(t):
    return tuple(t.get_shape()) if hasattr(t, "get_shape") else tuple(t.shape)


@torch.no_grad()
def fill_shards(model, sources, where="", seed=0):
    """Fill every parameter of a sharded model with its own rows of the full tensors, one tensor at a time:
    sources is a list of {name: tensor or lazy tensor} (weight_tensors of a folder, or a state dict); with two,
    their 50/50 average. Only this rank's rows are read, in their stored dtype, and cast here (a bf16 file is never
    upcast whole). Keys and shapes are checked first (one error naming every mismatch). LoRA adapters, which no
    folder holds, start as add_lora starts them (A Kaiming-uniform drawn from `seed`, B zero), alike on every rank."""
    params = dict(model.named_parameters())
    expected = {k: tuple(p.shape) for k, p in params.items() if ".lora_" not in k}
    for src in sources:
        M.check_state_keys(expected, {k: _shape(v) for k, v in src.items()}, where)
    gen = torch.Generator().manual_seed(seed)
    for name, p in params.items():
        dst = local(p)
        a = shard_start(p)
        b = a + dst.shape[0]
        if ".lora_" in name:  # small: every rank draws the whole matrix, keeps its rows
            full = torch.zeros(p.shape)
            if name.endswith("lora_A"):
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=gen)
            dst.copy_(full[a:b])
        elif len(sources) == 1:
            dst.copy_(sources[0][name][a:b])
        else:  # the same arithmetic as averaging two fp32 state dicts
            dst.copy_(0.5 * (sources[0][name][a:b].float() + sources[1][name][a:b].float()))
    return model


@torch.no_grad()
def copy_shards(dst, src):
    """dst ← src, parameter by parameter, for two models sharded alike: each rank copies its own rows."""
    params = dict(src.named_parameters())
    for name, p in dst.named_parameters():
        local(p).copy_(local(params[name]))
    return dst


def sharded_copy(model, device, bf16=False):
    """A frozen copy of a sharded model with the same shards (the EMA): built on the meta device, sharded alike and
    filled from the model's own rows, without communication."""
    copy = meta_mmdit(model.cfg).requires_grad_(False).eval()
    return copy_shards(shard(copy, device, bf16), model)


def sharded_teacher(folder, device, bf16=False, lora=None, seed=0):
    """A frozen MMDiT from `folder`, sharded like the trained one (stored in bf16 under --bf16), each rank reading
    its own rows; lora = (rank, alpha) adds adapters first, its only trained part (DMD's LoRA fake score)."""
    teacher = meta_mmdit(folder).requires_grad_(False).eval()
    if lora:
        M.add_lora(teacher, *lora)
    shard(teacher, device, bf16, frozen_dtype=torch.bfloat16 if bf16 else None)
    return fill_shards(teacher, [weight_tensors(folder)], folder, seed)


def gathered(model, rank):
    """For the toy evaluation under FSDP2: a plain fp32 copy of a sharded model on rank 0 (None on the others;
    collective, and it holds the whole model: toy scale only). A plain model is returned as it is."""
    if not is_sharded(model):
        return unwrap(model)
    sd = full_state_dict(model)
    if rank != 0:
        return None
    copy = meta_mmdit(model.cfg)
    lora = [m for m in model.modules() if isinstance(m, M.LoRALinear)]
    if lora:
        r = lora[0].lora_A.shape[0]
        M.add_lora(copy, r, lora[0].scale * r)
    copy.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return copy.eval()


# bytes a block saves for its backward, per token and per unit of width, under bf16 (FSDP2 bf16 params + autocast):
# counted with saved-tensor hooks (tests/test_fsdp_memory.py); with activation checkpointing only the block
# inputs stay (img and txt rows in bf16), and one block at a time is recomputed in full
ACT_BYTES, CKPT_BYTES = 56, 2


def memory_plan(cfg=None, gpus=8, img_tokens=2 * 4096, txt_tokens=1024 + 64, lora_rank=64):
    """Per-GPU memory in GB of the recipes at official scale under FSDP2 (--fsdp true --bf16 true, one sample per
    GPU), from parameter counts: the sharded state, FSDP2's gathered-block buffers, and the activations with and
    without --grad_ckpt. Defaults: the 20.4B MMDiT on 8 GPUs, a 1024² target and one 1024² reference
    (2 × 4096 image tokens) with ~1,088 condition tokens (1,024 for the reference's 896² copy, ~64 of text).
    Sharded state per parameter: trained weights fp32 4 + gradients fp32 4 + AdamW 8 (+ EMA fp32 4); a frozen
    teacher bf16 2. FM and CM (guidance from the EMA, official) 20; DMD: student 20 + teacher 2, and a full-copy
    fake score 16 more, or LoRA adapters (rank lora_rank on to_q/k/v/out) 16 per adapter parameter."""
    cfg = cfg or M.MMDiTConfig()
    model = meta_mmdit(cfg)
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.transformer_blocks[0].parameters())
    lora = 2 * lora_rank * cfg.dim * len(M.LORA_TARGETS) * cfg.num_layers
    GB = 1e9
    state = {"FM": 20 * n, "CM": 20 * n, "DMD, LoRA fake score": 22 * n + 16 * lora, "DMD, full fake score": 38 * n}
    # two blocks' bf16 weights in flight (the next one is prefetched) + one block's bf16 gradients and their fp32
    # copy for the reduce-scatter
    buffers = block * (2 * 2 + 2 + 4)
    tokens = img_tokens + txt_tokens
    act = cfg.num_layers * ACT_BYTES * tokens * cfg.dim
    act_ckpt = cfg.num_layers * CKPT_BYTES * tokens * cfg.dim + ACT_BYTES * tokens * cfg.dim
    plan = {"params (B)": n / 1e9, "state": {k: v / gpus / GB for k, v in state.items()}, "buffers": buffers / GB,
            "activations": act / GB, "activations, grad_ckpt": act_ckpt / GB}
    plan["total"] = {k: v + plan["buffers"] + plan["activations"] for k, v in plan["state"].items()}
    plan["total, grad_ckpt"] = {k: v + plan["buffers"] + plan["activations, grad_ckpt"] for k, v in plan["state"].items()}
    return plan


# -----------------------------------------------------------------------------
# preemption: a cluster scheduler sends SIGTERM (SLURM can send SIGUSR1 ahead of time) before it kills the job

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextlib.contextmanager
def preemption_guard():
    """Around the training loop: SIGTERM / SIGUSR1 only append their name to the yielded list, so the loop can
    finish its step, checkpoint and exit 0 (see `preempted`). The previous handlers come back afterwards."""
    caught = []
    old = {s: signal.signal(s, lambda signum, frame: caught.append(signal.Signals(signum).name))
           for s in PREEMPT_SIGNALS}
    try:
        yield caught
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def preempted(caught, device):
    """Called once a step by every rank: True on all ranks if any of them caught a signal (one all_reduce of a
    flag), so all stop after the same step, whichever process the scheduler signalled."""
    flag = torch.tensor([float(len(caught) > 0)], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0


def report_preemption(out, step, caught, rank):
    if rank == 0:
        why = caught[0] if caught else "a signal to another process"
        print(f"stopped by {why} after step {step}: checkpoint {os.path.join(out, 'ckpt', f'step_{step:06d}')}; "
              f"continue with --resume true", flush=True)


def end_of_step(cfg, step, caught, device, rank, pbar, meter, save, export, eval_model, sampler):
    """The three trainers' end of a step: a checkpoint (`save()`) every --save_every steps, at the last step and at
    once when any rank was signalled; the exported folders (`export()`) with the scheduled checkpoints (not when
    preempted: the grace period is short); a validation eval of `eval_model` every --eval_every steps on toy data.
    Returns True when the loop must stop (preempted), after saying how to continue."""
    saving = step % cfg.save_every == 0 or step == cfg.steps
    stop = preempted(caught, device)
    if saving or stop:
        save()
    if saving:
        export()
    if stop:
        pbar.close()
        report_preemption(cfg.out, step, caught, rank)
        return True
    if D.toy_world_config(cfg.data) and cfg.eval_cases and (step % cfg.eval_every == 0 or step == cfg.steps):
        net = gathered(eval_model, rank)  # collective under FSDP2
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


def ema_decay(step, decay):
    """EMA warm-up: min(decay, (1 + step) / (10 + step)), so a short run's EMA is not dominated by the init
    (0.998 alone still weighs the init 25% after 700 steps)."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema ← decay·ema + (1 − decay)·model, over the full weights. Under FSDP2 the EMA is sharded like the model
    (sharded_copy) and each rank updates its own rows: no communication, no full copy anywhere."""
    if is_sharded(model):
        params = dict(model.named_parameters())
        for k, v in ema.named_parameters():
            local(v).lerp_(local(params[k]), 1 - decay)
        return
    src = unwrap(model).state_dict()
    if not src:
        return
    for k, v in ema.state_dict().items():
        v.lerp_(src[k].to(v.device, v.dtype), 1 - decay)


# -----------------------------------------------------------------------------
# timesteps


def sample_t(shapes, generator, mean=0.0, std=1.0, sched=SchedulerConfig()):
    """Logit-normal t, then the same dynamic shift as sampling, from each sample's target token count."""
    u = torch.randn(len(shapes), generator=generator) * std + mean
    t = torch.sigmoid(u)
    shift = torch.tensor([shift_value(calculate_mu(hw[0][0] * hw[0][1], sched), sched) for hw in shapes])
    return time_shift(t, shift)


# -----------------------------------------------------------------------------
# data: encode once, then batches of unified sequences (shared by the three trainers: one latent cache)


def build_cache(cfg, rank, world):
    """Each process encodes its share (i ≡ rank mod world) into cache/<fingerprint>/part{rank}of{world}; returns the
    full dataset. The fingerprint covers the data, its size, the world version and the encoder files, so a changed
    VAE is never reused; a complete cache written by any number of processes is reused as it is. A killed build
    resumes at its first unfinished shard (D.cache_latents); a corrupt shard stops the run with one line."""
    files = [os.path.join(cfg.assets, d, f) for d in ("vae", "text_encoder") for f in sorted(os.listdir(os.path.join(cfg.assets, d)))]
    key = json.dumps([cfg.data, cfg.n_data, cfg.budget, cfg.seed, D.WORLD_VERSION] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files])
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
        if toy:
            ds = D.ToyDataset(cfg.n_data, seed=D.TRAIN_SEED + cfg.seed, budget=cfg.budget, cfg=toy)
        else:
            ds = D.JsonlDataset(cfg.data, budget=cfg.budget)
        shard = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
        if rank == 0:  # the one-time cost, said up front (toy: ~9 minutes for 8,000 samples on 2 CPU processes)
            print(f"latent cache: encoding {len(ds)} samples into {root} ({world} process(es)); reused by every "
                  f"later run with the same --data/--n_data/--budget/--seed and encoders", flush=True)
        # references arrive jointly resized already (pixel_budget=None: only the 28/32 copy for the encoder);
        # the posterior mean is cached (the official trainers draw a VAE sample each time)
        D.cache_latents(shard, lambda x: vae.normalize(vae.encode(x)), lambda p, ims: te.encode(p, ims, pixel_budget=None),
                        parts[rank], shard_size=D.CACHE_SHARD, null_prompt=" ")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
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
    seqs, shapes, txts = [], [], []
    drop = torch.rand(len(items), generator=generator) < cond_drop
    for it, d in zip(items, drop):
        s, hw = unified_sequence(it["target"], it["refs"])
        seqs.append(s)
        shapes.append(hw)
        txts.append(it["neg"] if d else it["txt"])
    txt, txt_mask = pad_text(txts)
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
# checkpoints


def _flatten_optimizer(osd):
    """optimizer.state_dict() → (tensors for safetensors, json-able rest)."""
    tensors, meta = {}, {"param_groups": osd["param_groups"], "state": {}}
    for pid, st in osd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors, meta):
    state = {}
    for pid, st in meta["state"].items():
        key = int(pid) if pid.isdigit() else pid
        state[key] = {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _optimizer_state(model, opt):
    return opt.state_dict()


def rng_state(generator=None):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def rank_rng_states(generator=None):
    """[torch RNG state, generator state] of every rank (gathered: collective under torchrun), so that each rank
    gets its own noise stream back on resume."""
    mine = [torch.get_rng_state()] + ([generator.get_state()] if generator is not None else [])
    if not dist.is_initialized():
        return [mine]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, mine)
    return states


def _rng_tensors(rngs):
    """rank_rng_states → {rng.torch.RANK, rng.generator.RANK: state} for a safetensors file."""
    tensors = {}
    for r, states in enumerate(rngs):
        tensors[f"rng.torch.{r}"] = states[0]
        if len(states) > 1:
            tensors[f"rng.generator.{r}"] = states[1]
    return tensors


def trainable_names(model):
    return {n for n, p in unwrap(model).named_parameters() if p.requires_grad}


def trainable_state(model):
    """The weights an optimiser changes (all of a full model; only the adapters of a LoRA model whose base is shared
    with a frozen teacher): what a checkpoint must hold to resume it."""
    full = full_state_dict(model)
    train = trainable_names(model)
    return {k: v for k, v in full.items() if k in train} if train != set(full) else full


def _adamw_state(opt):
    """The states a first step of make_optimizer's (fused) AdamW creates (step 0, zero moments), for dcp.load to
    fill on resume. torch's own initialisation (get_optimizer_state_dict on a fresh optimiser) runs a step on zero
    gradients: a transient copy of every gradient."""
    for group in opt.param_groups:
        for p in group["params"]:
            if p.requires_grad and p not in opt.state:
                opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device),
                                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}


def _dcp_state(model, ema, opt, extra):
    """What a sharded checkpoint holds, as the live tensors themselves (DTensor shards under FSDP2, nothing
    gathered or copied): dcp.save writes them, dcp.load fills them in place. Optimiser states are keyed by
    parameter name, so a checkpoint written by N processes loads into M (dcp reshards)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for o in [opt] + [o for _, o in (extra or {}).values()]:
        _adamw_state(o)
    sd = {"model": unwrap(model).state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    if ema is not None:
        sd["ema"] = ema.state_dict()
    for n, (m, o) in (extra or {}).items():
        train = trainable_names(m)
        sd[n] = {k: v for k, v in unwrap(m).state_dict().items() if k in train}
        sd[f"{n}_optim"] = get_optimizer_state_dict(m, o)
    return sd


def save_checkpoint(out, step, model, ema, opt, info, generator=None, rank=0, keep=2, extra=None):
    """Everything needed to resume exactly; `info` is a json-able dict (data position, config, …).
    extra: {name: (model, optimizer)} for further trained networks (DMD's fake score), saved in the same step
    folder as NAME.safetensors and NAME_optim.safetensors, so the switch of `latest` covers them all at once.
    state.json records every tensor's shape (what resume verifies). The `keep` newest step folders up to this
    step stay; newer ones belong to an abandoned run (restarted, or resumed from before them) and go.
    A sharded model (FSDP2) writes a torch.distributed.checkpoint folder dcp/ instead: every rank writes its own
    shards of the model, EMA, optimiser and extras (dcp/__RANK_0.distcp, rank 0 also the index dcp/.metadata),
    nothing is gathered; the per-rank RNG states go to rng.safetensors."""
    root, name = os.path.join(out, "ckpt"), f"step_{step:06d}"
    tmp = os.path.join(root, name + ".tmp")
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp

        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        sd = _dcp_state(model, ema, opt, extra)
        dcp.save(sd, checkpoint_id=os.path.join(tmp, "dcp"))  # collective: returns once all files are written
        files = {"rng.safetensors": _rng_tensors(rank_rng_states(generator))}
        shapes = {k: {n: list(v.shape) for n, v in d.items()} for k, d in sd.items() if not k.endswith("optim")}
        ometa, extra_meta, world = {}, {n: {} for n in extra or {}}, dist.get_world_size()
    else:
        msd, osd = full_state_dict(model), _optimizer_state(model, opt)
        extra_sd = {n: (trainable_state(m), _optimizer_state(m, o)) for n, (m, o) in (extra or {}).items()}
        rngs = rank_rng_states(generator)  # collective
        if rank != 0:
            return
        files = {"model.safetensors": msd}
        if ema is not None:
            files["ema.safetensors"] = {k: v.detach().cpu() for k, v in ema.state_dict().items()}
        extra_meta = {}
        for n, (sd, esd) in extra_sd.items():
            files[f"{n}.safetensors"] = sd
            files[f"{n}_optim.safetensors"], extra_meta[n] = _flatten_optimizer(esd)
        otensors, ometa = _flatten_optimizer(osd)
        otensors.update(_rng_tensors(rngs))
        files["optim.safetensors"] = otensors
        shapes, world = {}, len(rngs)
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if rank != 0:
        return
    for fn, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(tmp, fn))
    random_state = rng_state()
    np_state = random_state["numpy"]
    shapes.update({fn: {k: list(v.shape) for k, v in tensors.items()} for fn, tensors in files.items()})
    state = {"step": step, "info": info, "optimizer": ometa, "extra": extra_meta, "world": world,
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
             "rng_python": _jsonable(random_state["python"]), "tensors": shapes}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.replace(tmp, os.path.join(root, name))
    M.atomic_write(os.path.join(root, "latest"), name)  # the switch is atomic
    older = [c for c in checkpoints(out) if checkpoint_step(c) <= step]
    newer = [c for c in checkpoints(out) if checkpoint_step(c) > step]
    for c in newer + older[keep:]:
        shutil.rmtree(c, ignore_errors=True)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def checkpoints(out):
    """The complete step folders under OUT/ckpt (a step folder appears whole, by rename), newest first."""
    root = os.path.join(out, "ckpt")
    names = [d for d in os.listdir(root) if re.fullmatch(r"step_\d+", d)] if os.path.isdir(root) else []
    return sorted((os.path.join(root, d) for d in names), key=checkpoint_step, reverse=True)


def checkpoint_step(folder):
    return int(os.path.basename(folder)[len("step_"):])


def latest_checkpoint(out):
    path = os.path.join(out, "ckpt", "latest")
    if not os.path.exists(path):
        return None
    return os.path.join(out, "ckpt", open(path).read().strip())


STATE_KEYS = ("step", "info", "optimizer", "extra", "rng_numpy", "rng_python")


def is_dcp(folder):
    """True for a checkpoint written by a sharded (FSDP2) run."""
    return os.path.isdir(os.path.join(folder, "dcp"))


def checkpoint_files(folder, ema, extra):
    """What a resume needs in `folder`: the safetensors files, and for a sharded checkpoint the groups of dcp/."""
    if is_dcp(folder):
        groups = ["model", "optim"] + (["ema"] if ema is not None else []) + [f"{n}{s}" for n in extra or {}
                                                                             for s in ("", "_optim")]
        return ["rng.safetensors"], groups
    files = ["model.safetensors", "optim.safetensors"] + (["ema.safetensors"] if ema is not None else [])
    return files + [f"{n}{s}.safetensors" for n in (extra or {}) for s in ("", "_optim")], []


def checkpoint_problem(folder, files, groups=()):
    """Why the checkpoint in `folder` cannot be resumed from, in a few words, or None: state.json must be complete
    and each of `files` present, its safetensors header readable (which also catches a truncated file) and its
    tensors the names and shapes state.json recorded; `groups` must be in dcp/ (_dcp_problem)."""
    try:
        with open(os.path.join(folder, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        return f"state.json: {one_line(e)}"
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        return f"state.json lacks {', '.join(missing)}"
    for fn in files:
        try:
            with safe_open(os.path.join(folder, fn), framework="pt") as f:
                shapes = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # missing file, torn header, truncated data
            return f"{fn}: {one_line(e)}"
        if fn in state.get("tensors", {}) and shapes != state["tensors"][fn]:
            return f"{fn}: its tensors are not those state.json records"
    return _dcp_problem(os.path.join(folder, "dcp"), groups) if groups else None


def _dcp_problem(path, groups):
    """Why the torch.distributed.checkpoint folder `path` is unusable, or None: its index (.metadata) must load
    and hold every group (model, optim, ema, …), and each data file must hold the bytes the index points to."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        meta = FileSystemReader(path).read_metadata()
    except Exception as e:
        return f"dcp/.metadata: {one_line(e)}"
    have = {k.split(".", 1)[0] for k in meta.state_dict_metadata}
    if any(g not in have for g in groups):
        return f"dcp/ holds no {', '.join(g for g in groups if g not in have)}"
    ends = {}
    for item in meta.storage_data.values():
        ends[item.relative_path] = max(ends.get(item.relative_path, 0), item.offset + item.length)
    for fn, end in sorted(ends.items()):
        f = os.path.join(path, fn)
        if not os.path.isfile(f) or os.path.getsize(f) < end:
            return f"dcp/{fn}: missing or truncated"
    return None


def one_line(e):
    return " ".join(str(e).split())


def _load_full(model, sd, strict=True):
    """A whole state dict into a plain or a sharded model (each rank keeps its rows)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))
    else:
        unwrap(model).load_state_dict(sd, strict=strict)


def _load_full_optimizer(model, opt, osd):
    """A whole optimiser state dict into the optimiser of a plain or a sharded model."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        if all(isinstance(k, int) for k in osd["state"]):  # written by one process or DDP: keyed by position
            names = {p: n for n, p in unwrap(model).named_parameters()}
            fqn = dict(zip([i for g in osd["param_groups"] for i in g["params"]],
                           [names[p] for g in opt.param_groups for p in g["params"]]))
            osd = {"state": {fqn[i]: st for i, st in osd["state"].items()},
                   "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in osd["param_groups"]]}
        set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(osd)


def load_checkpoint(folder, model, ema, opt, generator=None, extra=None):
    """Restore model, EMA, optimiser, the `extra` {name: (model, optimizer)} and RNG states in place (each rank
    its own streams); returns (step, info). A sharded checkpoint (dcp/) loads into sharded or plain models, each
    rank reading only what it holds, whatever the number of processes that wrote it; a safetensors one is read
    whole by every rank (toy scale)."""
    if not os.path.exists(os.path.join(folder, "state.json")):
        raise ValueError(f"{folder} is not a complete checkpoint (no state.json)")
    state = json.load(open(os.path.join(folder, "state.json")))
    if is_dcp(folder):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        sd = _dcp_state(model, ema, opt, extra)
        with warnings.catch_warnings():  # one process (no process group) is a supported case, not a warning
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(sd, checkpoint_id=os.path.join(folder, "dcp"))  # in place, each rank reading only its rows
        set_optimizer_state_dict(model, opt, sd["optim"])
        for n, (m, o) in (extra or {}).items():
            set_optimizer_state_dict(m, o, sd[f"{n}_optim"])
        rngs = load_file(os.path.join(folder, "rng.safetensors"))
    else:
        rngs = load_file(os.path.join(folder, "optim.safetensors"))
        _load_full(model, load_file(os.path.join(folder, "model.safetensors")))
        _load_full_optimizer(model, opt, _unflatten_optimizer(rngs, state["optimizer"]))
        if ema is not None:
            _load_full(ema, load_file(os.path.join(folder, "ema.safetensors")))
        for n, (m, o) in (extra or {}).items():
            sd = load_file(os.path.join(folder, f"{n}.safetensors"))
            missing = trainable_names(m) - set(sd)
            if missing or n not in state.get("extra", {}):
                raise ValueError(f"{folder}: checkpoint of {n} is incomplete ({len(missing)} tensors missing)")
            _load_full(m, sd, strict=False)
            _load_full_optimizer(m, o, _unflatten_optimizer(load_file(os.path.join(folder, f"{n}_optim.safetensors")),
                                                            state["extra"][n]))
    rank = dist.get_rank() if dist.is_initialized() else 0
    own = lambda k: rngs.get(f"{k}.{rank}", rngs.get(f"{k}.0", rngs.get(k)))  # older: rank 0's only
    torch.set_rng_state(own("rng.torch"))
    if generator is not None and own("rng.generator") is not None:
        generator.set_state(own("rng.generator"))
    n = state["rng_numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["rng_python"]))
    return state["step"], state["info"]


def resume(cfg, model, ema, opt, generator, rank, extra=None):
    """With --resume true: restore everything in place from the newest usable checkpoint under cfg.out (each is
    verified first: an unusable one is named in a warning and the one before it tried); returns the step to go
    on from (0 when there is no checkpoint). None usable, or one of another model: one error line.
    A sharded checkpoint resumes with any number of processes, with or without --fsdp (dcp reshards); bit-identical
    to an uninterrupted run with the same number."""
    if not cfg.resume:
        return 0
    found = checkpoints(cfg.out)
    if not found:
        if rank == 0:
            print(f"no checkpoint under {os.path.join(cfg.out, 'ckpt')}: starting at step 0")
        return 0
    for folder in found:
        problem = checkpoint_problem(folder, *checkpoint_files(folder, ema, extra))
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
    tensors = state.get("tensors", {})
    saved = tensors.get("model.safetensors", tensors.get("model", live))
    if saved != live:
        diff = sorted(set(live) ^ set(saved)) or [k for k in live if live[k] != saved[k]]
        raise SystemExit(f"error: checkpoint {folder} holds another model than these flags build ({len(diff)} "
                         f"tensors differ, e.g. {diff[0]}); resume with the flags it was written with (its "
                         f"state.json, info.config)" if rank == 0 else 1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if rank == 0 and state.get("world", world) != world:
        print(f"warning: {folder} was written by {state['world']} process(es), resumed by {world}: the noise "
              f"streams differ from those of an uninterrupted run", file=sys.stderr)
    step, _ = load_checkpoint(folder, model, ema, opt, generator, extra)
    if rank == 0:
        print(f"resumed from step {step} ({folder})")
    return step


def export(out, model, ema, kind="teacher", rank=0):
    """Write OUT/transformer and OUT/ema_transformer in the official layout (official names, no prefixes).
    Sharded models are streamed, one tensor gathered at a time (export_sharded)."""
    if is_sharded(model):
        for name, m in (("transformer", model), ("ema_transformer", ema)):
            if m is not None:
                export_sharded(m, os.path.join(out, name), f"nanounipic-{kind}", rank)
        return
    msd = full_state_dict(model)
    if rank != 0:
        return
    base = unwrap(model)
    for name, sd in (("transformer", msd), ("ema_transformer", ema.state_dict() if ema is not None else None)):
        if sd is None:
            continue
        with torch.device("meta"):
            m = M.MMDiT(base.cfg)
        m.load_state_dict({k: v.detach().cpu() for k, v in sd.items()}, strict=True, assign=True)
        M.save_mmdit(m, os.path.join(out, name), name_or_path=f"nanounipic-{kind}")


SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}


def write_safetensors(path, entries, tensors, metadata=None):
    """A safetensors file written one tensor at a time: the header first (every name, dtype and shape is known up
    front), then each tensor's bytes as `tensors` yields it, so the file is never whole in memory.
    entries: [(name, dtype, shape)] in the order `tensors` yields them."""
    header, offset = {}, 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: got {t.dtype} {tuple(t.shape)}, the header says {dtype} {tuple(shape)}")
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


def _whole(t):
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


def official_tensors(model):
    """[(official key, dtype, shape)] of a (sharded) model: LoRA adapters are merged into their Linear's weight."""
    return [(k, v.dtype, tuple(v.shape)) for k, v in unwrap(model).state_dict().items() if ".lora_" not in k]


def gather_official(model, key):
    """One official tensor of a sharded model, whole on every rank (collective), a LoRA adapter merged in as
    M.merge_lora does."""
    owner, _, leaf = key.rpartition(".")
    mod = unwrap(model).get_submodule(owner)
    w = _whole(getattr(mod, leaf))
    if isinstance(mod, M.LoRALinear) and leaf == "weight":
        w = w + mod.scale * (_whole(mod.lora_B) @ _whole(mod.lora_A)).to(w.dtype)
    return w


def export_sharded(model, path, name_or_path, rank, max_shard_bytes=5 * 2**30):
    """The official folder of a sharded model (the files M.save_mmdit writes: config.json, shards of at most
    max_shard_bytes, their index), without the whole model on any host: tensor by tensor, every rank gathers one
    tensor (collective) and rank 0 appends it to the open shard file."""
    entries = official_tensors(model)
    shards, size = [[]], 0
    for e in entries:
        nbytes = math.prod(e[2]) * e[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += nbytes
    n, stem = len(shards), M.WEIGHTS
    names = [f"{stem}.safetensors"] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if rank == 0:
        os.makedirs(path, exist_ok=True)
        config = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.42.1",
                  **asdict(unwrap(model).cfg), "_name_or_path": name_or_path}
        config["axes_dims_rope"] = list(config["axes_dims_rope"])
        M.atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2))
    for shard_entries, name in zip(shards, names):
        stream = (gather_official(model, k) for k, _, _ in shard_entries)
        if rank == 0:
            M.atomic_write(os.path.join(path, name),
                           lambda p: write_safetensors(p, shard_entries, stream, metadata={"format": "pt"}))
        else:
            for _ in stream:  # the same gathers as rank 0, in the same order
                pass
    if rank != 0:
        return
    index = os.path.join(path, f"{stem}.safetensors.index.json")
    if n > 1:
        weight_map = {k: name for es, name in zip(shards, names) for k, _, _ in es}
        total = sum(math.prod(s) * d.itemsize for _, d, s in entries)
        M.atomic_write(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for f in os.listdir(path):  # files of an earlier save that this one does not use (as save_mmdit)
        if f.startswith(stem) and f not in names and not (n > 1 and f == os.path.basename(index)):
            os.remove(os.path.join(path, f))


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
