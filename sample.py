r"""
Sample UniPic 3.0: edit one image or compose 1–6 images from an instruction.

    python sample.py --steps 8                               # the embedded toy model and a built-in toy example
    python sample.py --ckpt Unipic3 --images a.png b.png --prompt "The man from Image1 holds the cup from Image2" \
        --steps 50 --cfg 4 --device cuda                     # the official teacher: Euler, true CFG
    python sample.py --ckpt Unipic3 --transformer Unipic3-DMD/ema_transformer --steps 8 ...   # few-step

Two samplers, exactly as the official UniPic-3 inference code runs them (paper §5; the UniPic-3/ folder of
Skywork's UniPic repository: qwen_image_edit/ for the teacher, qwen_image_edit_fast/ for the students):
  euler    the teacher: Euler on the flow ODE over the scheduler's sigmas (dynamic exponential shift with μ from
           the target token count, stretched to end at 0.02, then 0), true CFG with a per-token norm rescale;
  fewstep  CM / DMD students: predict x0 = x_t − t·v, then re-noise x = (1 − t')·x0 + t'·ε with fresh ε, over
           t = shift·s / (1 + (shift − 1)·s), s = linspace(1, 0, N+1).
Reference tokens stay clean at every step; only the target rows of the unified sequence are denoised.
"""
import argparse
import inspect
import io
import json
import math
import os
import re
import sys
import tokenize
from dataclasses import dataclass, fields, is_dataclass

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError
from tqdm import tqdm

import model as M
import text_encoder as TE
import toyworld
import vae as V
from pack import (collate, image_to_tensor, joint_resize, pack, pad_text_pair, target_rows, tensor_to_image,
                  unified_sequence, unpack)

TOY_CKPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "toy")

# -----------------------------------------------------------------------------
# schedules


@dataclass
class SchedulerConfig:
    """The fields of the official `scheduler/scheduler_config.json` that sampling reads (Qwen-Image values)."""

    base_image_seq_len: int = 256
    max_image_seq_len: int = 8192
    base_shift: float = 0.5
    max_shift: float = 0.9
    shift_terminal: float = 0.02
    time_shift_type: str = "exponential"

    @classmethod
    def from_folder(cls, root):
        path = os.path.join(root, "scheduler", "scheduler_config.json")
        d = json.load(open(path)) if os.path.exists(path) else {}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def calculate_mu(seq_len, sc):
    """μ grows linearly with the number of *target* tokens (references are not counted)."""
    m = (sc.max_shift - sc.base_shift) / (sc.max_image_seq_len - sc.base_image_seq_len)
    return seq_len * m + sc.base_shift - m * sc.base_image_seq_len


def shift_value(mu, sc):
    if sc.time_shift_type == "exponential":
        return math.exp(mu)
    if sc.time_shift_type == "linear":
        return mu
    raise ValueError(f"unknown time_shift_type {sc.time_shift_type!r}")


def time_shift(t, shift):
    """t → shift·t / (1 + (shift − 1)·t) (0 ↦ 0, 1 ↦ 1), t a tensor, shift a float or tensor. Computed as diffusers'
    scheduler does, shift / (shift + (1/t − 1)) with a tensor numerator (python / tensor is a reciprocal and a
    product), so the teacher's fp32 sigmas are bit-identical; the few-step grid (official: the first form, float64)
    moves by ≤ 4e-16, and not at all once cast to fp32 or bf16 (measured: 1–64 steps, 1–9000 target tokens)."""
    return torch.as_tensor(shift, dtype=t.dtype, device=t.device).expand_as(t) / (shift + (1 / t - 1))


