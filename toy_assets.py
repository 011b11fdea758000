"""
The toy pipeline's frozen parts, built from nothing in the official folder layout: a byte-level BPE tokenizer
trained on the toy world's instructions, a random frozen tiny Qwen2.5-VL condition encoder (its features carry the
tokens and images), a narrow Qwen-Image VAE fitted on toy crops, the scheduler config and model_index.json. The
denoiser is trained on top by train_fm.py. Never point it at assets/toy: it rewrites the committed files.
The writers of the encoders' official folders live here too (save_tokenizer, save_text_encoder, save_vae): the
trainers and sample.py only read them; the tests build their tiny random pipelines with them.

    python toy_assets.py OUT/toy                        # ≈ 22 minutes on 2 CPU cores (VAE fit: 1,600 + 450 steps)
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
from collections import Counter
from dataclasses import asdict

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tqdm import tqdm

import model as M
import pack
import text_encoder as TE
from sample import HelpFormatter
import vae as V
from toyworld import TOY_BUDGET, TRAIN_SEED, ToyWorld, instruction_corpus


# -----------------------------------------------------------------------------
# the encoders' official folders, written (text_encoder.py and vae.py read them; only this builder and the
# tests write them)


def save_tokenizer(folder, vocab, merges, added_tokens=TE.ADDED_TOKENS):
    """Write vocab.json (BPE tokens only), merges.txt and tokenizer_config.json (added tokens in
    added_tokens_decoder, eos <|im_end|>, pad <|endoftext|>, no BOS), as the official Qwen2.5 folder has them."""
    os.makedirs(folder, exist_ok=True)
    added = set(added_tokens)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for t, i in vocab.items() if t not in added}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    decoder = {str(vocab[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": t in TE.ADDED_TOKENS[:TE.N_SPECIAL]}
               for t in added_tokens if t in vocab}
    config = {"add_prefix_space": False, "added_tokens_decoder": decoder, "bos_token": None,
              "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
              "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
              "tokenizer_class": "Qwen2Tokenizer", "unk_token": None}
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)


def toy_text_config(tokenizer):
    """The toy condition encoder: 2 vision blocks (block 1 full attention, 56-px windows), 2 LM layers of width 64;
    the vocabulary size and special ids come from the toy tokenizer."""
    ids = tokenizer.added
    return TE.TextEncoderConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_config=TE.VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                      window_size=56, fullatt_block_indexes=[1]))


def init_weights(module, std=0.02):
    """Plain random init for the toy encoder (random and frozen): N(0, std) weights, zero biases, unit norms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, TE.RMSNorm):
            nn.init.ones_(m.weight)
    return module


def save_text_encoder(te, root):
    """Write root/text_encoder (config.json + model.safetensors in the legacy `model.*` / `visual.*` layout),
    root/tokenizer and root/processor (tokenizer files + preprocessor_config.json), loadable by transformers."""
    folder = os.path.join(root, "text_encoder")
    os.makedirs(folder, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in te.state_dict().items()}
    M.atomic_write(os.path.join(folder, "model.safetensors"), lambda p: save_file(sd, p, metadata={"format": "pt"}))
    d = asdict(te.cfg)
    vc = te.cfg.vision_config
    d["vision_config"].update(in_channels=vc.in_chans, model_type="qwen2_5_vl")
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "torch_dtype": str(next(te.parameters()).dtype).removeprefix("torch."), "use_sliding_window": False, **d}
    M.atomic_write(os.path.join(folder, "config.json"), json.dumps(config, indent=2))
    tok = te.tokenizer
    for sub in ("tokenizer", "processor"):
        save_tokenizer(os.path.join(root, sub), {**tok.vocab, **tok.added}, tok.merges, list(tok.added))
    proc = {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
            "do_convert_rgb": True, "do_resize": True, "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(te.image_mean), "image_std": list(te.image_std),
            "patch_size": vc.patch_size, "temporal_patch_size": vc.temporal_patch_size,
            "merge_size": vc.spatial_merge_size, "min_pixels": 3136, "max_pixels": 12845056}
    with open(os.path.join(root, "processor", "preprocessor_config.json"), "w") as f:
        json.dump(proc, f, indent=2)


def save_vae(vae, path):
    """Write the official layout: config.json and the safetensors with every reduced kernel put back on the
    last temporal tap (earlier taps zero) and zero `time_conv`s, so diffusers' AutoencoderKLQwenImage loads it
    and gives the same single-image outputs (vae.py's docstring: the 3-D → 2-D reduction). Both files are written
    atomically."""
    os.makedirs(path, exist_ok=True)
    sd, state = vae.state_dict(), {}
    for k, shape in V.official_shapes(vae).items():
        p = sd[k].detach().cpu() if k in sd else torch.zeros(shape, dtype=vae.dtype)  # time_conv: zeros
        state[k] = p.contiguous() if p.ndim == len(shape) else torch.zeros(shape, dtype=p.dtype)
        if p.ndim + 1 == len(shape):
            state[k][:, :, -1] = p
    M.atomic_write(os.path.join(path, M.WEIGHTS + ".safetensors"),
                   lambda p: save_file(state, p, metadata={"format": "pt"}))
    config = {"_class_name": V.CLASS_NAME, **asdict(vae.cfg)}
    M.atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2))


# -----------------------------------------------------------------------------
# the toy's tokenizer, encoder and VAE


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
    save_tokenizer(os.path.join(root, "tokenizer"), vocab, merges)
    tok = TE.Tokenizer.from_folder(os.path.join(root, "tokenizer"))
    te = TE.TextEncoder(toy_text_config(tok), tok)
    init_weights(te)
    save_text_encoder(te, root)
    torch.manual_seed(seed)
    vae = V.VAE(V.VAEConfig.toy())
    fit_vae(vae, toy_crops(seed), steps=vae_steps, lr=1e-3, seed=seed)  # 22.2 dB after 1,600 steps
    metrics = fit_vae(vae, toy_crops(seed + 1), steps=vae_steps * 9 // 32, lr=5e-4, seed=seed + 1)  # 23.8 dB after 450 more
    save_vae(vae, os.path.join(root, "vae"))
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
    p = argparse.ArgumentParser(description="Build the toy pipeline's tokenizer, text encoder, VAE, scheduler and "
                                            "model_index.json into a folder.",
                                formatter_class=HelpFormatter)
    p.add_argument("out", help="the pipeline folder to write (a new one, e.g. runs/toy; not assets/toy)")
    p.add_argument("--vae_steps", type=int, default=1600, help="VAE fitting steps (then 9/32 as many at half the lr)")
    p.add_argument("--vocab_size", type=int, default=512, help="BPE vocabulary, the special tokens included")
    p.add_argument("--seed", type=int, default=0, help="seed of the tokenizer corpus, the encoder init and the VAE fit")
    args = p.parse_args(argv)
    if os.path.exists(os.path.join(args.out, "model_index.json")):  # e.g. assets/toy: never overwrite a pipeline
        p.error(f"{args.out} already holds a pipeline (model_index.json); build into a new folder")
    t = time.time()
    print(build_toy_assets(args.out, args.vae_steps, args.vocab_size, args.seed), f"{time.time() - t:.0f}s")


if __name__ == "__main__":
    main()
