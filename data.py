"""
Data for nanoUniPic (paper §4.1): the official jsonl triplets, a toy world that writes them, and latent caches.

Official format, one json object per line, image paths relative to the jsonl's folder:
    {"input_images": ["a.png", "b.png"], "output_image": "t.png", "instruction": "..."}
The toy world adds a "scene" key: the exact index of what the target contains, read by the judge in eval.py.

The toy world stands in for the paper's pipeline (CC12M persons, Qwen-Image objects, a curated HOI conflict
matrix, Nano-Banana / Seedream targets) with exact ground truth: a person (identity: head shape × skin × shirt)
under a layout the inputs do not fix (v2: placement, scale, pose, horizon, sun; ToyWorld.layout); 14 item categories at the HOI positions head / torso / right_hand /
left_hand / both_hands / feet in 6 colours, sampled under the conflict matrix; 6 backgrounds. Composition: 2–6
sources (the person on its own background, one image per item, maybe a scene), each rendered alone at its own
random size and aspect. Editing: one full scene + add / remove / replace / recolour an item or change the
background. Instructions name the inputs Image1..ImageK, as the official demo prompts do.

API
  ToyWorld(seed, cfg).scene(i) -> scene dict (json-able, deterministic in (seed, i)); .sample(i) -> dict(
      input_images=[PIL], output_image=PIL, instruction=str, scene=dict), sources at their own random sizes.
  draw_scene(size, background, person, items) -> PIL, the renderer the judge also uses.
  ToyDataset(n, seed) and JsonlDataset(path) -> the same dict, resized by the joint pixel-budget rule (pack.py);
      use DataLoader(ds, batch_size=B, collate_fn=list): every sample keeps its own shapes.
  write_jsonl(folder, n, seed), instruction_corpus(n, seed), cache_latents(...) + LatentDataset(path).
Seeds: training uses seeds in [0, BENCH_SEED); ToyCom-Bench (eval.py) draws from BENCH_SEED, held out.

    python data.py --out data_cache/toy --n 1000        # writes a toy jsonl dataset, prints samples/s
    python data.py --assets assets/toy                  # rebuilds the toy tokenizer, text encoder and VAE
"""
import argparse
import itertools
import json
import math
import os
import random
import re
import time
import unicodedata
import warnings
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import model as M
import pack
import text_encoder as TE
import vae as V

TOY_BUDGET = 128 * 128  # toy pixel budget: all references together, and the target on its own
TOY_SIZE = (128, 128)  # default target (W, H): a 16×16 latent, 8×8 = 64 tokens after 2×2 packing
OUT_SIZES = [(128, 128), (160, 96), (96, 160), (144, 112), (112, 144)]  # mixed-shape targets within the budget
WORLD_VERSION = 3  # part of every latent-cache fingerprint: a changed world is never served from an old cache
#   (v3: every edit's layout is drawn "posed", in training and in the bench alike)
TRAIN_SEED = 0  # training worlds use seeds in [0, BENCH_SEED)
BENCH_SEED = 1_000_000  # ToyCom-Bench draws from seeds >= BENCH_SEED: held out from training
VAL_SEED = 2_000_000  # the validation split (training-time monitoring, recipe choices): held out, not the bench
EXAMPLE_SEED = 999_997  # sample.py's built-in example (sample 0: a 3-image composition); training uses small seeds
MAX_IMAGES = 6  # official limit on input images
MAX_PIXELS = 4096 * 4096  # larger images are skipped by the loader

# -----------------------------------------------------------------------------
# the world: palette, identities, scenes, items, the HOI conflict matrix

COLOURS = {"red": (230, 30, 30), "orange": (255, 140, 0), "yellow": (250, 220, 0), "green": (30, 170, 50),
           "blue": (30, 80, 230), "purple": (150, 50, 200)}
HEADS = ["round", "square", "triangle"]
SKINS = {"peach": (255, 214, 170), "tan": (222, 170, 120), "brown": (160, 105, 65), "deep": (95, 60, 40)}
SHIRTS = {"grey": (140, 140, 140), "teal": (0, 128, 128), "maroon": (128, 30, 60), "navy": (40, 50, 120),
          "olive": (110, 120, 40)}
SCENES = {  # name: (top colour, bottom colour below 62% of the height or None, phrase)
    "studio": ((200, 200, 200), None, "a plain studio"),
    "beach": ((120, 190, 235), (235, 210, 150), "a sunny beach"),
    "park": ((190, 225, 245), (110, 180, 90), "a grassy park"),
    "night": ((30, 35, 70), None, "a night sky"),
    "sunset": ((250, 170, 120), (170, 110, 160), "a sunset"),
    "snow": ((160, 175, 200), (245, 245, 250), "a snowy field"),
}
INK, LEGS, WHITE = (25, 25, 25), (70, 70, 80), (255, 255, 255)

POSITIONS = ["head", "torso", "right_hand", "left_hand", "both_hands", "feet"]
# The HOI conflict matrix (paper §4.1), over positions: True = two items there cannot be worn together.
CONFLICT = np.array([
    # hd    to     rh     lh     bh     ft
    [True, False, False, False, False, False],  # head: one hat
    [False, True, False, False, False, False],  # torso: one bag / medal / bow tie
    [False, False, True, False, True, False],  # right hand: one item, not with a two-handed one
    [False, False, False, True, True, False],  # left hand: likewise
    [False, False, True, True, True, False],  # both hands: excludes each hand
    [False, False, False, False, False, True],  # feet: no two footwear
])
CATEGORIES = {"top hat": "head", "cap": "head", "crown": "head", "bag": "torso", "medal": "torso",
              "bow tie": "torso", "balloon": "hand", "flag": "hand", "book": "hand", "banner": "both_hands",
              "barbell": "both_hands", "boots": "feet", "sneakers": "feet", "flippers": "feet"}
CATS_AT = {p: [c for c, s in CATEGORIES.items() if s == p or (s == "hand" and p.endswith("_hand"))]
           for p in POSITIONS}
