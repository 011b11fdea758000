"""
The UniPic 3.0 condition encoder (paper §4.2), from scratch: Qwen2.5-VL-7B reads the instruction *and* every input
image, and the MMDiT is conditioned on its last hidden state. Precision follows the official code: RMSNorm in fp32,
cast back, then the weight multiply; the vision rotary is applied in fp32; the LM's cos/sin are built in fp32 and
applied in the model dtype; attention is F.scaled_dot_product_attention.
"""
import json
import os
import re
import unicodedata
from dataclasses import dataclass, field, fields
from functools import lru_cache
from itertools import groupby

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import model as M
import pack

# -----------------------------------------------------------------------------
# tokenizer: Qwen2 byte-level BPE

# The added tokens in the official order, ids after the BPE vocabulary (151643.. in Qwen2.5); the first 14 are special
ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"]
N_SPECIAL = 14


def _read_text(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing")
    with open(path, encoding="utf-8") as f:
        return f.read()


def bytes_to_unicode():
    """GPT-2's reversible byte → printable character map; byte-level BPE merges these characters."""
    keep = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return {b: chr(b if b in keep else next(extra)) for b in range(256)}


@lru_cache(maxsize=1)
def split_regex():
    r"""The official Qwen2 pre-tokenizer regex, the same in meaning:
      (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
    stdlib `re` has no \p{..}, and its \s also matches \x1c-\x1f, so letters (L), numbers (N) and Unicode
    White_Space (Oniguruma's \s) are spelled out as code-point ranges from unicodedata. Digits split one by one."""
    def kind(cp):
        cat = unicodedata.category(chr(cp))
        return "space" if 0x09 <= cp <= 0x0D or cp == 0x85 or cat in ("Zs", "Zl", "Zp") else cat[0]
    ranges = {"L": [], "N": [], "space": []}
    for key, run in groupby(range(0x40000), kind):  # planes 4-16 hold no letters, numbers or spaces
        if key in ranges:
            run = list(run)
            ranges[key].append((run[0], run[-1]))
    L, N, S = ("".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges[k]) for k in ("L", "N", "space"))
    return re.compile(rf"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n{L}{N}]?[{L}]+|[{N}]| ?[^{S}{L}{N}]+[\r\n]*"
                      rf"|[{S}]*[\r\n]+|[{S}]+(?![^{S}])|[{S}]+")


class Tokenizer:
    """Qwen2 tokenizer (vocab: BPE token → id; merges: [(a, b)] in rank order; added: token → id). Added tokens are
    cut out verbatim first; the rest is NFC-normalised, split by the regex, byte-mapped, BPE-merged. No BOS/EOS."""

    def __init__(self, vocab, merges, added):
        self.vocab, self.merges, self.added = vocab, merges, added
        self.ranks = {pair: r for r, pair in enumerate(merges)}
        self.id_to_token = {i: t for t, i in {**vocab, **added}.items()}
        self.byte_char = bytes_to_unicode()
        self.char_byte = {c: b for b, c in self.byte_char.items()}
        longest_first = sorted(added, key=len, reverse=True)  # leftmost-longest match, like the reference
        self.added_re = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")") if added else None
        self.cache = {}

    @classmethod
    def from_folder(cls, path):
        vocab = json.loads(_read_text(os.path.join(path, "vocab.json")))
        decoder = json.loads(_read_text(os.path.join(path, "tokenizer_config.json"))).get("added_tokens_decoder", {})
        added = {t["content"]: int(i) for i, t in decoder.items()}
        if os.path.isfile(os.path.join(path, "added_tokens.json")):
            added.update(json.loads(_read_text(os.path.join(path, "added_tokens.json"))))
        merges_txt = os.path.join(path, "merges.txt")
        lines = _read_text(merges_txt).split("\n")
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if any(len(pair) != 2 for pair in merges):
            raise ValueError(f"{merges_txt} has a line that is not two tokens separated by one space")
        return cls(vocab, merges, added)

    def __len__(self):
        return max(self.id_to_token) + 1

    def bpe(self, word):
        """One pre-token → ids: its utf-8 byte characters merged pair by pair, lowest rank first (leftmost on ties)."""
        if word not in self.cache:
            parts = [self.byte_char[b] for b in word.encode("utf-8")]
            while len(parts) > 1:
                rank, i = min((self.ranks.get(p, float("inf")), i) for i, p in enumerate(zip(parts, parts[1:])))
                if rank == float("inf"):
                    break
                parts[i:i + 2] = [parts[i] + parts[i + 1]]
            missing = [p for p in parts if p not in self.vocab]
            if missing:
                raise ValueError(f"BPE token {missing[0]!r} is not in vocab.json")
            self.cache[word] = [self.vocab[p] for p in parts]
        return self.cache[word]

    def encode(self, text):
        ids = []
        pieces = self.added_re.split(text) if self.added_re else [text]
        for k, piece in enumerate(pieces):  # re.split with a group: text, token, text, token, ...
            if k % 2:
                ids.append(self.added[piece])
            else:
                ids += [i for w in split_regex().findall(unicodedata.normalize("NFC", piece)) for i in self.bpe(w)]
        return ids

    def decode(self, ids):
        out, buf = "", bytearray()
        for i in ids:
            if i not in self.id_to_token:
                raise ValueError(f"token id {i} is not in the vocabulary")
            tok = self.id_to_token[i]
            if tok in self.added:
                out, buf = out + buf.decode("utf-8", errors="replace") + tok, bytearray()
            else:
                buf.extend(self.char_byte[c] for c in tok)
        return out + buf.decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# image preprocessing for the VL encoder (UniPic-3 rule: no smart_resize)

IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, processor/preprocessor_config.json
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def vl_copy(img):
    """A jointly resized image (sides multiples of 32) → the VL copy scaled by 28/32 (PIL default resample);
    the official processor is then called with do_resize=False, so each 32 px become one 28-px vision token."""
    return img.resize(tuple(round(s * 28 / 32) for s in img.size))


def image_to_pixels(img, mean=IMAGE_MEAN, std=IMAGE_STD, unit=28):
    """PIL image, sides multiples of `unit` (14 px × 2) → [3, H, W] fp32 (x/255 − mean)/std; grid (1, H/14, W/14)."""
    w, h = img.size
    if w < unit or h < unit or w % unit or h % unit:
        raise ValueError(f"VL image {w}x{h} is not a positive multiple of {unit} px per side (one merged patch)")
    x = torch.from_numpy(np.asarray(pack.to_rgb(img), dtype=np.float32).copy()).permute(2, 0, 1) / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def expand_image_pads(ids, counts, pad_id):
    """Each <|image_pad|> (one per image, in order) → that image's count of merged vision tokens."""
    if ids.count(pad_id) != len(counts):
        raise ValueError(f"text has {ids.count(pad_id)} <|image_pad|> tokens for {len(counts)} images")
    counts = iter(counts)
    return [j for i in ids for j in ([i] * next(counts) if i == pad_id else [i])]


# -----------------------------------------------------------------------------
# shared by both towers: rotary helpers (rotate-half convention), RMSNorm, SwiGLU MLP


def inv_freq(dim, theta):  # [dim/2]
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def apply_rope(x, cos, sin):
    a, b = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-b, a], dim=-1) * sin


