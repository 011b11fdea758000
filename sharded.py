"""
What only a sharded run needs: FSDP2 (--fsdp true under torchrun with more than one process, the 20B path). The toy
path never imports this file; the trainers import it where they take --fsdp true, train_common.py where it meets a
sharded model or a sharded checkpoint.

No rank ever holds a whole model: models are built on the meta device (meta_mmdit), sharded (shard), and each rank
reads only its rows of the weight files (fill_shards); the EMA and frozen teachers are sharded alike (sharded_copy,
sharded_teacher). A checkpoint is ckpt/step_N/dcp/ (torch.distributed.checkpoint: each rank writes and reads its own
shards; it also loads with another number of processes) + checkpoint.pt (the RNG states) + state.json (save_dcp,
load_dcp); the exported folders are streamed one gathered tensor at a time (export_sharded). memory_plan: the
per-GPU budget.
"""
import json
import math
import os
import shutil
import warnings
from dataclasses import asdict

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

import lora as L
import model as M
import train_common as T

# -----------------------------------------------------------------------------
# FSDP2 without a full copy on any rank: the model is built on the meta device (no memory), sharded (each rank
# allocates its own rows of every tensor), then each rank reads only those rows from the weight files.


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
        L.add_lora(teacher, *lora)
    shard(teacher, device, bf16, frozen_dtype=torch.bfloat16 if bf16 else None)
    return fill_shards(teacher, [weight_tensors(folder)], folder, seed)


def dmd_models(cfg, device):
    """train_dmd.build_models under FSDP2: student, EMA, frozen teacher and fake score, each built on the meta
    device, sharded, and filled with this rank's rows (the teacher's frozen weights in bf16 under --bf16)."""
    student = meta_mmdit(cfg.init)
    T.freeze_unused(student)
    shard(student, device, cfg.bf16)
    fill_shards(student, [weight_tensors(f) for f in (cfg.init, cfg.init2) if f], cfg.init)
    ema = sharded_copy(student, device, cfg.bf16)
    adapters = (cfg.fake_lora_rank, cfg.fake_lora_alpha) if cfg.fake_lora_rank else None
    teacher = sharded_teacher(cfg.teacher, device, cfg.bf16, adapters, cfg.seed)  # a LoRA fake score rides on it
    fake = teacher
    if not cfg.fake_lora_rank:
        fake = meta_mmdit(cfg.teacher)
        T.freeze_unused(fake)
        fill_shards(shard(fake, device, cfg.bf16), [weight_tensors(cfg.teacher)], cfg.teacher)
    return student, ema, teacher, fake


@torch.no_grad()
def ema_update(ema, model, decay):
    """T.ema_update of a sharded model: the EMA is sharded like it (sharded_copy) and each rank updates its own
    rows: no communication, no full copy anywhere."""
    params = dict(model.named_parameters())
    for k, v in ema.named_parameters():
        local(v).lerp_(local(params[k]), 1 - decay)


def gathered(model, rank):
    """For the toy evaluation under FSDP2: a plain fp32 copy of a sharded model on rank 0 (None on the others;
    collective, and it holds the whole model: toy scale only)."""
    sd = T.full_state_dict(model)
    if rank != 0:
        return None
    copy = meta_mmdit(model.cfg)
    lora = [m for m in model.modules() if isinstance(m, L.LoRALinear)]
    if lora:
        r = lora[0].lora_A.shape[0]
        L.add_lora(copy, r, lora[0].scale * r)
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
    lora = 2 * lora_rank * cfg.dim * len(L.LORA_TARGETS) * cfg.num_layers
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
# checkpoints: torch.distributed.checkpoint (dcp/), written and read shard by shard (T.save_checkpoint,
# T.load_checkpoint and T.resume hand sharded models and dcp/ folders to the functions below)


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
    for o in [opt] + [o for _, o in (extra or {}).values()]:
        _adamw_state(o)
    sd = {"model": T.unwrap(model).state_dict(), "optim": get_optimizer_state_dict(model, opt)}
    if ema is not None:
        sd["ema"] = ema.state_dict()
    for n, (m, o) in (extra or {}).items():
        train = T.trainable_names(m)
        sd[n] = {k: v for k, v in T.unwrap(m).state_dict().items() if k in train}
        sd[f"{n}_optim"] = get_optimizer_state_dict(m, o)
    return sd


def save_dcp(tmp, model, ema, opt, rank, extra):
    """T.save_checkpoint of a sharded model: every rank writes its own shards of the model, EMA, optimiser and
    extras into the step folder `tmp` as dcp/ (dcp/__RANK_0.distcp, rank 0 also the index dcp/.metadata), nothing
    is gathered; T.save_checkpoint adds state.json and checkpoint.pt (the RNG states)."""
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    dcp.save(_dcp_state(model, ema, opt, extra), checkpoint_id=os.path.join(tmp, "dcp"))  # collective


def dcp_problem(path, groups):
    """Why the torch.distributed.checkpoint folder `path` is unusable, or None: its index (.metadata) must load
    and hold every group (model, optim, ema, …), and each data file must hold the bytes the index points to."""
    try:
        meta = dcp.FileSystemReader(path).read_metadata()
    except Exception as e:
        return f"dcp/.metadata: {T.one_line(e)}"
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


def load_dcp(folder, model, ema, opt, extra):
    """T.load_checkpoint of a sharded checkpoint, into sharded or plain models: model, EMA, optimiser and extras
    filled in place, each rank reading only what it holds, whatever the number of processes that wrote it."""
    sd = _dcp_state(model, ema, opt, extra)
    with warnings.catch_warnings():  # one process (no process group) is a supported case, not a warning
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=os.path.join(folder, "dcp"))  # in place, each rank reading only its rows
    set_optimizer_state_dict(model, opt, sd["optim"])
    for n, (m, o) in (extra or {}).items():
        set_optimizer_state_dict(m, o, sd[f"{n}_optim"])


def load_full(model, sd, strict=True):
    """A whole state dict (checkpoint.pt) into a sharded model: each rank keeps its rows."""
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_optimizer(model, opt, osd):
    """A whole optimiser state dict (checkpoint.pt) into the optimiser of a sharded model."""
    if all(isinstance(k, int) for k in osd["state"]):  # written by one process or DDP: keyed by position
        names = {p: n for n, p in T.unwrap(model).named_parameters()}
        fqn = dict(zip([i for g in osd["param_groups"] for i in g["params"]],
                       [names[p] for g in opt.param_groups for p in g["params"]]))
        osd = {"state": {fqn[i]: st for i, st in osd["state"].items()},
               "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in osd["param_groups"]]}
    set_optimizer_state_dict(model, opt, osd, options=StateDictOptions(full_state_dict=True))


# -----------------------------------------------------------------------------
# export: the official folder, streamed one gathered tensor at a time


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
    return [(k, v.dtype, tuple(v.shape)) for k, v in T.unwrap(model).state_dict().items() if ".lora_" not in k]


def gather_official(model, key):
    """One official tensor of a sharded model, whole on every rank (collective), a LoRA adapter merged in as
    L.merge_lora does."""
    owner, _, leaf = key.rpartition(".")
    mod = T.unwrap(model).get_submodule(owner)
    w = _whole(getattr(mod, leaf))
    if isinstance(mod, L.LoRALinear) and leaf == "weight":
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
                  **asdict(T.unwrap(model).cfg), "_name_or_path": name_or_path}
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
