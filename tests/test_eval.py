"""eval.py: the ToyCom-Bench judge cannot be fooled (exact = 1, blank / noise / another case's target ≈ 0, one
wrong item costs exactly that item), the fixed benchmark, the table, the CLI."""
import json

import numpy as np
import pytest
from PIL import Image

from data import (BENCH_SEED, CATS_AT, COLOURS, EDIT_OPS, OUT_SIZES, POSITIONS, SHIRTS, ToyWorld, WorldConfig,
                  draw_scene)
from eval import COVERS, REGIONS, _crop, format_table, judge, main, oracle, toycom_cases


@pytest.fixture(scope="module")
def cases():
    return toycom_cases(24, 10)


def _scores(cases, name):
    return [judge(im, c["scene"]) for c, im in zip(cases, oracle(name, cases)(cases))]


def test_exact_targets_score_one(cases):
    for s in _scores(cases, "exact"):
        assert s["overall"] >= 0.99 and s["adherence"] == s["identity"] == s["quality"] == 1 and s["psnr"] >= 80


def test_exact_targets_score_one_at_every_output_size():
    world = ToyWorld(BENCH_SEED, held_out=True, cfg=WorldConfig(out_size=None))
    for i in range(12):
        s = world.sample(i, kind="edit" if i % 3 == 0 else "compose")
        assert judge(s["output_image"], s["scene"])["overall"] >= 0.99, s["scene"]["size"]
        assert judge(Image.new("RGB", s["output_image"].size), s["scene"])["overall"] <= 0.2


@pytest.mark.parametrize("name", ["blank", "noise"])
def test_blank_and_noise_score_low(cases, name):
    scores = _scores(cases, name)
    print(f"{name}: mean overall {np.mean([s['overall'] for s in scores]):.4f}")
    assert all(s["overall"] <= 0.2 for s in scores)


def test_flat_grey_and_black_images_score_low(cases):
    for c in cases[::3]:
        for colour in ((0, 0, 0), (128, 128, 128)):
            assert judge(Image.new("RGB", tuple(c["scene"]["size"]), colour), c["scene"])["overall"] <= 0.2


def test_shuffled_targets_score_low(cases):
    """A clean image of another case is not rewarded: only an item it happens to share counts."""
    overall = [s["overall"] for s in _scores(cases, "shuffled")]
    print(f"shuffled: mean overall {np.mean(overall):.4f}, max {max(overall):.3f}")
    assert np.mean(overall) <= 0.2 and np.mean(np.array(overall) > 0.2) <= 0.1


def test_one_wrong_item_loses_exactly_its_credit(cases):
    """Removing, recolouring or changing the category of one item costs that item's credit and nothing else."""
    n_checked = 0
    for c in cases[::2]:
        sc = c["scene"]
        asked = [p for p in sc["checked"] if p in sc["items"]]
        for p in asked:
            cat, colour = sc["items"][p]
            other_cat = [x for x in CATS_AT[p] if x != cat][0]
            for change, items in (("remove", {q: v for q, v in sc["items"].items() if q != p}),
                                  ("recolour", sc["items"] | {p: [cat, next(x for x in COLOURS if x != colour)]}),
                                  ("category", sc["items"] | {p: [other_cat, colour]})):
                s = judge(draw_scene(sc["size"], sc["background"], sc["person"], items), sc)
                assert s["items"] == {q: q != p for q in sc["checked"]}, (sc, items)
                assert s["adherence"] == pytest.approx(1 - 1 / len(sc["checked"]))
                assert s["identity"] == 1
                # another shape may cover background the right one leaves clean
                assert s["quality"] == 1 if change != "category" else s["quality"] > 0.9
                n_checked += 1
    assert n_checked > 30


def test_identity_change_costs_only_identity(cases):
    sc = cases[30]["scene"]
    for change in ({"shirt": next(x for x in SHIRTS if x != sc["person"]["shirt"])},
                   {"head": "square" if sc["person"]["head"] != "square" else "round"}):
        s = judge(draw_scene(sc["size"], sc["background"], sc["person"] | change, sc["items"]), sc)
        assert s["identity"] == pytest.approx(2 / 3) and s["adherence"] == 1 and s["quality"] == 1


