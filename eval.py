"""
ToyCom-Bench: MultiCom-Bench (paper §5.2, Table 2) on the toy world, with an exact programmatic judge.

The benchmark: 200 composition cases from the held-out seed BENCH_SEED (100 with 2–3 input images, 100 with 4–6)
plus an editing set (add / remove / replace / recolour / background, equally many).

The judge scores a generated image against the scene index (data.py), every score in [0, 1]. Each part is found
by nearest-neighbour classification of its region among exact renders of every candidate (2×2-pooled mean
squared error over the pixels where candidates differ); a region farther than TAU from all of them is
"unrecognised". Stages build on what was seen before, so one mistake costs one score: background, then identity
(judged outside the item regions), then items drawn on the background and person seen.
  adherence  share of the elements the instruction asks for that are right (an item at its position with its
             category and colour, a removed item gone, a new background); an item where none was asked for
             counts as one more wrong element: adherence = correct / (asked + spurious)
  identity   head shape, skin and shirt colour, 1/3 each
  quality    share of clean background pixels (within CLEAN of the exact target, away from edges)
  overall    sqrt(min(adherence, identity) · quality): the VIEScore combination MultiCom-Bench follows
  psnr       to the exact target, reported beside (not in overall)

    python eval.py --oracle exact        # judge sanity numbers: exact / blank / noise / shuffled targets / vae
    python eval.py --transformer assets/toy/transformer --steps 50 --cfg 4    # a model, through sample.py

API: judge(image, scene) -> dict; toycom_cases(n, n_edit) -> [case]; evaluate(generate_fn, cases, out_dir) -> table,
where generate_fn(list of cases) -> list of PIL images (e.g. the sampler); format_table(table) -> str.
"""
import argparse
import json
import math
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import pack
from data import (BENCH_SEED, CATS_AT, COLOURS, EDIT_OPS, HEADS, POSITIONS, SCENES, SHIRTS, SKINS, ToyWorld,
                  draw_scene, layout, paint_item)

TAU = 0.02  # a region is recognised only within this mean squared error (RGB in [0, 1], 2×2-pooled) of its
#             nearest candidate: below the 1/48 of 2×2-pooled uniform noise, above a 2× down-up blur
CLEAN = 0.1  # a background pixel is clean within this max-channel error
# judged regions in canonical 128-px coordinates (data.py layout); item regions are disjoint
REGIONS = {"head": (38, 0, 94, 28), "torso": (46, 54, 82, 92), "right_hand": (0, 38, 44, 95),
           "left_hand": (84, 38, 128, 95), "feet": (34, 95, 94, 128)}
COVERS = {p: [p] for p in REGIONS} | {"both_hands": ["right_hand", "left_hand"]}  # position -> its regions
FACE, SHIRT = (46, 24, 82, 55), (40, 50, 88, 96)
METRICS = ["adherence", "identity", "quality", "overall", "psnr"]

# -----------------------------------------------------------------------------
# the judge


def _array(img):
    return np.asarray(img)  # [H, W, 3] uint8


def _crop(x, box, size):  # canonical box -> the pixels of x [H, W, 3] inside it
    ox, oy, s = layout(size)
    x0, y0, x1, y1 = box
    return x[math.floor(oy + y0 * s):math.ceil(oy + y1 * s), math.floor(ox + x0 * s):math.ceil(ox + x1 * s)]


