"""
ToyCom-Bench v2.1: MultiCom-Bench (paper §5.2, Table 2) on the toy world, with an exact programmatic judge.

The benchmark: 200 composition cases (100 with 2–3 input images, 100 with 4–6) plus 100 edits (add / remove /
replace / recolour / background, 20 each) from the held-out seed BENCH_SEED, drawn with BENCH_WORLD: no
instruction names an item's colour and about half name neither colour nor category, so the references must be
read. A validation split (VAL_SEED) is for training-time monitoring and recipe choices; the bench only for
reported results. Bench scenes that repeat a training scene are replaced. `--n 40 --n_edit 10` (the quick
subset) is the first 20 / 20 / 10 cases of the full bench's groups.

A composition's target has freedom the inputs do not fix (data.ToyWorld.layout: the person's placement and
scale, the pose, the horizon and a sun), so the judge first finds them in the generated image, then judges
everything relative to what it found — any valid draw scores fully, a 2-px shift keeps its credit, an item in the
wrong slot still fails. An edit's input fixes its layout (only a new background's horizon and sun are free), so
an edit is held to it (a shift of up to SHIFT px allowed):
  1. background: each scene's horizon (a row-profile fit) and sun (a box-filter peak) are fitted, and the scene
     whose render explains the most pixels is seen; a wrong (or unrecognised) background zeroes quality.
  2. placement: the expected scene's person, rendered at every scale of the world's grid, is slid over the image
     (masked squared error for every integer shift at once, by FFT correlation); then each hand's height; then
     the horizon and the sun on full renders.
  3. identity (head shape, skin, shirt, 1/3 each) and items by nearest-neighbour classification of each region
     among exact renders of every candidate at the found layout (2×2-pooled mean squared error over the pixels
     where candidates differ); farther than TAU from all of them is "unrecognised".
  4. (v2.1) quality region by region: a few-step sampler that has not chosen among valid layouts draws their
     mean — a ghost arm, a blended horizon, a faint sun — sharp everywhere else. So cleanliness is judged in each
     region the inputs leave free (the five item regions with the arms, the horizon band, the sky's worst
     sun-sized window) as well as over the whole image, and the worst counts; a pixel is clean if it matches the
     re-render, its toy-VAE round trip (the judge's ceiling) or its blur up to the output's own.
Scores, each in [0, 1]:
  adherence  credit for what the instruction asks only: composition, each asked item at its slot with its
             category and colour; an edit, the one asked change (an item added / removed / replaced /
             recoloured, or the new background). Lost unchanged items and items where none was asked are
             penalties, never credit: adherence = correct / (asked + lost + spurious). The no-op edit scores 0.
  identity   head shape, skin and shirt colour, 1/3 each
  quality    fidelity × sharpness against the scene re-rendered at the found layout (seen items where
             recognised, the asked ones where not): the share of clean pixels in the worst of the whole image
             and the free regions, mapped from [CLEAN_LO, CLEAN_HI] to [0, 1], times a sharpness credit from the
             equivalent Gaussian blur of the output against it (`equivalent_blur`: 1 up to BLUR_OK px, 0 from
             BLUR_BAD px). Calibrated on oracles (README): the VAE round trip and a Gaussian blur of radius 1 keep
             it; radius 2, a one-arm ghost and the mean of 2 valid draws lose it.
  overall    sqrt(min(adherence, identity) · quality): the VIEScore combination MultiCom-Bench follows
  all_correct  every asked element, the identity and the background right, at quality >= 0.9 (a strict headline)
  psnr       to the re-rendered scene, reported beside (not in overall)

Distribution (`--coverage K`): each of the first compositions sampled with K seeds; precision = share of samples
valid and sharp, coverage = distinct layouts among a case's valid samples over min(K, what the training world
offers) — a sampler collapsed to one answer covers 1/K, a blurred mean of answers has precision 0.

    python eval.py --oracle exact        # judge sanity: exact / vae / mean2 / ghost / blank / noise / text_only / ...
    python eval.py --transformer assets/toy/transformer --steps 50 --cfg 2    # a model, through sample.py
    python eval.py --transformer assets/toy/transformer_dmd --steps 8 --coverage 4    # plus precision / coverage

API: judge(image, scene) -> dict; toycom_cases(n, n_edit, split) -> [case]; evaluate(generate_fn, cases,
out_dir) -> table, where generate_fn(list of cases) -> list of PIL images (e.g. the sampler); format_table(table);
precision_coverage(make_generate, cases, k).
"""
import argparse
import functools
import json
import math
import os
import random
import re
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from tqdm import tqdm

import pack
import sample
import vae as V
from toyworld import (BENCH_SEED, BENCH_WORLD, BOTH_HAND_YS, CATEGORIES, CATS_AT, COLOURS, EDIT_OPS, HAND_Y, HAND_YS,
                      HEADS, HORIZON, POSITIONS, SCALES, SCENES, SHIRTS, SKINS, SUN, SUN_R, TRAIN_SEED, VAL_SEED,
                      ToyWorld, WorldConfig, draw_background, draw_scene, hand_centres, paint_item, paint_person,
                      render_target, scene_key, transform)

