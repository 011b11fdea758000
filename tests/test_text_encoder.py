"""text_encoder.py against independent references: transformers' Qwen2Tokenizer (tokenizers backend),
Qwen2VLImageProcessor and Qwen2_5_VLForConditionalGeneration (called with mm_token_type_ids, i.e. 3-D M-RoPE)."""
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pack  # noqa: E402
import text_encoder as te  # noqa: E402
import toy_assets  # the toy tokenizer's trainer and the writers of the official folders  # noqa: E402

transformers = pytest.importorskip("transformers")

CORPUS = ["Hello world! It's a test of the tokenizer; we'll see how it DOESN'T break.",
          "中文测试：把图片里的猫换成狗。日本語のテキストも少し。한국어 문장도.",
          "emoji 😀🎉👍🏽 and numbers 1234567890 3.14159 2026-01-09",
          "    indented code:\n\tdef f(x):\n\t\treturn x**2  # comment\r\n\r\n",
          "Make the sky red. Replace the cat in Image1 with the dog from Image2.",
          "Ünïcödé çàfé naïve résumé — “quotes” and ‘single’ … ellipsis", te.SYSTEM_PROMPT] * 3
BATTERY = CORPUS[:7] + [
    "", " ", "  ", "\n", " \n ", "a\n\n\nb", "x   y", "trailing   ", "   leading", "I'm you're he'd they've we'll it's",
    "IT'S WE'LL 'S 'sa 'll o'clock", "ſ'S 'ſ", "12345678901234567890", "١٢٣ ٤٥ Ⅻ ½ ²", "😀😀😀 👨‍👩‍👧", "\r\n\r\n",
    "<|im_start|>system\nhi<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>go<|im_end|>",
    "a<|image_pad|><|image_pad|>b <|endoftext|> <tool_call>x</tool_call>", "<|im_start|", "\x1c\x1d \x1e\x1f x",
    "a\u00a0b\u3000c\u2028d\u0085e", "e\u0301 cafe\u0301 (NFD input)", "tab\tsep\tvalues\t\n", "!!!??? ... ---",
    "zero\u200bwidth", "Mixed中文and English123数字"]


