r"""
Rebuild the whole toy pipeline from nothing and print the results table — the method end to end:

    python reproduce.py                  # ≈ 4.4 h on a 2-core CPU: assets → latent cache → FM → CM → DMD → eval
    python reproduce.py --quick          # the same models, judged on the quick bench subset (40 + 10 cases)
    python reproduce.py --tiny           # seconds: every stage at toy-of-toy size (what tests/test_reproduce.py runs)

Stages (each one a command you could type; each is skipped when its output exists, so an interrupted run
continues with the same command):
  1. assets   python toy_assets.py OUT/toy               tokenizer, frozen text encoder, VAE fitted on toy crops
  2. teacher  train_fm.py  --data toy:posed …            flow matching (Eq. 1), latent cache built on the way
              train_fm.py  --init (its bf16 export) …    the v3.1 continuation: 10,000 more steps from lr 1e-3
              train_fm.py  --init OUT/teacher_v31 …      v3.2, the committed teacher: 12,500 more from lr 1e-3
  3. cm       train_cm.py  --init OUT/toy/transformer    consistency tuning (Eq. 11), from the v3.2 teacher
  4. dmd      train_dmd.py --init OUT/toy/transformer_cm distribution matching (Eq. 12–14), v3.2 teacher frozen
  5. eval     eval.py for each: teacher 50 Euler steps at CFG 2 (100 NFE), CM and DMD 8 few-step steps (8 NFE)
Every trained model is exported in bf16 into the pipeline folder OUT/toy (transformer/, transformer_cm/,
transformer_dmd/), the layout of the committed assets/toy, so `python sample.py --ckpt OUT/toy` samples its default.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import torch
from PIL import Image

import eval as E
import model as M
import sample as S

HERE = os.path.dirname(os.path.abspath(__file__))

# the committed recipe (README "How to train"); --tiny swaps in the sizes of a smoke test
FULL = dict(
    assets=["--vae_steps", "1600"],
    teacher=["--data", "toy:posed", "--n_data", "12000", "--preset", "toy-144", "--compile", "true", "--steps", "16000",
             "--lr", "3e-3", "--lr_min", "3e-5", "--warmup", "100", "--eval_cases", "0"],
    teacher2=["--data", "toy:posed", "--n_data", "12000", "--compile", "true", "--steps", "10000", "--lr", "1e-3",
              "--lr_min", "3e-5", "--warmup", "100", "--eval_cases", "0"],  # v3.1: v3 trained on, a second cosine
    teacher3=["--data", "toy:posed", "--n_data", "12000", "--compile", "true", "--steps", "12500", "--lr", "1e-3",
              "--lr_min", "3e-5", "--warmup", "100", "--eval_cases", "0"],  # v3.2: v3.1 trained on, a third cosine
    cm=["--data", "toy:posed", "--n_data", "12000", "--guidance", "0.5", "--steps", "600", "--eval_cases", "0"],
    dmd=["--data", "toy:posed", "--n_data", "12000", "--steps", "200", "--micro_batch", "4", "--eval_cases", "0"],
    bench=[],  # the full ToyCom-Bench v2: 200 composition + 100 editing cases
)
QUICK_BENCH = ["--n", "40", "--n_edit", "10"]
TINY = dict(
    assets=["--vae_steps", "4"],
    teacher=["--data", "toy:posed", "--n_data", "8", "--steps", "2", "--batch", "4", "--micro_batch", "2",
             "--preset", "tiny", "--eval_cases", "0", "--warmup", "1"],
    teacher2=["--data", "toy:posed", "--n_data", "8", "--steps", "2", "--batch", "4", "--micro_batch", "2",
              "--eval_cases", "0", "--warmup", "1"],
    teacher3=["--data", "toy:posed", "--n_data", "8", "--steps", "2", "--batch", "4", "--micro_batch", "2",
              "--eval_cases", "0", "--warmup", "1"],
    cm=["--data", "toy:posed", "--n_data", "8", "--steps", "2", "--batch", "4", "--micro_batch", "2", "--eval_cases", "0",
        "--warmup", "1"],
    dmd=["--data", "toy:posed", "--n_data", "8", "--steps", "2", "--batch", "4", "--micro_batch", "2", "--max_gen_steps", "2",
         "--eval_cases", "0"],
    bench=["--n", "2", "--n_edit", "1"],
)
DEFAULT = "transformer_cm"  # the pipeline's default transformer
ROWS = [  # (model, folder in the pipeline, sampler steps, network evaluations per image)
    ("teacher, Euler, CFG 2", "transformer", 50, 100),
    ("CM, few-step", "transformer_cm", 8, 8),
    ("DMD, few-step", "transformer_dmd", 8, 8),
]


def run(cmd, log):
    """Run one stage's command with its output teed to a log file; stop everything if it fails."""
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in p.stdout:
            sys.stdout.write(line)
            f.write(line)
        if p.wait() != 0:
            raise SystemExit(f"error: stage failed (exit {p.returncode}): {' '.join(cmd)}; log: {log}")


