r"""
Speed and memory, measured side by side in one run against the libraries this code replaces (docs/speed.md).

    python bench.py [--quick]     # the CPU tables (--quick: smaller sizes, under two minutes on 2 cores)
    python bench.py --gpu         # CUDA: bf16 MMDiT at real width (MFU), sampler time, FSDP2 step memory
    python bench.py --gpu --tiny  # the same at toy-of-toy size, on whatever device there is (a test)

Every "×" is measured in one process on identical inputs and weights (the reference holds the very same tensors)
against diffusers' Qwen-Image transformer and VAE and transformers' Qwen2.5-VL (without them the reference columns
stay empty): a warm-up, then the sides alternate for --repeats rounds and the median is reported. Peak memory is
one more call each: max_memory_allocated on CUDA, on the CPU the peak RSS above the start (VmHWM after
/proc/self/clear_refs and glibc's malloc_trim). On a busy machine use --clock cpu.
"""
import argparse
import contextlib
import copy
import ctypes
import functools
import importlib.util
import io
import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, replace

import torch
import torch.distributed as dist

import model as M
import sample as S
import sharded as SH
import text_encoder as TE
import train_common as T
import vae as V

diffusers, transformers = (importlib.import_module(m) if importlib.util.find_spec(m) else None
                           for m in ("diffusers", "transformers"))
CPU = torch.device("cpu")

# measuring and printing -----------------------------------------------------------------------------------------------

