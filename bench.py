r"""
Speed and memory, measured side by side in one run against the libraries this code replaces.

    python bench.py --quick          # the table in under two minutes on a 2-core CPU
    python bench.py                  # the full table (README "Speed and memory")
    python bench.py --gpu            # a CUDA machine: bf16 MMDiT at real width (MFU), FSDP2 memory, sampler time
    python bench.py --gpu --tiny     # the same script at toy-of-toy size, on whatever device there is (a test)

Every "×" is a ratio measured in this process on identical inputs and identical weights (the reference model holds
the very same tensors): ours against diffusers' QwenImageTransformer2DModel / AutoencoderKLQwenImage and
transformers' Qwen2.5-VL. Each callable runs once to warm up, then the sides alternate for --repeats rounds and
the median is reported; peak memory comes from one more call each (RSS above the starting point on the CPU,
max_memory_allocated on CUDA). Ratios, not absolute times, are what carries over between machines; on a busy
machine use --clock cpu (process CPU time, not wall time). diffusers and transformers are test-only packages
(requirements-test.txt): without them the reference columns stay empty.
"""
import argparse
import contextlib
import ctypes
import functools
import io
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace

import torch

import model as M
import sample as S
import text_encoder as TE
import vae as V
from sample import HelpFormatter


def optional(name):
    try:
        return __import__(name)
    except ImportError:
        return None


diffusers, transformers = optional("diffusers"), optional("transformers")

# -----------------------------------------------------------------------------
# measuring: clocks, peak memory, interleaved repeats


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now(clock):
    return time.process_time() if clock == "cpu" else time.perf_counter()


def _proc_status(key):  # kB → bytes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _mmap_threshold(nbytes):
    """glibc serves blocks above this size with mmap and unmaps them on free; below it, freed blocks stay in the
    heap for reuse. Its default grows as a program runs (up to 32 MB); timing runs pinned at 32 MB, memory at 64 KB."""
    if _libc() is not None:
        _libc().mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def peak_memory(fn, device):
    """Bytes above the starting point at the peak of one call of fn: max_memory_allocated on CUDA; on the CPU the
    peak RSS (VmHWM, reset through /proc/self/clear_refs), with the free heap handed back first (malloc_trim) and
    every block above 64 KB mapped fresh, so the RSS follows the live tensors. None where neither is available."""
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        if _libc() is not None:
            _libc().malloc_trim(0)
        _mmap_threshold(1 << 16)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS to the current RSS
        base = _proc_status("VmRSS")
        fn()
        return _proc_status("VmHWM") - base
    except OSError:
        return None
    finally:
        _mmap_threshold(32 << 20)


def measure(fns, repeats, device, clock="wall"):
    """fns: {name: callable}. Each runs once to warm up; then `repeats` rounds run all of them, in an order that
    alternates round by round so a drifting machine affects every side alike; then one call each for peak memory.
    Returns {name: (median seconds, peak bytes or None)}."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for r in range(repeats):
        for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            sync(device)
            t0 = now(clock)
            fns[k]()
            sync(device)
            times[k].append(now(clock) - t0)
    return {k: (statistics.median(times[k]), peak_memory(fns[k], device)) for k in fns}


def fwd_bwd(module, call):
    """One training-shaped step: forward, a scalar loss, backward; the gradients are dropped again at the end, so
    a call's peak memory includes them."""
    def step():
        call().float().pow(2).mean().backward()
        module.zero_grad(set_to_none=True)
    return step


def no_grad(call):
    def fwd():
        with torch.no_grad():
            call()
    return fwd


def timed_pass(mode, module, call):
    return fwd_bwd(module, call) if mode in ("fwd+bwd", "forward+backward") else no_grad(call)


# -----------------------------------------------------------------------------
# the rows of the table


@dataclass
class Row:
    what: str
    size: str
    ours: float  # seconds
    ref: float = None  # seconds, or None without the reference
    ours_mem: int = None  # bytes
    ref_mem: int = None
    diff: float = None  # max |ours - reference| on the same input


def fmt_time(s):
    return "—" if s is None else f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def fmt_mem(b):
    if b is None:
        return "—"
    return f"{b / 2**10:.0f} KB" if b < 2**20 else f"{b / 2**20:.0f} MB" if b < 2**30 else f"{b / 2**30:.2f} GB"


