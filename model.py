"""
The Qwen-Image MMDiT, the denoiser of UniPic 3.0 (paper §4.2, Fig. 3), and its weight I/O.

Dual-stream blocks: text and image tokens keep their own weights (modulation, projections, MLPs) but meet in one joint
attention, text first. The image stream is the unified sequence of Eq. 7, [target ‖ ref_1 ‖ … ‖ ref_K]; the shape
descriptors H of Eq. 8 place each image in 3-D RoPE space (MSRoPE, rope_table). Unlike the reference implementation,
each sample carries its own H: samples of different target sizes and reference counts share one forward, padding rows
and padded text tokens masked out of attention so they change no real row. Parameter names are the official ones
(`transformer/config.json` + `diffusion_pytorch_model*.safetensors`): `load_mmdit` is a strict `load_state_dict`.
"""
import functools
import json
import math
import os
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from pack import image_mask

# -----------------------------------------------------------------------------
# stateless helpers: timestep embedding, RMSNorm math, MSRoPE


def timestep_embedding(t, dim=256, max_period=10000):
    """t [B] σ in [0, 1] → [B, dim] sinusoid of 1000·σ, cos first (official: flip_sin_to_cos, shift 0)."""
    half = dim // 2
    dtype = torch.float64 if t.dtype == torch.float64 else torch.float32  # fp32 at least; fp64 stays (tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
    args = 1000 * (t.to(dtype)[:, None] * freqs[None])  # the official order: (t · f) · 1000, in fp32
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


