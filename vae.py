"""
The Qwen-Image VAE as a 2-D image autoencoder, 3 x H x W in [-1, 1] <-> 16 x H/8 x W/8 latents: UniPic 3.0 encodes the
target and every reference with it (paper Eq. 5, z_O = f_vae-enc(O), z_k = f_vae-enc(I_k)). The released network is a
Wan-2.1-style causal 3-D video VAE (diffusers' AutoencoderKLQwenImage); on one frame it is exactly a 2-D network:
- each causal Conv3d pads two zero frames before the one real frame, so only its last temporal tap touches data: it is
  a Conv2d with kernel weight[:, :, -1] (kT = 1 convs likewise take weight[:, :, 0]);
- the temporal resample convs (`time_conv`) are skipped on the first frame, so they never run;
- the channel RMS norms' gamma [C, 1, 1, 1] is the 2-D gamma [C, 1, 1] with a time axis.
Zeroing every earlier tap changes encode/decode by 0.0, so this file builds the 2-D network; `load_vae` reduces the
official weights to it (same keys, shorter kernels, `time_conv` checked and dropped); toy_assets.save_vae undoes it.
"""

import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M

CLASS_NAME = "AutoencoderKLQwenImage"


def tiled(fn, x, tile, overlap, scale):
    """fn over overlapping tile x tile windows of x [B, C, H, W]; the outputs (scale x the window) are averaged with
    weights ramping linearly across each overlap. Windows are full-sized: a row's last sits flush with the border."""
    B, _, H, W = x.shape

    def starts(n):
        s = list(range(0, max(n - tile, 0) + 1, tile - overlap))
        return s + [n - tile] if s[-1] + tile < n else s

    def ramp(n, rise, fall):  # [n] weights in (0, 1]: ramps over the overlap, except at the image border
        i, ov = torch.arange(n) + 0.5, overlap * scale
        w = torch.minimum(torch.ones(n), i / ov) if rise else torch.ones(n)
        return torch.minimum(w, (n - i) / ov) if fall else w

    out = weight = None
    for y in starts(H):
        for x0 in starts(W):
            t = fn(x[:, :, y:y + tile, x0:x0 + tile])  # [B, C', th, tw]
            th, tw = t.shape[-2:]
            w = (ramp(th, y > 0, y + tile < H)[:, None] * ramp(tw, x0 > 0, x0 + tile < W)[None, :]).to(t.device)
            if out is None:  # accumulate in fp32 whatever the model's dtype
                out = torch.zeros(B, t.shape[1], round(H * scale), round(W * scale), device=t.device)
                weight = torch.zeros(out.shape[-2:], device=t.device)
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy:oy + th, ox:ox + tw] += t.float() * w
            weight[oy:oy + th, ox:ox + tw] += w
    return (out / weight).to(t.dtype)


# ----------------------------------------------------------------------------------------------------------
# blocks


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma; the L2 norm is taken in fp32 for half-precision inputs."""

    def __init__(self, dim):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1))

    def forward(self, x):  # [B, C, H, W]
        xn = F.normalize(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x, dim=1).to(x.dtype)
        return xn * (self.scale * self.gamma)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim, dropout=0.0):
        super().__init__()
        self.dropout = dropout
        self.norm1, self.conv1 = RMSNorm(in_dim), nn.Conv2d(in_dim, out_dim, 3, padding=1)
        self.norm2, self.conv2 = RMSNorm(out_dim), nn.Conv2d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x):  # [B, in, H, W] -> [B, out, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = F.dropout(F.silu(self.norm2(h)), self.dropout, self.training)
        return self.conv2(h).add_(self.conv_shortcut(x))  # in place: one image-sized buffer fewer


class Attention(nn.Module):
    """Single-head self-attention over all H*W positions of the image."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMSNorm(dim)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):  # [B, C, H, W]
        B, C, H, W = x.shape
        q, k, v = self.to_qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1).chunk(3, dim=-1)  # [B, 1, HW, C]
        h = F.scaled_dot_product_attention(q, k, v)  # [B, 1, HW, C]
        return x + self.proj(h.squeeze(1).transpose(1, 2).reshape(B, C, H, W))