HANDS = {"right_hand": (22, 76), "left_hand": (106, 76)}  # the person faces us: their right hand is image-left
# item drawings in canonical 128-px coordinates: (primitive, coords, filled with the item colour, else ink);
# hand items are relative to the hand centre, +x pointing away from the body
ITEM_SHAPES = {
    "top hat": [("rect", (52, 1, 76, 21), 1), ("rect", (42, 19, 86, 26), 1)],
    "cap": [("chord", (46, 6, 82, 42), 1), ("rect", (74, 19, 91, 25), 1)],
    "crown": [("poly", (48, 26, 48, 4, 56, 14, 64, 2, 72, 14, 80, 4, 80, 26), 1)],
    "bag": [("arc", (56, 56, 72, 72), 0), ("rect", (50, 64, 78, 90), 1)],
    "medal": [("poly", (56, 56, 72, 56, 64, 70), 1), ("ellipse", (52, 63, 76, 87), 1)],
    "bow tie": [("poly", (48, 60, 64, 73, 48, 86), 1), ("poly", (80, 60, 64, 73, 80, 86), 1),
                ("ellipse", (59, 68, 69, 78), 1)],
    "balloon": [("line", (0, 0, 4, -12), 0), ("ellipse", (-7, -36, 15, -12), 1)],
    "flag": [("rect", (-1, -32, 1, 12), 0), ("poly", (0, -32, 0, -8, 19, -20), 1)],
    "book": [("rect", (-13, -4, 13, 14), 1), ("line", (0, -4, 0, 14), 0)],
    "banner": [("rect", (4, 60, 124, 84), 1)],
    "barbell": [("rect", (10, 73, 118, 79), 0), ("ellipse", (1, 63, 27, 89), 1), ("ellipse", (101, 63, 127, 89), 1)],
    "boots": [("rect", (47, 96, 63, 124), 1), ("rect", (65, 96, 81, 124), 1)],
    "sneakers": [("round", (40, 106, 63, 124), 1), ("round", (65, 106, 88, 124), 1)],
    "flippers": [("poly", (50, 106, 62, 106, 66, 127, 36, 127), 1), ("poly", (66, 106, 78, 106, 92, 127, 62, 127), 1)],
}
HEAD_SHAPES = {"round": ("ellipse", (50, 26, 78, 52)), "square": ("rect", (51, 27, 77, 51)),
               "triangle": ("poly", (48, 27, 80, 27, 64, 54))}


def valid(positions):
    """True if no two of these item positions conflict (and none repeats)."""
    return not any(CONFLICT[POSITIONS.index(p), POSITIONS.index(q)] for p, q in itertools.combinations(positions, 2))


VALID_SETS = [s for r in range(len(POSITIONS) + 1) for s in itertools.combinations(POSITIONS, r) if valid(s)]

# -----------------------------------------------------------------------------
# rendering. The person is drawn in canonical 128-px coordinates under a transform tf = (ox, oy, s): a canonical
# point (x, y) lands on pixel (ox + s·x, oy + s·y). A layout fixes what the inputs do not (ToyWorld v2): the
# transform (placement and scale), the pose (each hand's height) and background details (horizon, a sun).

HAND_Y = 76  # canonical hand height of the default pose; a layout moves each hand within HAND_YS
HAND_YS = list(range(66, 80, 2))  # arm angles: hand heights, keeping every hand item inside its judged region
BOTH_HAND_YS = list(range(70, 80, 2))  # with a two-handed item both hands share one height in this range
SCALES = [round(0.78 + 0.02 * k, 2) for k in range(9)]  # person scale, a share of min(W, H): 0.78 .. 0.94
HORIZON = (0.5, 0.75)  # horizon row as a share of H, for scenes with a ground colour (default 0.62)
SUN = (255, 250, 215)  # a pale disk somewhere in the sky; no item, skin or ground colour is near it
SUN_R = 0.06  # its radius as a share of min(W, H)
# How a target layout is drawn. "free" is ToyWorld v2 (placement anywhere it fits, 9 scales, 7 hand heights,
# horizon and sun anywhere): the bench and the judge use it. "posed" draws a subset of the same valid layouts —
# the person centred at scale 0.94 (near its reference's full frame), 3 hand heights per hand, horizon and sun on
# the 8-px grid of latent pixels — and is what the toy teachers train on: on "free" data a 1.4M-parameter teacher
# never learned to carry the person's colours from a reference to a freely placed and scaled copy, and sampled a
# patchwork (README, "Status"). Its outputs still differ in pose, horizon and sun; the judge accepts any valid layout.
LAYOUTS = {"free": dict(step=1, scales=SCALES, hands=HAND_YS, both=BOTH_HAND_YS),
           "posed": dict(step=8, scales=SCALES[-1:], hands=HAND_YS[::3], both=BOTH_HAND_YS[::2], centred=True)}


def _map(tf, xy):  # canonical (x0, y0, x1, y1, ...) -> pixels under tf = (ox, oy, scale)
    return [v * tf[2] + tf[j % 2] for j, v in enumerate(xy)]


def _box(pts):  # two mapped corners -> a PIL box with x0 <= x1, y0 <= y1
    return [min(pts[0], pts[2]), min(pts[1], pts[3]), max(pts[0], pts[2]), max(pts[1], pts[3])]


def _paint(d, tf, kind, xy, fill):
    pts, lw = _map(tf, xy), max(1, round(1.5 * tf[2]))
    if kind == "rect":
        d.rectangle(_box(pts), fill=fill, outline=INK, width=lw)
    elif kind == "round":
        d.rounded_rectangle(_box(pts), radius=5 * tf[2], fill=fill, outline=INK, width=lw)
    elif kind == "ellipse":
        d.ellipse(_box(pts), fill=fill, outline=INK, width=lw)
    elif kind == "chord":
        d.chord(_box(pts), 180, 360, fill=fill, outline=INK, width=lw)
    elif kind == "arc":
        d.arc(_box(pts), 180, 360, fill=INK, width=2 * lw)
    elif kind == "line":
        d.line(pts, fill=INK, width=lw)
    else:
        d.polygon(pts, fill=fill, outline=INK, width=lw)


def hand_centres(hands=(HAND_Y, HAND_Y)):
    """Canonical centres of the right and left hand for hand heights (right, left)."""
    return {"right_hand": (HANDS["right_hand"][0], hands[0]), "left_hand": (HANDS["left_hand"][0], hands[1])}


