"""
The toy pipeline's frozen parts, built from nothing in the official folder layout: a byte-level BPE tokenizer
trained on the toy world's instructions, a random frozen tiny Qwen2.5-VL condition encoder (its features carry the
tokens and images), a narrow Qwen-Image VAE fitted on toy crops, the scheduler config and model_index.json. The
denoiser is trained on top by train_fm.py. Never point it at assets/toy: it rewrites the committed files.

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

import torch
from tqdm import tqdm

import pack
import text_encoder as TE
from sample import HelpFormatter
import vae as V
from toyworld import TOY_BUDGET, TRAIN_SEED, ToyWorld, instruction_corpus

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