class Resample(nn.Module):
    """down: pad right/bottom by 1, 3x3 stride-2 conv (H -> H/2). up: nearest x2, 3x3 conv that halves C.
    `temporal`: the official checkpoint also has a `time_conv` here (never run on an image)."""

    def __init__(self, dim, mode, temporal):
        super().__init__()
        self.dim, self.mode, self.temporal = dim, mode, temporal
        if mode == "down":  # index 1 is the official name `resample.1`
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        else:
            self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"),
                                          nn.Conv2d(dim, dim // 2, 3, padding=1))

    def forward(self, x):
        return self.resample(x)


class MidBlock(nn.Module):
    def __init__(self, dim, dropout):
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])
        self.attentions = nn.ModuleList([Attention(dim)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class UpBlock(nn.Module):
    def __init__(self, in_dim, out_dim, num_res_blocks, dropout, up, temporal):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(a, b, dropout) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nn.ModuleList([Resample(out_dim, "up", temporal)]) if up else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)

# ----------------------------------------------------------------------------------------------------------
# encoder, decoder, VAE


class Encoder(nn.Module):
    """image [B, 3, H, W] -> moments [B, 2z, H/8, W/8] (before quant_conv)."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1] + cfg.dim_mult]
        self.conv_in = nn.Conv2d(cfg.input_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                self.down_blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                if 0.5**i in cfg.attn_scales:  # attention after every res block at these scales (1, 1/2, ...)
                    self.down_blocks.append(Attention(out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                self.down_blocks.append(Resample(out_dim, "down", cfg.temperal_downsample[i]))
        self.mid_block = MidBlock(dims[-1], cfg.dropout)
        self.norm_out, self.conv_out = RMSNorm(dims[-1]), nn.Conv2d(dims[-1], 2 * cfg.z_dim, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    """latent [B, z, h, w] (after post_quant_conv) -> image [B, 3, 8h, 8w], unclamped. Upsamplers halve C, so up blocks
    after the first start at half width; no attention outside the mid block, as official (attn_scales: encoder-only)."""

    def __init__(self, cfg):
        super().__init__()
        dims = [cfg.base_dim * m for m in [cfg.dim_mult[-1]] + cfg.dim_mult[::-1]]
        self.conv_in = nn.Conv2d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        self.up_blocks = nn.ModuleList()
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i < len(cfg.dim_mult) - 1
            self.up_blocks.append(UpBlock(in_dim // 2 if i > 0 else in_dim, out_dim, cfg.num_res_blocks,
                                          cfg.dropout, up, up and cfg.temperal_downsample[-1 - i]))
        self.norm_out, self.conv_out = RMSNorm(dims[-1]), nn.Conv2d(dims[-1], cfg.input_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VAE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)
        self.factor = 2 ** (len(cfg.dim_mult) - 1)  # spatial downsampling: 8 for the released model

    @property
    def dtype(self):
        return self.quant_conv.weight.dtype

    def _check(self, t, channels, name, what):
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(f"{name} must be [B, {channels}, H, W] {what}, got shape {tuple(t.shape)}")
        if t.dtype != self.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but the VAE is {self.dtype}; cast it first")

    def _tiles(self, tile):  # (window, overlap) in image pixels; the overlap tile/4 must be whole latents
        if tile <= 0 or tile % (4 * self.factor):
            raise ValueError(f"tile must be a positive multiple of {4 * self.factor} pixels, got {tile}")
        return tile, tile // 4

    def posterior(self, x, tile=None):
        """image [B, 3, H, W] in [-1, 1] -> (mean, logvar), each [B, z, H/8, W/8]; logvar clamped as official."""
        self._check(x, self.cfg.input_channels, "image", "in [-1, 1]")
        f = self.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        encode = lambda x: self.quant_conv(self.encoder(x))  # noqa: E731
        moments = encode(x) if tile is None else tiled(encode, x, *self._tiles(tile), 1 / f)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @torch.no_grad()
    def encode(self, x, sample=False, generator=None, tile=None):
        """image [B, 3, H, W] in [-1, 1] -> un-normalised latent [B, z, H/8, W/8]: the posterior mean
        (inference, `sample_mode="argmax"`), or mean + std * noise when sample=True (training).
        tile: encode in overlapping tile x tile pixel windows (multiple of 32, e.g. 256) to bound memory."""
        mean, logvar = self.posterior(x, tile)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + torch.exp(0.5 * logvar) * noise

    @torch.no_grad()
    def decode(self, z, tile=None):
        """un-normalised latent [B, z, h, w] -> image [B, 3, 8h, 8w] clamped to [-1, 1]; tile: as in encode (pixels)."""
        self._check(z, self.cfg.z_dim, "latent", "")
        decode = lambda z: self.decoder(self.post_quant_conv(z))  # noqa: E731
        x = decode(z) if tile is None else tiled(decode, z, *(n // self.factor for n in self._tiles(tile)), self.factor)
        return x.clamp(-1.0, 1.0)

    def _stats(self):  # the config's per-channel latents_mean, latents_std as [1, z, 1, 1] fp32 tensors
        return (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)
                for v in (self.cfg.latents_mean, self.cfg.latents_std))

    def normalize(self, z):
        """encode side of the pipeline: (z - mean) / std, with mean and std cast to z's dtype first."""
        mean, std = self._stats()
        return (z - mean.to(z.device, z.dtype)) / std.to(z.device, z.dtype)

    def denormalize(self, z):
        """decode side of the pipeline: z / (1 / std) + mean, the reciprocal taken in fp32, then cast."""
        mean, std = self._stats()
        return z / (1.0 / std).to(z.device, z.dtype) + mean.to(z.device, z.dtype)

# ----------------------------------------------------------------------------------------------------------
# config and presets


@dataclass
class VAEConfig:
    """Field names are the official vae/config.json keys (including the `temperal` spelling); defaults are
    the released Qwen-Image VAE: 126.9M parameters in the 3-D checkpoint, 44.6M after the 2-D reduction."""
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: list = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_scales: list = field(default_factory=list)
    temperal_downsample: list = field(default_factory=lambda: [False, True, True])
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: list = field(default_factory=lambda: [
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921])
    latents_std: list = field(default_factory=lambda: [
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160])

    @classmethod
    def toy(cls):
        """The toy world's VAE for 64-128 px images: the official architecture at base_dim 16 (1.27M parameters,
        3.6M in 3-D form). Narrow on purpose: on a CPU base_dim 16 reached 26.8 dB PSNR in 1,600 steps at batch
        16, base_dim 32 only 16 dB. latents_mean/std start neutral; data.fit_vae measures them."""
        return cls(base_dim=16, latents_mean=[0.0] * 16, latents_std=[1.0] * 16)

    @classmethod
    def from_json(cls, path):
        try:
            with open(path) as fh:
                d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if d.get("_class_name", CLASS_NAME) != CLASS_NAME:
            raise ValueError(f"{path}: _class_name is {d['_class_name']!r}, expected {CLASS_NAME!r}")
        d = {k: v for k, v in d.items() if not k.startswith("_")}
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown VAE config keys {unknown}")
        cfg = cls(**d)
        if not len(cfg.latents_mean) == len(cfg.latents_std) == cfg.z_dim:
            raise ValueError(f"{path}: latents_mean/latents_std need z_dim = {cfg.z_dim} entries each")
        return cfg

# ----------------------------------------------------------------------------------------------------------
# loading the official 3-D layout (toy_assets.save_vae writes it)


def official_shapes(vae):
    """key -> shape in the released 3-D checkpoint: causal convs and their norms gain a time axis of length kT (= the
    kernel's spatial size; gamma [C,1,1] -> [C,1,1,1]); resample convs and attention were 2-D there too; each temporal
    Resample adds a `time_conv` that never runs on a single image."""
    frame2d = {f"{n}.{k}" for n, m in vae.named_modules() if isinstance(m, (Attention, Resample))
               for k in m.state_dict()}
    shapes = {}
    for k, p in vae.state_dict().items():
        s = tuple(p.shape)
        shapes[k] = s if k in frame2d or p.ndim == 1 else s[:2] + (s[2] if p.ndim == 4 else 1,) + s[2:]
    for n, m in vae.named_modules():
        if isinstance(m, Resample) and m.temporal:  # down: stride-2 over time; up: 2C = two output frames
            out = m.dim if m.mode == "down" else 2 * m.dim
            shapes[f"{n}.time_conv.weight"], shapes[f"{n}.time_conv.bias"] = (out, m.dim, 3, 1, 1), (out,)
    return shapes


def load_vae(path, dtype=torch.float32, device="cpu"):
    """Read an official `vae/` folder (config.json + diffusion_pytorch_model.safetensors) into the 2-D VAE: keys and
    3-D shapes checked first, then each read, reduced (weight[:, :, -1]) and cast in turn into a meta-device net."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"VAE folder {path!r} has no config.json")
    with torch.device("meta"):
        vae = VAE(VAEConfig.from_json(cfg_path))
    net = vae.state_dict()
    state = {k: (t[:, :, -1] if t.ndim == net[k].ndim + 1 else t).contiguous().to(device, dtype)
             for k, t in M.read_state(path, official_shapes(vae)) if k in net}
    vae.load_state_dict(state, strict=True, assign=True)
    return vae.eval()