def _pool(x):  # [..., h, w, 3] -> [..., h/2, w/2, 3] float, 2×2 means: a little blur, matched on both sides
    h, w = x.shape[-3] // 2 * 2, x.shape[-2] // 2 * 2
    x = x[..., :h, :w, :].astype(np.float32)
    return x.reshape(*x.shape[:-3], h // 2, 2, w // 2, 2, 3).mean((-4, -2))


def nearest(g, cands):
    """Index of the candidate crop [h, w, 3] nearest to g, compared 2×2-pooled over the pixels where candidates
    differ; -1 if even that one is farther than TAU."""
    c = np.stack(cands)  # [N, h, w, 3] uint8
    mask = _pool(np.repeat((c.max(0) != c.min(0)).any(-1, keepdims=True), 3, -1))[..., 0] > 0  # [h/2, w/2]
    diff = _pool(c)[:, mask] - _pool(g)[mask]  # [N, M, 3]
    d = np.einsum("nmc,nmc->n", diff, diff) / (diff[0].size * 255 ** 2)  # [N] mean squared error in [0, 1]
    k = int(d.argmin())
    return k if d[k] <= TAU else -1


def judge(image, scene):
    """Score one generated image against its scene index; see the module docstring."""
    size, bg, person, items = tuple(scene["size"]), scene["background"], scene["person"], scene["items"]
    img = pack.to_rgb(image)
    g = _array(img if img.size == size else img.resize(size, Image.BICUBIC))

    def render(bg=bg, person=person, items=items):
        return _array(draw_scene(size, bg, person, items))

    # Each stage is judged on what the earlier ones saw, so that one mistake costs one score: a wrong
    # background does not also cost the items, a wrong shirt does not also cost the bag on it.
    # 1. background, over the pixels where the backgrounds differ
    k = nearest(g, [render(bg=b) for b in SCENES])
    seen_bg, credit = list(SCENES)[k] if k >= 0 else bg, {}
    if "background" in scene["checked"]:
        credit["background"] = k >= 0 and seen_bg == bg

    # 2. identity: head shape and skin jointly from the face, shirt colour from the torso, only outside the
    # item regions (the candidates take the generated pixels there)
    in_items = np.zeros(g.shape[:2], dtype=bool)
    for box in REGIONS.values():
        _crop(in_items, box, size)[...] = True

    def person_crop(box, **change):
        return _crop(np.where(in_items[..., None], g, render(seen_bg, person | change)), box, size)
    faces = [(h, s) for h in HEADS for s in SKINS]
    k = nearest(_crop(g, FACE, size), [person_crop(FACE, head=h, skin=s) for h, s in faces])
    seen = dict(zip(("head", "skin"), faces[k])) if k >= 0 else {}
    k = nearest(_crop(g, SHIRT, size), [person_crop(SHIRT, shirt=c) for c in SHIRTS])
    seen |= {"shirt": list(SHIRTS)[k]} if k >= 0 else {}
    identity = sum(seen.get(a) == person[a] for a in ("head", "skin", "shirt")) / 3

    # 3. items: classify every region among empty + each item that fits there. Items never leave their region
    # (tested), so a candidate is the person seen plus that one item, drawn over a copy of one base render.
    seen_person = person | seen
    base, tf, behind = draw_scene(size, seen_bg, seen_person), layout(size), {}

    def with_item(p, cat, colour):
        if p == "both_hands":  # held behind the body: a full render, shared by both hand regions
            if (cat, colour) not in behind:
                behind[cat, colour] = render(seen_bg, seen_person, {p: [cat, colour]})
            return behind[cat, colour]
        im = base.copy()
        paint_item(ImageDraw.Draw(im), tf, cat, colour, p)
        return _array(im)

    got, expect = {}, {}
    for r, box in REGIONS.items():
        cands = [None] + [(p, cat, c) for p in POSITIONS if r in COVERS[p] for cat in CATS_AT[p] for c in COLOURS]
        crops = [_crop(with_item(*c) if c else _array(base), box, size) for c in cands]
        k = nearest(_crop(g, box, size), crops)
        got[r] = cands[k] if k >= 0 else "unrecognised"
        expect[r] = next(((p, *v) for p, v in items.items() if r in COVERS[p]), None)
    asked = [p for p in scene["checked"] if p != "background"]
    credit |= {p: all(got[r] == expect[r] for r in COVERS[p]) for p in asked}
    spurious = [r for r in REGIONS if all(r not in COVERS[p] for p in asked) and got[r] != expect[r]]
    adherence = sum(credit.values()) / max(1, len(credit) + len(spurious))

    # quality: clean background pixels, at least ~3 px (canonical) away from any edge; PSNR to the exact target
    t, g = render(), g.astype(np.float32)
    plain = (t == render(person=None, items={})).all(-1)
    t = t.astype(np.float32)
    r = 2 * round(3 * min(size) / 128) + 1
    plain = np.asarray(Image.fromarray(plain.astype(np.uint8) * 255).filter(ImageFilter.MinFilter(r))) > 0
    quality = float((np.abs(g - t).max(-1)[plain] <= 255 * CLEAN).mean()) if plain.any() else 1.0
    psnr = 10 * math.log10(255 ** 2 / max(float(((g - t) ** 2).mean()), 255 ** 2 * 1e-10))  # at most 100 dB
    overall = math.sqrt(min(adherence, identity) * quality)
    return dict(adherence=adherence, identity=identity, quality=quality, psnr=psnr, overall=overall,
                items=credit, spurious=spurious)

# -----------------------------------------------------------------------------
# the benchmark, its table, oracles


def toycom_cases(n=200, n_edit=100, seed=BENCH_SEED):
    """The fixed benchmark: n compositions (first half 2–3 inputs, second half 4–6), then n_edit edits
    cycling through the edit ops. Each case: input_images, output_image, instruction, scene, group, index."""
    world = ToyWorld(seed, held_out=True)
    cases = []
    for j in range(n):
        small = j < n // 2
        s = world.sample(j, kind="compose", n_inputs=2 + j % 2 if small else 4 + j % 3)
        cases.append(s | dict(group="2-3 images" if small else "4-6 images"))
    for j in range(n_edit):
        op = EDIT_OPS[j % len(EDIT_OPS)]
        cases.append(world.sample(100_000 + j, kind="edit", op=op) | dict(group=op))
    return [c | dict(index=i) for i, c in enumerate(cases)]


def _means(scores):
    return {m: float(np.mean([s[m] for s in scores])) for m in METRICS} | dict(n=len(scores))


def make_table(cases, scores):
    """Table 2 shape: composition 2–3 | 4–6 | overall, and editing by op | overall."""
    table = {}
    for name, groups in (("composition", ["2-3 images", "4-6 images"]), ("editing", EDIT_OPS)):
        part = {g: _means(sel) for g in groups if (sel := [s for c, s in zip(cases, scores) if c["group"] == g])}
        if part:
            table[name] = part | dict(overall=_means([s for c, s in zip(cases, scores) if c["group"] in groups]))
    return table


def format_table(table):
    lines = []
    for name, part in table.items():
        lines.append(f"{'ToyCom-Bench ' + name:<26}" + "".join(f"{g:>12}" for g in part))
        for m in METRICS:
            lines.append(f"{m:<26}" + "".join(f"{v[m]:>12.4f}" for v in part.values()))
        lines.append(f"{'cases':<26}" + "".join(f"{v['n']:>12}" for v in part.values()))
    return "\n".join(lines)


def save_grid(rows, path, h=96, pad=4):
    """rows: lists of PIL images -> one PNG, every image scaled to height h."""
    rows = [[im.resize((max(1, round(im.width * h / im.height)), h)) for im in row] for row in rows]
    W = max(sum(im.width + pad for im in row) for row in rows)
    grid = Image.new("RGB", (W, len(rows) * (h + pad)), (255, 255, 255))
    for j, row in enumerate(rows):
        x = 0
        for im in row:
            grid.paste(im, (x, j * (h + pad)))
            x += im.width + pad
    grid.save(path)


def evaluate(generate_fn, cases, out_dir=None, batch_size=16, n_grid=8):
    """Generate and judge every case; write table.json, scores.jsonl and grid.png (inputs | generated | target)
    to out_dir if given; return the table. generate_fn(batch of cases) -> one PIL image per case, ideally at
    case["scene"]["size"] (other sizes are resized by the judge)."""
    images, scores = [], []
    for b in tqdm(range(0, len(cases), batch_size), desc="toycom", disable=len(cases) <= batch_size):
        batch = cases[b:b + batch_size]
        out = generate_fn(batch)
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} images for {len(batch)} cases")
        images += out
        scores += [judge(im, c["scene"]) for im, c in zip(images[b:], batch)]
    table = make_table(cases, scores)
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "table.json"), "w") as f:
            json.dump(table, f, indent=1)
        with open(os.path.join(out_dir, "scores.jsonl"), "w") as f:
            for c, s in zip(cases, scores):
                f.write(json.dumps(dict(index=c["index"], group=c["group"], instruction=c["instruction"]) | s) + "\n")
        picks = np.linspace(0, len(cases) - 1, min(n_grid, len(cases))).round().astype(int)
        save_grid([cases[i]["input_images"] + [images[i], cases[i]["output_image"]] for i in picks],
                  os.path.join(out_dir, "grid.png"))
    return table