def tiny_hf_config(tok):
    ids = tok.added
    return transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok) + 7, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6}),
        # window 56 px = 2 merged tokens: every image below spans several (ragged) windows
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           window_size=56, fullatt_block_indexes=[1]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def perturb_(model, seed):
    # default inits leave biases 0 and norms 1; shake every parameter so all of them matter
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def rand_image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8), mode)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A pipeline folder holding our toy tokenizer and a random transformers model saved by transformers."""
    root = tmp_path_factory.mktemp("pipe")
    vocab, merges = toy_assets.train_bpe(CORPUS, 600)
    toy_assets.save_tokenizer(root / "tokenizer", vocab, merges)
    toy_assets.save_tokenizer(root / "processor", vocab, merges)
    tok = te.Tokenizer.from_folder(root / "tokenizer")
    torch.manual_seed(0)
    model = perturb_(transformers.Qwen2_5_VLForConditionalGeneration(tiny_hf_config(tok)), 1).eval()
    model.save_pretrained(root / "text_encoder")
    proc = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "image_mean": list(te.IMAGE_MEAN),
            "image_std": list(te.IMAGE_STD), "image_processor_type": "Qwen2VLImageProcessor"}
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(proc))
    return root


def hf_reference(model, hf_tok, texts, vl_images):
    """transformers run of the texts (one <|image_pad|> per image) with the images already at VL size."""
    proc = transformers.Qwen2VLImageProcessorPil(do_resize=False)
    flat = [im for row in vl_images for im in row]
    px = proc(images=flat, return_tensors="pt")
    grids, rows, k = px["image_grid_thw"], [], 0
    for text, imgs in zip(texts, vl_images):
        for _ in imgs:
            text = text.replace("<|image_pad|>", "<|placeholder|>" * int(grids[k].prod() // 4), 1)
            k += 1
        rows.append(hf_tok.encode(text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False))
    L = max(map(len, rows))
    ids = torch.tensor([r + [hf_tok.pad_token_id] * (L - len(r)) for r in rows])
    attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows])
    image_pad = hf_tok.convert_tokens_to_ids("<|image_pad|>")
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=attn, pixel_values=px["pixel_values"], image_grid_thw=grids,
                    mm_token_type_ids=(ids == image_pad).int(), output_hidden_states=True)
    return out.hidden_states[-1], ids, attn.bool()


# -----------------------------------------------------------------------------
# tokenizer


def test_tokenizer_matches_transformers_qwen2(root):
    # wrong ids here = a wrong pre-tokenizer class (\p{L}, \p{N}, \s), BPE merge order, NFC or special-token split
    ours = te.Tokenizer.from_folder(root / "tokenizer")
    ref = transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer")
    assert len(ref) == len(ours)
    for s in BATTERY:
        ids = ours.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False), repr(s)
        assert ours.decode(ids) == ref.decode(ids), repr(s)
    for t in te.ADDED_TOKENS:
        assert ours.added[t] == ref.convert_tokens_to_ids(t)
    assert ours.added["<|endoftext|>"] == len(ours.vocab)  # added tokens follow the BPE vocabulary, as in Qwen2.5
    assert ours.decode(ours.encode("round trip: ÿ€😀 中文")) == "round trip: ÿ€😀 中文"


def test_train_bpe_is_deterministic_and_respects_size():
    v1, m1 = toy_assets.train_bpe(CORPUS, 400)
    v2, m2 = toy_assets.train_bpe(CORPUS, 400)
    assert (v1, m1) == (v2, m2) and len(v1) == 400
    assert list(v1)[-len(te.ADDED_TOKENS):] == te.ADDED_TOKENS


def test_missing_tokenizer_file_is_one_line_error(root, tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json is missing"):
        te.Tokenizer.from_folder(tmp_path)
    for f in ("vocab.json", "tokenizer_config.json"):
        (tmp_path / f).write_text((root / "tokenizer" / f).read_text())
    with pytest.raises(FileNotFoundError, match="merges.txt is missing") as e:
        te.Tokenizer.from_folder(tmp_path)
    assert "\n" not in str(e.value)
    os.makedirs(tmp_path / "pipe" / "text_encoder")  # a pipeline folder without tokenizer/
    (tmp_path / "pipe" / "text_encoder" / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="tokenizer.vocab.json is missing"):
        te.load_text_encoder(tmp_path / "pipe")


# -----------------------------------------------------------------------------
# image preprocessing and positions


def test_pixels_match_qwen2vl_image_processor():
    # wrong = wrong mean/std, channel order, or 2×2 merge order of the patches
    imgs = [rand_image(140, 84, 0), rand_image(28, 196, 1), rand_image(56, 56, 2, "RGBA")]
    ref = transformers.Qwen2VLImageProcessorPil(do_resize=False)(images=[pack.to_rgb(i) for i in imgs],
                                                                    return_tensors="pt")
    ours = []
    for im in imgs:
        x = te.image_to_pixels(im)
        gh, gw = x.shape[1] // 14, x.shape[2] // 14
        ours.append(te.merge_order(x.reshape(3, gh, 14, gw, 14).permute(1, 3, 0, 2, 4), 2).flatten(1))
    ours = torch.cat(ours)  # [N, 3·14·14], one frame
    frames = ref["pixel_values"].view(len(ours), 3, 2, 14 * 14)
    torch.testing.assert_close(ours, frames[:, :, 0].flatten(1), atol=1e-6, rtol=0)
    torch.testing.assert_close(ours, frames[:, :, 1].flatten(1), atol=1e-6, rtol=0)
    assert ref["image_grid_thw"].tolist() == [[1, 6, 10], [1, 14, 2], [1, 4, 4]]


def test_mrope_positions_worked_example():
    # the reference's example: text×4, a 2×3 merged image, text×4
    ids = [1, 1, 1, 1] + [9] * 6 + [1, 1, 1, 1]
    pos = te.mrope_positions(ids, [(2, 3)], 9)
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8, 9, 10]
    assert pos[1].tolist() == [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8, 9, 10]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8, 9, 10]


def test_template_is_unipic3():
    # images first, then the instruction; no "Picture N:" labels
    sys_msg = ("Describe the key features of the input image (color, shape, size, texture, objects, background), then "
               "explain how the user's text instruction should alter or modify the image. Generate a new image that "
               "meets the user's requirements while maintaining consistency with the original input where appropriate.")
    expect = (f"<|im_start|>system\n{sys_msg}<|im_end|>\n<|im_start|>user\n"
              "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>"
              "Make it red<|im_end|>\n<|im_start|>assistant\n")
    assert te.chat_text("Make it red", 2) == expect


# -----------------------------------------------------------------------------
# the model against transformers

VL_SIZES = [[(140, 84)], [(28, 196), (84, 84), (140, 56)]]  # merged grids 3×5 | 7×1, 3×3, 2×5


def test_forward_matches_transformers_3d_mrope(root):
    # wrong = patch embed / window reorder / full-attention indexes / merger / M-RoPE sections / GQA / padding
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
    hf_tok = transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer")
    enc = te.load_text_encoder(root, dtype=torch.float32)
    vl = [[rand_image(w, h, 10 * b + k) for k, (w, h) in enumerate(row)] for b, row in enumerate(VL_SIZES)]
    texts = [te.chat_text("a red cube", 1), te.chat_text("Put the cat from Image1 on the sofa of Image3", 3)]
    ref, ids, attn = hf_reference(model, hf_tok, texts, vl)
    ours_ids = [te.expand_image_pads(enc.tokenizer.encode(t), [(w // 28) * (h // 28) for w, h in row],
                                     enc.cfg.image_token_id) for t, row in zip(texts, VL_SIZES)]
    assert ours_ids == [r[:int(a.sum())].tolist() for r, a in zip(ids, attn)]
    pixels = [[te.image_to_pixels(im) for im in row] for row in vl]
    with torch.no_grad():
        ours = enc(ids, attn, pixels)
    torch.testing.assert_close(ours[attn], ref[attn], atol=1e-5, rtol=0)


def test_encode_template_drop_and_mask(root):
    # wrong = a different preprocessing (joint budget, 28/32), template, drop or mask than the official pipeline
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(root / "text_encoder").eval()
    hf_tok = transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer")
    enc = te.load_text_encoder(root, dtype=torch.float32)
    images = [[rand_image(300, 200, 5)], [rand_image(120, 260, 6), rand_image(500, 90, 7, "RGBA")]]
    prompts = ["make it blue", "combine them"]
    emb, mask = enc.encode(prompts, images, pixel_budget=160 * 160)
    vl = [[te.vl_copy(im) for im in pack.joint_resize(row, 160 * 160)] for row in images]
    ref, ids, attn = hf_reference(model, hf_tok, [te.chat_text(p, len(r)) for p, r in zip(prompts, images)], vl)
    drop = len(hf_tok.encode(te.PREFIX, add_special_tokens=False))
    assert enc.drop_idx == drop
    for b in range(2):
        n = int(attn[b].sum())
        assert hf_tok.decode(ids[b, :drop]) == te.PREFIX  # exactly the system block + "<|im_start|>user\n" goes
        assert hf_tok.decode(ids[b, drop:n]).startswith("<|vision_start|>")
        assert mask[b].tolist() == [True] * (n - drop) + [False] * (mask.shape[1] - n + drop)
        torch.testing.assert_close(emb[b, :n - drop], ref[b, drop:n], atol=1e-5, rtol=0)
        assert (emb[b, n - drop:] == 0).all()
    (pos, pos_mask), (neg, neg_mask) = enc.encode_with_negative(prompts[:1], images[:1], pixel_budget=160 * 160)
    n_emb, n_mask = enc.encode([" "], images[:1], pixel_budget=160 * 160)
    torch.testing.assert_close(neg, n_emb, atol=1e-6, rtol=0)
    assert torch.equal(neg_mask, n_mask) and torch.equal(pos_mask, mask[:1, :pos_mask.shape[1]])


def test_save_roundtrip_loads_in_transformers(tmp_path):
    # wrong = our legacy-key layout / config.json / tokenizer files are not what transformers reads
    vocab, merges = toy_assets.train_bpe(CORPUS, 500)
    toy_assets.save_tokenizer(tmp_path / "tok", vocab, merges)
    tok = te.Tokenizer.from_folder(tmp_path / "tok")
    torch.manual_seed(0)
    ours = perturb_(toy_assets.init_weights(te.TextEncoder(toy_assets.toy_text_config(tok), tok)), 2).eval()
    toy_assets.save_text_encoder(ours, tmp_path / "pipe")
    model = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "pipe" / "text_encoder").eval()
    hf_tok = transformers.Qwen2Tokenizer.from_pretrained(tmp_path / "pipe" / "tokenizer")
    proc = transformers.Qwen2VLImageProcessorPil.from_pretrained(tmp_path / "pipe" / "processor")
    assert list(proc.image_mean) == list(te.IMAGE_MEAN) and proc.merge_size == 2
    vl = [[rand_image(84, 112, 3), rand_image(168, 56, 4)]]
    ref, ids, attn = hf_reference(model, hf_tok, [te.chat_text("swap the colours", 2)], vl)
    with torch.no_grad():
        out = ours(ids, attn, [[te.image_to_pixels(im) for im in vl[0]]])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    again = te.load_text_encoder(tmp_path / "pipe", dtype=torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values()))


def test_new_prefixes_shards_and_strict_keys(root, tmp_path):
    # wrong = the loader misses the transformers>=4.52 names, shard indexes, or lets bad checkpoints through
    with safe_open(root / "text_encoder" / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert "lm_head.weight" in sd  # skipped by the loader, the one allowed key
    rename = lambda k: ("model.language_model." + k[6:] if k.startswith("model.") else
                        "model." + k if k.startswith("visual.") else k)  # transformers>=4.52 names
    new = {rename(k): v for k, v in sd.items()}
    keys = sorted(new)
    os.makedirs(tmp_path / "text_encoder")
    for name, part in (("a.safetensors", keys[::2]), ("b.safetensors", keys[1::2])):
        save_file({k: new[k] for k in part}, tmp_path / "text_encoder" / name)
    index = {"weight_map": {k: ("a" if i % 2 == 0 else "b") + ".safetensors" for i, k in enumerate(keys)}}
    (tmp_path / "text_encoder" / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "text_encoder" / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    for sub in ("tokenizer", "processor"):
        os.symlink(root / sub, tmp_path / sub)
    a = te.load_text_encoder(root, dtype=torch.float32)
    b = te.load_text_encoder(tmp_path, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = te.load_text_encoder(tmp_path, dtype=torch.bfloat16, offload=True)
    assert c.model.norm.weight.dtype == torch.bfloat16 and c.offload
    images = [[rand_image(90, 60, 0)]]
    e32, m32 = a.encode("bf16 smoke", images, pixel_budget=128 * 128)
    e16, m16 = c.encode("bf16 smoke", images, pixel_budget=128 * 128)
    assert e16.dtype == torch.bfloat16 and torch.equal(m16, m32)
    assert torch.nn.functional.cosine_similarity(e16.float()[m16], e32[m32], dim=-1).min() > 0.99

    bad = dict(sd)
    bad.pop("model.norm.weight")
    bad["visual.extra.weight"] = torch.zeros(1)
    bad["visual.merger.ln_q.weight"] = torch.zeros(5)
    os.makedirs(tmp_path / "bad" / "text_encoder")
    save_file(bad, tmp_path / "bad" / "text_encoder" / "model.safetensors")
    (tmp_path / "bad" / "text_encoder" / "config.json").write_text((root / "text_encoder" / "config.json").read_text())
    for sub in ("tokenizer", "processor"):
        os.symlink(root / sub, tmp_path / "bad" / sub)
    with pytest.raises(ValueError) as e:
        te.load_text_encoder(tmp_path / "bad")
    msg = str(e.value)
    assert "\n" not in msg and "model.norm.weight" in msg and "visual.extra.weight" in msg and "ln_q" in msg


def test_bad_inputs_are_one_line_errors(root):
    enc = te.load_text_encoder(root, dtype=torch.float32)
    img = rand_image(64, 64, 0)
    with pytest.raises(ValueError, match="at most max_images=6") as e:
        enc.encode("x", [[img] * 7], pixel_budget=64 * 64)
    assert "\n" not in str(e.value)
    emb, mask = enc.encode("x", [[img] * 7], pixel_budget=64 * 64, max_images=7)  # the limit is configurable
    assert mask.shape[0] == 1
    with pytest.raises(ValueError, match="Image1 of prompt 1 is 10x300 px after resizing; each side needs at least 14"):
        enc.encode("x", [[rand_image(10, 300, 1)]], pixel_budget=None)  # already "resized" (training caches)
    emb, mask = enc.encode("x", [[rand_image(3, 3, 1), img]], pixel_budget=64 * 64)  # the joint resize comes first
    assert mask.shape[0] == 1
    with pytest.raises(ValueError, match="multiple of 28"):
        te.image_to_pixels(rand_image(20, 20, 2))
    with pytest.raises(ValueError, match="one list of PIL images per prompt"):
        enc.encode("x", [img])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> tokens for 1 images"):
        enc.encode("look at <|image_pad|>", [[img]], pixel_budget=64 * 64)