def teacher_sigmas(steps, seq_len, sc):
    """N+1 sigmas of the teacher (the flow-match Euler scheduler, computed in fp32 as it does):
    linspace(1, 1/N, N) → shift → stretch so the last is shift_terminal → append 0."""
    if steps < 2 and sc.shift_terminal:  # the stretch divides by 1 − σ_last = 0 (NaN in diffusers too)
        raise ValueError(f"the euler sampler needs at least 2 steps (its schedule is stretched to end at "
                         f"{sc.shift_terminal}), got {steps}")
    s = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).float()
    s = time_shift(s, shift_value(calculate_mu(seq_len, sc), sc))
    if sc.shift_terminal:
        s = 1 - (1 - s) / ((1 - s[-1]) / (1 - sc.shift_terminal))
    return torch.cat([s, s.new_zeros(1)])


def fewstep_times(steps, seq_len, sc):
    """N+1 times of the CM/DMD sampler: t = shift·s / (1 + (shift − 1)·s) over s = linspace(1, 0, N+1), float64."""
    s = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return time_shift(s, shift_value(calculate_mu(seq_len, sc), sc))


def fewstep_update(x, v, t, t_next, fresh):
    """One step of the CM/DMD sampler (and of DMD's backward simulation): the clean estimate x0 = x − t·v,
    re-noised to t_next: (1 − t_next)·x0 + t_next·fresh. t, t_next broadcast against x."""
    return (1 - t_next) * (x - t * v) + t_next * fresh


def cfg_combine(v_c, v_u, scale):
    """True CFG with the per-token norm rescale: comb = v_u + w·(v_c − v_u), then |comb| := |v_c| per token."""
    comb = v_u + scale * (v_c - v_u)
    return comb * (v_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))


# -----------------------------------------------------------------------------
# the denoising loop on the unified sequence


@torch.no_grad()
def denoise(model, refs, target_hw, txt, txt_mask, neg=None, neg_mask=None, *, steps, cfg=4.0, sampler="euler",
            generator=None, sched=None, noise=None, progress=False):
    """Sample target latents for a batch whose samples may differ in size and number of references. refs: B lists
    of normalised reference latents [C, H_k, W_k]; target_hw: B (h, w) target token grids; txt/txt_mask: the
    instruction embeddings [B, L, D] / [B, L]; neg/neg_mask: those of the negative prompt " " (same images), used
    when cfg > 1. noise: optional B initial target tokens [h·w, 4C]. Returns B denoised target tokens [h·w, 4C]."""
    sched = sched or SchedulerConfig()
    param = next(model.parameters())
    dtype, device = param.dtype, param.device
    C = model.cfg.in_channels // 4
    if noise is None:
        noise = [pack(torch.randn(1, C, 2 * h, 2 * w, generator=generator))[0] for h, w in target_hw]
    built = [unified_sequence(unpack(noise[b][None], h, w)[0], refs[b]) for b, (h, w) in enumerate(target_hw)]
    shapes = [hw for _, hw in built]
    x = collate([s.to(device, dtype) for s, _ in built], shapes)  # [B, N, 4C]
    tgt = target_rows(shapes, x.shape[1], device)[..., None]  # [B, N, 1]: the rows that are denoised

    use_cfg = cfg > 1 and neg is not None
    if use_cfg:  # one forward for both branches: the same image rows, text = [cond; uncond]
        txt, txt_mask = pad_text_pair(txt, txt_mask, neg, neg_mask)
        shapes = shapes + shapes
    txt, txt_mask = txt.to(device, dtype), txt_mask.to(device)
    make = teacher_sigmas if sampler == "euler" else fewstep_times
    times = torch.stack([make(steps, h * w, sched) for h, w in target_hw]).to(device)  # [B, N+1]

    for i in tqdm(range(steps), disable=not progress, desc=sampler):
        if sampler == "euler":  # official: σ·1000 in the latent dtype, then /1000
            t = (times[:, i].float() * 1000).to(dtype) / 1000
        else:  # official few-step: t in the latent dtype, used both as model input and in x0 = x − t·v
            t = times[:, i].to(dtype)
        v = model(torch.cat([x, x]) if use_cfg else x, shapes, txt, txt_mask, torch.cat([t, t]) if use_cfg else t)
        if use_cfg:
            v = cfg_combine(*v.chunk(2), cfg)
        if sampler == "euler":
            dt = (times[:, i + 1] - times[:, i]).float()[:, None, None]
            x_new = (x.float() + dt * v.float()).to(v.dtype)
        else:
            fresh = torch.randn(x.shape, generator=generator).to(device, dtype)
            x_new = fewstep_update(x, v, t[:, None, None], times[:, i + 1].to(dtype)[:, None, None], fresh)
        x = torch.where(tgt, x_new, x)  # references stay clean
    return [x[b, : h * w] for b, (h, w) in enumerate(target_hw)]