def row(what, size, res, diff=None):
    """A table row from measure()'s result for "ours" and, when it ran, "ref"."""
    (t, mem), (t_ref, mem_ref) = res["ours"], res.get("ref", (None, None))
    return Row(what, size, t, t_ref, mem, mem_ref, diff)


def print_rows(title, rows, reference):
    print(f"\n{title}\n")
    print(f"| what | size | ours | {reference} | speed-up | peak mem ours | peak mem {reference} | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"**{r.ref / r.ours:.2f}×**" if r.ref else "—"
        diff = "—" if r.diff is None else f"{r.diff:.1e}"
        print(f"| {r.what} | {r.size} | {fmt_time(r.ours)} | {fmt_time(r.ref)} | {ratio} | {fmt_mem(r.ours_mem)} | "
              f"{fmt_mem(r.ref_mem)} | {diff} |")


# -----------------------------------------------------------------------------
# the MMDiT against diffusers


def mmdit_pair(cfg, device, dtype, reference=True):
    """Ours with PyTorch's default Linear init (no zero blocks), and diffusers' model holding the very same tensors
    (load_state_dict(assign=True) shares the storage): identical weights, one copy in memory."""
    torch.manual_seed(0)
    with torch.device(device):
        ours = M.MMDiT(cfg).to(dtype)
        ref = diffusers.QwenImageTransformer2DModel(**asdict(cfg)) if reference and diffusers else None
    if ref is not None:
        ref.load_state_dict(ours.state_dict(), strict=True, assign=True)
    return ours, ref


def mmdit_calls(ours, ref, B, shapes, L, device, dtype):
    """Calls of both models on one random batch: B samples, each a unified sequence with the image grids `shapes`
    (target first) and L text tokens, none of them padding (so diffusers, as its pipeline does, gets no mask)."""
    cfg, g = ours.cfg, torch.Generator().manual_seed(1)
    N = sum(h * w for h, w in shapes)
    x = torch.randn(B, N, cfg.in_channels, generator=g).to(device, dtype)
    txt = torch.randn(B, L, cfg.joint_attention_dim, generator=g).to(device, dtype)
    mask, t = torch.ones(B, L, dtype=torch.bool, device=device), torch.rand(B, generator=g).to(device)
    call_ours = lambda: ours(x, [shapes] * B, txt, mask, t)
    img_shapes = [[(1, h, w) for h, w in shapes]] * B
    call_ref = (lambda: ref(hidden_states=x, encoder_hidden_states=txt, timestep=t, img_shapes=img_shapes).sample) \
        if ref is not None else None
    return call_ours, call_ref


def bench_mmdit(name, cfg, B, shapes, L, args, device=torch.device("cpu"), dtype=torch.float32, modes=("fwd", "fwd+bwd")):
    ours, ref = mmdit_pair(cfg, device, dtype, reference=not args.no_reference)
    call_ours, call_ref = mmdit_calls(ours, ref, B, shapes, L, device, dtype)
    diff = None
    if ref is not None:
        with torch.no_grad():
            diff = (call_ours().float() - call_ref().float()).abs().max().item()
    N = sum(h * w for h, w in shapes)
    size = f"width {cfg.dim}, {cfg.num_layers} blocks, {B} × ({N} img + {L} txt) tokens"
    rows = []
    for mode in modes:
        fns = {"ours": timed_pass(mode, ours, call_ours)}
        if ref is not None:
            fns["ref"] = timed_pass(mode, ref, call_ref)
        res = measure(fns, args.repeats_big if cfg.dim >= 1024 else args.repeats, device, args.clock)
        rows.append(row(f"MMDiT {name} {mode}", size, res, diff))
    return rows


def mmdit_mixed_batch(args, items):
    """What per-sample H buys (not equal work): a real toy training micro-batch (own shapes, padded text) in one
    call of ours, against diffusers run once per sample (its RoPE takes one H for the whole batch)."""
    from train_common import make_batch

    ours, ref = mmdit_pair(M.PRESETS["toy"], torch.device("cpu"), torch.float32, reference=not args.no_reference)
    x, shapes, txt, mask = make_batch(items, 0.0, torch.Generator().manual_seed(0), "cpu")
    t = torch.rand(len(items), generator=torch.Generator().manual_seed(2))
    fns = {"ours": fwd_bwd(ours, lambda: ours(x, shapes, txt, mask, t))}
    if ref is not None:
        def per_sample():
            outs = []
            for b, hw in enumerate(shapes):
                n, l = sum(h * w for h, w in hw), int(mask[b].sum())
                outs.append(ref(hidden_states=x[b : b + 1, :n], encoder_hidden_states=txt[b : b + 1, :l],
                                timestep=t[b : b + 1], img_shapes=[[(1, h, w) for h, w in hw]]).sample)
            return torch.cat([o.flatten() for o in outs])
        fns["ref"] = fwd_bwd(ref, per_sample)
    res = measure(fns, args.repeats, torch.device("cpu"), args.clock)
    rows = x.shape[0] * (x.shape[1] + txt.shape[1])
    real = sum(sum(h * w for h, w in hw) for hw in shapes) + int(mask.sum())
    return row("MMDiT toy fwd+bwd, mixed-shape batch: one call vs one per sample",
               f"{len(items)} toy samples, {1 - real / rows:.0%} padded rows", res)


def bench_compile(args, items):
    """train_fm --compile against eager: one training step (Eq. 1 loss, backward, AdamW) on a real cached toy
    micro-batch (mixed shapes), for the toy width and the v3 teacher's; the same initial weights on both sides."""
    import train_common as T

    x, shapes, txt, mask = T.make_batch(items, 0.0, torch.Generator().manual_seed(0), "cpu")
    t = torch.rand(len(items), generator=torch.Generator().manual_seed(2))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    rows = []
    for name in ("toy", "toy-144"):
        eager = M.MMDiT(M.PRESETS[name]).init_weights()
        compiled = M.MMDiT(eager.cfg)
        compiled.load_state_dict(eager.state_dict())
        M.compile_blocks(compiled)

        def step(model, opt):
            T.fm_loss(model, x, shapes, txt, mask, t, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        opt_c, opt_e = T.make_optimizer(compiled, 1e-4), T.make_optimizer(eager, 1e-4)
        fns = {"ours": lambda: step(compiled, opt_c), "ref": lambda: step(eager, opt_e)}
        res = measure(fns, args.repeats, torch.device("cpu"), args.clock)
        params = sum(p.numel() for p in eager.parameters()) / 1e6
        rows.append(row(f"`{name}` ({params:.2f}M) fwd+bwd+AdamW", f"{len(items)} cached toy samples, "
                        f"{len(items) / res['ours'][0]:.0f} vs {len(items) / res['ref'][0]:.0f} samples/s", res))
    return rows


# -----------------------------------------------------------------------------
# the VAE against diffusers, the condition encoder against transformers


def bench_vae(name, cfg, side, args, folder):
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLQwenImage(**asdict(cfg)).eval()
    with torch.no_grad():
        for p in ref.parameters():  # the default init leaves biases at 0 and gains at 1: make every weight matter
            p.add_(0.02 * torch.randn_like(p))
    ref.save_pretrained(folder)
    ours = V.load_vae(folder)
    x = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        diffs = {"encode": (ours.encode(x) - z).abs().max().item(),
                 "decode": (ours.decode(z) - ref.decode(z[:, :, None]).sample[:, :, 0]).abs().max().item()}
    calls = {"encode": (lambda: ours.encode(x), lambda: ref.encode(x[:, :, None]).latent_dist.mean),
             "decode": (lambda: ours.decode(z), lambda: ref.decode(z[:, :, None]).sample)}
    rows, repeats = [], args.repeats_big if side > 128 else args.repeats  # official size: seconds a call
    for what, (a, b) in calls.items():
        res = measure({"ours": no_grad(a), "ref": no_grad(b)}, repeats, torch.device("cpu"), args.clock)
        rows.append(row(f"VAE {name} {what}", f"base_dim {cfg.base_dim}, 1 × {side}² image", res, diffs[what]))
    return rows


def bench_text_encoder(args):
    """The toy pipeline's Qwen2.5-VL (assets/toy) on two prompts with 1 and 2 images: ours against transformers'
    Qwen2_5_VLModel (the last hidden state, no LM head) on the same token ids and pixels."""
    enc = TE.load_text_encoder(S.TOY_CKPT, dtype=torch.float32)
    transformers.logging.set_verbosity_error()  # it reports the LM head it does not find: we do not use it
    with contextlib.redirect_stderr(io.StringIO()):
        hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
            os.path.join(S.TOY_CKPT, "text_encoder"), dtype=torch.float32).model.eval()
    g = torch.Generator().manual_seed(0)
    images = [[(84, 56)], [(56, 112), (112, 84)]]  # (W, H), multiples of 28: the VL copies themselves
    pixels = [[torch.rand(3, h, w, generator=g) * 2 - 1 for w, h in row] for row in images]
    unit = 28
    rows = [TE.expand_image_pads(enc.tokenizer.encode(TE.chat_text(p, len(r))), [(w // unit) * (h // unit) for w, h in r],
                                 enc.cfg.image_token_id) for p, r in zip(["make it red", "put Image2 on Image1"], images)]
    L = max(map(len, rows))
    ids = torch.tensor([r + [0] * (L - len(r)) for r in rows])
    attn = torch.tensor([[True] * len(r) + [False] * (L - len(r)) for r in rows])
    hf_pixels, grids = hf_patches([p for row in pixels for p in row])
    call_hf = lambda: hf(input_ids=ids, attention_mask=attn.long(), pixel_values=hf_pixels, image_grid_thw=grids,
                         mm_token_type_ids=(ids == enc.cfg.image_token_id).int()).last_hidden_state
    with torch.no_grad():
        diff = (enc(ids, attn, pixels) - call_hf())[attn].abs().max().item()
    res = measure({"ours": no_grad(lambda: enc(ids, attn, pixels)), "ref": no_grad(call_hf)}, args.repeats,
                  torch.device("cpu"), args.clock)
    return row("condition encoder (Qwen2.5-VL) forward", f"toy config, 2 prompts, 3 images, {L} tokens", res, diff)


def hf_patches(imgs, patch=14, merge=2, frames=2):
    """transformers' pixel_values for normalised [3, H, W] images: each image's 14×14 patches in 2×2 merge order,
    the still frame repeated to the temporal patch of 2, flattened as (C, T, 14, 14)."""
    out, grids = [], []
    for x in imgs:
        C, H, W = x.shape
        h, w = H // patch, W // patch
        p = x.reshape(C, h // merge, merge, patch, w // merge, merge, patch).permute(1, 4, 2, 5, 0, 3, 6)
        p = p.reshape(h * w, C, 1, patch, patch).expand(-1, -1, frames, -1, -1)
        out.append(p.reshape(h * w, -1))
        grids.append([1, h, w])
    return torch.cat(out), torch.tensor(grids)


# -----------------------------------------------------------------------------
# the samplers and the trainer


def sampler_inputs(cfg, target_hw, ref_hw, L, device, dtype):
    g = torch.Generator().manual_seed(3)
    C = cfg.in_channels // 4
    refs = [[torch.randn(C, 2 * h, 2 * w, generator=g).to(device, dtype) for h, w in ref_hw]]
    txt, neg = torch.randn(1, L, cfg.joint_attention_dim, generator=g), torch.randn(1, L, cfg.joint_attention_dim, generator=g)
    ones = torch.ones(1, L, dtype=torch.bool)
    return dict(refs=refs, target_hw=[target_hw], txt=txt.to(device, dtype), txt_mask=ones.to(device),
                neg=neg.to(device, dtype), neg_mask=ones.to(device))


SAMPLERS = [  # (label, sampler, steps, with CFG): CFG doubles the network evaluations (NFE) per step
    ("Euler, 50 steps, CFG", "euler", 50, True),
    ("few-step, 8 steps", "fewstep", 8, False),
    ("few-step, 8 steps, CFG", "fewstep", 8, True),
]


def bench_samplers(net, inputs, cfg_scale, args, device, steps_scale=1):
    """sample.denoise with each sampler on the same model and inputs → [(label, NFE, seconds)]."""
    fns = {}
    for label, sampler, steps, use_cfg in SAMPLERS:
        steps = max(2, steps // steps_scale)
        kw = dict(inputs, cfg=cfg_scale if use_cfg else 1.0, steps=steps, sampler=sampler)
        fns[label] = (lambda kw=kw: S.denoise(net, generator=torch.Generator().manual_seed(0), **kw),
                      steps * (2 if use_cfg else 1))
    res = measure({k: f for k, (f, _) in fns.items()}, args.repeats_sampler, device, args.clock)
    return [(k, fns[k][1], res[k][0]) for k in fns]


def bench_generate(args):
    """The whole sample.generate call on the embedded toy pipeline: text encoder, VAE encode, denoising, decode."""
    pipe = S.load_pipeline(S.TOY_CKPT, dtype=torch.float32)
    images, prompt, _ = S.builtin_example()
    fns = {}
    for label, sampler, steps, use_cfg in SAMPLERS:
        kw = dict(steps=steps, cfg=2.0 if use_cfg else 1.0, sampler=sampler, progress=False)
        fns[label] = (lambda kw=kw: S.generate(pipe, [prompt], [images], **kw), steps * (2 if use_cfg else 1))
    res = measure({k: f for k, (f, _) in fns.items()}, args.repeats_sampler, torch.device("cpu"), args.clock)
    return [(k, fns[k][1], res[k][0]) for k in fns]


def print_samplers(title, rows):
    print(f"\n{title}\n")
    print("| sampler | NFE | time | speed-up vs 50-step Euler + CFG |")
    print("|---|---|---|---|")
    base = rows[0][2]
    for label, nfe, s in rows:
        print(f"| {label} | {nfe} | {fmt_time(s)} | **{base / s:.1f}×** (NFE {rows[0][1] / nfe:.1f}×) |")


def bench_training(args, work):
    """train_fm.py itself on the toy world, one process: samples/s and padded rows of the last logging window
    (the first window holds the warm-up). The latent cache is built first, in a temporary folder.
    Returns (the run's config, its last metrics line, one length-sorted micro-batch of cached items)."""
    import json

    import train_common as T
    import train_fm

    n, steps = args.train_data, args.train_steps
    cfg = train_fm.Config(cache=os.path.join(work, "cache"), out=os.path.join(work, "fm"), n_data=n, steps=steps,
                          log_every=steps // 2, save_every=10 * steps, eval_cases=0, data=args.train_dataset)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        train_fm.main(cfg)
        dataset = T.build_cache(cfg, 0, 1)  # the cache the run built
    last = [json.loads(line) for line in open(os.path.join(cfg.out, "metrics.jsonl"))][-1]
    lengths = [d.length(i) for d in dataset.datasets for i in range(len(d))]
    items = [dataset[i] for i in T.batch_indices(0, lengths, min(8, n), cfg.seed)]
    return cfg, last, items


# -----------------------------------------------------------------------------
# the CPU table


def header(args, device):
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu}, {os.cpu_count()} cores"
    refs = ", ".join(f"{m.__name__} {m.__version__}" for m in (diffusers, transformers) if m) or "no reference packages"
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {where} · torch {torch.__version__} · {refs} · "
          f"{torch.get_num_threads()} thread(s) · {args.clock} clock · median of {args.repeats} "
          f"({args.repeats_big} for width ≥ 1024 and the official VAE) after a warm-up")


def cpu_table(args):
    device = torch.device("cpu")
    header(args, device)
    if args.no_reference or not diffusers:
        print("reference columns empty: " + ("--no_reference" if args.no_reference else
              "diffusers is not installed (pip install -r requirements-test.txt)"))
    toy, wide, real = M.PRESETS["toy"], M.MMDiTConfig(num_layers=4, num_attention_heads=8), M.MMDiTConfig(num_layers=2)
    if args.tiny:
        toy = wide = real = M.PRESETS["tiny"]
    rows = bench_mmdit("toy", toy, 8, [(8, 8), (8, 4), (4, 8)], 32, args)
    grid = 8 if args.tiny else 16 if args.quick else 24  # target grid; two references of half its area
    rows += bench_mmdit("wide", replace(wide, num_layers=2) if args.quick else wide, 1,
                        [(grid, grid), (grid, grid // 2), (grid // 2, grid)], 64, args)
    grid = 4 if args.tiny or args.quick else 8  # a call takes seconds here: few tokens; --quick: forward only
    rows += bench_mmdit("real width", real, 1, [(grid, grid), (grid, grid // 2), (grid // 2, grid)], 16 if args.quick else 32,
                        args, modes=("fwd",) if args.quick else ("fwd", "fwd+bwd"))
    with tempfile.TemporaryDirectory() as work:
        if diffusers and not args.no_reference:
            rows += bench_vae("toy", V.VAEConfig.toy(), 64 if args.tiny else 128, args, os.path.join(work, "vae_toy"))
            if not (args.quick or args.tiny):
                rows += bench_vae("official", V.VAEConfig(), 256, args, os.path.join(work, "vae_official"))
        if transformers and not args.no_reference and os.path.isdir(S.TOY_CKPT):
            rows += [bench_text_encoder(args)]
        trained = bench_training(args, work) if os.path.isdir(S.TOY_CKPT) else None
        if trained:
            rows += [mmdit_mixed_batch(args, trained[2])]
        print_rows("Ours against the reference implementations (fp32, same weights, same inputs)", rows,
                   "reference")
        print("\n(speed-up = reference time / ours; the references are diffusers' QwenImageTransformer2DModel and "
              "AutoencoderKLQwenImage, transformers' Qwen2_5_VLModel)")
        if trained and not (args.quick or args.tiny):  # compiling takes ≈ 90 s a model on one core
            print_rows(f"Training step, `train_fm --compile true` (torch.compile per block) against eager, "
                       f"{torch.get_num_threads()} thread(s)", bench_compile(args, trained[2]), "eager")

        cfg = M.PRESETS["tiny" if args.tiny else "toy"]
        net = M.MMDiT(cfg).eval()
        inputs = sampler_inputs(cfg, (8, 8), [(8, 4), (4, 8)], 32, device, torch.float32)
        print_samplers("Samplers, same toy MMDiT and inputs (sample.denoise, 1 image: 64 target + 64 reference "
                       "tokens, 32 text), CFG 2", bench_samplers(net, inputs, 2.0, args, device, 5 if args.tiny else 1))
        if os.path.isdir(S.TOY_CKPT) and not args.tiny:
            print_samplers("The whole sample.generate call, embedded toy pipeline (assets/toy), built-in example, "
                           "CFG 2", bench_generate(args))
        if trained:
            cfg_t, last, _ = trained
            print(f"\nToy training (train_fm.py, 1 process, {torch.get_num_threads()} thread(s), --data "
                  f"{cfg_t.data}, batch {cfg_t.batch} = micro-batches of {cfg_t.micro_batch}, {cfg_t.n_data} cached "
                  f"samples): **{last['samples_per_s']} samples/s**, {last['tokens_per_s']} image tokens/s, "
                  f"{last['padded']:.1%} of the batch rows padding")


# -----------------------------------------------------------------------------
# where the time goes: the profile behind the MMDiT ratios

KERNELS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::gelu", "aten::gelu_backward",
           "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def profile_mmdit(args):
    """torch.profiler over fwd+bwd steps of both models: the top ops by self CPU time per step, side by side, and the
    share of the kernels both sides call identically (GEMMs, flash attention, tanh-GELU), which bounds any speed-up."""
    from torch.profiler import ProfilerActivity, profile

    wide = M.MMDiTConfig(num_layers=2, num_attention_heads=8)
    for name, cfg, B, shapes, L in (("toy", M.PRESETS["toy"], 8, [(8, 8), (8, 4), (4, 8)], 32),
                                    ("wide", wide, 1, [(16, 16), (16, 8), (8, 16)], 64)):
        ours, ref = mmdit_pair(cfg, torch.device("cpu"), torch.float32)
        steps = {k: fwd_bwd(m, c) for k, m, c in zip(("ours", "diffusers"), (ours, ref),
                                                      mmdit_calls(ours, ref, B, shapes, L, "cpu", torch.float32))}
        rounds, n = (4, 3) if name == "toy" else (2, 1)  # sides alternate, as in measure()
        self_ms, calls = {k: {} for k in steps}, {k: 0.0 for k in steps}
        for step in steps.values():
            step()
        for r in range(rounds):
            for k in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(n):
                        steps[k]()
                for e in prof.key_averages():
                    self_ms[k][e.key] = self_ms[k].get(e.key, 0.0) + e.self_cpu_time_total / 1e3 / (n * rounds)
                    calls[k] += e.count / (n * rounds)
        print(f"\nProfile, MMDiT {name} fwd+bwd (width {cfg.dim}, {cfg.num_layers} blocks), ms per step, self CPU time\n")
        print("| op | ours | diffusers |")
        print("|---|---|---|")
        top = sorted(self_ms["ours"], key=lambda k: -self_ms["ours"][k])[:12]
        for op in top:
            print(f"| {op[:60]} | {self_ms['ours'][op]:.2f} | {self_ms['diffusers'].get(op, 0):.2f} |")
        for k in steps:
            total, shared = sum(self_ms[k].values()), sum(v for op, v in self_ms[k].items() if op in KERNELS)
            print(f"{k}: {total:.1f} ms/step under the profiler, {shared / total:.0%} in GEMM + flash attention + "
                  f"GELU kernels, {calls[k]:.0f} op calls/step")


# -----------------------------------------------------------------------------
# the GPU script: bf16 at real width


PEAK_BF16_TFLOPS = {"H200": 989, "H100": 989, "H800": 989, "A100": 312, "A800": 312, "L40S": 362, "L40": 181,
                    "A6000": 155, "4090": 165, "A10": 125}  # dense bf16 tensor-core peaks (SXM where it differs)


def mmdit_flops(cfg, S):
    """Forward FLOPs of one sample of S joint tokens: every token meets 12·D² weights (q, k, v, out and the 4×
    MLP, in its own stream), and attention is QKᵀ and PV: 2·12·D²·S + 4·S²·D per block. At the released width,
    S = 8,448 (1024² target + one 1024² reference + 256 text tokens) and 60 blocks: 167 TFLOP."""
    D = cfg.dim
    return cfg.num_layers * (24 * D * D * S + 4 * S * S * D)


def gpu_report(args):
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16
    header(args, device)
    if args.tiny:
        cfg, grid, L = replace(M.PRESETS["tiny"], num_layers=2), 4, 8
    else:  # the released width: 24 heads of 128, fewer blocks
        cfg, grid, L = M.MMDiTConfig(num_layers=args.layers), 64, 256
    shapes = [(grid, grid), (grid, grid)]  # a 1024² target and one 1024² reference: 64 × 64 tokens each
    S_tokens = sum(h * w for h, w in shapes) + L
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None) \
        if device.type == "cuda" else None
    peak = args.peak_tflops or peak
    flops = mmdit_flops(cfg, S_tokens)
    print(f"\nbf16 MMDiT, width {cfg.dim} ({cfg.num_attention_heads} heads × {cfg.attention_head_dim}), "
          f"{cfg.num_layers} blocks, 1 × {S_tokens} tokens: forward floor {flops / 1e12:.3g} TFLOP "
          f"({mmdit_flops(replace(cfg, num_layers=60), S_tokens) / 1e12:.0f} TFLOP for all 60 blocks); "
          f"peak {peak or '?'} TFLOPS\n")
    print("| pass | ours | diffusers | speed-up | ours TFLOPS | ours MFU | peak mem ours | peak mem diffusers |")
    print("|---|---|---|---|---|---|---|---|")
    ours, ref = mmdit_pair(cfg, device, dtype, reference=not args.no_reference)
    call_ours, call_ref = mmdit_calls(ours, ref, 1, shapes, L, device, dtype)
    for mode, mult in (("forward", 1), ("forward+backward", 3)):  # backward: twice the forward's FLOPs
        fns = {"ours": timed_pass(mode, ours, call_ours)}
        if ref is not None:
            fns["ref"] = timed_pass(mode, ref, call_ref)
        res = measure(fns, args.repeats, device, "wall")
        t, t_ref = res["ours"][0], res.get("ref", (None,))[0]
        tflops = mult * flops / t / 1e12
        mfu = f"{tflops / peak:.1%}" if peak else "—"
        ratio = f"**{t_ref / t:.2f}×**" if t_ref else "—"
        print(f"| {mode} | {fmt_time(t)} | {fmt_time(t_ref)} | {ratio} | {tflops:.3g} | {mfu} | "
              f"{fmt_mem(res['ours'][1])} | {fmt_mem(res.get('ref', (None, None))[1])} |")

    net = ours.eval()
    del ref, call_ours, call_ref
    inputs = sampler_inputs(cfg, (grid, grid), [(grid, grid)], L, device, dtype)
    print_samplers(f"Samplers on this bf16 model (sample.denoise, 1 image, {S_tokens} tokens), CFG 4",
                   bench_samplers(net, inputs, 4.0, args, device, 5 if args.tiny else 1))
    del net, ours, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    fsdp_memory(args, device, replace(cfg, num_layers=2 if args.tiny else args.fsdp_layers), shapes, L)


def fsdp_memory(args, device, cfg, shapes, L):
    """One train_fm step under FSDP2 as `--fsdp true --bf16 true --grad_ckpt true` runs it (fp32 masters sharded per
    block, bf16 all-gathers, AdamW), in a process group of one: the per-GPU memory of N GPUs is this peak minus
    (N−1)/N of the 16 bytes/parameter of weights, gradients and AdamW moments."""
    import torch.distributed as dist

    import sharded as SH
    import train_common as T

    own_group = not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
    try:
        model = SH.shard(SH.meta_mmdit(cfg), device, bf16=True)
        with torch.no_grad():
            for p in model.parameters():
                SH.local(p).normal_(std=0.02)
        model.gradient_checkpointing = True
        opt = T.make_optimizer(model, 1e-4)
        g = torch.Generator().manual_seed(4)
        N = sum(h * w for h, w in shapes)
        x = torch.randn(1, N, cfg.in_channels, generator=g).to(device)
        txt = torch.randn(1, L, cfg.joint_attention_dim, generator=g).to(device)
        mask, t = torch.ones(1, L, dtype=torch.bool, device=device), torch.rand(1, generator=g).to(device)
        noise = torch.randn(x.shape, generator=g).to(device)

        def step():
            with torch.autocast(device.type, torch.bfloat16):
                loss = T.fm_loss(model, x, [shapes], txt, mask, t, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        step()  # creates the AdamW moments
        res = measure({"step": step}, max(1, args.repeats // 2), device, "wall")
        params = sum(p.numel() for p in model.parameters())
        states = 16 * params  # fp32 weights, gradients, two AdamW moments
        print(f"\nFSDP2 train_fm step (bf16 all-gathers, gradient checkpointing, AdamW), width {cfg.dim}, "
              f"{cfg.num_layers} blocks ({params / 1e9:.3g}B params), 1 × {N + L} tokens, 1 process: "
              f"{fmt_time(res['step'][0])} per step")
        if device.type == "cuda":
            sync(device)
            resident = torch.cuda.memory_allocated(device)
            peak = resident + res["step"][1]
            per_gpu = peak - states * 7 / 8
            print(f"peak {fmt_mem(peak)} on one GPU (states {fmt_mem(states)} at 16 B/param, the rest activations and "
                  f"gathered blocks); per GPU at 8 GPUs ≈ {fmt_mem(per_gpu)}; the released 60 blocks add "
                  f"{fmt_mem(16 * (20_430_401_088 - params) / 8)} of states per GPU at 8 GPUs")
        else:
            print(f"peak RSS {fmt_mem(res['step'][1])} above the resident model and optimiser")
    finally:
        if own_group:
            dist.destroy_process_group()


# -----------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats: under two minutes on 2 cores")
    p.add_argument("--tiny", action="store_true", help="toy-of-toy sizes: seconds, proves the script runs (tests)")
    p.add_argument("--gpu", action="store_true", help="the GPU script (bf16, real width; CUDA if present, else CPU)")
    p.add_argument("--profile", action="store_true", help="where the MMDiT time goes: top ops of ours and diffusers")
    p.add_argument("--threads", type=int, default=1, help="CPU threads for every side (ratios at 1 are the least noisy)")
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu = process CPU time (a busy machine)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds per row (default: 20, --quick 7, --tiny 2)")
    p.add_argument("--no_reference", action="store_true", help="ours only, even when diffusers/transformers exist")
    p.add_argument("--train_dataset", default="toy:posed", help="--data of the training row (the committed recipe's)")
    p.add_argument("--layers", type=int, default=8, help="--gpu: blocks of the real-width MMDiT (60 released)")
    p.add_argument("--fsdp_layers", type=int, default=4, help="--gpu: blocks of the FSDP2 training-memory model")
    p.add_argument("--peak_tflops", type=float, default=None, help="--gpu: the device's dense bf16 peak (default: by name)")
    args = p.parse_args(argv)
    args.repeats = args.repeats or (2 if args.tiny else 7 if args.quick else 20)
    # width ≥ 1024 on a CPU: seconds a call
    args.repeats_big = args.repeats if args.gpu else 1 if args.tiny else 3 if args.quick else max(3, args.repeats // 4)
    args.repeats_sampler = 1 if args.tiny else 3 if args.quick else 5
    args.train_data, args.train_steps = (4, 2) if args.tiny else (32, 20) if args.quick else (96, 60)
    torch.set_num_threads(args.threads)
    _mmap_threshold(32 << 20)  # the same allocator behaviour for every timed call (see peak_memory)
    (gpu_report if args.gpu else profile_mmdit if args.profile else cpu_table)(args)


if __name__ == "__main__":
    main()