def peak_memory(fn, device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        return torch.cuda.max_memory_allocated(device) - base
    kb = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
    try:  # Linux and glibc only
        ctypes.CDLL(None).malloc_trim(0)  # else the call reuses pages that earlier calls freed, and shows nothing
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        base = kb("VmRSS")
        fn()
        return kb("VmHWM") - base
    except (OSError, AttributeError):
        return None

def measure(fns, repeats, device, clock="wall", memory=True):
    """fns: {name: callable} → {name: (median seconds, peak bytes or None)}, as the module docstring says."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    now, times = time.process_time if clock == "cpu" else time.perf_counter, {k: [] for k in fns}
    for r in range(-1, repeats):  # round -1: the warm-up
        for k in list(fns)[:: -1 if r % 2 else 1]:
            sync()
            t0 = now()
            fns[k]()
            sync()
            times[k].append(now() - t0)
    return {k: (statistics.median(times[k][1:]), peak_memory(fns[k], device) if memory else None) for k in fns}

def fwd_bwd(module, call):  # forward, a scalar loss, backward; the gradients dropped again (in the peak memory)
    return lambda: (call().float().pow(2).mean().backward(), module.zero_grad(set_to_none=True))

def train_step(model, opt, x, shapes, txt, mask, t, noise, bf16=False):  # as train_fm.py: Eq. 1, clip, AdamW
    with torch.autocast(x.device.type, torch.bfloat16, enabled=bf16):
        loss = T.fm_loss(model, x, shapes, txt, mask, t, noise)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)

def fmt(x, unit="s"):  # seconds as ms / s, bytes as KB / MB / GB
    if x is None or unit == "s":
        return "—" if x is None else f"{x * 1e3:.3g} ms" if x < 1 else f"{x:.3g} s"
    return f"{x / 2**10:.0f} KB" if x < 2**20 else f"{x / 2**20:.0f} MB" if x < 2**30 else f"{x / 2**30:.2f} GB"

def side_by_side(res):  # measure()'s "ours" and, when it ran, "ref" → both times, the speed-up, both peak memories
    (t, mem), (t_ref, mem_ref) = res["ours"], res.get("ref", (None, None))
    return [fmt(t), fmt(t_ref), f"**{t_ref / t:.2f}×**" if t_ref else "—", fmt(mem, "B"), fmt(mem_ref, "B")]

def row(what, size, fns, repeats, args, diff="—", grad=False):  # a row of the CPU table, under no_grad unless `grad`
    with torch.set_grad_enabled(grad):
        return [what, size, *side_by_side(measure(fns, repeats, CPU, args.clock)), diff]

def max_diff(a, b):  # the max abs difference of two callables' outputs
    with torch.no_grad():
        return f"{(a().float() - b().float()).abs().max().item():.1e}"

def table(title, head, rows):
    print(f"\n{title}\n\n| {head} |\n|" + "---|" * len(head.split(" | ")))
    for r in rows:
        print("| " + " | ".join(map(str, r)) + " |")

# ours against diffusers (MMDiT, VAE) and transformers (the condition encoder); the toy trainer ------------------------

def random_batch(cfg, B, shapes, L, device, dtype, seed):
    g, N = torch.Generator().manual_seed(seed), sum(h * w for h, w in shapes)
    x = torch.randn(B, N, cfg.in_channels, generator=g).to(device, dtype)
    txt = torch.randn(B, L, cfg.joint_attention_dim, generator=g).to(device, dtype)
    return x, txt, torch.ones(B, L, dtype=torch.bool, device=device), torch.rand(B, generator=g).to(device)

def mmdit_sides(cfg, B, shapes, L, device, dtype):
    """{"ours"/"ref": (model, call)}: ours (PyTorch's default init) and diffusers' model holding the very same
    tensors, on B random samples of the image grids `shapes` (target first) and L text tokens, no padding."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = M.MMDiT(cfg).to(dtype)
        ref = diffusers.QwenImageTransformer2DModel(**asdict(cfg)) if diffusers else None
    x, txt, mask, t = random_batch(cfg, B, shapes, L, device, dtype, seed=1)
    sides = {"ours": (ours, lambda: ours(x, [shapes] * B, txt, mask, t))}
    if ref is not None:  # no mask: diffusers' pipeline passes none without padding
        ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
        hw = [[(1, h, w) for h, w in shapes]] * B
        sides["ref"] = (ref, lambda: ref(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_shapes=hw).sample)
    return sides

def bench_mmdit(name, cfg, B, g, L, args, modes=("fwd", "fwd+bwd")):  # a g × g target, two refs of half its area
    sides = mmdit_sides(cfg, B, [(g, g), (g, g // 2), (g // 2, g)], L, CPU, torch.float32)
    diff = max_diff(sides["ours"][1], sides["ref"][1]) if "ref" in sides else "—"
    size = f"width {cfg.dim}, {cfg.num_layers} blocks, {B} × ({2 * g * g} img + {L} txt) tokens"
    return [row(f"MMDiT {name} {m}", size, {k: fwd_bwd(*s) if m == "fwd+bwd" else s[1] for k, s in sides.items()},
                args.repeats_big if cfg.dim >= 1024 else args.repeats, args, diff, grad=m == "fwd+bwd") for m in modes]

def bench_vae(name, cfg, side, args, folder):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLQwenImage(**asdict(cfg)).eval()
    for p in ref.parameters():  # the default init leaves biases at 0 and gains at 1: make every weight matter
        p.data.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(folder)
    ours, x = V.load_vae(folder), torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    z = ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0].detach()
    calls = {"encode": (lambda: ours.encode(x), lambda: ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]),
             "decode": (lambda: ours.decode(z), lambda: ref.decode(z[:, :, None]).sample[:, :, 0])}
    repeats = args.repeats_big if side > 128 else args.repeats  # the official size: seconds a call
    return [row(f"VAE {name} {what}", f"base_dim {cfg.base_dim}, 1 × {side}² image", {"ours": a, "ref": b}, repeats,
                args, max_diff(a, b)) for what, (a, b) in calls.items()]

def bench_text_encoder(args):
    """The toy Qwen2.5-VL on two prompts with 1 and 2 images against transformers' (last hidden state, no LM head)."""
    enc = TE.load_text_encoder(S.TOY_CKPT, dtype=torch.float32)
    transformers.logging.set_verbosity_error()  # it reports the LM head it does not find: we do not use it
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        os.path.join(S.TOY_CKPT, "text_encoder"), dtype=torch.float32).model.eval()
    g, sizes = torch.Generator().manual_seed(0), [[(84, 56)], [(56, 112), (112, 84)]]  # (W, H), multiples of 28
    pixels = [[torch.rand(3, h, w, generator=g) * 2 - 1 for w, h in imgs] for imgs in sizes]
    prompts = [TE.chat_text(p, len(imgs)) for p, imgs in zip(["make it red", "put Image2 on Image1"], sizes)]
    ids = [TE.expand_image_pads(enc.tokenizer.encode(p), [w * h // 28**2 for w, h in imgs], enc.cfg.image_token_id)
           for p, imgs in zip(prompts, sizes)]
    L = max(map(len, ids))
    attn = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in ids])
    ids = torch.tensor([r + [0] * (L - len(r)) for r in ids])
    patches = [TE.merge_order(x.unflatten(1, (-1, 14)).unflatten(3, (-1, 14)).permute(1, 3, 0, 2, 4), 2)
               for imgs in pixels for x in imgs]  # transformers' pixel_values: 14² patches, merge order, 2 frames
    hf_pixels = torch.cat([p[:, :, None].expand(-1, -1, 2, -1, -1).flatten(1) for p in patches])
    grids = torch.tensor([[1, h // 14, w // 14] for imgs in sizes for w, h in imgs])
    ours = lambda: enc(ids, attn, pixels)
    ref = lambda: hf(input_ids=ids, attention_mask=attn.long(), pixel_values=hf_pixels, image_grid_thw=grids,
                     mm_token_type_ids=(ids == enc.cfg.image_token_id).int()).last_hidden_state
    return row("condition encoder (Qwen2.5-VL) forward", f"toy config, 2 prompts, 3 images, {L} tokens",
               {"ours": ours, "ref": ref}, args.repeats, args, max_diff(lambda: ours()[attn], lambda: ref()[attn]))

def bench_training(args, work):
    """train_fm.py itself on the toy world, one process: samples/s of the last logging window (the first holds the
    warm-up). Then, on one length-sorted micro-batch of its cache (own shapes, padded text), ours in one fwd+bwd call
    against diffusers once per sample, whose RoPE takes one H per batch: what per-sample H buys, not equal work; and
    one training step with --compile against eager at the toy width and the v3 teacher's (docs/status.md)."""
    import train_fm
    n, steps = args.train_data, args.train_steps
    c = train_fm.Config(cache=os.path.join(work, "cache"), out=os.path.join(work, "fm"), n_data=n, steps=steps,
                        log_every=steps // 2, save_every=10 * steps, eval_cases=0, data="toy:posed")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_fm.main(c)
        dataset = T.build_cache(c, 0, 1)  # the cache the run built
    m = [json.loads(line) for line in open(os.path.join(c.out, "metrics.jsonl"))][-1]
    print(f"\nToy training (train_fm.py, 1 process, {torch.get_num_threads()} thread(s), --data {c.data}, batch "
          f"{c.batch} = micro-batches of {c.micro_batch}, {n} cached samples): **{m['samples_per_s']} samples/s**, "
          f"{m['tokens_per_s']} image tokens/s, {m['padded']:.1%} of the batch rows padding")
    lengths = [d.length(i) for d in dataset.datasets for i in range(len(d))]
    items = [dataset[i] for i in T.batch_indices(0, lengths, min(8, n), c.seed)]
    x, shapes, txt, mask = T.make_batch(items, 0.0, torch.Generator().manual_seed(0), "cpu")
    t, n = torch.rand(len(items), generator=torch.Generator().manual_seed(2)), len(items)
    sides = mmdit_sides(M.PRESETS["toy"], 1, [(1, 1)], 1, CPU, torch.float32)  # for its two models
    ours, ref = sides["ours"][0], sides.get("ref", (None,))[0]
    fns = {"ours": fwd_bwd(ours, lambda: ours(x, shapes, txt, mask, t))}
    if ref is not None:
        one = lambda b, hw: ref(hidden_states=x[b : b + 1, : sum(h * w for h, w in hw)], timestep=t[b : b + 1],
                                encoder_hidden_states=txt[b : b + 1, : int(mask[b].sum())],
                                img_shapes=[[(1, h, w) for h, w in hw]]).sample.flatten()
        fns["ref"] = fwd_bwd(ref, lambda: torch.cat([one(b, hw) for b, hw in enumerate(shapes)]))
    padded = 1 - (sum(h * w for hw in shapes for h, w in hw) + mask.sum().item()) / (n * (x.shape[1] + txt.shape[1]))
    rows = [row("MMDiT toy fwd+bwd, mixed-shape batch: one call vs one per sample",
                f"{n} toy samples, {padded:.0%} padded rows", fns, args.repeats, args, grad=True)]
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    for name in ("tiny",) if args.tiny else ("toy", "toy-144"):  # train_fm --compile ("ours") against eager ("ref")
        eager = M.MMDiT(M.PRESETS[name]).init_weights()
        fns = {k: functools.partial(train_step, m, T.make_optimizer(m, 1e-4), x, shapes, txt, mask, t, noise)
               for k, m in (("ours", M.compile_blocks(copy.deepcopy(eager))), ("ref", eager))}
        rows.append(row(f"`{name}` train step (Eq. 1 fwd+bwd+AdamW): --compile vs eager", f"{n} toy samples, "
                        f"{sum(p.numel() for p in eager.parameters()) / 1e6:.2f}M params", fns, args.repeats, args,
                        grad=True))
    return rows

# the samplers, the CPU tables -----------------------------------------------------------------------------------------

SAMPLERS = [("Euler, 50 steps, CFG", "euler", 50, True), ("few-step, 8 steps", "fewstep", 8, False),
            ("few-step, 8 steps, CFG", "fewstep", 8, True)]  # CFG doubles the network evaluations (NFE) per step

def denoiser(net, target, refs, L, cfg_scale):
    """run(sampler, steps, with CFG): sample.denoise on `net` with random reference latents and text."""
    p, g = next(net.parameters()), torch.Generator().manual_seed(3)
    refs = [[torch.randn(net.cfg.in_channels // 4, 2 * h, 2 * w, generator=g).to(p) for h, w in refs]]
    txt, neg = (torch.randn(1, L, net.cfg.joint_attention_dim, generator=g).to(p) for _ in range(2))
    mask = torch.ones(1, L, dtype=torch.bool, device=p.device)
    return lambda sampler, steps, cfg: S.denoise(net, refs, [target], txt, mask, neg, mask, steps=steps,
                                                 cfg=cfg_scale if cfg else 1.0, sampler=sampler,
                                                 generator=torch.Generator().manual_seed(0))

def bench_samplers(title, cols, args, device):
    """cols {column: run(sampler, steps, with CFG)}: every sampler through each; speed-ups against the first row."""
    runs = [(label, s, max(2, n // 5) if args.tiny else n, c) for label, s, n, c in SAMPLERS]
    times = {col: measure({label: lambda a=(s, n, c), run=run: run(*a) for label, s, n, c in runs},
                          args.repeats_sampler, device, args.clock, memory=False) for col, run in cols.items()}
    cells = lambda t, label: (fmt(t[label][0]), f"**{t[runs[0][0]][0] / t[label][0]:.1f}×**")
    table(title, "sampler | NFE | " + " | ".join(f"{col} | speed-up" for col in cols),
          [[label, n * (2 if c else 1), *(x for t in times.values() for x in cells(t, label))]
           for label, _, n, c in runs])

def cpu_table(args):
    toy, wide, real = M.PRESETS["toy"], M.MMDiTConfig(num_layers=4, num_attention_heads=8), M.MMDiTConfig(num_layers=2)
    if args.tiny:
        toy = wide = real = M.PRESETS["tiny"]
    g, r = (8 if args.tiny else 16 if args.quick else 24), (4 if args.tiny or args.quick else 8)  # target grids
    rows = bench_mmdit("toy", toy, 8, 8, 32, args)
    rows += bench_mmdit("wide", replace(wide, num_layers=2) if args.quick else wide, 1, g, 64, args)
    rows += bench_mmdit("real width", real, 1, r, 16 if args.quick else 32, args,  # seconds a call here: few tokens
                        ("fwd",) if args.quick else ("fwd", "fwd+bwd"))
    with tempfile.TemporaryDirectory() as work:
        if diffusers:
            rows += bench_vae("toy", V.VAEConfig.toy(), 64 if args.tiny else 128, args, os.path.join(work, "vae_toy"))
            if not (args.quick or args.tiny):
                rows += bench_vae("official", V.VAEConfig(), 256, args, os.path.join(work, "vae_official"))
        if transformers:
            rows.append(bench_text_encoder(args))
        rows += bench_training(args, work)
    table("Ours against the references (fp32, same weights, same inputs; speed-up = reference time / ours)",
          "what | size | ours | reference | speed-up | peak mem ours | peak mem reference | max abs diff", rows)
    cols = {"denoising loop": denoiser(M.MMDiT(M.PRESETS["tiny" if args.tiny else "toy"]).eval(), (8, 8),
                                       [(8, 4), (4, 8)], 32, 2.0)}
    if not args.tiny:
        pipe, (images, prompt, _) = S.load_pipeline(S.TOY_CKPT, dtype=torch.float32), S.builtin_example()
        cols["whole `generate` call"] = lambda sampler, steps, cfg: S.generate(
            pipe, [prompt], [images], steps=steps, cfg=2.0 if cfg else 1.0, sampler=sampler, progress=False)
    bench_samplers("Samplers: sample.denoise on one toy MMDiT and input (64 target + 64 reference tokens, 32 text), "
                   "and the whole sample.generate call on the toy pipeline's built-in example; CFG 2", cols, args, CPU)

# the GPU script: bf16 at real width -----------------------------------------------------------------------------------

PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "A6000": 155, "4090": 165, "A10": 125}  # dense bf16 tensor-core peaks (SXM where it differs)

def mmdit_flops(cfg, S):
    """Forward FLOPs of a sample of S joint tokens, 2·12·D²·S + 4·S²·D per block: 12·D² weights a token (q, k, v,
    out, 4× MLP), attention QKᵀ and PV. 1024² target + reference at the released width, 60 blocks: 167 TFLOP."""
    D = cfg.dim
    return cfg.num_layers * (24 * D * D * S + 4 * S * S * D)

def gpu_report(args):
    """The bf16 MMDiT against diffusers (TFLOPS, MFU) and the samplers on it; then one train_fm step under FSDP2, as
    `--fsdp true --bf16 true --grad_ckpt true` runs it, in a process group of one: its time and, on CUDA, its peak
    memory (FSDP2's host memory on the CPU is tests/test_fsdp_memory.py's measurement, not this one's)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else CPU
    name = torch.cuda.get_device_name(device) if cuda else "CPU"
    # the released width (24 heads of 128), fewer blocks; a 1024² target and one 1024² reference (--tiny: 4 × 4)
    cfg, grid, L = ((replace(M.PRESETS["tiny"], num_layers=2), 4, 8) if args.tiny else
                    (M.MMDiTConfig(num_layers=args.layers), 64, 256))
    shapes, tokens = [(grid, grid)] * 2, 2 * grid * grid + L
    flops, full = mmdit_flops(cfg, tokens), mmdit_flops(replace(cfg, num_layers=60), tokens)
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    sides, rows = mmdit_sides(cfg, 1, shapes, L, device, torch.bfloat16), []
    for mode, mult in (("forward", 1), ("forward+backward", 3)):  # backward: twice the forward's FLOPs
        with torch.set_grad_enabled(mult > 1):
            res = measure({k: fwd_bwd(*s) if mult > 1 else s[1] for k, s in sides.items()}, args.repeats, device)
        tflops = mult * flops / res["ours"][0] / 1e12
        rows.append([mode, *side_by_side(res), f"{tflops:.3g}", f"{tflops / peak:.1%}" if peak else "—"])
    table(f"bf16 MMDiT on {name}, width {cfg.dim} ({cfg.num_attention_heads} heads × {cfg.attention_head_dim}), "
          f"{cfg.num_layers} blocks, 1 × {tokens} tokens: forward floor {flops / 1e12:.3g} TFLOP ({full / 1e12:.0f} "
          f"for all 60 blocks); peak {peak or '?'} TFLOPS", "pass | ours | diffusers | speed-up | peak mem ours | "
          "peak mem diffusers | ours TFLOPS | ours MFU", rows)
    run = denoiser(sides["ours"][0].eval(), (grid, grid), [(grid, grid)], L, 4.0)
    bench_samplers(f"Samplers on this bf16 model (sample.denoise, 1 image, {tokens} tokens), CFG 4",
                   {"denoising loop": run}, args, device)
    del sides, run  # frees both models before the FSDP2 step

    cfg = replace(cfg, num_layers=2 if args.tiny else args.fsdp_layers)
    dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device if cuda else None)
    with torch.device(device):  # built in place; sharded outside the context (its device mesh is a CPU tensor)
        model = M.MMDiT(cfg)
    model = SH.shard(model, device, bf16=True)  # fp32 masters sharded per block, bf16 all-gathers
    model.gradient_checkpointing, opt = True, T.make_optimizer(model, 1e-4)
    x, txt, mask, t = random_batch(cfg, 1, shapes, L, device, torch.float32, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device)
    step = functools.partial(train_step, model, opt, x, [shapes], txt, mask, t, noise, bf16=True)
    step()  # creates the AdamW moments
    (sec, extra), = measure({"step": step}, max(1, args.repeats // 2), device, memory=cuda).values()
    params = sum(p.numel() for p in model.parameters())
    peak = torch.cuda.memory_allocated(device) + extra if cuda else None  # 8 GPUs: 7/8 of 16 B/param sharded away
    print(f"\nFSDP2 train_fm step (bf16 all-gathers, gradient checkpointing, AdamW), width {cfg.dim}, {cfg.num_layers} "
          f"blocks ({params / 1e9:.3g}B params), 1 × {tokens} tokens, 1 process: {fmt(sec)} per step, peak memory "
          f"{fmt(peak, 'B')}, per GPU at 8 GPUs ≈ {fmt(peak and peak - 14 * params, 'B')}")
    dist.destroy_process_group()

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=S.HelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats: under two minutes on 2 cores")
    p.add_argument("--tiny", action="store_true", help="toy-of-toy sizes: seconds, proves the script runs (tests)")
    p.add_argument("--gpu", action="store_true", help="the GPU script (bf16, real width; CUDA if present, else CPU)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every side (1: the least noisy ratios)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu = process CPU time (a busy machine)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default: 20, --quick 7, --tiny 2)")
    p.add_argument("--layers", type=int, default=8, help="--gpu: blocks of the real-width MMDiT (60 released)")
    p.add_argument("--fsdp_layers", type=int, default=4, help="--gpu: blocks of the FSDP2 training-memory model")
    args = p.parse_args(argv)
    size = 0 if args.tiny else 1 if args.quick else 2
    args.repeats = args.repeats or (2, 7, 20)[size]
    args.repeats_big = args.repeats if args.gpu else (1, 3, max(3, args.repeats // 4))[size]  # width ≥ 1024, CPU
    args.repeats_sampler, (args.train_data, args.train_steps) = (1, 3, 5)[size], ((4, 2), (32, 20), (96, 60))[size]
    torch.set_num_threads(args.threads)
    refs = ", ".join(f"{m.__name__} {m.__version__}" for m in (diffusers, transformers) if m) or "no references"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {os.cpu_count()} CPU cores · torch "
          f"{torch.__version__} · {refs} · {args.threads} thread(s) · {args.clock} clock · median of "
          f"{args.repeats} ({args.repeats_big} for width ≥ 1024 and the official VAE)")
    (gpu_report if args.gpu else cpu_table)(args)

if __name__ == "__main__":
    main()