def item_shapes(cat, position, hands=(HAND_Y, HAND_Y)):
    """The item's primitives in absolute canonical coordinates at its position: hand items mirrored outward
    around their hand, two-handed items moved with the (shared) hand height."""
    hx, hy = hand_centres(hands).get(position, (0, 0))
    out = -1 if hx < 64 else 1
    for kind, xy, filled in ITEM_SHAPES[cat]:
        if CATEGORIES[cat] == "hand":
            xy = [hx + out * v if j % 2 == 0 else hy + v for j, v in enumerate(xy)]
        elif position == "both_hands":
            xy = [v if j % 2 == 0 else v + hands[0] - HAND_Y for j, v in enumerate(xy)]
        yield kind, xy, filled


def paint_item(d, tf, cat, colour, position, hands=(HAND_Y, HAND_Y)):
    for kind, xy, filled in item_shapes(cat, position, hands):
        _paint(d, tf, kind, xy, COLOURS[colour] if filled else INK)


def paint_person(d, tf, person, hands=(HAND_Y, HAND_Y)):
    skin, s = SKINS[person["skin"]], tf[2]
    for box in ((50, 92, 62, 112), (66, 92, 78, 112)):
        d.rectangle(_box(_map(tf, box)), fill=LEGS)
    for box in ((46, 108, 62, 116), (66, 108, 82, 116)):  # bare feet
        _paint(d, tf, "ellipse", box, skin)
    for hx, hy in hand_centres(hands).values():
        d.line(_map(tf, (64, 62, hx, hy)), fill=skin, width=max(1, round(7 * s)))
        _paint(d, tf, "ellipse", (hx - 6, hy - 6, hx + 6, hy + 6), skin)
    _paint(d, tf, "rect", (42, 52, 86, 94), SHIRTS[person["shirt"]])
    _paint(d, tf, *HEAD_SHAPES[person["head"]], skin)
    for x in (58, 70):  # eyes
        d.ellipse(_box(_map(tf, (x - 2, 33, x + 2, 37))), fill=INK)


def default_layout(size):
    """ToyWorld v1's fixed layout: the person filling the centred min(W, H) square, default pose, horizon at
    62%, no sun. Source images use it; v2 targets draw a random one (ToyWorld.layout)."""
    S = min(size)
    return dict(x=(size[0] - S) / 2, y=(size[1] - S) / 2, scale=1.0, hands=[HAND_Y, HAND_Y],
                horizon=round(0.62 * size[1]), sun=None)


def transform(size, lay):
    """The canonical -> pixel transform (ox, oy, s) of a layout on a (W, H) canvas."""
    return lay["x"], lay["y"], lay["scale"] * min(size) / 128


def draw_background(size, background, lay):
    W, H = size
    top, bottom, _ = SCENES[background]
    img = Image.new("RGB", (W, H), top)
    d = ImageDraw.Draw(img)
    if lay.get("sun"):
        r, (x, y) = SUN_R * min(size), lay["sun"]
        d.ellipse((x - r, y - r, x + r, y + r), fill=SUN)
    if bottom:
        d.rectangle((0, lay["horizon"], W, H), fill=bottom)
    return img, d


def draw_scene(size, background, person=None, items=None, layout=None):
    """The exact image of a scene at size (W, H) under a layout (default_layout if None): background and its
    details, a two-handed item (held behind the body), the person, the other items. Without a person: the
    background alone (a scene source image)."""
    lay = layout or default_layout(size)
    img, d = draw_background(size, background, lay)
    tf, items, hands = transform(size, lay), items or {}, lay["hands"]
    if "both_hands" in items:
        paint_item(d, tf, *items["both_hands"], "both_hands", hands)
    if person:
        paint_person(d, tf, person, hands)
    for p, (cat, colour) in items.items():
        if p != "both_hands":
            paint_item(d, tf, cat, colour, p, hands)
    return img


def draw_item(size, cat, colour):
    """One item alone on white, scaled to fill 80% of its own canvas (hand items as held in the right hand)."""
    pos = "right_hand" if CATEGORIES[cat] == "hand" else CATEGORIES[cat]
    pts = [v for _, xy, _ in item_shapes(cat, pos) for v in xy]
    (x0, x1), (y0, y1) = (min(pts[0::2]), max(pts[0::2])), (min(pts[1::2]), max(pts[1::2]))
    s = 0.8 * min(size[0] / (x1 - x0), size[1] / (y1 - y0))
    tf = (size[0] / 2 - s * (x0 + x1) / 2, size[1] / 2 - s * (y0 + y1) / 2, s)
    img = Image.new("RGB", size, WHITE)
    paint_item(ImageDraw.Draw(img), tf, cat, colour, pos)
    return img


def render_inputs(scene):
    """The source images of a scene, each at its own size (an edit source under the target's layout, rescaled)."""
    out = []
    for src in scene["sources"]:
        if src["kind"] == "item":
            out.append(draw_item(src["size"], *src["item"]))
        elif src["kind"] == "scene":
            out.append(draw_scene(src["size"], src["background"]))
        else:  # "person" (alone, on its own background) or "edit" (a full scene)
            out.append(draw_scene(src["size"], src["background"], scene["person"], src.get("items"), src.get("layout")))
    return out


def render_target(scene):
    return draw_scene(scene["size"], scene["background"], scene["person"], scene["items"], scene.get("layout"))


# -----------------------------------------------------------------------------
# scenes and instructions


@dataclass
class WorldConfig:
    out_size: tuple = TOY_SIZE  # target (W, H); None: one of OUT_SIZES per sample
    p_edit: float = 0.4  # share of single-image editing samples (v3: 0.4, was 0.25; the bench fixes its own 200 + 100)
    min_inputs: int = 2  # composition: number of source images, the person included
    max_inputs: int = 6
    p_scene: float = 0.3  # chance that one composition source (of 3 or more) is a background scene
    src_area: tuple = (48 * 48, 192 * 192)  # each source image's area, uniform; aspect log-uniform in [1/2, 2]
    p_colour_word: float = 0.25  # chance that a composition instruction names an item's colour (bench: 0)
    p_category_word: float = 0.7  # chance that it names the item's category ("the item from Image3" otherwise)
    p_sun: float = 0.7  # chance of a sun in the target's sky
    shuffle_sources: bool = False  # False: Image1 is the person, a scene comes last
    layout: str = "free"  # how composition targets' layouts are drawn (LAYOUTS); the bench uses "free"
    edit_layout: str = "posed"  # how an edit's scene is laid out (its source shows it; the target keeps it)


