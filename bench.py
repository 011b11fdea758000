"""
Speed and memory, measured side by side in one run (targets live here, never in timed tests).

    python bench.py                 # MMDiT fwd+bwd: ours vs diffusers at the toy width, same weights and inputs
    python bench.py --batch 8 --repeats 10

Ratios, not absolute times, are what to compare across machines: both sides run interleaved in one process.
diffusers is a test-only dependency; without it the reference side is skipped.
"""
import argparse
import time
from dataclasses import asdict

import torch

import model as M
from sample import HelpFormatter


def timed(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]  # median


def bench_mmdit(args):
    cfg = M.PRESETS[args.preset]
    torch.manual_seed(0)
    ours = M.MMDiT(cfg).init_weights()
    for p in ours.parameters():  # non-trivial weights (init zeroes the modulation)
        p.data.add_(torch.randn_like(p) * 0.02)
    B, shapes = args.batch, [[(8, 8), (8, 4), (4, 8)]] * args.batch  # 128² target + two references, toy sizes
    N, L = sum(h * w for h, w in shapes[0]), 32
    x, txt = torch.randn(B, N, cfg.in_channels), torch.randn(B, L, cfg.joint_attention_dim)
    mask, t = torch.ones(B, L, dtype=torch.bool), torch.rand(B)
    rows = {}

    def step_ours():
        ours.zero_grad(set_to_none=True)
        ours(x, shapes, txt, mask, t).pow(2).mean().backward()

    try:
        from diffusers import QwenImageTransformer2DModel
    except ImportError:
        QwenImageTransformer2DModel = None
    if QwenImageTransformer2DModel is not None:
        ref = QwenImageTransformer2DModel(**asdict(cfg))
        ref.load_state_dict(ours.state_dict())
        img_shapes = [[(1, h, w) for h, w in s] for s in shapes]

        def step_ref():
            ref.zero_grad(set_to_none=True)
            ref(x, txt, mask, t, img_shapes=img_shapes).sample.pow(2).mean().backward()

        with torch.no_grad():
            diff = (ref(x, txt, mask, t, img_shapes=img_shapes).sample - ours(x, shapes, txt, mask, t)).abs().max()
        print(f"max |ours - diffusers| on this batch: {diff.item():.2e}")
    for _ in range(2):  # interleave to share the machine's state fairly
        rows.setdefault("ours", []).append(timed(step_ours, args.repeats))
        if QwenImageTransformer2DModel is not None:
            rows.setdefault("diffusers", []).append(timed(step_ref, args.repeats))
    params = sum(p.numel() for p in ours.parameters())
    print(f"MMDiT '{args.preset}' ({params / 1e6:.2f}M params), batch {B} × {N} image + {L} text tokens, fwd+bwd, "
          f"{torch.get_num_threads()} threads")
    best = {k: min(v) for k, v in rows.items()}
    for k, v in best.items():
        print(f"  {k:10s} {v * 1000:8.1f} ms/step  {B * N / v:10.0f} img tokens/s")
    if "diffusers" in best:
        print(f"  speed-up ours vs diffusers: {best['diffusers'] / best['ours']:.2f}×")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--preset", default="toy", choices=list(M.PRESETS), help="the MMDiT config (model.PRESETS)")
    p.add_argument("--batch", type=int, default=8, help="samples per step, each a 128² target and two references")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per measurement (the median is reported)")
    bench_mmdit(p.parse_args(argv))


if __name__ == "__main__":
    main()