def trainer(script, procs):
    """torchrun with `procs` gloo processes (a plain process for one)."""
    if procs == 1:
        return [sys.executable, script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}", script]


def export_bf16(run_dir, dst):
    """The run's EMA weights → a bf16 transformer folder of the pipeline (official layout, same _name_or_path)."""
    src = os.path.join(run_dir, "ema_transformer")
    name = json.load(open(os.path.join(src, "config.json"))).get("_name_or_path", "")
    shutil.rmtree(dst, ignore_errors=True)
    M.save_mmdit(M.load_mmdit(src).to(torch.bfloat16), dst, name_or_path=name)


def results_table(tables, tiny=False):
    """ToyCom-Bench in the shape of the paper's Table 2: composition 2–3 | 4–6 | overall, editing overall."""
    cell = lambda d: f"{d['overall']:.3f} ± {d['overall_se']:.3f}"  # noqa: E731
    lines = ["| model | steps | NFE | 2–3 images | 4–6 images | composition | all-correct | editing | s / image |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, _, steps, nfe), t in zip(ROWS, tables):
        steps, nfe = (2, nfe * 2 // steps) if tiny else (steps, nfe)
        c, e = t["composition"], t["editing"]["overall"]
        lines.append(f"| {name} | {steps} | {nfe} | {cell(c['2-3 images'])} | {cell(c['4-6 images'])} | "
                     f"{cell(c['overall'])} | {c['overall']['all_correct']:.3f} | {cell(e)} | {t['seconds_per_case']:.3f} |")
    return "\n".join(lines)


def figure(pipe_dir, path, cases=(0, 100, 200)):
    """A few held-out bench cases, one row each: the inputs | teacher (100 NFE) | CM (8) | DMD (8) | exact target."""
    bench = E.toycom_cases()
    rows = []
    for i in cases:
        c = bench[i]
        outs = []
        for _, folder, steps, _ in ROWS:
            pipe = S.load_pipeline(pipe_dir, transformer=os.path.join(pipe_dir, folder))
            outs.append(S.generate(pipe, [c["instruction"]], [c["input_images"]], steps=steps, cfg=pipe.default_cfg(),
                                   width=c["scene"]["size"][0], height=c["scene"]["size"][1], progress=False)[0])
        labels = [f"Image{k}" for k in range(1, len(c["input_images"]) + 1)] + ["teacher 100 NFE", "CM 8", "DMD 8", "target"]
        target = c["output_image"]
        target = target.resize((round(target.width * 96 / target.height), 96))
        rows.append(S.grid(c["input_images"] + outs, target, size=96, labels=labels))
    canvas = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 6 for r in rows)), "white")
    y = 0
    for r in rows:
        canvas.paste(r, (0, y))
        y += r.height + 6
    S.save_png(canvas, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=S.HelpFormatter)
    p.add_argument("--out", default="runs/reproduce", help="everything goes here")
    p.add_argument("--procs", type=int, default=2, help="training processes (gloo on CPU)")
    p.add_argument("--quick", action="store_true", help="judge on the quick bench subset (40 + 10 cases)")
    p.add_argument("--tiny", action="store_true", help="smoke test: every stage at toy-of-toy size, seconds")
    args = p.parse_args(argv)
    if args.procs < 1:
        raise SystemExit(f"error: --procs must be >= 1, not {args.procs}")
    recipe = TINY if args.tiny else FULL
    bench = recipe["bench"] or (QUICK_BENCH if args.quick else [])
    out = os.path.abspath(args.out)
    pipe = os.path.join(out, "toy")
    os.makedirs(out, exist_ok=True)
    cache = ["--cache", os.path.join(out, "cache"), "--assets", pipe]
    v31 = os.path.join(out, "teacher_v31")
    stages = [
        ("assets", os.path.join(pipe, "model_index.json"),
         [sys.executable, "toy_assets.py", pipe] + recipe["assets"], None),
        ("teacher", os.path.join(out, "teacher_v3"),
         trainer("train_fm.py", args.procs) + recipe["teacher"] + cache + ["--out", os.path.join(out, "fm")], "fm"),
        ("teacher2", v31,
         trainer("train_fm.py", args.procs) + recipe["teacher2"] + cache + ["--out", os.path.join(out, "fm2"),
                                                                            "--init", os.path.join(out, "teacher_v3")],
         "fm2"),
        ("teacher3", os.path.join(pipe, "transformer"),
         trainer("train_fm.py", args.procs) + recipe["teacher3"] + cache + ["--out", os.path.join(out, "fm3"),
                                                                            "--init", v31], "fm3"),
        ("cm", os.path.join(pipe, "transformer_cm"),
         trainer("train_cm.py", args.procs) + recipe["cm"] + cache + ["--out", os.path.join(out, "cm"),
                                                                      "--init", os.path.join(pipe, "transformer")], "cm"),
        ("dmd", os.path.join(pipe, "transformer_dmd"),
         trainer("train_dmd.py", args.procs) + recipe["dmd"] + cache +
         ["--out", os.path.join(out, "dmd"), "--teacher", os.path.join(pipe, "transformer"),
          "--init", os.path.join(pipe, "transformer_cm")], "dmd"),
    ]
    times = {}
    for name, done, cmd, run_dir in stages:
        if os.path.exists(done):
            print(f"== {name}: {done} exists, skipped")
            continue
        print(f"== {name}")
        t0 = time.time()
        run(cmd, os.path.join(out, f"{name}.log"))
        if run_dir:
            export_bf16(os.path.join(out, run_dir), done)
        times[name] = time.time() - t0
    index_path = os.path.join(pipe, "model_index.json")
    index = json.load(open(index_path))
    # `python sample.py --ckpt OUT/toy` samples the best 8-step model on validation: CM since the v3 teacher (DMD
    # pulls towards the teacher's distribution, which scores below its CM student; README "Results")
    index["nanounipic_default_transformer"] = DEFAULT
    M.atomic_write(index_path, json.dumps(index, indent=2))

    tables = []
    for name, folder, steps, _ in ROWS:
        dst = os.path.join(out, "eval", folder)
        if not os.path.exists(os.path.join(dst, "table.json")):
            t0 = time.time()
            run([sys.executable, "eval.py", "--ckpt", pipe, "--transformer", os.path.join(pipe, folder),
                 "--steps", str(2 if args.tiny else steps), "--out", dst] + bench, os.path.join(out, "eval.log"))
            times[f"eval {folder}"] = time.time() - t0
        tables.append(json.load(open(os.path.join(dst, "table.json"))))
    table = results_table(tables, args.tiny)
    figure(pipe, os.path.join(out, "results.png"), cases=(0,) if args.tiny else (0, 100, 200))
    total = sum(times.values())
    lines = [f"{k}: {v / 60:.1f} min ({v / max(total, 1e-9):.0%})" for k, v in times.items()]
    report = table + "\n\nwall time of this run: " + (f"{total / 60:.1f} min — " + "; ".join(lines) if times else "all stages reused")
    M.atomic_write(os.path.join(out, "results.md"), report + "\n")
    print("\n" + report + f"\n\nwrote {os.path.join(out, 'results.md')}")


if __name__ == "__main__":
    main()