@functools.lru_cache(maxsize=64)
def rope_table(hw, N, L, axes_dims, device, theta=10000):
    """MSRoPE (Eq. 8) of one sample's [text ‖ image rows], hw its (h, w) token grids, target first: [L + N, 1, Dh/2]
    complex64 exp(i·angle), [frame | row | col] with axes_dims[a]/2 frequencies each. Frame = image index, rows/cols
    centred per image, text after the largest half-extent, padding rows 0. Cached: a sampler reuses it every step."""
    with torch.inference_mode(False):  # a table first made under inference_mode must still serve training later
        pos = torch.zeros(L + N, 3, dtype=torch.long, device=device)
        pos[:L] = (max(max(h // 2, w // 2) for h, w in hw) + torch.arange(L, device=device))[:, None]
        start = L
        for idx, (h, w) in enumerate(hw):
            rows = torch.arange(h, device=device) - (h - h // 2)  # centred: -(h - h//2) .. h//2 - 1
            cols = torch.arange(w, device=device) - (w - w // 2)
            pos[start : start + h * w, 0] = idx  # frame axis = image index (0 = target)
            pos[start : start + h * w, 1:] = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), -1).reshape(-1, 2)
            start += h * w
        invs = [1.0 / torch.pow(theta, torch.arange(0, d, 2, dtype=torch.float32, device=device) / d) for d in axes_dims]
        angles = torch.cat([pos[:, a, None].float() * invs[a] for a in range(3)], dim=-1)
        return torch.polar(torch.ones_like(angles), angles)[:, None]


def apply_rope(x, freqs):
    """Rotate interleaved pairs (x[2k], x[2k+1]) as complex numbers — not the rotate-half convention.
    x [B, S, H, Dh]; freqs [B, S, 1, Dh/2] complex64 = exp(i·angle). Math in fp32, result in x's dtype."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def layer_norm(x, eps=1e-6):  # no affine weights: the official img_norm*/txt_norm*/norm_out.norm have none
    return F.layer_norm(x, x.shape[-1:], eps=eps)


def modulate(x, shift, scale):  # AdaLN: x·(1 + scale) + shift, in one fused op
    return torch.addcmul(shift, x, 1 + scale)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # official casts: statistics in fp32; the normalised x is cast to a low-precision weight's dtype
        y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            y = y.to(self.weight.dtype)
        return y * self.weight


# -----------------------------------------------------------------------------
# the dual-stream block


class MLP(nn.Module):  # official `img_mlp.net` = [GELU(proj), Dropout(p=0) → Identity, Linear]
    def __init__(self, dim):
        super().__init__()
        gelu_proj = nn.Sequential(OrderedDict(proj=nn.Linear(dim, 4 * dim), act=nn.GELU(approximate="tanh")))  # `net.0`
        self.net = nn.Sequential(gelu_proj, nn.Identity(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class JointAttention(nn.Module):  # the weights; the computation is written out in Block.forward
    def __init__(self, dim, heads):
        super().__init__()
        self.heads, head_dim = heads, dim // heads
        self.to_q, self.to_k, self.to_v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.add_q_proj, self.add_k_proj, self.add_v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.norm_q, self.norm_k, self.norm_added_q, self.norm_added_k = (RMSNorm(head_dim) for _ in range(4))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # official `to_out.0`
        self.to_add_out = nn.Linear(dim, dim)


class Block(nn.Module):
    """One dual-stream MMDiT block: AdaLN-modulated attention and MLP for each stream, attention joint."""

    def __init__(self, dim, heads):
        super().__init__()
        self.img_mod, self.txt_mod = (nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim)) for _ in range(2))
        self.attn = JointAttention(dim, heads)
        self.img_mlp, self.txt_mlp = MLP(dim), MLP(dim)

    def forward(self, img, txt, vec, pe, mask):
        # img [B, N, D], txt [B, L, D], vec [B, D]; pe [B, L+N, 1, Dh/2] rotations; mask [B, 1, 1, L+N] or None
        B, N, L, H, a = *img.shape[:2], txt.shape[1], self.attn.heads, self.attn
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)[:, None].chunk(6, dim=-1)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)[:, None].chunk(6, dim=-1)

        # joint attention: project each stream and QK-RMSNorm it, concatenate text first, rotate, one SDPA, split
        x = modulate(layer_norm(img), i_shift1, i_scale1)
        c = modulate(layer_norm(txt), t_shift1, t_scale1)
        q = torch.cat([a.norm_added_q(a.add_q_proj(c).view(B, L, H, -1)), a.norm_q(a.to_q(x).view(B, N, H, -1))], 1)
        k = torch.cat([a.norm_added_k(a.add_k_proj(c).view(B, L, H, -1)), a.norm_k(a.to_k(x).view(B, N, H, -1))], 1)
        v = torch.cat([a.add_v_proj(c).view(B, L, H, -1), a.to_v(x).view(B, N, H, -1)], 1)  # [B, L+N, H, Dh]
        q, k = apply_rope(q, pe), apply_rope(k, pe)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        o = o.transpose(1, 2).flatten(2).to(q.dtype)  # [B, L+N, D]
        img = torch.addcmul(img, i_gate1, a.to_out[0](o[:, L:].contiguous()))  # img + gate · out
        txt = torch.addcmul(txt, t_gate1, a.to_add_out(o[:, :L].contiguous()))

        img = torch.addcmul(img, i_gate2, self.img_mlp(modulate(layer_norm(img), i_shift2, i_scale2)))
        txt = torch.addcmul(txt, t_gate2, self.txt_mlp(modulate(layer_norm(txt), t_shift2, t_scale2)))
        if img.dtype == torch.float16:  # official overflow guard, a no-op in bf16 / fp32
            img, txt = img.clip(-65504, 65504), txt.clip(-65504, 65504)
        return img, txt


# -----------------------------------------------------------------------------
# the model


@dataclass
class MMDiTConfig:
    """Field names are the official `transformer/config.json` keys; defaults are the released 20B model."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    @property
    def dim(self):
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        # metadata ("_class_name", ...), the documented-unused pooled_projection_dim, and flags left at their
        # off default are accepted; anything the model would have to implement is refused loudly.
        bad = [k for k, v in d.items() if k not in known and not k.startswith("_") and k != "pooled_projection_dim" and v]
        if bad or d.get("guidance_embeds"):
            raise ValueError(f"unsupported transformer config options: {bad or ['guidance_embeds']}")
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        cfg.axes_dims_rope = tuple(cfg.axes_dims_rope)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope {cfg.axes_dims_rope} must sum to attention_head_dim {cfg.attention_head_dim}")
        return cfg


PRESETS = {
    "qwen-image": MMDiTConfig(),  # Qwen-Image(-Edit) and all UniPic-3 checkpoints
    # the toy world's denoiser (the committed teachers): 4 blocks of width 96, ≈ 1.4M params. On 2 CPU cores a 25-min
    # run is compute-bound: width 96/128 beat 192 (ToyCom 0.35–0.36 vs 0.20); 4×24 heads beat 3×32 (0.429 vs 0.376, v1).
    "toy": MMDiTConfig(num_layers=4, attention_head_dim=24, num_attention_heads=4, joint_attention_dim=64, axes_dims_rope=(8, 8, 8)),
    # the v3 toy teacher: 6 heads of 24 (width 144, ≈ 3.1M params), affordable under torch.compile + bf16 autocast
    "toy-144": MMDiTConfig(num_layers=4, attention_head_dim=24, num_attention_heads=6, joint_attention_dim=64, axes_dims_rope=(8, 8, 8)),
    # the v1 toy teacher's shape (docs/history.md), kept so its training command still runs
    "toy-3x32": MMDiTConfig(num_layers=4, attention_head_dim=32, num_attention_heads=3, joint_attention_dim=64, axes_dims_rope=(8, 12, 12)),
    # tests and smoke runs: one block of width 32 on the toy text encoder's 64-d embeddings
    "tiny": MMDiTConfig(num_layers=1, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, axes_dims_rope=(4, 6, 6)),
}


def compile_blocks(model):
    """Regional compilation: torch.compile each block (pure tensor code); the per-sample bookkeeping (RoPE tables,
    masks) stays eager. dynamic=True: one graph serves every sequence length. Parameter names are unchanged."""
    for blk in model.transformer_blocks:
        blk.compile(dynamic=True)
    return model


class TimestepEmbedder(nn.Module):  # official `time_text_embed.timestep_embedder`
    def __init__(self, dim):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(256, dim), nn.Linear(dim, dim)

    def forward(self, e):
        return self.linear_2(F.silu(self.linear_1(e)))


class OutNorm(nn.Module):  # official `norm_out`: AdaLN with (scale, shift) — scale first, unlike the blocks
    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim)

    def forward(self, x, vec):
        scale, shift = self.linear(F.silu(vec).to(x.dtype))[:, None].chunk(2, dim=-1)
        return modulate(layer_norm(x), shift, scale)


class MMDiT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg, D = cfg, cfg.dim
        self.time_text_embed = nn.Module()
        self.time_text_embed.timestep_embedder = TimestepEmbedder(D)
        self.txt_norm = RMSNorm(cfg.joint_attention_dim)
        self.img_in = nn.Linear(cfg.in_channels, D)
        self.txt_in = nn.Linear(cfg.joint_attention_dim, D)
        self.transformer_blocks = nn.ModuleList([Block(D, cfg.num_attention_heads) for _ in range(cfg.num_layers)])
        self.norm_out = OutNorm(D)
        self.proj_out = nn.Linear(D, cfg.patch_size**2 * cfg.out_channels)
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self):
        """DiT-style init from scratch: Xavier Linears, zero AdaLN modulation and output (identity blocks, output 0)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        mods = [lin for blk in self.transformer_blocks for lin in (blk.img_mod[1], blk.txt_mod[1])]
        for lin in mods + [self.norm_out.linear, self.proj_out]:
            nn.init.zeros_(lin.weight), nn.init.zeros_(lin.bias)
        nn.init.normal_(self.time_text_embed.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.time_text_embed.timestep_embedder.linear_2.weight, std=0.02)
        return self

    def forward(self, x, shapes, txt, txt_mask, t):
        """x [B, N, in_channels] unified sequences (target first, zero-padded); shapes: B lists of (h, w);
        txt [B, L, joint_attention_dim]; txt_mask [B, L] bool (True = real); t [B] σ in [0, 1].
        Returns [B, N, patch²·out_channels]: a prediction for every image row (zero on padding rows)."""
        N, L = x.shape[1], txt.shape[1]
        self._check(x, shapes, txt, txt_mask, t)
        img_mask = image_mask(shapes, N, x.device)  # [B, N]: the rows each sample owns
        keep = torch.cat([txt_mask.bool(), img_mask], dim=1)  # keys to attend to, text first
        mask = None if bool(keep.all()) else keep[:, None, None, :]

        img = self.img_in(x)
        # σ's sinusoid stays fp32 even under bf16 autocast: a bf16 σ (spacing ≈ 0.004 near 1) breaks the CM trainer's
        # finite difference (continuous-time CMs collapsed). The official code casts σ to the activation dtype first;
        # the samplers pass σ already rounded to the latent dtype, as it does.
        vec = self.time_text_embed.timestep_embedder(timestep_embedding(t).to(img.dtype))
        txt = self.txt_in(self.txt_norm(txt))
        pe = torch.stack([rope_table(tuple(hw), N, L, self.cfg.axes_dims_rope, x.device) for hw in shapes])

        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        for blk in self.transformer_blocks:
            args = (img, txt, vec, pe, mask)
            img, txt = checkpoint(blk, *args, use_reentrant=False) if ckpt else blk(*args)
        out = self.proj_out(self.norm_out(img, vec))
        return out * img_mask[..., None].to(out.dtype)

    def _check(self, x, shapes, txt, txt_mask, t):
        B, N, C = x.shape
        if C != self.cfg.in_channels:
            raise ValueError(f"x has {C} channels, the model takes in_channels={self.cfg.in_channels}")
        if len(shapes) != B:
            raise ValueError(f"shapes has {len(shapes)} entries for a batch of {B}")
        for b, hw in enumerate(shapes):
            n = sum(h * w for h, w in hw)
            if not hw or n > N:
                raise ValueError(f"sample {b}: shapes {list(hw)} describe {n} tokens but x has {N} rows")
        if txt.shape[:1] != (B,) or txt.shape[-1] != self.cfg.joint_attention_dim:
            raise ValueError(f"txt is {tuple(txt.shape)}, expected [{B}, L, {self.cfg.joint_attention_dim}]")
        if txt_mask.shape != txt.shape[:2]:
            raise ValueError(f"txt_mask is {tuple(txt_mask.shape)}, expected {tuple(txt.shape[:2])}")
        if t.shape != (B,):
            raise ValueError(f"t is {tuple(t.shape)}, expected [{B}]")


# -----------------------------------------------------------------------------
# loading and saving official diffusers-layout folders

WEIGHTS = "diffusion_pytorch_model"  # the diffusers file stem (transformer/, vae/); transformers uses "model"


def _first_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def atomic_write(path, write):
    """Write `path` via a temp file + rename: a killed run leaves no half-written file. write: text, or fn(tmp path)."""
    tmp = path + ".tmp"
    try:
        if callable(write):
            write(tmp)
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(write)
    except BaseException:
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)


def weight_files(folder, stem=WEIGHTS):
    """A component folder's weight files: the shards in STEM.safetensors.index.json, else STEM.safetensors or .bin."""
    index = os.path.join(folder, stem + ".safetensors.index.json")
    if os.path.exists(index):
        try:
            weight_map = json.load(open(index))["weight_map"]
        except (ValueError, KeyError) as e:
            raise ValueError(f"{index}: not a valid index ({_first_line(e)})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(folder, f))]
        if missing:
            raise ValueError(f"{folder}: shards listed in the index are missing: {missing}")
        return [os.path.join(folder, f) for f in files]
    for name in (stem + ".safetensors", stem + ".bin"):
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    raise ValueError(f"{folder}: no {stem}.safetensors(.index.json) or {stem}.bin found")


def open_weights(path):
    """One weight file → {key: lazy tensor}: a safetensors slice (only the header is read) or a memory-mapped
    tensor of a .bin. `v[:]` reads one; `v.get_shape()` / `v.shape` is its shape."""
    try:
        if path.endswith(".bin"):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        f = safe_open(path, framework="pt", device="cpu")
        return {k: f.get_slice(k) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"{path}: cannot read weights ({_first_line(e)})") from None


def _listed(keys, n=8):
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", … ({len(keys)} in all)" if len(keys) > n else "")


def check_state_keys(expected, found, where):
    """Compare {key: shape} dicts; one error listing every missing, unexpected and mis-shaped key."""
    missing, unexpected = expected.keys() - found.keys(), found.keys() - expected.keys()
    wrong = [f"{k} {tuple(found[k])} != {tuple(expected[k])}" for k in expected.keys() & found.keys()
             if tuple(found[k]) != tuple(expected[k])]
    if missing or unexpected or wrong:
        parts = [f"{what} [{_listed(keys)}]" for what, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys]
        raise ValueError(f"{where}: the weights do not match the config: " + "; ".join(parts))


def read_state(folder, expected, stem=WEIGHTS, rename=None, skip=()):
    """(key, tensor) pairs of a component folder in stored dtype, read one at a time once every file's keys and shapes
    match `expected` {key: shape} (MMDiT, VAE and text encoder load here); rename: stored key → ours; skip: dropped."""
    files = weight_files(folder, stem)
    opened = [{(rename(k) if rename else k): v for k, v in open_weights(f).items()} for f in files]
    opened = [{k: v for k, v in o.items() if k not in skip} for o in opened]
    shapes = {k: tuple(v.get_shape() if hasattr(v, "get_shape") else v.shape) for o in opened for k, v in o.items()}
    check_state_keys(expected, shapes, folder)
    for f, o in zip(files, opened):
        for k, v in o.items():
            try:
                yield k, (v[:] if hasattr(v, "get_shape") else v)
            except Exception as e:
                raise ValueError(f"{f}: cannot read tensor {k} ({_first_line(e)})") from None


def load_mmdit(path, dtype=None, device="cpu"):
    """Load an official (or our own) transformer folder; dtype=None keeps the stored dtype. The model is built on the
    meta device and filled tensor by tensor as read and cast: peak memory is the model plus one tensor."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"{path}: no config.json (expected a diffusers-layout transformer folder)")
    try:
        cfg = MMDiTConfig.from_dict(json.load(open(cfg_path)))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{cfg_path}: unreadable config ({_first_line(e)})") from None
    with torch.device("meta"):
        model = MMDiT(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    sd = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in read_state(path, expected)}
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def save_mmdit(model, path, max_shard_bytes=5 * 2**30, name_or_path=None):
    """Write config.json + safetensors shards (+ index if >1), each atomically; loads in `load_mmdit` and diffusers'
    QwenImageTransformer2DModel.from_pretrained; name_or_path → `_name_or_path` (as in official DMD/CM configs)."""
    sd = model.state_dict()
    if any(".lora_" in k for k in sd):
        raise ValueError("model has LoRA weights; call lora.merge_lora(model) before save_mmdit")
    os.makedirs(path, exist_ok=True)
    shards, size = [[]], 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += nbytes
    n = len(shards)
    names = [f"{WEIGHTS}.safetensors"] if n == 1 else [f"{WEIGHTS}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    config = {"_class_name": "QwenImageTransformer2DModel", "_diffusers_version": "0.42.1", **asdict(model.cfg),
              "axes_dims_rope": list(model.cfg.axes_dims_rope)}
    if name_or_path:
        config["_name_or_path"] = name_or_path
    atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2))
    for keys, name in zip(shards, names):
        tensors = {k: sd[k].detach().contiguous().cpu() for k in keys}
        atomic_write(os.path.join(path, name), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    if n > 1:
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in sd.values())},
                 "weight_map": {k: name for keys, name in zip(shards, names) for k in keys}}
        names.append(f"{WEIGHTS}.safetensors.index.json")  # so the clean-up below keeps it
        atomic_write(os.path.join(path, names[-1]), json.dumps(index, indent=2))
    # drop files of an earlier save that the new one does not use (a stale index would shadow the new weights)
    for f in os.listdir(path):
        if f.startswith(WEIGHTS) and f not in names:
            os.remove(os.path.join(path, f))
    return path
