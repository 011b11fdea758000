"""
The toy world (paper §4.1's data, in miniature; docs/toyworld.md): procedurally generated composition and editing
tasks with exact ground truth, the stand-in for the paper's pipeline (CC12M persons, Qwen-Image objects, a curated
HOI conflict matrix, Nano-Banana / Seedream targets). A person (head shape × skin × shirt) with 14 item categories
at 6 HOI positions in 6 colours under the conflict matrix, on 6 backgrounds, under a layout the inputs do not fix.
Composition: 2–6 sources (the person on its own background, one image per item, maybe a scene), each rendered
alone at its own random size and aspect; editing: one full scene + add / remove / replace / recolour an item or
change the background. Instructions name the inputs Image1..ImageK, as the official demo prompts do.
"""
import itertools
import json
import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

TOY_BUDGET = 128 * 128  # toy pixel budget: all references together, and the target on its own
TOY_SIZE = (128, 128)  # default target (W, H): a 16×16 latent, 8×8 = 64 tokens after 2×2 packing
OUT_SIZES = [(128, 128), (160, 96), (96, 160), (144, 112), (112, 144)]  # mixed-shape targets within the budget
WORLD_VERSION = 3  # part of every latent-cache fingerprint: a changed world is never served from an old cache
TRAIN_SEED = 0  # training worlds use seeds in [0, BENCH_SEED)
BENCH_SEED = 1_000_000  # ToyCom-Bench draws from seeds >= BENCH_SEED: held out from training
VAL_SEED = 2_000_000  # the validation split (training-time monitoring, recipe choices): held out, not the bench
MAX_IMAGES = 6  # official limit on input images
EXAMPLE_SEED = 999_997  # sample.py's built-in example (sample 0: a 3-image composition); training uses small seeds

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
CATS_AT = {p: [c for c, s in CATEGORIES.items() if s == p or (s == "hand" and p.endswith("_hand"))] for p in POSITIONS}
HANDS = {"right_hand": (22, 76), "left_hand": (106, 76)}  # the person faces us: their right hand is image-left
# items as (primitive, canonical coords, 1: item colour / 0: ink); hand items relative to the hand centre, +x outward
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


def valid(positions):  # True if no two of these item positions conflict (and none repeats)
    return not any(CONFLICT[POSITIONS.index(p), POSITIONS.index(q)] for p, q in itertools.combinations(positions, 2))


VALID_SETS = [s for r in range(len(POSITIONS) + 1) for s in itertools.combinations(POSITIONS, r) if valid(s)]

# -----------------------------------------------------------------------------
# rendering: the person in canonical 128-px coordinates under tf = (ox, oy, s), point (x, y) -> pixel (ox + s·x,
# oy + s·y). A layout fixes what the inputs do not: tf (placement, scale), the pose (hand heights), horizon and sun.

HAND_Y = 76  # canonical hand height of the default pose; a layout moves each hand within HAND_YS
HAND_YS = list(range(66, 80, 2))  # arm angles: hand heights, keeping every hand item inside its judged region
BOTH_HAND_YS = list(range(70, 80, 2))  # with a two-handed item both hands share one height in this range
SCALES = [round(0.78 + 0.02 * k, 2) for k in range(9)]  # person scale, a share of min(W, H): 0.78 .. 0.94
HORIZON = (0.5, 0.75)  # horizon row as a share of H, for scenes with a ground colour (default 0.62)
SUN = (255, 250, 215)  # a pale disk somewhere in the sky; no item, skin or ground colour is near it
SUN_R = 0.06  # its radius as a share of min(W, H)
# Target layouts: "free" (anywhere it fits, 9 scales, 7 hand heights; bench and judge) or "posed", the subset the toy
# teachers train on (docs/history.md says why): centred at scale 0.94, 3 hand heights, horizon and sun on an 8-px grid.
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


def hand_centres(hands=(HAND_Y, HAND_Y)):  # hand heights (right, left) -> canonical centres of both hands
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
    """Source images' layout: the person filling the centred min(W, H) square, default pose, horizon at 62%, no sun."""
    S = min(size)
    return dict(x=(size[0] - S) / 2, y=(size[1] - S) / 2, scale=1.0, hands=[HAND_Y, HAND_Y],
                horizon=round(0.62 * size[1]), sun=None)


def transform(size, lay):  # the canonical -> pixel transform (ox, oy, s) of a layout on a (W, H) canvas
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
    """The exact image of a scene at (W, H) under a layout (default: default_layout), also the judge's renderer:
    background, a two-handed item (held behind the body), the person, the other items. No person: a scene source."""
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
        else:  # a background "scene", the "person" alone on its own background, or an "edit" (a full scene)
            person = None if src["kind"] == "scene" else scene["person"]
            out.append(draw_scene(src["size"], src["background"], person, src.get("items"), src.get("layout")))
    return out


def render_target(scene):
    return draw_scene(scene["size"], scene["background"], scene["person"], scene["items"], scene.get("layout"))


# -----------------------------------------------------------------------------
# scenes and instructions


@dataclass
class WorldConfig:
    out_size: tuple = TOY_SIZE  # target (W, H); None: one of OUT_SIZES per sample
    p_edit: float = 0.4  # share of single-image editing samples (the bench fixes its own 200 + 100)
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
        """What the inputs leave free in the target, on an integer grid the judge can search: the person's scale and
        placement, each hand's height (one shared under a two-handed item), horizon and sun. grid: a LAYOUTS key."""
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
        """Sample i's json-able scene index; kind ("compose" / "edit"), n_inputs and op override the random draw."""
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
            name = f"{colour} {cat}" if rng.random() < 0.5 else cat  # an edit names its item, maybe its colour
            ref = f"the {name}" + (f" {WHERE[p]}" if p.endswith("_hand") else "")
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
        # an edit keeps its input's layout (cfg.edit_layout: "posed" in training and bench alike) and the judge holds
        # the output to it; only a background edit's input has a horizon and sun of its own
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
        return dict(scene, op=op, background=new_bg, items=items, checked=[p] if p else ["background"], sources=[src],
                    instruction=text, layout=lay)

    def sample(self, i, **force):
        scene = self.scene(i, **force)
        return dict(input_images=render_inputs(scene), output_image=render_target(scene),
                    instruction=scene["instruction"], scene=scene)


def instruction_corpus(n, seed=TRAIN_SEED, cfg=None):
    """n toy-world instructions (no rendering), e.g. to train the toy tokenizer."""
    world = ToyWorld(seed, cfg)
    return [world.scene(i)["instruction"] for i in range(n)]