# -----------------------------------------------------------------------------
# the pipeline: components from an official-layout folder, images in, images out


@dataclass
class Pipeline:
    transformer: M.MMDiT
    vae: object
    text_encoder: object
    sched: SchedulerConfig
    pixel_budget: int = 1024 * 1024  # the joint budget of the inputs, and the default output area
    sampler: str = "euler"  # what the transformer was trained for: "euler" (teacher) or "fewstep" (CM / DMD)
    device: str = "cpu"
    cfg: dict = None  # the best CFG per sampler for this pipeline ({} : the official 4)

    def default_cfg(self, sampler=None):
        return (self.cfg or {}).get(sampler or self.sampler, 4.0)


def checkpoint_kind(transformer_dir):
    """CM/DMD students are run with the few-step sampler. Their configs name the run they came from in
    `_name_or_path` (official: the run's folder; ours: nanounipic-cm / nanounipic-dmd, train_common.export)."""
    name = json.load(open(os.path.join(transformer_dir, "config.json"))).get("_name_or_path") or ""
    return "fewstep" if any(k in name.lower() for k in ("dmd", "-cm", "_cm", "consistency", "fewstep")) else "euler"


def pipeline_index(ckpt):
    """model_index.json of a pipeline folder ({} if absent). The toy's records its scale and defaults:
    nanounipic_pixel_budget (128²; official 1024²), nanounipic_default_transformer (the folder `--transformer`
    defaults to; official: transformer) and nanounipic_cfg ({sampler: the best CFG}; official 4)."""
    index = os.path.join(ckpt, "model_index.json")
    return json.load(open(index)) if os.path.exists(index) else {}


def pixel_budget(ckpt):
    return pipeline_index(ckpt).get("nanounipic_pixel_budget", 1024 * 1024)


def load_pipeline(ckpt=TOY_CKPT, transformer=None, dtype=None, device="cpu", offload_text_encoder=False):
    """ckpt: an official-layout pipeline root (see --ckpt); transformer: another transformer folder instead (e.g.
    Unipic3-DMD/ema_transformer), or a model. dtype: default bf16 on GPU, fp32 on CPU (whatever the files store).
    offload_text_encoder: the 7B text encoder stays on the CPU, visiting `device` (the 20B MMDiT's) only to encode."""
    dtype = dtype or (torch.bfloat16 if str(device).startswith("cuda") else torch.float32)
    if not os.path.isdir(ckpt):
        raise ValueError(f"checkpoint folder {ckpt} does not exist")
    for part in (os.path.join(ckpt, "vae"), os.path.join(ckpt, "text_encoder")):
        if not os.path.isdir(part):
            raise ValueError(f"checkpoint is missing its {os.path.basename(part)}/ folder ({part})")
    if isinstance(transformer, torch.nn.Module):  # a model in memory (the trainers' periodic evaluation)
        net, kind = transformer, "euler"
    else:
        transformer = transformer or os.path.join(ckpt, pipeline_index(ckpt).get("nanounipic_default_transformer",
                                                                                  "transformer"))
        if not os.path.isdir(transformer):
            raise ValueError(f"transformer folder {transformer} does not exist")
        net, kind = M.load_mmdit(transformer, dtype=dtype, device=device), checkpoint_kind(transformer)
    return Pipeline(transformer=net, vae=V.load_vae(os.path.join(ckpt, "vae"), dtype=dtype, device=device),
                    text_encoder=TE.load_text_encoder(ckpt, dtype=dtype, device=device, offload=offload_text_encoder),
                    sched=SchedulerConfig.from_folder(ckpt), pixel_budget=pixel_budget(ckpt), sampler=kind,
                    device=device, cfg=pipeline_index(ckpt).get("nanounipic_cfg", {}))


