"""
Images → the unified token sequence of UniPic 3.0 (paper §4.2, Eq. 5–8), and back.

  1. all K inputs are resized *together* to one pixel budget (official rule: Σ areas ≈ 1024², sides multiples of 32);
  2. each image is VAE-encoded to z [C, H/8, W/8] (Eq. 5, vae.py);
  3. `pack` turns every latent into tokens by 2×2 patches (Eq. 6): s [(H/16)(W/16), 4C];
  4. the target tokens come first, then the references (Eq. 7), with the shape descriptors
     H = [(h_O, w_O), (h_1, w_1), ...] in token-grid units (Eq. 8);
  5. a batch of such sequences, each with its own H, is zero-padded to the longest (`collate`).
"""
import math

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# images: mode, tensors, the joint pixel-budget resize


def to_rgb(img):
    """Any PIL image → RGB; transparent pixels are composited on white (as the ComfyUI integration does)."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, img).convert("RGB")
    return img.convert("RGB")


def image_to_tensor(img):
    """PIL image → [3, H, W] float32 in [-1, 1]."""
    x = torch.from_numpy(np.asarray(to_rgb(img), dtype=np.uint8).copy())
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def tensor_to_image(x):
    """[3, H, W] in [-1, 1] → PIL (rounded as the pipeline's postprocess does)."""
    x = (x.detach().float().cpu().clamp(-1, 1) * 0.5 + 0.5).permute(1, 2, 0).numpy()
    return Image.fromarray(np.round(x * 255).astype(np.uint8))


def _scaled_sizes(sizes, budget):
    # step 1 of the official rule: one ratio for all images, so that Σ w·h ≈ budget
    if not sizes:
        raise ValueError("joint resize needs at least one image")
    for w, h in sizes:
        if w < 1 or h < 1:
            raise ValueError(f"image size {w}x{h} is empty")
    ratio = math.sqrt(budget) / math.sqrt(sum(w * h for w, h in sizes))
    return [(max(1, round(w * ratio)), max(1, round(h * ratio))) for w, h in sizes]


def joint_resize(images, budget=1024 * 1024, multiple=32):
    """Resize PIL images by the joint rule, as the official two PIL resizes (default resample): one 1024² input stays
    1024²; two become 736² each; six become 416² each."""
    images = [to_rgb(im) for im in images]
    out = []
    for im, size in zip(images, _scaled_sizes([im.size for im in images], budget)):
        im = im.resize(size)
        # step 2: each side to the nearest multiple (never below one multiple; the official code would give 0)
        out.append(im.resize(tuple(max(multiple, round(s / multiple) * multiple) for s in im.size)))
    return out


# -----------------------------------------------------------------------------
# 2×2 packing (Eq. 6) and the unified sequence (Eq. 7–8)


def pack(z):
    """z [B, C, H, W] → tokens [B, (H/2)(W/2), 4C]; token row-major, channel c·4 + dy·2 + dx (official)."""
    B, C, H, W = z.shape
    if H % 2 or W % 2:
        raise ValueError(f"latent size {H}x{W} is not even; images must be multiples of 16 pixels")
    z = z.view(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)  # B, h, w, C, dy, dx
    return z.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(tokens, h, w):
    """tokens [B, h·w, 4C] on an (h, w) token grid → z [B, C, 2h, 2w]; the inverse of `pack`."""
    B, N, D = tokens.shape
    if N != h * w or D % 4:
        raise ValueError(f"cannot unpack {N} tokens of width {D} to a {h}x{w} grid")
    z = tokens.view(B, h, w, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # B, C, h, dy, w, dx
    return z.reshape(B, D // 4, 2 * h, 2 * w)


def latent_grid(z):
    """The shape descriptor (h, w) of one latent [.., H, W]: its token grid (Eq. 8)."""
    return z.shape[-2] // 2, z.shape[-1] // 2


def unified_sequence(target, refs):
    """Eq. 7–8 for one sample: target [C, H, W], refs [C, H_k, W_k] → S = [s_O ‖ s_1 ‖ … ‖ s_K], H = [(h_O, w_O), …]."""
    zs = [target] + list(refs)
    seq = torch.cat([pack(z[None])[0] for z in zs], dim=0)
    return seq, [latent_grid(z) for z in zs]


def seq_len(shapes):
    """Number of image tokens a sample owns: Σ h·w over its shape descriptors."""
    return sum(h * w for h, w in shapes)


def collate(seqs, shapes):
    """Pad unified sequences ([N_b, D] each, with its own shapes) to x [B, N, D] with zeros: sample b owns the first
    seq_len(shapes[b]) rows; the model masks the rest (see `image_mask`)."""
    for b, (s, hw) in enumerate(zip(seqs, shapes)):
        if s.shape[0] != seq_len(hw):
            raise ValueError(f"sample {b}: {s.shape[0]} tokens but its shapes {hw} describe {seq_len(hw)}")
    N = max(s.shape[0] for s in seqs)
    x = seqs[0].new_zeros(len(seqs), N, seqs[0].shape[1])
    for b, s in enumerate(seqs):
        x[b, : s.shape[0]] = s
    return x


def image_mask(shapes, N, device=None):
    """[B, N] bool: True on the rows each sample owns, False on padding."""
    lens = torch.tensor([seq_len(hw) for hw in shapes], device=device)
    return torch.arange(N, device=device)[None] < lens[:, None]


def target_rows(shapes, N, device=None):
    """[B, N] bool: True on each sample's target tokens (the first h_O·w_O rows)."""
    return image_mask([hw[:1] for hw in shapes], N, device)


def pad_text(embs):
    """A list of [L_b, D] text embeddings → txt [B, L, D] zero-padded at the end, txt_mask [B, L] bool."""
    L = max(e.shape[0] for e in embs)
    txt = embs[0].new_zeros(len(embs), L, embs[0].shape[1])
    mask = torch.zeros(len(embs), L, dtype=torch.bool, device=embs[0].device)
    for b, e in enumerate(embs):
        txt[b, : e.shape[0]] = e
        mask[b, : e.shape[0]] = True
    return txt, mask


def pad_text_pair(txt, txt_mask, neg, neg_mask):
    """[cond; uncond] text in one batch (true CFG in one forward): the real tokens of both, padded together."""
    return pad_text([e[m] for e, m in zip(txt, txt_mask)] + [e[m] for e, m in zip(neg, neg_mask)])
