"""toyworld.py and data.py: the toy world (HOI conflict matrix, sources, sizes, determinism, throughput), the jsonl loader and
its validation, the joint resize of samples, the latent / embedding cache."""
import io
import json
import pickle
import time
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import pack
from data import JsonlDataset, LatentDataset, ToyDataset, cache_latents, write_jsonl
from toyworld import (BENCH_SEED, CATEGORIES, COLOURS, CONFLICT, EDIT_OPS, OUT_SIZES, POSITIONS, TOY_BUDGET, ToyWorld,
                      WorldConfig, draw_scene, instruction_corpus)

PERSON = {"head": "round", "skin": "tan", "shirt": "teal"}


def _body_parts(items):
    """The body parts a set of items occupies, written out independently of CONFLICT."""
    parts = []
    for pos, (cat, colour) in items.items():
        slot = CATEGORIES[cat]
        assert slot == pos or (slot == "hand" and pos in ("left_hand", "right_hand")), (cat, pos)
        assert colour in COLOURS
        parts += {"both_hands": ["left hand", "right hand"], "left_hand": ["left hand"],
                  "right_hand": ["right hand"]}.get(pos, [pos])
    return parts


def test_conflict_matrix_never_violated_over_10000_scenes():
    """One item per body part, a two-handed item takes both hands, one pair of footwear — in targets and in
    the scenes that editing starts from. A violation would teach physically impossible compositions."""
    assert (CONFLICT == CONFLICT.T).all() and CONFLICT.diagonal().all()
    world, used, n_items = ToyWorld(0), Counter(), Counter()
    for i in range(10_000):
        s = world.scene(i)
        for items in [s["items"]] + [src["items"] for src in s["sources"] if src["kind"] == "edit"]:
            parts = _body_parts(items)
            assert len(parts) == len(set(parts)), (i, items)
        used.update(list(s["items"]))
        n_items[len(s["items"])] += 1
    assert set(used) == set(POSITIONS) and set(n_items) == {0, 1, 2, 3, 4, 5}


def test_sources_count_2_to_6_and_sizes_vary():
    """Composition uses 2–6 sources, each named ImageK in the instruction; editing has one input; every edit op
    occurs; source sizes and aspects vary (the model must handle arbitrary inputs)."""
    world, counts, ops, sizes = ToyWorld(0), Counter(), Counter(), set()
    for i in range(2000):
        s = world.scene(i)
        K = len(s["sources"])
        if s["kind"] == "compose":
            counts[K] += 1
            assert s["sources"][0]["kind"] == "person"
            assert all(f"Image{k}" in s["instruction"] for k in range(1, K + 1))
            assert f"Image{K + 1}" not in s["instruction"]
        else:
            ops[s["op"]] += 1
            assert K == 1
        for src in s["sources"]:
            w, h = src["size"]
            assert 0.49 <= w / h <= 2.05
            sizes.add((w, h))
        assert s["size"] == [128, 128]
    assert set(counts) == {2, 3, 4, 5, 6} and set(ops) == set(EDIT_OPS)
    assert len(sizes) > 1000


def test_mixed_output_sizes_stay_within_the_budget():
    world = ToyWorld(0, WorldConfig(out_size=None))
    sizes = {tuple(world.scene(i)["size"]) for i in range(200)}
    assert sizes == set(OUT_SIZES)
    assert all(w % 16 == 0 and h % 16 == 0 and w * h <= TOY_BUDGET for w, h in sizes)


def test_world_is_deterministic_and_bench_seeds_are_held_out():
    a, b, c = ToyWorld(3).sample(7), ToyWorld(3).sample(7), ToyWorld(4).sample(7)
    assert a["scene"] == b["scene"] != c["scene"]
    for x, y in zip(a["input_images"] + [a["output_image"]], b["input_images"] + [b["output_image"]]):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="held-out"):
        ToyWorld(BENCH_SEED)


def test_items_are_large_enough_for_the_vae():
    """Every item spans >= 16 px in both directions and >= 24 px in one at a 128² target: >= 2×3 latent pixels
    after the VAE's 8× downsampling, so shape and not only colour can survive."""
    base = np.asarray(draw_scene((128, 128), "studio", PERSON))
    for cat, slot in CATEGORIES.items():
        pos = "right_hand" if slot == "hand" else slot
        img = np.asarray(draw_scene((128, 128), "studio", PERSON, {pos: [cat, "red"]}))
        ys, xs = np.nonzero((img != base).any(-1))
        w, h = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert min(w, h) >= 16 and max(w, h) >= 24, (cat, w, h)