def vision_rope(hw, head_dim, theta=10000.0):
    """hw [N, 2] (patch row, col) → cos, sin [N, head_dim] fp32, laid out [h | w | h | w]."""
    f = (hw[..., None].float() * inv_freq(head_dim // 2, theta).to(hw.device)).flatten(1)  # N, head_dim/2
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def mrope(pos, head_dim, theta, sections):
    """pos [3, B, L] (temporal, height, width) → cos, sin [B, L, head_dim] fp32. Frequency k takes its angle from
    the axis whose section holds k ([16, 24, 24] pairs in 7B), then [f, f] as usual."""
    f = pos[..., None].float() * inv_freq(head_dim, theta).to(pos.device)  # 3, B, L, head_dim/2
    f = torch.cat([part[i % 3] for i, part in enumerate(f.split(sections, dim=-1))], dim=-1)
    emb = torch.cat([f, f], dim=-1)
    return emb.cos(), emb.sin()


def mrope_positions(ids, grids, image_id):
    """3-D M-RoPE position ids of one row of real tokens → [3, L]. Text tokens advance (t, h, w) together by one; an
    image of (Hm, Wm) merged tokens gets (cur, cur + row, cur + col), then cur += max(Hm, Wm)."""
    out, cur, i, grids = [], 0, 0, iter(grids)
    while i < len(ids):
        if ids[i] == image_id:
            hm, wm = next(grids)
            r, c = torch.arange(hm).repeat_interleave(wm), torch.arange(wm).repeat(hm)
            out.append(torch.stack([torch.zeros_like(r), r, c]) + cur)
            cur, i = cur + max(hm, wm), i + hm * wm
        else:
            out.append(torch.full((3, 1), cur))
            cur, i = cur + 1, i + 1
    return torch.cat(out, dim=1) if out else torch.zeros(3, 0, dtype=torch.long)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class MLP(nn.Module):  # SwiGLU
    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# -----------------------------------------------------------------------------
# vision tower


def merge_order(t, m):
    """[gh, gw, ...] row-major patch grid → [gh·gw, ...] in the official order: m×m merge blocks row-major, the
    m² patches of a block row-major inside it (so a merged token is m² consecutive rows)."""
    gh, gw = t.shape[:2]
    return t.reshape(gh // m, m, gw // m, m, *t.shape[2:]).transpose(1, 2).reshape(gh * gw, *t.shape[2:])


def window_order(hm, wm, ws):
    """Merged-token ids of one (hm, wm) image in window order: ws×ws windows row-major, tokens row-major inside;
    plus the window sizes. Edge windows are smaller (the official code pads with −100 and drops the padding)."""
    ids = torch.arange(hm * wm).view(hm, wm)
    wins = [ids[r:r + ws, c:c + ws].flatten() for r in range(0, hm, ws) for c in range(0, wm, ws)]
    return torch.cat(wins), [len(w) for w in wins]


class PatchEmbed(nn.Module):
    """Official weight: Conv3d(3 → D, kernel = stride = (2, 14, 14)) over a still image on 2 identical frames, i.e. a
    Conv2d with the two temporal kernels summed (exact in real arithmetic, not bitwise); patches come in merge order."""

    def __init__(self, dim, patch, temporal, in_chans, merge):
        super().__init__()
        self.proj = nn.Conv3d(in_chans, dim, (temporal, patch, patch), stride=(temporal, patch, patch), bias=False)
        self.patch, self.merge = patch, merge

    def forward(self, img):  # img [3, H, W] → [(H/14)(W/14), D]
        w = self.proj.weight.sum(dim=2)  # D, 3, 14, 14
        x = F.conv2d(img[None].to(w.dtype), w, stride=self.patch)[0]  # D, gh, gw
        return merge_order(x.permute(1, 2, 0), self.merge)


class VisionAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, lens):  # x [N, D]; attention within each of the consecutive segments `lens`
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.heads, -1).unbind(1)  # N, H, hd each
        q, k = (apply_rope(t.float(), cos[:, None], sin[:, None]).to(x.dtype) for t in (q, k))
        q, k, v = (t.transpose(0, 1).split(lens, 1) for t in (q, k, v))  # H, n, hd per segment
        o = [F.scaled_dot_product_attention(*qkv) for qkv in zip(q, k, v)]
        return self.proj(torch.cat(o, dim=1).transpose(0, 1).reshape(N, D))


class VisionBlock(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.norm1 = RMSNorm(vc.hidden_size)
        self.attn = VisionAttention(vc.hidden_size, vc.num_heads)
        self.norm2 = RMSNorm(vc.hidden_size)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, bias=True)

    def forward(self, x, cos, sin, lens):
        x = x + self.attn(self.norm1(x), cos, sin, lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, dim, out_dim, merge):
        super().__init__()
        self.ln_q = RMSNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim * merge ** 2, dim * merge ** 2), nn.GELU(),
                                 nn.Linear(dim * merge ** 2, out_dim))  # exact (erf) GELU

    def forward(self, x):  # [N, D] → [N/m², out_dim]: the m² patches of a merged token concatenated
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTower(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.vc = vc
        self.patch_embed = PatchEmbed(vc.hidden_size, vc.patch_size, vc.temporal_patch_size, vc.in_chans,
                                      vc.spatial_merge_size)
        self.blocks = nn.ModuleList(VisionBlock(vc) for _ in range(vc.depth))
        self.merger = PatchMerger(vc.hidden_size, vc.out_hidden_size, vc.spatial_merge_size)

    def forward(self, imgs):
        """imgs: list of normalised [3, H, W] → [Σ merged tokens, out_hidden_size], row-major, image after image."""
        vc, m = self.vc, self.vc.spatial_merge_size
        ws = vc.window_size // m // vc.patch_size  # window side in merged tokens (112 px → 4)
        xs, hw, order, win_lens, img_lens = [], [], [], [], []
        for img in imgs:
            gh, gw = img.shape[1] // vc.patch_size, img.shape[2] // vc.patch_size
            idx, sizes = window_order(gh // m, gw // m, ws)
            xs.append(self.patch_embed(img))
            hw.append(merge_order(torch.cartesian_prod(torch.arange(gh), torch.arange(gw)).view(gh, gw, 2), m))
            order.append(idx + sum(img_lens) // (m * m))  # offset: the earlier images' merged tokens
            win_lens += [s * m * m for s in sizes]
            img_lens.append(gh * gw)
        order = torch.cat(order).to(xs[0].device)
        # merged tokens (m² patches each) regrouped by window: every attention segment (window or image) is contiguous
        regroup = lambda t: t.reshape(-1, m * m, t.shape[-1])[order].flatten(0, 1)
        cos, sin = vision_rope(torch.cat(hw).to(order.device), vc.hidden_size // vc.num_heads)
        x, cos, sin = regroup(torch.cat(xs)), regroup(cos), regroup(sin)
        for j, block in enumerate(self.blocks):
            x = block(x, cos, sin, img_lens if j in vc.fullatt_block_indexes else win_lens)
        return self.merger(x)[torch.argsort(order)]


# -----------------------------------------------------------------------------
# language model: Qwen2 decoder with 3-D M-RoPE


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, heads * self.head_dim)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim)
        self.o_proj = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin, mask):  # x [B, L, D]; cos, sin [B, L, hd]; mask [B, 1, L, L] bool
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
        k, v = (t.repeat_interleave(self.heads // self.kv_heads, dim=1) for t in (k, v))  # GQA
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, ids, image_embeds, pos, attn):
        """ids [B, L], image_embeds [Σ image tokens, D], pos [3, B, L], attn [B, L] bool (padding at the end)
        → hidden_states[-1] [B, L, D], i.e. after the final norm."""
        cfg, L = self.cfg, ids.shape[1]
        x = self.embed_tokens(ids)
        is_image = ids == cfg.image_token_id
        n_feats = 0 if image_embeds is None else len(image_embeds)
        if int(is_image.sum()) != n_feats:
            raise ValueError(f"{int(is_image.sum())} <|image_pad|> tokens but {n_feats} image features")
        if image_embeds is not None:
            x[is_image] = image_embeds.to(x.dtype)  # row-major: row 0's images first
        hd = cfg.hidden_size // cfg.num_attention_heads
        cos, sin = (t.to(x.dtype) for t in mrope(pos, hd, cfg.rope_theta, cfg.rope_scaling["mrope_section"]))
        causal = torch.ones(L, L, dtype=torch.bool, device=ids.device).tril()
        mask = (causal[None] & attn[:, None, :])[:, None]  # B, 1, L, L: causal and no padded keys
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


# -----------------------------------------------------------------------------
# the condition encoder: UniPic-3 template, encode → (emb, mask)

SYSTEM_PROMPT = ("Describe the key features of the input image (color, shape, size, texture, objects, background), "
                 "then explain how the user's text instruction should alter or modify the image. Generate a new image "
                 "that meets the user's requirements while maintaining consistency with the original input where "
                 "appropriate.")
PREFIX = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n"  # dropped after encoding
NEGATIVE_PROMPT = " "  # the official negative (and training null) prompt, always with the same images


def chat_text(prompt, n_images):
    """Stock Qwen2-VL chat template as the official code calls it: images first, then the instruction, no
    "Picture N:" labels (add_vision_id unset), generation prompt appended."""
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * n_images
    return f"{PREFIX}{vision}{prompt}<|im_end|>\n<|im_start|>assistant\n"


class TextEncoder(nn.Module):
    def __init__(self, cfg, tokenizer, image_mean=IMAGE_MEAN, image_std=IMAGE_STD):
        super().__init__()
        self.visual, self.model = VisionTower(cfg.vision_config), LanguageModel(cfg)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        # the official drop_idx = 64 is PREFIX's token count in Qwen2.5; counting keeps that for the toy vocabulary
        self.drop_idx = len(tokenizer.encode(PREFIX))
        self.unit = cfg.vision_config.patch_size * cfg.vision_config.spatial_merge_size  # px per merged token (28)
        self.compute_device, self.offload = None, False  # set by load_text_encoder

    def forward(self, ids, attn, pixels):
        """ids [B, L] with expanded image pads, attn [B, L] bool (padding at the end), pixels: per row a list of
        normalised [3, H, W] → last hidden state [B, L, D]."""
        flat = [p.to(ids.device) for row in pixels for p in row]
        image_embeds = self.visual(flat) if flat else None
        pos = torch.zeros(3, *ids.shape, dtype=torch.long)
        for b, row in enumerate(pixels):
            n = int(attn[b].sum())
            grids = [(p.shape[1] // self.unit, p.shape[2] // self.unit) for p in row]
            pos[:, b, :n] = mrope_positions(ids[b, :n].tolist(), grids, self.cfg.image_token_id)
        return self.model(ids, image_embeds, pos.to(ids.device), attn)

    @torch.no_grad()
    def encode(self, prompts, images=None, pixel_budget=1024 * 1024, max_images=6):
        """prompts: a str or B strs; images: one list of PIL images per prompt, as the user gave them. UniPic-3 joint
        pixel-budget resize, 28/32 VL copy, chat template, encoder, system prefix dropped → emb [B, L, D], mask [B, L]
        bool (True = real token, padding at the end). pixel_budget=None: the images are already the jointly resized
        VAE inputs (training caches); resizing twice could move a side by 32 px, so only the 28/32 copy is made."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        images = [[] for _ in prompts] if images is None else images
        if len(images) != len(prompts) or any(not isinstance(row, (list, tuple)) for row in images):
            raise ValueError(f"images must be one list of PIL images per prompt ({len(prompts)} prompts)")
        tok, p, unit = self.tokenizer, self.cfg.vision_config.patch_size, self.unit
        rows, pixels = [], []
        for b, (prompt, imgs) in enumerate(zip(prompts, images)):
            if len(imgs) > max_images:
                raise ValueError(f"prompt {b} has {len(imgs)} images; at most max_images={max_images} are allowed")
            # the official rule resizes all inputs jointly to the budget first; only what it gives must hold a patch
            sized = pack.joint_resize(imgs, pixel_budget) if imgs and pixel_budget else [pack.to_rgb(im) for im in imgs]
            for k, im in enumerate(sized, 1):
                if min(im.size) < p:
                    raise ValueError(f"Image{k} of prompt {b + 1} is {im.size[0]}x{im.size[1]} px after resizing; "
                                     f"each side needs at least {p} px (one vision patch)")
            vl = [vl_copy(im) for im in sized]
            pixels.append([image_to_pixels(im, self.image_mean, self.image_std, unit) for im in vl])
            counts = [(im.size[0] // unit) * (im.size[1] // unit) for im in vl]
            rows.append(expand_image_pads(tok.encode(chat_text(prompt, len(imgs))), counts, self.cfg.image_token_id))
        device = self.compute_device or next(self.parameters()).device
        if self.offload:
            self.to(device)
        try:
            L = max(len(r) for r in rows)
            ids = torch.tensor([r + [tok.added["<|endoftext|>"]] * (L - len(r)) for r in rows], device=device)
            attn = torch.arange(L, device=device)[None] < torch.tensor([len(r) for r in rows], device=device)[:, None]
            hidden = self(ids, attn, pixels)
        finally:
            if self.offload:
                self.to("cpu")  # the 7B encoder leaves the GPU once the embeddings exist
        return pack.pad_text([h[self.drop_idx:len(r)] for h, r in zip(hidden, rows)])

    def encode_with_negative(self, prompts, images, **kw):
        """(emb, mask) of the prompts and (neg_emb, neg_mask) of NEGATIVE_PROMPT with the same images, in one batch."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        emb, mask = self.encode(prompts + [NEGATIVE_PROMPT] * len(prompts), list(images) * 2, **kw)
        halves = [(emb[s], mask[s]) for s in (slice(0, len(prompts)), slice(len(prompts), None))]
        return [(e[:, :int(m.sum(1).max())], m[:, :int(m.sum(1).max())]) for e, m in halves]


# -----------------------------------------------------------------------------
# configs: field names are the official text_encoder/config.json keys; defaults = Qwen2.5-VL-7B


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    out_hidden_size: int = 3584
    in_chans: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])


@dataclass
class TextEncoderConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict = field(default_factory=lambda: {"mrope_section": [16, 24, 24], "rope_type": "default",
                                                        "type": "default"})
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    image_token_id: int = 151655
    video_token_id: int = 151656
    tie_word_embeddings: bool = False
    vision_config: VisionConfig = field(default_factory=VisionConfig)

    @classmethod
    def from_dict(cls, d):
        """Accepts the flat 4.5x layout and the newer one (text fields in text_config, rope in rope_parameters)."""
        text = {**d, **d.get("text_config", {})}
        rope = text.get("rope_scaling") or text.get("rope_parameters") or {}
        kw = {f.name: text[f.name] for f in fields(cls) if f.name in text and f.name != "vision_config"}
        kw["rope_scaling"] = {"mrope_section": list(rope["mrope_section"]), "rope_type": "default", "type": "default"}
        kw["rope_theta"] = float(text.get("rope_theta", rope.get("rope_theta", cls.rope_theta)))
        vd = {"in_chans": d.get("vision_config", {}).get("in_channels", 3), **d.get("vision_config", {})}
        vision = VisionConfig(**{f.name: vd[f.name] for f in fields(VisionConfig) if f.name in vd})
        return cls(**kw, vision_config=vision)


# -----------------------------------------------------------------------------
# loading the official folders (text_encoder/, tokenizer/, processor/; toy_assets.py writes them)


def _official_name(key):
    # transformers >= 4.52 in-memory names → the legacy on-disk names our modules use
    return re.sub(r"^model\.language_model\.", "model.", re.sub(r"^model\.visual\.", "visual.", key))


def load_text_encoder(root, dtype=torch.bfloat16, device="cpu", offload=False):
    """root: a pipeline folder with text_encoder/, tokenizer/, processor/. Built on the meta device, filled by
    model.read_state (one ValueError for any missing, unexpected or mis-shaped key); `lm_head.weight` (untied in 7B) is
    skipped, only the last hidden state is used. offload=True: weights on the CPU, on `device` only while encoding."""
    folder = os.path.join(root, "text_encoder")
    cfg = TextEncoderConfig.from_dict(json.loads(_read_text(os.path.join(folder, "config.json"))))
    tokenizer = Tokenizer.from_folder(os.path.join(root, "tokenizer"))
    proc = json.loads(_read_text(os.path.join(root, "processor", "preprocessor_config.json")))
    vc = cfg.vision_config
    if (proc.get("patch_size", 14), proc.get("merge_size", 2)) != (vc.patch_size, vc.spatial_merge_size):
        raise ValueError(f"processor patch/merge size {proc.get('patch_size')}/{proc.get('merge_size')} "
                         f"disagree with the vision config {vc.patch_size}/{vc.spatial_merge_size}")
    with torch.device("meta"):
        te = TextEncoder(cfg, tokenizer, proc.get("image_mean", IMAGE_MEAN), proc.get("image_std", IMAGE_STD))
    expected = {k: tuple(v.shape) for k, v in te.state_dict().items()}
    state = M.read_state(folder, expected, stem="model", rename=_official_name, skip={"lm_head.weight"})
    te.load_state_dict({k: v.to("cpu" if offload else device, dtype) for k, v in state}, strict=True, assign=True)
    te.compute_device, te.offload = torch.device(device), offload
    return te.eval().requires_grad_(False)