@torch.no_grad()
def generate(pipe, prompts, images, *, steps=None, cfg=None, sampler=None, seed=0, height=None, width=None,
             max_images=6, vae_tile=None, progress=True):
    """prompts: B strings; images: B lists of 1–max_images PIL images (any size and mode) → B PIL images. cfg: the
    true CFG scale, default the pipeline's best for the sampler (model_index.json, as the CLI; else 4). Output size:
    height × width (multiples of 16), default the square of the pixel budget (1024² officially). vae_tile: VAE-encode
    and decode in overlapping windows this many pixels a side (a multiple of 32; 256 bounds VAE memory at 1024²)."""
    sampler = sampler or pipe.sampler
    steps = steps or (50 if sampler == "euler" else 8)
    cfg = pipe.default_cfg(sampler) if cfg is None else cfg
    if sampler not in ("euler", "fewstep"):
        raise ValueError(f"unknown sampler {sampler!r} (euler or fewstep)")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
    for b, ims in enumerate(images):
        if not 1 <= len(ims) <= max_images:
            raise ValueError(f"sample {b} has {len(ims)} input images; 1 to {max_images} are supported")
    side = int(math.isqrt(pipe.pixel_budget))
    height, width = height or side, width or side
    if height < 16 or width < 16:
        raise ValueError(f"output size {width}x{height} is too small (at least 16x16)")
    height, width = height // 16 * 16, width // 16 * 16  # official: multiples of vae_scale_factor·2
    dtype = next(pipe.transformer.parameters()).dtype

    # the joint budget (official rule), applied once: the text encoder only makes its 28/32 copy (pixel_budget=None)
    images = [joint_resize(ims, pipe.pixel_budget) for ims in images]
    te, kw = pipe.text_encoder, dict(pixel_budget=None, max_images=max_images)
    if cfg > 1:  # the negative is " " with the same images (official); both in one batched call
        (emb, mask), (neg, neg_mask) = te.encode_with_negative(prompts, images, **kw)
    else:
        (emb, mask), (neg, neg_mask) = te.encode(prompts, images, **kw), (None, None)

    vae_dtype = next(pipe.vae.parameters()).dtype
    xs = [[image_to_tensor(im)[None].to(pipe.device, vae_dtype) for im in ims] for ims in images]
    refs = [[pipe.vae.normalize(pipe.vae.encode(x, tile=vae_tile))[0].to(dtype) for x in x_b] for x_b in xs]
    hw = [(height // 16, width // 16)] * len(prompts)
    tokens = denoise(pipe.transformer, refs, hw, emb, mask, neg, neg_mask, steps=steps, cfg=cfg, sampler=sampler,
                     generator=torch.Generator().manual_seed(seed), sched=pipe.sched, progress=progress)
    zs = [pipe.vae.denormalize(unpack(tok[None].to(vae_dtype), h, w)) for tok, (h, w) in zip(tokens, hw)]
    return [tensor_to_image(pipe.vae.decode(z, tile=vae_tile)[0]) for z in zs]


def save_png(img, path):
    """Written atomically: a failed run never leaves a half-written final file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    M.atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def grid(inputs, output, size=None, labels=None):
    """Inputs then the output, side by side on white, each scaled to the output's height; labels: one caption per
    tile (e.g. "Image1", …, "target", "output"), written in a strip above."""
    H = size or output.height
    tiles = [im.resize((max(1, round(im.width * H / im.height)), H)) for im in inputs] + [output]
    top = 14 if labels else 0
    canvas = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), H + top), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for k, t in enumerate(tiles):
        canvas.paste(t, (x, top))
        if labels:
            draw.text((x + 2, 1), labels[k], fill=(0, 0, 0))
        x += t.width + 4
    return canvas


# -----------------------------------------------------------------------------
# CLI: this script's, and the helpers every script's --help is made with (the trainers' flags are Config fields)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the docstring's lines as written (examples continued with a backslash stay on their lines) and
    ends every flag's help with its default, unless the help already says what the default is or there is none."""

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        if action.default is None or action.default is argparse.SUPPRESS or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def field_comments(cls):
    """{field: the comment after it} from a dataclass's source and its dataclass bases' (its own comment wins). Where
    it runs on into the lines below (the reasons behind a value), only the whole sentences on the field's line count."""
    out = {}
    for c in reversed([c for c in cls.__mro__ if is_dataclass(c)]):  # bases first
        try:
            src = inspect.getsource(c)
        except (OSError, TypeError):  # no source file (an interactive session): no comments
            continue
        comments = {t.start[0]: t.string.lstrip("#").strip()
                    for t in tokenize.generate_tokens(io.StringIO(src).readline) if t.type == tokenize.COMMENT}
        lines, names = src.splitlines(), {f.name for f in fields(c)}
        for n, line in enumerate(lines, 1):
            m = re.match(r"\s+(\w+)\s*:", line)
            if not (m and m.group(1) in names and n in comments):
                continue
            text = comments[n]
            if n < len(lines) and lines[n].lstrip().startswith("#"):  # continued below: whole sentences only
                whole = re.match(r"(.*[.)])\s", text + " ")
                text = whole.group(1) if whole else text + " …"
            out[m.group(1)] = text
    return out


def _bool(s):
    if s.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")
    return s.lower() in ("1", "true", "yes")


def parse_config(cls, argv=None, doc=None):
    """A dataclass config from the command line: every field is a flag (`--lr 1e-4`, `--fsdp true`) whose help is
    the field's comment and whose default is the field's default; nothing else."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    meaning = field_comments(cls)
    for f in fields(cls):
        kind = type(f.default)
        conv = _bool if kind is bool else kind if kind in (int, float) else str
        p.add_argument(f"--{f.name}", type=conv, default=f.default, metavar=kind.__name__.upper(),
                       help=meaning.get(f.name, "").replace("%", "%%") or "(default: %(default)s)")
    return cls(**vars(p.parse_args(argv)))


DEFAULT_PROMPT = "Combine the reference images to generate the final result."  # the official demo's default


def builtin_example():
    """A held-out toy-world composition case: its inputs, instruction and exact target."""
    case = toyworld.ToyWorld(seed=toyworld.EXAMPLE_SEED).sample(0)
    return case["input_images"], case["instruction"], case["output_image"]


def check_args(args):
    """Everything that can be checked before loading a model: a one-line ValueError naming the problem."""
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive number of denoising steps, got {args.steps}")
    if args.cfg is not None and (not math.isfinite(args.cfg) or args.cfg < 1):
        raise ValueError(f"--cfg must be a finite number >= 1 (1 disables guidance), got {args.cfg}")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty; give the instruction, e.g. \"The person from Image1 holds the cup from Image2.\"")
    if args.images is not None and not 1 <= len(args.images) <= args.max_images:
        raise ValueError(f"{len(args.images)} input images given; 1 to {args.max_images} are supported")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v < 16 or v % 16):
            raise ValueError(f"--{name} {v} must be a multiple of 16, at least 16")
    if args.vae_tile is not None and (args.vae_tile < 32 or args.vae_tile % 32):
        raise ValueError(f"--vae-tile {args.vae_tile} must be a positive multiple of 32 pixels, e.g. 256")
    if not os.path.isdir(args.ckpt):
        raise ValueError(f"checkpoint folder {args.ckpt} does not exist")
    budget = pixel_budget(args.ckpt)
    side = int(math.isqrt(budget))
    h, w = args.height or side, args.width or side
    if h * w > budget:
        raise ValueError(f"output {w}x{h} is {h * w} pixels, beyond this pipeline's budget of {budget} ({side}x{side})")


def add_sampling_flags(p):
    """The flags sample.py and eval.py share: the pipeline, and how its transformer is sampled."""
    p.add_argument("--ckpt", default=TOY_CKPT, help="pipeline root: transformer/ vae/ text_encoder/ tokenizer/ "
                   "processor/ scheduler/; the default is the embedded toy model")
    p.add_argument("--steps", type=int, help="denoising steps (default: 50 for euler, 8 for fewstep)")
    p.add_argument("--cfg", type=float, help="true CFG scale; 1 disables CFG (default: the pipeline's best for its "
                   "sampler, from model_index.json; 4 in the official scripts)")
    p.add_argument("--sampler", choices=["euler", "fewstep"], help="euler (teacher) or fewstep (CM / DMD students) "
                   "(default: what the transformer was trained for)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial (and re-noise) noise")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--images", nargs="+", help="1–6 input images (default: a built-in held-out toy example)")
    p.add_argument("--prompt", help="the instruction; refer to inputs as Image1, Image2, … (default: the example's, "
                   "or the official demo's generic one)")
    p.add_argument("--transformer", help="use this transformer folder instead, e.g. Unipic3-DMD/ema_transformer "
                   "(default: the one CKPT/model_index.json names, else CKPT/transformer)")
    add_sampling_flags(p)
    p.add_argument("--height", type=int, help="output height in pixels, a multiple of 16 (default: the side of the "
                   "pipeline's pixel budget, 1024 officially, 128 for the toy)")
    p.add_argument("--width", type=int, help="output width in pixels, a multiple of 16 (default: as --height)")
    p.add_argument("--out", default="sample.png", help="the output PNG")
    p.add_argument("--grid", action="store_true", help="also write OUT_grid.png: the inputs, the exact target (built-in "
                   "example) and the output side by side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="where the models run")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="model precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--offload-text-encoder", action="store_true", help="keep the text encoder on the CPU; it visits "
                   "the device only while it encodes")
    p.add_argument("--vae-tile", type=int, help="VAE-encode and decode in overlapping tiles of this many pixels a "
                   "side, a multiple of 32 (e.g. 256: 1024² outputs on a small GPU) (default: whole images)")
    p.add_argument("--max-images", type=int, default=6, help="the most input images accepted (the paper's limit)")
    args = p.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]  # None: load_pipeline's default
    try:
        check_args(args)
        images, prompt, target = ([], DEFAULT_PROMPT, None) if args.images else builtin_example()
        for f in args.images or []:
            try:
                with Image.open(f) as im:
                    images.append(im.copy())
            except (OSError, UnidentifiedImageError) as e:
                raise ValueError(f"cannot read image {f}: {str(e).splitlines()[0]}") from None
        prompt = args.prompt or prompt
        pipe = load_pipeline(args.ckpt, args.transformer, dtype=dtype, device=args.device,
                             offload_text_encoder=args.offload_text_encoder)
        cfg = args.cfg if args.cfg is not None else pipe.default_cfg(args.sampler)
        out = generate(pipe, [prompt], [images], steps=args.steps, cfg=cfg, sampler=args.sampler, seed=args.seed,
                       height=args.height, width=args.width, max_images=args.max_images, vae_tile=args.vae_tile)[0]
    except ValueError as e:
        sys.exit(f"error: {e}")
    save_png(out, args.out)
    print(f"prompt: {prompt}\nwrote {args.out} ({out.width}x{out.height}; {args.sampler or pipe.sampler}, CFG {cfg})")
    if args.grid:
        extra = [target] if target is not None else []
        labels = [f"Image{k}" for k in range(1, len(images) + 1)] + ["target"] * len(extra) + ["output"]
        path = os.path.splitext(args.out)[0] + "_grid.png"
        save_png(grid(images + extra, out, labels=labels), path)
        print(f"wrote {path} (inputs{' | exact target' if target is not None else ''} | output)")


if __name__ == "__main__":
    main()