def oracle(name, cases):
    """A generate_fn for judge sanity: the exact target, a blank (white) image, uniform noise, or the target
    of another case (shuffled by half the benchmark)."""
    def generate(batch):
        out = []
        for c in batch:
            size = tuple(c["scene"]["size"])
            if name == "exact":
                out.append(c["output_image"])
            elif name == "blank":
                out.append(Image.new("RGB", size, (255, 255, 255)))
            elif name == "noise":
                noise = np.random.default_rng(c["index"]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
                out.append(Image.fromarray(noise))
            elif name == "shuffled":
                out.append(cases[(c["index"] + len(cases) // 2) % len(cases)]["output_image"].resize(size))
            else:
                raise ValueError(f"unknown oracle {name!r}")
        return out
    return generate


def model_generate(pipe, steps, cfg, sampler=None, seed=0):
    """A generate_fn that runs the sampler (sample.py) on a batch of cases, at each case's target size."""
    import sample

    def generate(batch):
        out = []
        for size in sorted({tuple(c["scene"]["size"]) for c in batch}):  # one call per output size
            sub = [c for c in batch if tuple(c["scene"]["size"]) == size]
            ims = sample.generate(pipe, [c["instruction"] for c in sub], [c["input_images"] for c in sub], steps=steps,
                                  cfg=cfg, sampler=sampler, seed=seed, width=size[0], height=size[1], progress=False)
            out += list(zip([c["index"] for c in sub], ims))
        order = {i: im for i, im in out}
        return [order[c["index"]] for c in batch]

    return generate


def vae_generate(vae):
    """A generate_fn returning the VAE reconstruction of the exact target: the ceiling the VAE puts on any model."""
    import torch

    @torch.no_grad()
    def generate(batch):
        return [pack.tensor_to_image(vae.decode(vae.encode(pack.image_to_tensor(c["output_image"])[None]))[0]) for c in batch]

    return generate


def main(argv=None):
    import sample

    p = argparse.ArgumentParser(description="ToyCom-Bench: judge generated images on the held-out toy benchmark.")
    p.add_argument("--transformer", help="judge this transformer folder (sampled with sample.py); default: an oracle")
    p.add_argument("--ckpt", default=sample.TOY_CKPT, help="pipeline root with vae/ and text_encoder/")
    p.add_argument("--steps", type=int, help="sampler steps (default 50 euler / 8 fewstep)")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--sampler", choices=["euler", "fewstep"])
    p.add_argument("--oracle", choices=["exact", "blank", "noise", "shuffled", "vae"], default="exact",
                   help="without --transformer: judge the exact targets, blanks, noise, another case's target, or "
                        "the VAE reconstruction of the target")
    p.add_argument("--n", type=int, default=200, help="composition cases (half 2-3, half 4-6 inputs)")
    p.add_argument("--n_edit", type=int, default=100, help="editing cases")
    p.add_argument("--out", default="out/eval")
    args = p.parse_args(argv)
    cases = toycom_cases(args.n, args.n_edit)
    try:
        if args.transformer:
            pipe = sample.load_pipeline(args.ckpt, args.transformer)
            generate_fn = model_generate(pipe, args.steps, args.cfg, args.sampler)
        elif args.oracle == "vae":
            import vae

            generate_fn = vae_generate(vae.load_vae(os.path.join(args.ckpt, "vae")))
        else:
            generate_fn = oracle(args.oracle, cases)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    table = evaluate(generate_fn, cases, args.out)
    print(format_table(table))
    print(f"wrote {args.out}/table.json, scores.jsonl, grid.png")
    return table


if __name__ == "__main__":
    main()