def test_generator_throughput():
    """Data must never be the bottleneck: one toy training step costs far more than 1/50 s per sample."""
    world, n = ToyWorld(0), 200
    t = time.perf_counter()
    for i in range(n):
        world.sample(i)
    rate = n / (time.perf_counter() - t)
    print(f"toy world: {rate:.0f} samples/s")
    assert rate > 50


def test_samples_follow_the_joint_resize_rule():
    """References share the budget (sides multiples of 32), the target is resized on its own (official dataset)."""
    ds = ToyDataset(20, seed=1)
    for i in range(len(ds)):
        s, raw = ds[i], ds.world.sample(i)
        sizes = [im.size for im in s["input_images"]]
        assert sizes == [im.size for im in pack.joint_resize(raw["input_images"], TOY_BUDGET)]
        assert all(w % 32 == 0 and h % 32 == 0 for w, h in sizes)
        assert s["output_image"].size == (128, 128) and s["scene"] == raw["scene"]


def test_write_jsonl_roundtrip(tmp_path):
    path = write_jsonl(str(tmp_path), 6, seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = JsonlDataset(path)
    ref = ToyDataset(6, seed=2)
    assert len(ds) == 6 and not ds.skipped
    for i in range(6):
        a, b = ds[i], ref[i]
        assert a["instruction"] == b["instruction"] and a["scene"] == b["scene"]
        for x, y in zip(a["input_images"] + [a["output_image"]], b["input_images"] + [b["output_image"]]):
            assert np.array_equal(np.asarray(x), np.asarray(y))
    line = json.loads(open(path).readline())
    assert {"input_images", "output_image", "instruction"} <= line.keys()


def _bad_dataset(tmp_path):
    Image.new("RGB", (64, 48), "red").save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "t.png")
    Image.new("RGB", (400, 20)).save(tmp_path / "thin.png")  # aspect 20
    Image.new("RGB", (300, 300)).save(tmp_path / "big.png")  # over max_pixels below
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (tmp_path / "trunc.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])

    def rec(*ins):
        return json.dumps({"input_images": list(ins), "output_image": "t.png", "instruction": "x"})
    lines = [rec("a.png"), "{not json", json.dumps({"input_images": ["a.png"], "instruction": "x"}),
             rec("missing.png"), rec("garbage.png"), rec("trunc.png"), rec("thin.png"), rec("big.png"),
             rec(*["a.png"] * 7), "", rec("a.png", "t.png")]
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "d.jsonl")


def test_loader_skips_bad_lines_by_line_number(tmp_path):
    """Broken json, a missing key, a missing file, garbage and truncated images, a 20:1 aspect, an oversized
    image and 7 inputs are skipped with one counted warning naming line numbers; good lines load."""
    path = _bad_dataset(tmp_path)
    with pytest.warns(UserWarning, match="skipped 8 of 10 lines"):
        ds = JsonlDataset(path, max_pixels=256 * 256)
    assert [n for n, _ in ds.skipped] == [2, 3, 4, 5, 6, 7, 8, 9]
    assert "aspect" in ds.skipped[5][1] and "larger" in ds.skipped[6][1] and "7 input images" in ds.skipped[7][1]
    assert len(ds) == 2 and [len(ds[i]["input_images"]) for i in range(2)] == [1, 2]


def test_loader_never_crashes_mid_epoch(tmp_path):
    """Without up-front decoding, the truncated image passes the header check and fails only when loaded:
    that sample is skipped (line number reported) and another one returned."""
    path = _bad_dataset(tmp_path)
    with pytest.warns(UserWarning):
        ds = JsonlDataset(path, max_pixels=256 * 256, verify=False)
    assert len(ds) == 3
    with pytest.warns(UserWarning, match="line 6"):
        batch = [ds[i] for i in range(len(ds))]
    assert all(len(s["input_images"]) >= 1 for s in batch)
    assert 6 in [n for n, _ in ds.skipped]


def _encode_image(x):  # [1, 3, H, W] -> [1, 6, H/8, W/8]: a stand-in VAE
    return torch.nn.functional.avg_pool2d(x, 8).repeat(1, 2, 1, 1)