BENCH_WORLD = WorldConfig(p_colour_word=0.0, p_category_word=0.4)  # ToyCom-Bench v2: the references are needed
EDIT_OPS = ["add", "remove", "replace", "recolour", "background"]
OPENERS = ["Show the person from Image{k}", "Draw the person in Image{k}", "The person from Image{k} is standing",
           "Compose a picture of the person from Image{k}", "Place the figure from Image{k}"]
USE = {"head": ["wearing the {it} from Image{k}", "with the {it} from Image{k} on their head"],
       "torso": ["with the {it} from Image{k} on their chest", "wearing the {it} from Image{k} on the chest"],
       "right_hand": ["holding the {it} from Image{k} in the right hand",
                      "with the {it} of Image{k} in their right hand"],
       "left_hand": ["holding the {it} from Image{k} in the left hand", "with the {it} of Image{k} in their left hand"],
       "both_hands": ["holding the {it} from Image{k} with both hands", "gripping the {it} of Image{k} in both hands"],
       "feet": ["wearing the {it} from Image{k} on their feet", "with the {it} from Image{k} on the feet"],
       "background": ["in the scene from Image{k}", "against the background of Image{k}"]}
GENERIC = ["item", "object", "thing"]  # "the item from Image3": neither colour nor category
WHERE = {"head": "on their head", "torso": "on their chest", "right_hand": "in their right hand",
         "left_hand": "in their left hand", "both_hands": "in both hands", "feet": "on their feet"}
EDITS = {"add": ["Give the person {a} {where}.", "Add {a} {where}.", "In Image1, put {a} {where}."],
         "remove": ["Remove {ref}.", "Take away {ref}.", "In Image1, delete {ref}."],
         "replace": ["Replace {ref} with {a}.", "Swap {ref} for {a}.", "In Image1, change {ref} into {a}."],
         "recolour": ["Make {ref} {colour}.", "Change the colour of {ref} to {colour}.",
                      "Recolour {ref} {colour} in Image1."],
         "background": ["Change the background to {bg}.", "Put the person in {bg}.",
                        "Replace the background of Image1 with {bg}."]}


def _a(cat, colour):  # "a red cap", "an orange flag", "a pair of blue boots"
    if CATEGORIES[cat] == "feet":
        return f"a pair of {colour} {cat}"
    return ("an " if colour[0] in "aeiou" else "a ") + f"{colour} {cat}"


def scene_key(scene):
    """What a scene asks for, placement apart: two scenes with equal keys are the same task."""
    srcs = [(s["kind"], s.get("item"), s.get("background"), s.get("items")) for s in scene["sources"]]
    return json.dumps([scene["kind"], scene["person"], scene["background"], scene["items"], srcs], sort_keys=True)