TAU = 0.03  # a region is recognised only within this mean squared error (RGB in [0, 1], 2×2-pooled) of its
#             nearest candidate: below the 1/48 of 2×2-pooled uniform noise; calibrated on the VAE reconstruction
#             (every generated image passes through the decoder): 0.02 lost faces it still shows (ceiling 0.92)
CLEAN = 0.1  # a pixel is clean within this max-channel error of the re-rendered scene, of its VAE round trip (the
#             judge's ceiling: what the pipeline can show) or of that render blurred by the output's equivalent blur
#             or any radius of BLURS up to 0.5 px above it (softness is the sharpness credit's to judge, not a ghost)
CLEAN_LO, CLEAN_HI = 0.80, 0.95  # clean share -> fidelity 0 .. 1, for the whole image and for each free region on
#                                  its own; the worst counts (v2.1: a ghost arm or a blended horizon fails locally)
JUDGE_VAE = os.path.join(sample.TOY_CKPT, "vae")  # the toy VAE whose round trip of the re-render is the ceiling
BLUR_OK, BLUR_BAD = 1.25, 1.75  # equivalent Gaussian blur (px) -> sharpness credit 1 .. 0 (Gaussian blur of radius 1
#                                 keeps all of it, radius 2 none; the VAE reconstruction ~0.5)
BLURS = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0]  # the Gaussian radii tried by equivalent_blur
BG_MIN = 0.2  # a background is recognised if its render explains at least this share of the pixels
PAD = 4  # the placement search reaches this many pixels past each edge of the canvas
SHIFT = 3  # an edit must keep its input's layout: its placement is searched only this many pixels around it
# judged regions in canonical 128-px coordinates, relative to the layout; hand regions around each hand's
# centre. Disjoint for every pose the world draws (tested), so each candidate is one item over one base render.
REGIONS = {"head": (38, 0, 94, 28), "torso": (46, 54, 82, 92), "feet": (34, 95, 94, 128)}
HAND_REGION = (-22, -38, 22, 17)
COVERS = {p: [p] for p in POSITIONS if p != "both_hands"} | {"both_hands": ["right_hand", "left_hand"]}
FACE, SHIRT = (46, 24, 82, 55), (40, 50, 88, 96)
METRICS = ["adherence", "identity", "quality", "sharpness", "blur", "all_correct", "overall", "psnr"]
KEY = (255, 0, 255)  # template background: no scene, person or item colour

# -----------------------------------------------------------------------------
# the judge: finding the layout


def regions(hands):
    """Canonical boxes of the five judged regions for hand heights (right, left)."""
    out = dict(REGIONS)
    for p, (hx, hy) in hand_centres(hands).items():
        out[p] = (hx + HAND_REGION[0], hy + HAND_REGION[1], hx + HAND_REGION[2], hy + HAND_REGION[3])
    return out


def _crop(x, box, tf):  # canonical box -> the pixels of x [H, W, ...] inside it under tf, clipped to the canvas
    ox, oy, s = tf
    x0, y0, x1, y1 = box
    H, W = x.shape[:2]
    r0, r1 = min(H, max(0, math.floor(oy + y0 * s))), min(H, max(0, math.ceil(oy + y1 * s)))
    c0, c1 = min(W, max(0, math.floor(ox + x0 * s))), min(W, max(0, math.ceil(ox + x1 * s)))
    return x[r0:r1, c0:c1]


