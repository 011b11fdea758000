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
"""
import functools
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import data as D
import model as M
from pack import collate, pad_text, unified_sequence
from sample import SchedulerConfig, calculate_mu, shift_value

# -----------------------------------------------------------------------------
# config: dataclass defaults, overridden by --field value on the command line


def parse_config(cls, argv=None, doc=None):
    """Every dataclass field becomes a flag (`--lr 1e-4`, `--fsdp true`); nothing else."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(cls):
        kind = type(f.default)
        conv = (lambda s: s.lower() in ("1", "true", "yes")) if kind is bool else kind if kind in (int, float) else str
        p.add_argument(f"--{f.name}", type=conv, default=f.default, metavar=kind.__name__.upper())
    return cls(**vars(p.parse_args(argv)))


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
    """What every trainer does first: processes, seeds, the output folder, the batch split and the latent cache.
    Returns (rank, world, device, per-rank batch, accumulation steps, dataset, each sample's row count)."""
    rank, world, device = setup_dist()
    torch.manual_seed(cfg.seed + rank)
    per_rank = cfg.batch // world
    if cfg.batch % world or per_rank % cfg.micro_batch:
        raise SystemExit(f"error: batch {cfg.batch} must split into {world} processes × micro_batch {cfg.micro_batch}")
    os.makedirs(cfg.out, exist_ok=True)
    dataset = build_cache(cfg, rank, world)
    lengths = [d.length(i) for d in dataset.datasets for i in range(len(d))]  # rows per sample, for batch_indices
    return rank, world, device, per_rank, per_rank // cfg.micro_batch, dataset, lengths


def cleanup_dist():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def freeze_unused(model):
    """The last block's text stream feeds nothing (its output is discarded, as in the official model), so its
    `to_add_out` and `txt_mlp` never get a gradient. Freezing them lets DDP run without unused-parameter search."""
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}."
    for n, p in model.named_parameters():
        if n.startswith(last) and (".attn.to_add_out." in n or ".txt_mlp." in n):
            p.requires_grad_(False)


def wrap(model, world, device, fsdp=False, bf16=False):
    """DDP for models whose AdamW state fits on one device; FSDP2 (`fully_shard` per block, bf16 params,
    fp32 gradient reduction) for the 20B model. Plain model when there is one process."""
    if world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        for blk in model.transformer_blocks:
            fully_shard(blk, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model):
    return model.module if hasattr(model, "module") else model


def no_sync(model, last):
    """Gradient sync only on the last micro-step of an accumulation (DDP `no_sync`, FSDP2 flag)."""
    import contextlib

    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def is_sharded(model):
    """True when FSDP2 has turned the parameters into DTensor shards."""
    return any(type(p).__name__ == "DTensor" for p in model.parameters())


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
    """ema ← decay·ema + (1 − decay)·model, over the full weights. Under FSDP2 the gather is collective and only
    rank 0 receives (and keeps) the EMA."""
    sharded = is_sharded(model)
    src = full_state_dict(model) if sharded else unwrap(model).state_dict()
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
    return shift * t / (1 + (shift - 1) * t)


# -----------------------------------------------------------------------------
# data: encode once, then batches of unified sequences (shared by the three trainers: one latent cache)