def test_unrequested_item_and_wrong_background_are_penalised():
    world = ToyWorld(BENCH_SEED, held_out=True)
    sc = next(s for s in (world.scene(i, kind="compose", n_inputs=3) for i in range(100))
              if "background" in s["checked"] and "head" not in s["items"])
    s = judge(draw_scene(sc["size"], sc["background"], sc["person"], sc["items"] | {"head": ["crown", "red"]}), sc)
    assert s["spurious"] == ["head"] and s["adherence"] == pytest.approx(1 - 1 / (len(sc["checked"]) + 1))
    other = next(b for b in ("studio", "night") if b != sc["background"])
    s = judge(draw_scene(sc["size"], other, sc["person"], sc["items"]), sc)
    assert s["items"]["background"] is False and s["quality"] == 0


def test_unedited_input_loses_exactly_the_edit(cases):
    """Copying the input image back is no edit: it loses the edited element's credit, nothing else."""
    for c in cases:
        sc = c["scene"]
        if sc["kind"] != "edit":
            continue
        src = sc["sources"][0]
        s = judge(draw_scene(sc["size"], src["background"], sc["person"], src["items"]), sc)
        assert s["adherence"] == pytest.approx(1 - 1 / len(sc["checked"])) and s["identity"] == 1, sc
        assert s["quality"] == 0 if sc["op"] == "background" else s["quality"] > 0.8


def test_judge_tolerates_mild_blur(cases):
    """A generator's slightly soft output (2× down-up) keeps its credit: the judge is not a pixel-exact match."""
    scores = [judge(c["output_image"].resize((64, 64), Image.BICUBIC).resize((128, 128), Image.BICUBIC), c["scene"])
              for c in cases]
    assert np.mean([s["overall"] for s in scores]) >= 0.95


@pytest.mark.parametrize("size", [(128, 128), OUT_SIZES[1], OUT_SIZES[2], (256, 256)])
def test_items_stay_in_their_regions(size):
    """The judge draws each candidate over the plain person alone; that is exact only if every item stays
    inside its own (disjoint) regions, at every output size."""
    for a in REGIONS:  # pairwise disjoint
        for b in REGIONS:
            A, B = REGIONS[a], REGIONS[b]
            assert a == b or A[2] <= B[0] or B[2] <= A[0] or A[3] <= B[1] or B[3] <= A[1], (a, b)
    person = {"head": "triangle", "skin": "deep", "shirt": "olive"}
    base = np.asarray(draw_scene(size, "park", person))
    for p in POSITIONS:
        for cat in CATS_AT[p]:
            changed = (np.asarray(draw_scene(size, "park", person, {p: [cat, "yellow"]})) != base).any(-1)
            inside = np.zeros_like(changed)
            for r in COVERS[p]:
                _crop(inside, REGIONS[r], size)[...] = True
            assert changed.any() and not (changed & ~inside).any(), (p, cat, size)


def test_bench_is_fixed_balanced_and_held_out():
    cases = toycom_cases()
    groups = [c["group"] for c in cases]
    assert groups.count("2-3 images") == 100 and groups.count("4-6 images") == 100
    assert all(groups.count(op) == 20 for op in EDIT_OPS) and len(cases) == 300
    n_in = {g: {len(c["input_images"]) for c in cases if c["group"] == g} for g in ("2-3 images", "4-6 images")}
    assert n_in == {"2-3 images": {2, 3}, "4-6 images": {4, 5, 6}}
    assert toycom_cases(4, 0)[3]["scene"] == toycom_cases(4, 0)[3]["scene"]
    with pytest.raises(ValueError, match="held-out"):
        ToyWorld(BENCH_SEED)


def test_cli_writes_table_and_grid(tmp_path, capsys):
    table = main(["--oracle", "exact", "--n", "4", "--n_edit", "5", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2-3 images" in out and "4-6 images" in out and "recolour" in out
    assert json.load(open(tmp_path / "table.json")) == table
    assert table["composition"]["overall"]["overall"] == 1 and table["editing"]["overall"]["n"] == 5
    assert Image.open(tmp_path / "grid.png").size[1] > 100
    assert len(open(tmp_path / "scores.jsonl").readlines()) == 9
    assert format_table(table).count("\n") == 13