def _pool(x):  # [..., h, w, 3] -> [..., h/2, w/2, 3] float, 2×2 means: a little blur, matched on both sides
    h, w = x.shape[-3] // 2 * 2, x.shape[-2] // 2 * 2
    x = x[..., :h, :w, :].astype(np.float32)
    return x.reshape(*x.shape[:-3], h // 2, 2, w // 2, 2, 3).mean((-4, -2))


def nearest(g, cands):
    """Index of the candidate crop [h, w, 3] nearest to g, compared 2×2-pooled over the pixels where candidates
    differ; -1 if even that one is farther than TAU (or the region is off the canvas)."""
    c = np.stack(cands)  # [N, h, w, 3] uint8
    if min(c.shape[1:3]) < 2:
        return -1
    mask = _pool(np.repeat((c.max(0) != c.min(0)).any(-1, keepdims=True), 3, -1))[..., 0] > 0  # [h/2, w/2]
    diff = _pool(c)[:, mask] - _pool(g)[mask]  # [N, M, 3]
    d = np.einsum("nmc,nmc->n", diff, diff) / max(1, diff[0].size * 255 ** 2)  # [N] mean squared error in [0, 1]
    k = int(d.argmin())
    return k if d[k] <= TAU else -1


def _maxdiff(g, colour):  # [H, W] max-channel distance of every pixel to one colour
    return np.abs(g.astype(np.int16) - np.array(colour, dtype=np.int16)).max(-1)


def _window_sums(px, k):
    """Sums of px [H, W] over every k × k window (integral image): [H − k + 1, W − k + 1], float64."""
    ii = np.pad(px.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    return ii[k:, k:] - ii[:-k, k:] - ii[k:, :-k] + ii[:-k, :-k]


def fit_background(g, size):
    """The scene and its details (horizon row, sun centre) that best explain g: (name, details, share of the
    pixels its render explains), or (None, None, best share) below BG_MIN."""
    W, H = size
    best = (None, None, -1.0)
    for name, (top, bottom, _) in SCENES.items():
        d_top = _maxdiff(g, top)
        horizon = round(0.62 * H)
        if bottom:  # the row where "mostly sky" turns into "mostly ground"
            d_bot = _maxdiff(g, bottom)
            ground = ((d_bot < d_top) & (d_bot < 60)).mean(1)
            sky = ((d_top <= d_bot) & (d_top < 60)).mean(1)
            cost = np.concatenate([[0], np.cumsum(ground)]) + np.concatenate([np.cumsum(sky[::-1])[::-1], [0]])
            horizon = int(cost.argmin())
        sun, r = None, math.ceil(SUN_R * min(size))
        lit = np.clip(1 - _maxdiff(g, SUN) / 80, 0, 1)  # soft: a blurred or half-hidden sun still shows
        lit[horizon if bottom else H:] = 0
        if lit.sum() >= 0.05 * math.pi * r * r:  # the box of the disk's size holding the most sun-coloured pixels
            box = _window_sums(lit, 2 * r + 1)  # (a candidate: fit_layout keeps it if it fits)
            y, x = np.unravel_index(int(box.argmax()), box.shape)
            sun = [int(x) + r, int(y) + r]
        details = dict(horizon=horizon, sun=sun)
        img, _ = draw_background(size, name, details)
        share = float((np.abs(g.astype(np.int16) - np.asarray(img, dtype=np.int16)).max(-1) <= 255 * CLEAN).mean())
        if share > best[2]:
            best = (name, details, share)
    return best if best[2] >= BG_MIN else (None, None, best[2])


class _Correlator:
    """Valid cross-correlations of fixed images with many small kernels, by FFT: out[v, u] = Σ x[v + i, u + j] ·
    k[i, j] for every shift that keeps the kernel inside. The images' transforms are computed once; the FFT size
    is rounded up to a product of small primes (zero padding leaves the valid part unchanged)."""

    def __init__(self, H, W):
        self.H, self.W, self.shape = H, W, tuple(next(m for m in range(n, 2 * n) if _smooth(m)) for n in (H, W))

    def fft(self, x):  # [H, W] or [H, W, C] -> its transform
        return np.fft.rfft2(x, s=self.shape, axes=(0, 1))

    def __call__(self, fx, k):  # fx = self.fft(x); k [h, w] or [h, w, C] (same channels): summed over channels
        f = fx * np.conj(self.fft(k))
        out = np.fft.irfft2(f.sum(-1) if f.ndim == 3 else f, s=self.shape)
        return out[: self.H - k.shape[0] + 1, : self.W - k.shape[1] + 1]


def _smooth(m):  # m has no prime factor above 5
    for p in (2, 3, 5):
        while m % p == 0:
            m //= p
    return m == 1


def _person_layer(size, scale, person, items, hands):
    """The person and items alone at pixel (0, 0) and one scale of the grid: (rgb [h, w, 3] float, mask [h, w])."""
    s = scale * min(size) / 128
    side = math.ceil(128 * s) + 2
    img = Image.new("RGB", (side, side), KEY)
    d = ImageDraw.Draw(img)
    if "both_hands" in items:
        paint_item(d, (0, 0, s), *items["both_hands"], "both_hands", hands)
    paint_person(d, (0, 0, s), person, hands)
    for p, (cat, colour) in items.items():
        if p != "both_hands":
            paint_item(d, (0, 0, s), cat, colour, p, hands)
    a = np.asarray(img).astype(np.float64)
    return a, (a != KEY).any(-1).astype(np.float64)


def fit_placement(fits, size, person, items, hands, scales=SCALES, near=None):
    """(error, (x, y, scale)) minimising the squared error between g and the background with the expected person
    and items pasted at (x, y): for each scale, Σ_mask[(g − T)² − (g − B)²] = Σ_mask[T²] − 2·corr(G, mask·T)
    − corr(B², mask) + 2·corr(G·B, mask) for every integer shift at once (the g² terms cancel), searched PAD pixels
    past each edge, or within SHIFT pixels of near = (x, y). fits = _placement_fits(g, bg_img): the image
    transforms, computed once."""
    corr, FG, FBB, FGB = fits
    best = (np.inf, None)
    for scale in scales:
        T, m = _person_layer(size, scale, person, items, hands)
        if T.shape[0] > corr.H or T.shape[1] > corr.W:
            continue
        e = (m[..., None] * T * T).sum() - 2 * corr(FG, m[..., None] * T) - corr(FBB, m) + 2 * corr(FGB, m)
        if near is not None:  # only shifts within SHIFT px of the given placement
            keep = np.full(e.shape, np.inf)
            (x0, y0), r = (round(near[0]) + PAD, round(near[1]) + PAD), SHIFT
            keep[max(0, y0 - r):y0 + r + 1, max(0, x0 - r):x0 + r + 1] = 0
            e = e + keep
        v, u = np.unravel_index(int(e.argmin()), e.shape)
        if e[v, u] < best[0]:
            best = (float(e[v, u]), (int(u) - PAD, int(v) - PAD, scale))
    return best


def _placement_fits(g, bg_img):
    G = np.pad(g.astype(np.float64), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    B = np.pad(np.asarray(bg_img).astype(np.float64), ((PAD, PAD), (PAD, PAD), (0, 0)), mode="edge")
    corr = _Correlator(*G.shape[:2])
    return corr, corr.fft(G), corr.fft((B * B).sum(-1)), corr.fft((G * B).sum(-1))


def fit_layout(g, size, bg, details, person, items, given=None, fixed_details=False):
    """The placement, scale and pose of the expected person and items in g (fit_placement at the default pose,
    then each hand's height in turn, the placement refitted for every candidate), then the sun's exact centre.
    given: the layout an edit's input fixes; then only a shift of up to SHIFT px is searched (scale and pose kept).
    fixed_details: the horizon and sun are given too (an edit that keeps its background), not refined."""
    fits = _placement_fits(g, draw_background(size, bg, details)[0])
    if given is not None:
        hands = list(given["hands"])
        e, (x, y, scale) = fit_placement(fits, size, person, items, hands, [given["scale"]], (given["x"], given["y"]))
    else:
        hands = [HAND_Y, HAND_Y]
        e, (x, y, scale) = fit_placement(fits, size, person, items, hands)
        options = ([[[h, h] for h in BOTH_HAND_YS]] if "both_hands" in items else
                   [[[h, None] for h in HAND_YS], [[None, h] for h in HAND_YS]])
        for option in options:  # each hand's height at the scale found, then the scale again
            for cand in option:
                cand = [c if c is not None else hands[j] for j, c in enumerate(cand)]
                ec, fit = fit_placement(fits, size, person, items, cand, [scale])
                if ec < e:
                    e, (x, y, scale), hands = ec, fit, cand
        k = SCALES.index(scale)
        e, (x, y, scale) = fit_placement(fits, size, person, items, hands, SCALES[max(0, k - 1):k + 2])
    lay = dict(details, x=x, y=y, scale=scale, hands=hands)
    if fixed_details:  # the input's horizon and sun, moved with the placement found
        dx, dy = x - given["x"], y - given["y"]
        return dict(lay, horizon=lay["horizon"] + dy, sun=[lay["sun"][0] + dx, lay["sun"][1] + dy] if lay["sun"] else None)
    gf = g.astype(np.float32)

    def err(**change):
        return float(((np.asarray(draw_scene(size, bg, person, items, dict(lay, **change)), np.float32) - gf) ** 2).sum())
    if SCENES[bg][1]:  # the row profile can miss the horizon by a row where the person covers it: refine on renders
        lay["horizon"] = min(range(max(0, lay["horizon"] - 2), min(size[1], lay["horizon"] + 2) + 1),
                             key=lambda h: err(horizon=h))
    if lay["sun"]:  # the box-filter peak moves where the person hides part of the sun (whether a sun there fits
        lay["sun"] = refine_sun(lay["sun"], lambda p: err(sun=p))  # better than none is the judge's to decide)
    return lay


def refine_sun(sun, err):
    """The sun centre near `sun` with the least err(centre): an 8-px neighbourhood in steps of 2, then ±1 px."""
    sx, sy = min(([sun[0] + i, sun[1] + j] for i in range(-8, 9, 2) for j in range(-8, 9, 2)), key=err)
    return min(([sx + i, sy + j] for i in range(-1, 2) for j in range(-1, 2)), key=err)


def equivalent_blur(g, t_img):
    """The Gaussian blur radius σ that brings the re-rendered scene closest to g (mean squared error, parabolic
    interpolation between the radii tried): 0 for a sharp image, ~r for a Gaussian blur of radius r."""
    gf = g.astype(np.float32)
    e = [float(((np.asarray(t_img.filter(ImageFilter.GaussianBlur(s)) if s else t_img, np.float32) - gf) ** 2).mean())
         for s in BLURS]
    k = int(np.argmin(e))
    if 0 < k < len(BLURS) - 1:
        den = e[k - 1] - 2 * e[k] + e[k + 1]  # vertex of the parabola through three points (the grid is not uniform
        if den > 0:                          # at the top end; there the step of the left side is used)
            step = BLURS[k] - BLURS[k - 1]
            return float(BLURS[k] + step * 0.5 * (e[k - 1] - e[k + 1]) / den)
    return BLURS[k]


@functools.lru_cache(maxsize=1)
def _judge_vae():
    return V.load_vae(JUDGE_VAE).float().eval()


@torch.no_grad()
def vae_round_trip(img):
    """The toy VAE's reconstruction of a PIL image as float [H, W, 3] in 0..255: what the pipeline can represent."""
    x = _judge_vae().decode(_judge_vae().encode(pack.image_to_tensor(img)[None]))[0]
    return np.asarray(pack.tensor_to_image(x), np.float32)


def _fidelity(gf, t_img, bg_img, lay, tf, box, ground, vae=True):
    """(t_img, clean shares, worst region, equivalent blur) of g [H, W, 3] float against the re-render t_img at layout
    lay, whose background alone is bg_img. A pixel is clean within CLEAN of any reference — the render, its blurs up
    to the output's own plus 0.5 px, and (only where those leave a region short of CLEAN_HI) its VAE round trip —
    each allowed a one-pixel shift (the VAE moves a small disk's centre by a pixel)."""
    H, W = gf.shape[:2]
    blur = equivalent_blur(gf, t_img)
    err = np.full((H, W), np.inf, dtype=np.float32)

    def add(ref):  # err = min(err, the ref's max-channel error under every 1-px shift)
        rp = np.pad(ref, ((1, 1), (1, 1), (0, 0)), mode="edge")
        for dy in range(3):
            for dx in range(3):
                np.minimum(err, np.abs(gf - rp[dy:dy + H, dx:dx + W]).max(-1), out=err)
    for r in sorted({0.0, blur, *(r for r in BLURS if 0 < r <= blur + 0.5)}):  # each radius once
        add(np.asarray(t_img.filter(ImageFilter.GaussianBlur(r)) if r else t_img, np.float32))
    bare = (np.asarray(t_img) == np.asarray(bg_img)).all(-1)  # where the render shows the bare background
    horizon = lay["horizon"] if ground else None
    shares = clean_shares(err <= 255 * CLEAN, bare, t_img.size, tf, box, horizon)
    if vae and min(shares.values()) < CLEAN_HI:  # the VAE round trip only adds clean pixels: run it if it may matter
        add(vae_round_trip(t_img))
        shares = clean_shares(err <= 255 * CLEAN, bare, t_img.size, tf, box, horizon)
    return t_img, shares, min(shares, key=shares.get), blur


def _sky_windows(px, size):
    """Sums of px [H, W] over every sun-sized window of the upper half (where the world puts a sun), and k."""
    k = 2 * math.ceil(SUN_R * min(size)) + 1
    return _window_sums(px[: max(k, size[1] // 2 + k // 2)], k), k


def _sun_guess(gf, t_none, sky_img, size, bare_only):
    """The centre of the sun-sized window of the sky that the sunless render t_none explains least; bare_only: over
    the pixels where it shows the bare background sky_img, 2 px away from anything else (the VAE's halo around the
    person), else over all (a sun half hidden behind the head)."""
    t = np.asarray(t_none, np.float32)
    err = np.abs(gf - t).max(-1)
    if bare_only:
        bare = np.pad((t == np.asarray(sky_img, np.float32)).all(-1), 2, constant_values=True)
        H, W = err.shape
        err = err * np.min([bare[dy:dy + H, dx:dx + W] for dy in range(5) for dx in range(5)], 0)
    box, k = _sky_windows(err, size)
    y, x = np.unravel_index(int(box.argmax()), box.shape)
    return [int(x) + k // 2, int(y) + k // 2]


def clean_shares(clean_px, bare, size, tf, box, horizon):
    """The share of clean pixels in the whole image and in each region whose content the inputs leave free, each on
    its own: the five item regions (the hand regions hold the arms), for scenes with a ground the horizon's rows
    (horizon: the fitted row, None without a ground) and the sky's worst sun-sized window, these two over the pixels
    where the re-render shows the bare background (bare: a blended horizon, a faint, extra or missing sun, a ghost
    arm in the sky — not the person's own details, which would dilute them). A ghost
    arm, a blended horizon or a half-transparent sun is a few percent of the image but most of its own region."""
    W, H = size
    shares = {"image": float(clean_px.mean())}
    for r, b in box.items():
        px = _crop(clean_px, b, tf)
        if px.size:
            shares[r] = float(px.mean())
    if horizon is not None:  # over the bare ground and sky: the rows the horizon may take, and the rows within a
        # latent pixel (8 px) of the fitted horizon, where a blend of neighbouring horizons lies
        bands = [(math.floor(HORIZON[0] * H) - 2, math.ceil(HORIZON[1] * H) + 2), (horizon - 8, horizon + 9)]
        shares["horizon"] = min(float(clean_px[a:b][bare[a:b]].mean()) if bare[a:b].any() else 1.0 for a, b in bands)
    n_bare, k = _sky_windows(bare, size)
    n_clean, _ = _sky_windows(clean_px & bare, size)
    mostly_bare = n_bare >= k * k / 2  # windows that are mostly sky
    if mostly_bare.any():
        shares["sun"] = float((n_clean[mostly_bare] / n_bare[mostly_bare]).min())
    return shares


def _grad(x):  # mean |image gradient| of [H, W, 3]
    x = x.astype(np.float32)
    return float(np.abs(np.diff(x, axis=0)).mean() + np.abs(np.diff(x, axis=1)).mean())


def _ramp(v, lo, hi):
    return float(min(1.0, max(0.0, (v - lo) / (hi - lo))))

# -----------------------------------------------------------------------------
# the judge: scoring


def judge(image, scene):
    """Score one generated image against its scene index; see the module docstring. The scene's own layout
    (one valid draw) is never read: the judge finds the layout in the image."""
    size, bg, person, items = tuple(scene["size"]), scene["background"], scene["person"], scene["items"]
    img = pack.to_rgb(image)
    g = np.asarray(img if img.size == size else img.resize(size, Image.BICUBIC))

    # 1. background and its details (an edit keeps its input's, unless it changes the background)
    seen_bg, details, _ = fit_background(g, size)
    bg_ok = seen_bg == bg
    details = details or dict(horizon=round(0.62 * size[1]), sun=None)
    given = scene["layout"] if scene["kind"] == "edit" else None  # an edit's input fixes its layout
    fixed = given is not None and scene["op"] != "background"
    if fixed:
        details = dict(horizon=given["horizon"], sun=given["sun"])
    # 2. placement, scale and pose of the expected person, on the background seen (or the expected one)
    lay = fit_layout(g, size, seen_bg or bg, details, person, items, given, fixed)
    tf, box = transform(size, lay), regions(lay["hands"])

    def render(bg=seen_bg or bg, person=person, items=items):
        return np.asarray(draw_scene(size, bg, person, items, lay))

    # 3. identity: head shape and skin jointly from the face, shirt colour from the torso, only outside the
    # item regions (the candidates take the generated pixels there)
    in_items = np.zeros(g.shape[:2], dtype=bool)
    for b in box.values():
        _crop(in_items, b, tf)[...] = True

    def person_crop(b, **change):
        return _crop(np.where(in_items[..., None], g, render(person=person | change)), b, tf)
    faces = [(h, s) for h in HEADS for s in SKINS]
    k = nearest(_crop(g, FACE, tf), [person_crop(FACE, head=h, skin=s) for h, s in faces])
    seen = dict(zip(("head", "skin"), faces[k])) if k >= 0 else {}
    k = nearest(_crop(g, SHIRT, tf), [person_crop(SHIRT, shirt=c) for c in SHIRTS])
    seen |= {"shirt": list(SHIRTS)[k]} if k >= 0 else {}
    identity = sum(seen.get(a) == person[a] for a in ("head", "skin", "shirt")) / 3

    # 4. items: classify every region among empty + each item that fits there, drawn over the person seen
    seen_person = person | seen
    base_img = draw_scene(size, seen_bg or bg, seen_person, None, lay)
    base, behind = np.asarray(base_img), {}

    def with_item(p, cat, colour):
        if p == "both_hands":  # held behind the body: a full render, shared by both hand regions
            if (cat, colour) not in behind:
                behind[cat, colour] = render(person=seen_person, items={p: [cat, colour]})
            return behind[cat, colour]
        im = base_img.copy()
        paint_item(ImageDraw.Draw(im), tf, cat, colour, p, lay["hands"])
        return np.asarray(im)

    got, expect = {}, {}
    for r, b in box.items():
        cands = [None] + [(p, cat, c) for p in POSITIONS if r in COVERS[p] for cat in CATS_AT[p] for c in COLOURS]
        k = nearest(_crop(g, b, tf), [_crop(with_item(*c) if c else base, b, tf) for c in cands])
        got[r] = cands[k] if k >= 0 else "unrecognised"
        expect[r] = next(((p, *v) for p, v in items.items() if r in COVERS[p]), None)
    right = {p: all(got[r] == expect[r] for r in COVERS[p]) for p in POSITIONS}
    asked = [p for p in scene["checked"] if p != "background"]
    credit = {p: right[p] for p in asked} | ({"background": bg_ok} if "background" in scene["checked"] else {})
    kept = [p for p in items if p not in asked]  # edits: items that must survive unchanged
    lost = [p for p in kept if not right[p]]
    spurious = [r for r in box if expect[r] is None and got[r] is not None and all(r not in COVERS[p] for p in asked)]
    adherence = sum(credit.values()) / (len(credit) + len(lost) + len(spurious))

    # 5. quality against the scene as seen (asked items where a region is unrecognised), on the right background
    shown = {}
    for r in box:
        c = got[r] if got[r] != "unrecognised" else expect[r]
        if c:
            shown[c[0]] = list(c[1:])
    if shown != items or seen_person != person:  # quality at the layout that explains the items as seen
        lay = fit_layout(g, size, seen_bg or bg, details, seen_person, shown, given, fixed)
        tf, box = transform(size, lay), regions(lay["hands"])
    gf, ground = g.astype(np.float32), SCENES[seen_bg or bg][1] is not None
    render = lambda o: draw_scene(size, seen_bg or bg, seen_person, shown, o)
    # a free sun the judge is unsure of (faint or off-colour after the VAE, half hidden) is judged several ways — at
    # the position fitted, absent, at the sky's least-explained sun-sized spot (over the bare sky, then anywhere) —
    # until one leaves the image fully clean; the best one stands
    options = [lay]
    if not fixed and bg_ok:  # (with the wrong background quality is 0 whatever the sun)
        none = dict(lay, sun=None)
        t_none, sky = render(none), draw_background(size, seen_bg or bg, none)[0]
        err = lambda p: float(((np.asarray(render(dict(lay, sun=p)), np.float32) - gf) ** 2).sum())
        for bare in (True, False):  # each guess refined on renders, as the fitted sun was
            options.append(dict(lay, sun=refine_sun(_sun_guess(gf, t_none, sky, size, bare), err)))
        options.insert(1, none)
    best, tried = None, []
    for o in options:
        if o["sun"] in tried:
            continue
        tried.append(o["sun"])
        t_img, shares, worst, blur = _fidelity(gf, render(o), draw_background(size, seen_bg or bg, o)[0], o, tf, box,
                                               ground, vae=bg_ok)
        if best is None or shares[worst] > best[2][best[3]]:
            best = (o, t_img, shares, worst, blur)
        if shares[worst] >= CLEAN_HI:
            break
    lay, t_img, shares, worst, blur = best
    t = np.asarray(t_img, np.float32)
    sharpness = _grad(gf) / max(_grad(t), 1e-6)
    quality = _ramp(shares[worst], CLEAN_LO, CLEAN_HI) * _ramp(-blur, -BLUR_BAD, -BLUR_OK) if bg_ok else 0.0
    psnr = 10 * math.log10(255 ** 2 / max(float(((gf - t) ** 2).mean()), 255 ** 2 * 1e-10))  # at most 100 dB
    overall = math.sqrt(min(adherence, identity) * quality)
    all_correct = float(adherence == 1 and identity == 1 and bg_ok and quality >= 0.9)
    return dict(adherence=adherence, identity=identity, quality=quality, sharpness=sharpness, blur=blur, psnr=psnr,
                overall=overall, all_correct=all_correct, clean=shares["image"], worst=worst,
                worst_clean=shares[worst], items=credit, lost=lost, spurious=spurious, layout=lay, background=seen_bg)


# -----------------------------------------------------------------------------
# the benchmark, its table, oracles

N_TRAIN_KEYS = 20_000  # bench / validation scenes equal to one of the first this many training scenes are replaced


@functools.lru_cache(maxsize=1)
def training_keys(n=N_TRAIN_KEYS):
    world = ToyWorld(TRAIN_SEED)
    return frozenset(scene_key(world.scene(i)) for i in range(n))


def toycom_cases(n=200, n_edit=100, split="bench"):
    """The fixed benchmark (split "bench") or the validation split ("val"): n compositions (first half 2–3
    inputs, second half 4–6), then n_edit edits cycling through the edit ops. Each group draws from its own
    index range, so a smaller n is the first cases of each group of the full bench. Scenes that repeat a training
    scene are skipped. Each case: input_images, output_image, instruction, scene, group, index."""
    world = ToyWorld({"bench": BENCH_SEED, "val": VAL_SEED}[split], BENCH_WORLD, held_out=True)
    train = training_keys()

    def draw(start, **force):
        i = start
        while scene_key(world.scene(i, **force)) in train:
            i += 1_000
        return world.sample(i, **force)

    cases = []
    for j in range(n):
        small = j < n // 2
        jj = j if small else j - n // 2
        s = draw(jj if small else 50_000 + jj, kind="compose", n_inputs=2 + jj % 2 if small else 4 + jj % 3)
        cases.append(s | dict(group="2-3 images" if small else "4-6 images"))
    for j in range(n_edit):
        op = EDIT_OPS[j % len(EDIT_OPS)]
        cases.append(draw(100_000 + j, kind="edit", op=op) | dict(group=op))
    return [c | dict(index=i) for i, c in enumerate(cases)]


def _means(scores):
    """Mean of every metric and its standard error (suffix _se) over cases."""
    out = dict(n=len(scores))
    for m in METRICS:
        v = np.array([s[m] for s in scores], dtype=np.float64)
        out[m] = float(v.mean())
        out[m + "_se"] = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else 0.0
    return out


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
        if not isinstance(part, dict) or "overall" not in part:
            continue
        lines.append(f"{'ToyCom-Bench v2.1 ' + name:<26}" + "".join(f"{g:>16}" for g in part))
        for m in METRICS:
            lines.append(f"{m:<26}" + "".join(f"{v[m]:>9.3f} ±{v[m + '_se']:.3f}" if m != "psnr" else
                                              f"{v[m]:>10.2f} ±{v[m + '_se']:.2f}" for v in part.values()))
        lines.append(f"{'cases':<26}" + "".join(f"{v['n']:>16}" for v in part.values()))
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
    images, scores, seconds = [], [], 0.0
    for b in tqdm(range(0, len(cases), batch_size), desc="toycom", disable=len(cases) <= batch_size):
        batch = cases[b:b + batch_size]
        t0 = time.perf_counter()
        out = generate_fn(batch)
        seconds += time.perf_counter() - t0
        if len(out) != len(batch):
            raise ValueError(f"generate_fn returned {len(out)} images for {len(batch)} cases")
        images += out
        scores += [judge(im, c["scene"]) for im, c in zip(images[b:], batch)]
    table = make_table(cases, scores) | dict(seconds_per_case=seconds / max(1, len(cases)))
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


ORACLES = ["exact", "redraw", "redraw_posed", "mean2", "mean4", "mean16", "ghost", "shift2", "blur1", "blur2", "blank",
           "noise", "shuffled", "person", "refs_mean", "refs_pasted", "text_only", "noop"]


def _redraw(case, k, grid="free", free_only=False):
    """The case's scene at the k-th other layout drawn on the world's grid ("free" or "posed": placement, pose,
    details): another valid target of a composition, a wrong one for an edit. free_only: an edit keeps what its
    input fixes and redraws only what it leaves free (a new background's horizon and sun)."""
    sc = case["scene"]
    rng = random.Random(f"redraw/{case['index']}/{k}")
    lay = ToyWorld(TRAIN_SEED, WorldConfig(layout=grid)).layout(rng, sc["size"], sc["items"], sc["background"])
    if free_only and sc["kind"] == "edit":
        lay = dict(sc["layout"], **({k: lay[k] for k in ("horizon", "sun")} if sc["op"] == "background" else {}))
    return render_target(dict(sc, layout=lay))


def _pixel_mean(images):
    return Image.fromarray(np.mean([np.asarray(im, dtype=np.float32) for im in images], 0).round().astype(np.uint8))


def _ghost(case):
    """The exact target with one arm at two heights, half opacity each: what a few-step sampler that has not chosen
    a pose draws (both arms, under a two-handed item that holds them level)."""
    sc = case["scene"]
    h = sc["layout"]["hands"]
    if "both_hands" in sc["items"]:
        other = [h[0] + 4 if h[0] + 4 <= BOTH_HAND_YS[-1] else h[0] - 4] * 2
    else:
        other = [h[0] + 6 if h[0] + 6 <= HAND_YS[-1] else h[0] - 6, h[1]]
    return _pixel_mean([case["output_image"], render_target(dict(sc, layout=dict(sc["layout"], hands=other)))])


def _text_only(case, rng):
    """What a generator that never looks at the item images can draw: the person, the right background and a valid
    layout copied, each asked item's category read from the instruction where it is named (else guessed), its
    colour guessed."""
    sc, items = case["scene"], {}
    for k, src in enumerate(sc["sources"], 1):
        if src["kind"] == "item":
            p = src["position"]
            m = re.search(rf"the ([a-z ]+?) (?:from|of) Image{k}\b", case["instruction"])
            named = m.group(1) if m and m.group(1) in CATEGORIES else None
            items[p] = [named or rng.choice(CATS_AT[p]), rng.choice(list(COLOURS))]
    return draw_scene(sc["size"], sc["background"], sc["person"], items, sc["layout"])


def _pasted(case, rng):
    """The references (as the model sees them, jointly resized) pasted at random places on the first one."""
    size = tuple(case["scene"]["size"])
    refs = pack.joint_resize(case["input_images"], size[0] * size[1])
    canvas = refs[0].resize(size)
    for im in refs[1:]:
        w, h = min(im.width, size[0]), min(im.height, size[1])
        canvas.paste(im.resize((w, h)), (rng.randint(0, size[0] - w), rng.randint(0, size[1] - h)))
    return canvas


def oracle(name, cases):
    """A generate_fn for judge sanity (README table): valid outputs (exact, a 2-px shift, Gaussian blur of radius 1,
    and for a composition another valid draw, free or posed: "redraw", "redraw_posed"), and generators that must
    fail (an edit redrawn at another layout; the pixel mean of 2, 4 or 16 draws of the training world's layouts and
    a one-arm ghost: a collapsed few-step sample; blur radius 2, blank, noise, another case's target, the person
    alone, the pixel mean of the references, the references pasted anywhere, items drawn from the instruction alone,
    the input copied back as an edit)."""
    if name not in ORACLES:
        raise ValueError(f"unknown oracle {name!r}, expected one of {', '.join(ORACLES)}")

    def one(c):
        size, rng = tuple(c["scene"]["size"]), random.Random(f"{name}/{c['index']}")
        if name == "exact":
            return c["output_image"]
        if name in ("redraw", "redraw_posed"):
            return _redraw(c, 0, "posed" if name == "redraw_posed" else "free")
        if name in ("mean2", "mean4", "mean16"):  # the pixel mean of k draws of the training world (toy:posed)
            return _pixel_mean([_redraw(c, k, "posed", free_only=True) for k in range(int(name[4:]))])
        if name == "ghost":
            return _ghost(c)
        if name == "shift2":  # two pixels right, the uncovered column repeated
            a = np.asarray(c["output_image"])
            return Image.fromarray(np.concatenate([a[:, :1]] * 2 + [a[:, :-2]], 1))
        if name in ("blur1", "blur2"):
            return c["output_image"].filter(ImageFilter.GaussianBlur(int(name[-1])))
        if name == "blank":
            return Image.new("RGB", size, (255, 255, 255))
        if name == "noise":
            return Image.fromarray(np.random.default_rng(c["index"]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        if name == "shuffled":
            return cases[(c["index"] + len(cases) // 2) % len(cases)]["output_image"].resize(size)
        if name in ("person", "noop"):  # the first input: the person alone, or (editing) the unedited image
            return c["input_images"][0].resize(size, Image.BICUBIC)
        if name == "refs_mean":
            return _pixel_mean([im.resize(size) for im in c["input_images"]])
        if name == "refs_pasted":
            return _pasted(c, rng)
        return _text_only(c, rng) if c["scene"]["kind"] == "compose" else c["input_images"][0].resize(size)

    return lambda batch: [one(c) for c in batch]


def model_generate(pipe, steps, cfg, sampler=None, seed=0):
    """A generate_fn that runs the sampler (sample.py) on a batch of cases, at each case's target size."""

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

    @torch.no_grad()
    def generate(batch):
        return [pack.tensor_to_image(vae.decode(vae.encode(pack.image_to_tensor(c["output_image"])[None]))[0]) for c in batch]

    return generate


VALID_Q = 0.5  # a sample counts as valid in precision / coverage: everything right (asked items, identity,
#               background) at quality >= this


def layout_key(lay):
    """A layout binned to what a person tells apart: placement to 4 px and the scale, each hand's height, the
    horizon to 8 px, the sun's presence and its place to 16 px."""
    sun = None if not lay.get("sun") else (round(lay["sun"][0]) // 16, round(lay["sun"][1]) // 16)
    return (round(lay["x"]) // 4, round(lay["y"]) // 4, lay["scale"], tuple(lay["hands"]), round(lay["horizon"]) // 8,
            sun)


def offered(case, draws=64):
    """How many distinct layouts (layout_key) the training world (toy:posed) offers this composition."""
    sc, world = case["scene"], ToyWorld(TRAIN_SEED, WorldConfig(layout="posed"))
    return len({layout_key(world.layout(random.Random(f"offered/{k}"), sc["size"], sc["items"], sc["background"]),
                           ) for k in range(draws)})


def precision_coverage(make_generate, cases, k=4):
    """The distribution a sampler draws for each composition, sampled with k seeds (make_generate(seed) ->
    generate_fn): precision, the share of samples that are valid and sharp (every asked item, the identity and the
    background right at quality >= VALID_Q); coverage, the distinct layouts (layout_key: pose, horizon, sun,
    placement) among a case's valid samples over min(k, the number the training world offers), averaged over
    cases. A sampler collapsed to one answer per case has coverage 1/k; a blurred mean of answers, precision 0."""
    keys = [[] for _ in cases]
    n_valid = 0
    for seed in range(k):
        for j, (im, c) in enumerate(zip(make_generate(seed)(cases), cases)):
            s = judge(im, c["scene"])
            if s["adherence"] == 1 and s["identity"] == 1 and s["background"] == c["scene"]["background"] \
                    and s["quality"] >= VALID_Q:
                n_valid += 1
                keys[j].append(layout_key(s["layout"]))
    cover = [len(set(ks)) / min(k, offered(c)) for ks, c in zip(keys, cases)]
    return dict(precision=n_valid / (k * len(cases)), coverage=float(np.mean(cover)),
                coverage_se=float(np.std(cover, ddof=1) / math.sqrt(len(cases))) if len(cases) > 1 else 0.0,
                k=k, n=len(cases))


def main(argv=None):
    p = argparse.ArgumentParser(description="ToyCom-Bench v2.1: judge generated images on the held-out toy benchmark.",
                                formatter_class=sample.HelpFormatter)
    p.add_argument("--transformer", help="judge this transformer folder, sampled with sample.py in CKPT's pipeline "
                   "(default: none; an oracle is judged)")
    sample.add_sampling_flags(p)
    p.add_argument("--oracle", choices=ORACLES + ["vae"], default="exact",
                   help="without --transformer: a generator with known answers (see oracle())")
    p.add_argument("--split", choices=["bench", "val"], default="bench", help="val: for recipe choices; bench: results")
    p.add_argument("--n", type=int, default=200, help="composition cases (half 2-3, half 4-6 inputs)")
    p.add_argument("--n_edit", type=int, default=100, help="editing cases")
    p.add_argument("--coverage", type=int, default=0, help="K > 0: also sample the first --coverage_cases compositions "
                   "with K seeds each and report precision and coverage (model only)")
    p.add_argument("--coverage_cases", type=int, default=40, help="compositions for --coverage")
    p.add_argument("--out", default="out/eval", help="folder for table.json, scores.jsonl and grid.png")
    args = p.parse_args(argv)
    for flag in ("n", "n_edit", "coverage", "coverage_cases"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} must be >= 0, got {getattr(args, flag)}")
    cases = toycom_cases(args.n, args.n_edit, args.split)
    try:
        if args.transformer:
            pipe = sample.load_pipeline(args.ckpt, args.transformer)
            args.cfg = args.cfg if args.cfg is not None else pipe.default_cfg(args.sampler)
            generate_fn = model_generate(pipe, args.steps, args.cfg, args.sampler, args.seed)
            print(f"{args.transformer or 'the default transformer'}: {args.sampler or pipe.sampler}, "
                  f"{args.steps or 'default'} steps, CFG {args.cfg}")
        elif args.oracle == "vae":
            generate_fn = vae_generate(V.load_vae(os.path.join(args.ckpt, "vae")))
        else:
            generate_fn = oracle(args.oracle, cases)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    table = evaluate(generate_fn, cases, args.out)
    print(format_table(table))
    print(f"generation: {table['seconds_per_case']:.3f} s per case (batches of 16, this machine)")
    if args.coverage and args.transformer:
        comp = [c for c in cases if c["scene"]["kind"] == "compose"][:args.coverage_cases]
        table["distribution"] = precision_coverage(lambda s: model_generate(pipe, args.steps, args.cfg, args.sampler, s),
                                                   comp, args.coverage)
        print(f"precision / coverage: {table['distribution']}")
        with open(os.path.join(args.out, "table.json"), "w") as f:
            json.dump(table, f, indent=1)
    print(f"wrote {args.out}/table.json, scores.jsonl, grid.png")
    return table


if __name__ == "__main__":
    main()