def build_cache(cfg, rank, world):
    """Each process encodes its share (i ≡ rank mod world) into cache/<fingerprint>/part{rank}of{world}; returns the
    full dataset. The fingerprint covers the data, its size, the world version and the encoder files, so a changed
    VAE is never reused; a complete cache written by any number of processes is reused as it is."""
    files = [os.path.join(cfg.assets, d, f) for d in ("vae", "text_encoder") for f in sorted(os.listdir(os.path.join(cfg.assets, d)))]
    key = json.dumps([cfg.data, cfg.n_data, cfg.budget, cfg.seed, D.WORLD_VERSION] + [(f, os.path.getsize(f), os.path.getmtime(f)) for f in files])
    root = os.path.join(cfg.cache, hashlib.sha1(key.encode()).hexdigest()[:12])
    complete = lambda w: all(os.path.exists(os.path.join(root, f"part{r}of{w}", "index.json")) for r in range(w))
    built = sorted(int(d.rpartition("of")[2]) for d in (os.listdir(root) if os.path.isdir(root) else [])
                   if d.startswith("part0of") and complete(int(d.rpartition("of")[2])))
    W = built[0] if built else world  # a cache built by another number of processes is the same data: reuse it
    parts = [os.path.join(root, f"part{r}of{W}") for r in range(W)]
    if W == world and not os.path.exists(os.path.join(parts[rank], "index.json")):
        import text_encoder as TE
        import vae as V

        vae = V.load_vae(os.path.join(cfg.assets, "vae"))
        te = TE.load_text_encoder(cfg.assets)
        toy = D.toy_world_config(cfg.data)
        if toy:
            ds = D.ToyDataset(cfg.n_data, seed=D.TRAIN_SEED + cfg.seed, budget=cfg.budget, cfg=toy)
        else:
            ds = D.JsonlDataset(cfg.data, budget=cfg.budget)
        shard = torch.utils.data.Subset(ds, list(range(rank, len(ds), world)))
        # references arrive jointly resized already (pixel_budget=None: only the 28/32 copy for the encoder);
        # the posterior mean is cached (the official trainers draw a VAE sample each time)
        D.cache_latents(shard, lambda x: vae.normalize(vae.encode(x)), lambda p, ims: te.encode(p, ims, pixel_budget=None),
                        parts[rank], null_prompt=" ")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return torch.utils.data.ConcatDataset([D.LatentDataset(p) for p in parts])


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
    import eval as E
    import sample as S

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
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def rng_state(generator=None):
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def trainable_state(model):
    """The weights an optimiser changes (all of a full model; only the adapters of a LoRA model whose base is shared
    with a frozen teacher): what a checkpoint must hold to resume it."""
    full = full_state_dict(model)
    train = {n for n, p in unwrap(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in full.items() if k in train} if train != set(full) else full


def save_checkpoint(out, step, model, ema, opt, info, generator=None, rank=0, keep=1, extra=None):
    """Everything needed to resume exactly; `info` is a json-able dict (data position, config, …).
    extra: {name: (model, optimizer)} for further trained networks (DMD's fake score), saved in the same step
    folder as NAME.safetensors and NAME_optim.safetensors, so the switch of `latest` covers them all at once."""
    msd, osd = full_state_dict(model), _optimizer_state(model, opt)  # collective under FSDP2: all ranks call
    extra_sd = {n: (trainable_state(m), _optimizer_state(m, o)) for n, (m, o) in (extra or {}).items()}
    if rank != 0:
        return
    root = os.path.join(out, "ckpt")
    name = f"step_{step:06d}"
    tmp = os.path.join(root, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in msd.items()}, os.path.join(tmp, "model.safetensors"))
    if ema is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}, os.path.join(tmp, "ema.safetensors"))
    extra_meta = {}
    for n, (sd, esd) in extra_sd.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(tmp, f"{n}.safetensors"))
        etensors, extra_meta[n] = _flatten_optimizer(esd)
        save_file(etensors, os.path.join(tmp, f"{n}_optim.safetensors"))
    otensors, ometa = _flatten_optimizer(osd)
    rng = rng_state(generator)
    for k in ("torch", "generator"):
        if k in rng:
            otensors[f"rng.{k}"] = rng.pop(k)
    save_file(otensors, os.path.join(tmp, "optim.safetensors"))
    np_state = rng["numpy"]
    state = {"step": step, "info": info, "optimizer": ometa, "extra": extra_meta,
             "rng_numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "rng_python": _jsonable(rng["python"])}
    with open(os.path.join(tmp, "state.json"), "w") as f:
        json.dump(state, f)
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.replace(tmp, os.path.join(root, name))
    with open(os.path.join(root, "latest.tmp"), "w") as f:
        f.write(name)
    os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))  # the switch is atomic
    done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
    for d in done[:-keep]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _jsonable(x):
    return [_jsonable(v) for v in x] if isinstance(x, (tuple, list)) else x


def latest_checkpoint(out):
    path = os.path.join(out, "ckpt", "latest")
    if not os.path.exists(path):
        return None
    return os.path.join(out, "ckpt", open(path).read().strip())


def load_checkpoint(folder, model, ema, opt, generator=None, extra=None):
    """Restore model, EMA, optimiser, the `extra` {name: (model, optimizer)} and RNG states in place; returns
    (step, info)."""
    if not os.path.exists(os.path.join(folder, "state.json")):
        raise ValueError(f"{folder} is not a complete checkpoint (no state.json)")
    state = json.load(open(os.path.join(folder, "state.json")))
    msd = load_file(os.path.join(folder, "model.safetensors"))
    otensors = load_file(os.path.join(folder, "optim.safetensors"))
    sharded = is_sharded(model)
    osd = _unflatten_optimizer(otensors, state["optimizer"])
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=False)
        set_model_state_dict(model, msd, options=opts)
        set_optimizer_state_dict(model, opt, osd, options=opts)
    else:
        unwrap(model).load_state_dict(msd, strict=True)
        opt.load_state_dict(osd)
    if ema is not None:
        ema.load_state_dict(load_file(os.path.join(folder, "ema.safetensors")), strict=True)
    for n, (m, o) in (extra or {}).items():
        sd = load_file(os.path.join(folder, f"{n}.safetensors"))
        missing = set(trainable_state(m)) - set(sd)
        if missing or n not in state.get("extra", {}):
            raise ValueError(f"{folder}: checkpoint of {n} is incomplete ({len(missing)} tensors missing)")
        unwrap(m).load_state_dict(sd, strict=False)
        o.load_state_dict(_unflatten_optimizer(load_file(os.path.join(folder, f"{n}_optim.safetensors")),
                                               state["extra"][n]))
    torch.set_rng_state(otensors["rng.torch"])
    if generator is not None and "rng.generator" in otensors:
        generator.set_state(otensors["rng.generator"])
    n = state["rng_numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), *n[2:]))
    random.setstate(tuple(tuple(v) if isinstance(v, list) else v for v in state["rng_python"]))
    return state["step"], state["info"]


def resume(cfg, model, ema, opt, generator, rank, extra=None):
    """With --resume true and a checkpoint under cfg.out: restore everything in place; returns the step to go on
    from (0 for a fresh run)."""
    if not (cfg.resume and latest_checkpoint(cfg.out)):
        return 0
    step, _ = load_checkpoint(latest_checkpoint(cfg.out), model, ema, opt, generator, extra)
    if rank == 0:
        print(f"resumed from step {step}")
    return step


def export(out, model, ema, kind="teacher", rank=0):
    """Write OUT/transformer and OUT/ema_transformer in the official layout (official names, no prefixes)."""
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
