"""pack.py: 2×2 packing in the official channel order, the UniPic-3 joint resize rule, batch collation."""
import pytest
import torch
from PIL import Image

from pack import (collate, image_mask, image_to_tensor, joint_resize, pack, pad_text, target_rows, tensor_to_image,
                  to_rgb, unpack)


def test_pack_matches_diffusers_order_and_inverts():
    """Wrong channel order here would scramble every official latent the model sees."""
    from diffusers import QwenImageEditPlusPipeline as P

    z = torch.randn(2, 16, 6, 10)
    tokens = pack(z)
    assert torch.equal(tokens, P._pack_latents(z, 2, 16, 6, 10))
    assert torch.equal(unpack(tokens, 3, 5), z)
    assert torch.equal(P._unpack_latents(tokens, 48, 80, 8)[:, :, 0], z)
    # the documented index formula: t[b, r·(w/2)+col, ch·4+dy·2+dx] = z[b, ch, 2r+dy, 2col+dx]
    assert tokens[1, 1 * 5 + 3, 7 * 4 + 1 * 2 + 0] == z[1, 7, 3, 6]


def test_pack_rejects_odd_latents():
    with pytest.raises(ValueError, match="not even"):
        pack(torch.randn(1, 16, 5, 4))
    with pytest.raises(ValueError, match="cannot unpack"):
        unpack(torch.randn(1, 12, 64), 3, 5)


# hand-computed from the official rule: ratio = sqrt(budget)/sqrt(Σ w·h); round; round each side to 32
@pytest.mark.parametrize("sizes,budget,expect", [
    ([(1024, 1024)], 1024**2, [(1024, 1024)]),
    ([(1024, 1024)] * 2, 1024**2, [(736, 736)] * 2),  # 724.08 → 724 → 23·32
    ([(1024, 1024)] * 6, 1024**2, [(416, 416)] * 6),  # 418.04 → 418 → 13·32
    # ratio 1024/866.03 = 1.18241: 945.9→946→960, 709.4→709→704, 354.7→355→352, 1064.2→1064→1056
    ([(800, 600), (300, 900)], 1024**2, [(960, 704), (352, 1056)]),
    # toy budget 128²: ratio 128/√(5000+3200+4096)=1.15445: 115.4→115→128, 57.7→58→64, 46.2→46→32,
    # 92.4→92→96, 73.9→74→64
    ([(100, 50), (40, 80), (64, 64)], 128**2, [(128, 64), (32, 96), (64, 64)]),
    # six mixed aspects: Σ = 526096, ratio 1.41179: 1411.8→1412→1408, 141.2→141→128, 705.9→706→704,
    # 90.4→90→96, 423.5→424→416, 282.4→282→288, 42.4→42→32, 564.7→565→576
    ([(1000, 100), (100, 1000), (500, 500), (64, 64), (300, 200), (30, 400)], 1024**2,
     [(1408, 128), (128, 1408), (704, 704), (96, 96), (416, 288), (32, 576)]),
    # a side that would round to 0 is clamped to one multiple (the official code would fail on it)
    ([(2000, 2000), (10, 10)], 1024**2, [(1024, 1024), (32, 32)]),
])
def test_joint_resize_table(sizes, budget, expect):
    assert [im.size for im in joint_resize([Image.new("RGB", s) for s in sizes], budget)] == expect


def test_joint_resize_images_use_the_rule_and_rgb():
    ims = [Image.new("RGBA", (800, 600), (255, 0, 0, 0)), Image.new("L", (300, 900), 40)]
    out = joint_resize(ims)
    assert [im.size for im in out] == [(960, 704), (352, 1056)]
    assert all(im.mode == "RGB" for im in out)
    assert out[0].getpixel((10, 10)) == (255, 255, 255)  # fully transparent → white
    with pytest.raises(ValueError, match="at least one image"):
        joint_resize([])


def test_to_rgb_and_tensor_roundtrip():
    im = Image.new("RGBA", (4, 2), (0, 0, 255, 128))
    rgb = to_rgb(im)
    assert rgb.getpixel((0, 0)) == (127, 127, 255)  # half-transparent blue over white
    x = image_to_tensor(rgb)
    assert x.shape == (3, 2, 4) and x.min() >= -1 and x.max() <= 1
    assert tensor_to_image(x).tobytes() == rgb.tobytes()
    assert to_rgb(Image.new("CMYK", (2, 2))).mode == "RGB"


def test_collate_pads_and_masks():
    seqs = [torch.randn(12, 8), torch.randn(7, 8)]
    shapes = [[(3, 4)], [(1, 3), (2, 2)]]
    x = collate(seqs, shapes)
    assert x.shape == (2, 12, 8) and torch.equal(x[1, :7], seqs[1]) and not x[1, 7:].any()
    assert image_mask(shapes, 12).sum(1).tolist() == [12, 7]
    assert target_rows(shapes, 12).sum(1).tolist() == [12, 3]
    with pytest.raises(ValueError, match="sample 1: 7 tokens but its shapes"):
        collate(seqs, [[(3, 4)], [(2, 2)]])
    txt, mask = pad_text([torch.randn(3, 5), torch.randn(5, 5)])
    assert txt.shape == (2, 5, 5) and mask.sum(1).tolist() == [3, 5]