def _encode_text(prompts, images):  # -> emb [1, L + 3, 4] with 3 padding rows, mask [1, L + 3]
    L = len(prompts[0].split())
    emb = torch.cat([torch.arange(L * 4.0).view(1, L, 4) + len(images[0]), torch.full((1, 3, 4), -7.0)], 1)
    return emb, torch.arange(L + 3)[None] < L


def test_latent_cache_roundtrip(tmp_path):
    """The cache returns exactly what the encoders gave, per-sample shapes kept, padding dropped, across shards."""
    ds = ToyDataset(5, seed=1, cfg=WorldConfig(out_size=None))
    cache_latents(ds, _encode_image, _encode_text, str(tmp_path / "c"), shard_size=2)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "index.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    lat = pickle.loads(pickle.dumps(LatentDataset(str(tmp_path / "c"))))
    for i in range(len(ds)):
        s, e = ds[i], lat[i]
        assert torch.equal(e["target"], _encode_image(pack.image_to_tensor(s["output_image"])[None])[0])
        assert len(e["refs"]) == len(s["input_images"])
        for z, im in zip(e["refs"], s["input_images"]):
            assert torch.equal(z, _encode_image(pack.image_to_tensor(im)[None])[0])
        emb, mask = _encode_text([s["instruction"]], [s["input_images"]])
        assert torch.equal(e["txt"], emb[0][mask[0]])
        assert e["instruction"] == s["instruction"] and e["scene"] == s["scene"]
        rows = e["txt"].shape[0] + sum(z.shape[1] // 2 * (z.shape[2] // 2) for z in [e["target"]] + e["refs"])
        assert lat.length(i) == rows  # from the shard headers alone, for length-grouped batches
    pickle.dumps(lat)  # usable by DataLoader workers after it has opened shards


def test_instruction_corpus():
    corpus = instruction_corpus(2000, seed=0)
    assert corpus == instruction_corpus(2000, seed=0) and len(corpus) == 2000
    assert len(set(corpus)) > 1500
    text = " ".join(corpus)
    assert all(w in text for w in list(COLOURS) + list(CATEGORIES) + ["Image1", "Image6"])


def test_training_edits_and_bench_edits_are_one_distribution():
    """World v3: the bench's edits are held-out seeds of the edits the toy teachers train on (toy:posed), not a
    different layout distribution: the person near the full frame at one scale, the pose, horizon and sun on the
    posed grid, the same ops, item counts and source rescaling. (Compositions differ on purpose: trained posed,
    judged on any valid layout.)"""
    from data import toy_world_config
    from toyworld import BENCH_WORLD, HAND_YS, LAYOUTS
    train = ToyWorld(0, toy_world_config("toy:posed"))
    bench = ToyWorld(BENCH_SEED, BENCH_WORLD, held_out=True)
    n = 300
    edits = {name: [w.scene(i, kind="edit") for i in range(n)] for name, w in (("train", train), ("bench", bench))}
    posed = LAYOUTS["posed"]

    def summary(scenes):
        lays = [s["layout"] for s in scenes]
        W = [s["size"][0] for s in scenes]
        side = [np.ceil(l["scale"] * min(s["size"])) for l, s in zip(lays, scenes)]
        return dict(scales={l["scale"] for l in lays}, centred=all(l["x"] == (w - d) // 2 for l, w, d in zip(lays, W, side)),
                    hands={h for l in lays for h in l["hands"]}, horizon_grid=all(l["horizon"] % 8 == 0 for l in lays),
                    ops=Counter(s["op"] for s in scenes), sun=np.mean([l["sun"] is not None for l in lays]),
                    items=np.mean([len(s["sources"][0]["items"]) for s in scenes]),
                    rescale=np.mean([s["sources"][0]["size"][0] / s["size"][0] for s in scenes]))
    a, b = summary(edits["train"]), summary(edits["bench"])
    assert a["scales"] == b["scales"] == set(posed["scales"]) and a["centred"] and b["centred"]
    assert a["hands"] <= set(HAND_YS) and b["hands"] <= set(HAND_YS) and a["hands"] == b["hands"]
    assert a["horizon_grid"] and b["horizon_grid"] and set(a["ops"]) == set(b["ops"]) == set(EDIT_OPS)
    for key, tol in (("sun", 0.1), ("items", 0.3), ("rescale", 0.05)):  # same rates within sampling noise
        assert abs(a[key] - b[key]) <= tol, (key, a[key], b[key])
    assert all(max(c.values()) / min(c.values()) < 1.6 for c in (a["ops"], b["ops"]))  # ops drawn uniformly