class ToyWorld:
    """Procedural HOI composition and editing tasks, deterministic in (seed, i)."""

    def __init__(self, seed=TRAIN_SEED, cfg=None, held_out=False):
        if seed >= BENCH_SEED and not held_out:
            raise ValueError(f"seed {seed} is in the held-out ToyCom-Bench range (>= {BENCH_SEED})")
        self.seed, self.cfg = seed, cfg or WorldConfig()
        for lay in (self.cfg.layout, self.cfg.edit_layout):
            if lay not in LAYOUTS:
                raise ValueError(f"unknown layout {lay!r}; choose from {sorted(LAYOUTS)}")
        if not 1 <= self.cfg.min_inputs - 1 <= self.cfg.max_inputs - 1 < MAX_IMAGES:
            raise ValueError(f"composition inputs {self.cfg.min_inputs}..{self.cfg.max_inputs} not within 2..6")

    def _size(self, rng):
        area, aspect = rng.uniform(*self.cfg.src_area), math.exp(rng.uniform(-math.log(2), math.log(2)))
        return [round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))]

    def _items(self, rng, sizes):  # a random item set under the conflict matrix, with 'sizes' positions
        positions = rng.choice([s for s in VALID_SETS if len(s) in sizes])
        return {p: [rng.choice(CATS_AT[p]), rng.choice(list(COLOURS))] for p in positions}

    def _it(self, rng, item):  # how a composition instruction refers to an item shown in a reference
        if rng.random() >= self.cfg.p_category_word:
            return rng.choice(GENERIC)
        return f"{item[1]} {item[0]}" if rng.random() < self.cfg.p_colour_word else item[0]

    def layout(self, rng, size, items, background, grid=None):
        """What the inputs leave free in the target (ToyWorld v2), on an integer grid the judge can search:
        the person's scale and placement anywhere it fits, each hand's height (one shared height under a
        two-handed item), the horizon and a sun somewhere in the sky. grid (default WorldConfig.layout) picks
        how finely: a key of LAYOUTS."""
        W, H = size
        g = LAYOUTS[grid or self.cfg.layout]
        step = g["step"]
        grid = lambda lo, hi: step * rng.randint(-(-lo // step), max(-(-lo // step), hi // step))  # in [lo, hi]
        scale = rng.choice(g["scales"])
        side = math.ceil(scale * min(size))
        hands = [rng.choice(g["hands"]), rng.choice(g["hands"])]
        if "both_hands" in items:
            hands = [rng.choice(g["both"])] * 2
        horizon = step * round(rng.uniform(*HORIZON) * H / step)
        sky = horizon if SCENES[background][1] else H
        r = math.ceil(SUN_R * min(size))
        sun = [grid(r, W - r), grid(r, min(sky, H // 2) - r)] if rng.random() < self.cfg.p_sun else None
        x, y = ((W - side) // 2, (H - side) // 2) if g.get("centred") else (grid(0, W - side), grid(0, H - side))
        return dict(x=x, y=y, scale=scale, hands=hands, horizon=horizon, sun=sun)

    def scene(self, i, kind=None, n_inputs=None, op=None):
        """The scene index of sample i; kind ("compose" / "edit"), n_inputs and op override the random choice."""
        rng, cfg = random.Random(f"{self.seed}/{i}"), self.cfg
        kind = kind or ("edit" if rng.random() < cfg.p_edit else "compose")
        size = list(cfg.out_size or rng.choice(OUT_SIZES))
        person = {"head": rng.choice(HEADS), "skin": rng.choice(list(SKINS)), "shirt": rng.choice(list(SHIRTS))}
        bg = rng.choice(list(SCENES))
        scene = dict(kind=kind, size=size, person=person)
        if kind == "compose":
            k = n_inputs or rng.randint(cfg.min_inputs, cfg.max_inputs)
            has_scene = k >= 3 and rng.random() < cfg.p_scene  # every composition asks for at least one item
            items = self._items(rng, [k - 1 - has_scene])
            sources = [dict(kind="person", size=self._size(rng), background=bg)]
            order = list(items)
            rng.shuffle(order)
            sources += [dict(kind="item", size=self._size(rng), position=p, item=items[p]) for p in order]
            if has_scene:
                bg = rng.choice([b for b in SCENES if b != bg])
                sources.append(dict(kind="scene", size=self._size(rng), background=bg))
            if cfg.shuffle_sources:
                rng.shuffle(sources)
            uses = []
            for k, src in enumerate(sources, 1):
                if src["kind"] == "person":
                    opener = rng.choice(OPENERS).format(k=k)
                elif src["kind"] == "scene":
                    uses.append(rng.choice(USE["background"]).format(k=k))
                else:
                    uses.append(rng.choice(USE[src["position"]]).format(it=self._it(rng, src["item"]), k=k))
            text = opener + " " + (", ".join(uses[:-1]) + " and " if len(uses) > 1 else "") + uses[-1] + "."
            return dict(scene, op="compose", background=bg, items=items, checked=sorted(items), sources=sources,
                        instruction=text, layout=self.layout(rng, size, items, bg))
        op = op or rng.choice(EDIT_OPS)
        # add needs a free position (every valid set of <= 3 extends); remove / replace / recolour need an item
        before = self._items(rng, {"add": [0, 1, 2, 3], "background": [0, 1, 2, 3, 4]}.get(op, [1, 2, 3, 4]))
        items, new_bg, p, template = dict(before), bg, None, rng.choice(EDITS[op])
        if op == "add":
            p = rng.choice([q for q in POSITIONS if valid(list(before) + [q])])
            items[p] = [rng.choice(CATS_AT[p]), rng.choice(list(COLOURS))]
            text = template.format(a=_a(*items[p]), where=WHERE[p])
        elif op == "background":
            new_bg = rng.choice([b for b in SCENES if b != bg])
            text = template.format(bg=SCENES[new_bg][2])
        else:
            p = rng.choice(sorted(before))
            cat, colour = before[p]
            ref = f"the {_it_edit(rng, before[p], cfg)}" + (f" {WHERE[p]}" if p.endswith("_hand") else "")
            if op == "remove":
                del items[p]
                text = template.format(ref=ref)
            elif op == "replace":
                items[p] = [rng.choice([c for c in CATS_AT[p] if c != cat]), rng.choice(list(COLOURS))]
                text = template.format(ref=ref, a=_a(*items[p]))
            else:
                items[p] = [cat, rng.choice([c for c in COLOURS if c != colour])]
                text = template.format(ref=ref, colour=items[p][1])
        text = text[0].upper() + text[1:]
        # an edit keeps the input's placement, pose and background details; only a new background draws new ones.
        # v3: edits are laid out "posed" (the person near the full frame, pose / horizon / sun free) in training and
        # in the bench alike; the input fixes the layout, so the judge holds the output to it (eval.py)
        lay = self.layout(rng, size, items | before, new_bg, cfg.edit_layout)
        src_lay = dict(lay)
        if op == "background":
            src_lay |= {k: v for k, v in self.layout(rng, size, items | before, bg, cfg.edit_layout).items()
                        if k in ("horizon", "sun")}
        scale = rng.uniform(0.75, 1.5)
        src_lay = dict(src_lay, x=src_lay["x"] * scale, y=src_lay["y"] * scale, horizon=src_lay["horizon"] * scale,
                       sun=[v * scale for v in src_lay["sun"]] if src_lay["sun"] else None)
        src = dict(kind="edit", size=[round(size[0] * scale), round(size[1] * scale)], background=bg, items=before,
                   layout=src_lay)
        changed = [p] if p else ["background"]
        return dict(scene, op=op, background=new_bg, items=items, checked=changed, sources=[src], instruction=text,
                    layout=lay)

    def sample(self, i, **force):
        scene = self.scene(i, **force)
        return dict(input_images=render_inputs(scene), output_image=render_target(scene),
                    instruction=scene["instruction"], scene=scene)


def _it_edit(rng, item, cfg):  # an edit names the item it changes: its category, maybe its colour
    return f"{item[1]} {item[0]}" if rng.random() < 0.5 else item[0]


def instruction_corpus(n, seed=TRAIN_SEED, cfg=None):
    """n toy-world instructions (no rendering), e.g. to train the toy tokenizer."""
    world = ToyWorld(seed, cfg)
    return [world.scene(i)["instruction"] for i in range(n)]

# -----------------------------------------------------------------------------
# datasets: the joint resize, the jsonl loader with validation, the toy world as a dataset


def prepare(input_images, output_image, instruction, budget=TOY_BUDGET, scene=None):
    """References resized together to the budget (joint rule), the target resized on its own (official)."""
    return dict(input_images=pack.joint_resize(input_images, budget),
                output_image=pack.joint_resize([output_image], budget)[0], instruction=instruction, scene=scene)


def check_image(path, max_pixels=MAX_PIXELS, verify=True):
    """Raise ValueError / OSError naming the problem if the image is unusable."""
    with Image.open(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{path}: {w}x{h} is larger than {max_pixels} pixels")
        if not 0.1 <= w / h <= 10:
            raise ValueError(f"{path}: aspect {w}x{h} outside 0.1-10")
        if verify:
            im.load()


def toy_world_config(data):
    """The trainers' --data: "toy" (ToyWorld v2) or "toy:LAYOUT" (e.g. toy:posed) → a WorldConfig; None for a
    path (an official jsonl)."""
    if data != "toy" and not data.startswith("toy:"):
        return None
    layout = data.partition(":")[2] or "free"
    if layout not in LAYOUTS:
        raise ValueError(f"--data {data}: unknown toy layout {layout!r}; choose from {sorted(LAYOUTS)}")
    return WorldConfig(layout=layout)


class ToyDataset(torch.utils.data.Dataset):
    """n samples of ToyWorld(seed, cfg), prepared as JsonlDataset prepares a line."""

    def __init__(self, n, seed=TRAIN_SEED, budget=TOY_BUDGET, cfg=None):
        self.n, self.world, self.budget = n, ToyWorld(seed, cfg), budget

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        s = self.world.sample(i)
        return prepare(s["input_images"], s["output_image"], s["instruction"], self.budget, s["scene"])


class JsonlDataset(torch.utils.data.Dataset):
    """Official jsonl triplets. Bad lines (json, keys, counts, missing / unreadable / oversized images, aspect
    outside 0.1–10) are skipped and listed in .skipped as (line number, reason) with one counted warning.
    verify=True decodes every image up front; with verify=False a corrupt image met later is skipped the same way
    and the next good sample is returned, so an epoch never crashes."""

    def __init__(self, path, budget=TOY_BUDGET, max_images=MAX_IMAGES, max_pixels=MAX_PIXELS, verify=True):
        self.path, self.budget, self.samples, self.skipped = path, budget, [], []
        root = os.path.dirname(os.path.abspath(path))
        with open(path) as f:
            lines = f.readlines()
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or not {"input_images", "output_image", "instruction"} <= rec.keys():
                    raise ValueError("needs input_images, output_image and instruction")
                ins = rec["input_images"]
                ins = [ins] if isinstance(ins, str) else ins
                if not 1 <= len(ins) <= max_images:
                    raise ValueError(f"{len(ins)} input images, expected 1..{max_images}")
                paths = [os.path.join(root, p) for p in ins + [rec["output_image"]]]
                for p in paths:
                    check_image(p, max_pixels, verify)
                self.samples.append((n, paths, str(rec["instruction"]), rec.get("scene")))
            except Exception as e:  # any bad line: json, keys, missing or corrupt file, PIL errors
                self.skipped.append((n, " ".join(f"{type(e).__name__}: {e}".split())))  # one line
        if not self.samples:
            what = f"none of its {len(self.skipped)} lines is usable" if self.skipped else "it has no lines"
            raise ValueError(f"{path}: {what}{self._shown()}")
        if self.skipped:
            self._warn(f"skipped {len(self.skipped)} of {len(self.samples) + len(self.skipped)} lines")

    def _shown(self):  # " (line 2: reason; line 5: reason ...)": the first five bad lines
        shown = "; ".join(f"line {n}: {r}" for n, r in self.skipped[:5])
        return f" ({shown}{' ...' if len(self.skipped) > 5 else ''})" if shown else ""

    def _warn(self, what):
        warnings.warn(f"{self.path}: {what}{self._shown()}")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        for j in range(len(self.samples)):
            n, paths, instruction, scene = self.samples[(i + j) % len(self.samples)]
            try:
                images = []
                for p in paths:
                    with Image.open(p) as im:
                        images.append(pack.to_rgb(im))
                return prepare(images[:-1], images[-1], instruction, self.budget, scene)
            except Exception as e:
                self.skipped.append((n, f"{type(e).__name__}: {e}"))
                self._warn(f"skipped line {n} while loading")
        raise ValueError(f"{self.path}: no image could be loaded")


def write_jsonl(folder, n, seed=TRAIN_SEED, cfg=None, name="data.jsonl"):
    """n toy-world samples as PNGs + an official jsonl (plus each sample's "scene" index); returns the jsonl path."""
    os.makedirs(folder, exist_ok=True)
    world = ToyWorld(seed, cfg)
    with open(os.path.join(folder, name), "w") as f:
        for i in tqdm(range(n), desc="toy world", disable=n < 1000):
            s = world.sample(i)
            ins = [f"{i:06d}_in{k}.png" for k in range(len(s["input_images"]))]
            for im, fn in zip(s["input_images"] + [s["output_image"]], ins + [f"{i:06d}_out.png"]):
                im.save(os.path.join(folder, fn), compress_level=1)
            f.write(json.dumps(dict(input_images=ins, output_image=f"{i:06d}_out.png",
                                    instruction=s["instruction"], scene=s["scene"])) + "\n")
    return os.path.join(folder, name)

# -----------------------------------------------------------------------------
# cache of VAE latents and text embeddings (safetensors shards), so training does not re-encode


CACHE_SHARD = 1024  # samples per cache shard: the most an interrupted build has to encode again


@torch.no_grad()
def cache_latents(dataset, encode_image, encode_text, path, shard_size=CACHE_SHARD, null_prompt=None):
    """encode_image: x [1, 3, H, W] in [-1, 1] -> z [1, C, h, w] (e.g. normalised VAE mean);
    encode_text: (prompts [str], images [[PIL]]) -> (emb [B, L, D], mask [B, L]), e.g. TextEncoder.encode.
    null_prompt (e.g. " "): also cache its embedding with the same images, for condition dropout.
    Writes path/shard-XXXXX.safetensors, each whole (temp file + rename) with its items' index entries in its
    metadata, and path/index.json last. A build that was killed resumes at the first shard not on disk; readers
    need index.json, so a partial cache is never served."""
    os.makedirs(path, exist_ok=True)
    n, index = len(dataset), []
    shards = [(lo, min(n, lo + shard_size)) for lo in range(0, n, shard_size)]
    done = {k: finished_shard(shard_file(path, k), lo, hi) for k, (lo, hi) in enumerate(shards)}
    done = {k: entries for k, entries in done.items() if entries is not None}
    if done:
        print(f"cache: {len(done)} of {len(shards)} shards of {path} already encoded, resuming")
    pbar = tqdm(total=n, initial=sum(len(e) for e in done.values()), desc="cache")
    for k, (lo, hi) in enumerate(shards):
        if k in done:
            index += done[k]
            continue
        tensors, entries = {}, []
        for i in range(lo, hi):
            s = dataset[i]
            zs = [encode_image(pack.image_to_tensor(im)[None])[0] for im in [s["output_image"]] + s["input_images"]]
            prompts = [s["instruction"]] + ([null_prompt] if null_prompt is not None else [])
            emb, mask = encode_text(prompts, [s["input_images"]] * len(prompts))
            tensors[f"{i}.target"] = zs[0].float().contiguous()  # [C, h, w]
            for r, z in enumerate(zs[1:]):
                tensors[f"{i}.ref{r}"] = z.float().contiguous()  # [C, h_k, w_k]
            tensors[f"{i}.txt"] = emb[0][mask[0].bool()].float().contiguous()  # [L, D], real tokens only
            if null_prompt is not None:
                tensors[f"{i}.neg"] = emb[1][mask[1].bool()].float().contiguous()
            entries.append(dict(shard=k, refs=len(zs) - 1, neg=null_prompt is not None,
                                instruction=s["instruction"], scene=s["scene"]))
            pbar.update(1)
        fn = shard_file(path, k)
        M.atomic_write(fn, lambda p: save_file(tensors, p, metadata={"items": f"{lo}:{hi}", "index": json.dumps(entries)}))
        index += entries
    pbar.close()
    M.atomic_write(os.path.join(path, "index.json"), json.dumps(index))


def shard_file(path, k):
    return os.path.join(path, f"shard-{k:05d}.safetensors")


def finished_shard(fn, lo, hi):
    """The index entries of a shard an earlier build finished, if fn is one holding exactly items lo..hi-1 (its
    header readable, every item's tensors present); else None (missing, truncated, another shard size)."""
    try:
        with safe_open(fn, framework="pt") as f:
            meta, keys = f.metadata() or {}, set(f.keys())
        entries = json.loads(meta["index"])
    except Exception:  # no file, a torn write, a shard of an older format: encode it again
        return None
    if meta.get("items") != f"{lo}:{hi}" or len(entries) != hi - lo:
        return None
    if not all(item_keys(i, e) <= keys for i, e in zip(range(lo, hi), entries)):
        return None
    return entries


def item_keys(i, e):
    """The tensor names of cached item i with index entry e."""
    refs = {f"{i}.ref{r}" for r in range(e["refs"])}
    return {f"{i}.target", f"{i}.txt"} | refs | ({f"{i}.neg"} if e.get("neg") else set())


class LatentDataset(torch.utils.data.Dataset):
    """A cache written by cache_latents, item i: dict(target [C, h, w], refs [[C, h_k, w_k]], txt [L, D],
    instruction, scene). Every shard's header is read up front: a missing, truncated or incomplete shard is a
    ValueError naming the file and the command that rebuilds it (only that shard is encoded again)."""

    def __init__(self, path):
        self.path, self.files = path, {}
        index_file = os.path.join(path, "index.json")
        try:
            with open(index_file) as f:
                self.index = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"latent cache index {index_file} is unreadable ({' '.join(str(e).split())}); rebuild "
                             f"it: rm {index_file} and run the same command again") from None
        keys = {}
        for i, e in enumerate(self.index):
            keys.setdefault(e["shard"], set()).update(item_keys(i, e))
        for k, need in keys.items():
            fn = shard_file(path, k)
            try:
                self.files[k] = safe_open(fn, framework="pt")
                missing = need - set(self.files[k].keys())
                problem = f"{len(missing)} of its tensors missing" if missing else ""
            except Exception as e:
                problem = " ".join(str(e).split())
            if problem:
                raise ValueError(f"latent cache shard {fn} is corrupt ({problem}); rebuild it: rm {fn} {index_file} "
                                 f"and run the same command again")

    def __getstate__(self):  # open shard handles do not travel to DataLoader workers
        return dict(self.__dict__, files={})

    def __len__(self):
        return len(self.index)

    def _file(self, i):
        e = self.index[i]
        if e["shard"] not in self.files:
            self.files[e["shard"]] = safe_open(shard_file(self.path, e["shard"]), framework="pt")
        return e, self.files[e["shard"]]

    def length(self, i):
        """Rows item i takes in the MMDiT, text + image tokens (2×2 patches), read from the headers only."""
        e, f = self._file(i)
        shapes = [f.get_slice(f"{i}.{k}").get_shape() for k in ["target"] + [f"ref{r}" for r in range(e["refs"])]]
        return f.get_slice(f"{i}.txt").get_shape()[0] + sum(h // 2 * (w // 2) for _, h, w in shapes)

    def __getitem__(self, i):
        e, f = self._file(i)
        return dict(target=f.get_tensor(f"{i}.target"), refs=[f.get_tensor(f"{i}.ref{k}") for k in range(e["refs"])],
                    txt=f.get_tensor(f"{i}.txt"), neg=f.get_tensor(f"{i}.neg") if e.get("neg") else None,
                    instruction=e["instruction"], scene=e["scene"])


# -----------------------------------------------------------------------------
# the toy pipeline's frozen parts: tokenizer, condition encoder, VAE — in the official folder layout


def toy_crops(seed=TRAIN_SEED, crop=64, budget=TOY_BUDGET):
    """A callable n -> [n, 3, crop, crop] in [-1, 1]: random crops of toy targets and jointly resized sources."""
    world, rng, counter, pool = ToyWorld(seed), random.Random(seed), itertools.count(), []

    def batch(n):
        out = []
        while len(out) < n:
            while not pool:
                s = world.sample(next(counter))
                ims = [s["output_image"]] + pack.joint_resize(s["input_images"], budget)
                pool.extend(im for im in ims if min(im.size) >= crop)
            im = pool.pop()
            x0, y0 = rng.randrange(im.width - crop + 1), rng.randrange(im.height - crop + 1)
            out.append(pack.image_to_tensor(im.crop((x0, y0, x0 + crop, y0 + crop))))
        return torch.stack(out)

    return batch


def train_bpe(texts, vocab_size, special_tokens=TE.ADDED_TOKENS):
    """A tiny byte-level BPE trainer for the toy world. Pre-tokenize like the tokenizer, start from the 256 byte
    characters (ids = byte values), merge the most frequent adjacent pair (ties: the smallest pair) until the vocab
    plus the special tokens reaches vocab_size. Returns (vocab with the special tokens last, merges)."""
    byte_char = TE.bytes_to_unicode()
    cut = re.compile("|".join(map(re.escape, special_tokens))) if special_tokens else None
    words = Counter()
    for text in texts:
        for piece in cut.split(text) if cut else [text]:
            for w in TE.split_regex().findall(unicodedata.normalize("NFC", piece)):
                words[tuple(byte_char[b] for b in w.encode("utf-8"))] += 1
    vocab = {c: b for b, c in byte_char.items()}
    merges = []
    while len(vocab) + len(special_tokens) < vocab_size:
        pairs = Counter()
        for w, n in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += n
        if not pairs:
            break  # every word is a single token: the corpus has nothing left to merge
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append((a, b))
        vocab.setdefault(a + b, len(vocab))
        words = Counter({_merge(w, a, b): n for w, n in words.items()})
    for t in special_tokens:
        vocab[t] = len(vocab)
    return vocab, merges


def _merge(word, a, b):  # every (a, b) in the symbol tuple → a+b, left to right
    out = []
    for s in word:
        if out and out[-1] == a and s == b:
            out[-1] = a + b
        else:
            out.append(s)
    return tuple(out)


def fit_vae(vae, batches, steps=1600, lr=1e-3, batch=16, kl_weight=1e-6, seed=0, progress=True):
    """Train `vae` in place: L1 + MSE reconstruction of decoded posterior samples + kl_weight * KL(q || N(0, I)).
    batches: a callable batch_size -> images [B, 3, H, W] in [-1, 1], or an iterable of such batches.
    Afterwards sets cfg.latents_mean/std from the posterior means of 8 fresh batches, and returns metrics
    (last-step losses, PSNR in dB of the posterior-mean reconstruction of one fresh batch)."""
    it, w = (None if callable(batches) else itertools.cycle(batches)), vae.quant_conv.weight
    next_batch = lambda: (batches(batch) if it is None else next(it)).to(w.device, w.dtype)  # noqa: E731
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    vae.train()
    bar = tqdm(range(steps), desc="fit_vae", disable=not progress)
    for _ in bar:
        x = next_batch()
        mean, logvar = vae.posterior(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen).to(mean)
        rec = vae.decoder(vae.post_quant_conv(z))  # [B, 3, H, W], unclamped so gradients flow everywhere
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = l1 + mse + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(l1=f"{l1.item():.4f}", mse=f"{mse.item():.4f}", kl=f"{kl.item():.1f}")
    vae.eval()
    z = torch.cat([vae.encode(next_batch()) for _ in range(8)])  # [8B, z, h, w]
    vae.cfg.latents_mean = z.float().mean(dim=(0, 2, 3)).tolist()
    vae.cfg.latents_std = z.float().std(dim=(0, 2, 3)).tolist()
    x = next_batch()
    mse_eval = (vae.decode(vae.encode(x)) - x).float().pow(2).mean().item()
    psnr = 10 * math.log10(4.0 / max(mse_eval, 1e-12))  # peak-to-peak range of [-1, 1] is 2
    return {"steps": steps, "l1": l1.item(), "mse": mse.item(), "kl": kl.item(), "psnr": psnr}


def build_toy_assets(root, vae_steps=1600, vocab_size=512, seed=0):
    """Write ROOT/{tokenizer,processor,text_encoder,vae,scheduler}/ and model_index.json: a byte-level BPE trained
    on the toy instructions, a random frozen tiny Qwen2.5-VL (its features carry the tokens and images), and a
    narrow VAE fitted on toy crops (L1 + MSE + small KL). The denoiser is trained on top by train_fm.py."""
    torch.manual_seed(seed)
    corpus = instruction_corpus(3000, seed) + [" ", "Combine the reference images to generate the final result."]
    vocab, merges = train_bpe(corpus, vocab_size)
    TE.save_tokenizer(os.path.join(root, "tokenizer"), vocab, merges)
    tok = TE.Tokenizer.from_folder(os.path.join(root, "tokenizer"))
    te = TE.TextEncoder(TE.toy_config(tok), tok)
    TE.init_weights(te)
    TE.save_text_encoder(te, root)
    torch.manual_seed(seed)
    vae = V.VAE(V.VAEConfig.toy())
    fit_vae(vae, toy_crops(seed), steps=vae_steps, lr=1e-3, seed=seed)  # 22.2 dB after 1,600 steps
    metrics = fit_vae(vae, toy_crops(seed + 1), steps=vae_steps * 9 // 32, lr=5e-4, seed=seed + 1)  # 23.8 dB after 450 more
    V.save_vae(vae, os.path.join(root, "vae"))
    sched = dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256, base_shift=0.5,
                 max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02,
                 time_shift_type="exponential", use_dynamic_shifting=True)  # the Qwen-Image values, unchanged
    os.makedirs(os.path.join(root, "scheduler"), exist_ok=True)
    with open(os.path.join(root, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "QwenImageEditPipeline", "nanounipic_pixel_budget": TOY_BUDGET,
                   "nanounipic_vae_fit": metrics, "nanounipic_cfg": {"euler": 2.0, "fewstep": 1.0}}, f, indent=2)
        # the pixel budget tells sample.py the toy scale; the CFG map its best guidance per sampler
    return metrics


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a toy-world dataset in the official jsonl format, or rebuild the "
                                            "toy pipeline's frozen parts (--assets).")
    p.add_argument("--out", default="data_cache/toy")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=TRAIN_SEED)
    p.add_argument("--assets", help="build tokenizer, text encoder and VAE into this pipeline folder (e.g. assets/toy)")
    p.add_argument("--vae_steps", type=int, default=1600)
    args = p.parse_args(argv)
    t = time.time()
    if args.assets:
        print(build_toy_assets(args.assets, args.vae_steps, seed=args.seed), f"{time.time() - t:.0f}s")
        return
    path = write_jsonl(args.out, args.n, args.seed)
    print(f"wrote {args.n} samples to {path} ({args.n / (time.time() - t):.0f} samples/s with PNG writing)")


if __name__ == "__main__":
    main()
