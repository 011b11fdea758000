# Tests import the top-level modules (model.py, pack.py, ...) from the repository root, on the CPU, in a few threads.
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))


def make_tiny_pipeline(root, budget=64 * 64):
    """A complete pipeline folder in the official layout with tiny random parts (VAE, Qwen2.5-VL, MMDiT),
    small enough to build in a second: what the sampler and the trainers load."""
    import model as M
    import text_encoder as TE
    import toy_assets
    import vae as V

    torch.manual_seed(0)
    vae = V.VAE(V.VAEConfig(base_dim=8, latents_mean=[0.1] * 16, latents_std=[0.5] * 16))
    toy_assets.save_vae(vae.eval(), os.path.join(root, "vae"))
    corpus = [f"Show the person from Image1 wearing the red cap from Image{k}." for k in range(2, 7)]
    vocab, merges = toy_assets.train_bpe(corpus, 300)
    toy_assets.save_tokenizer(os.path.join(root, "tokenizer"), vocab, merges)
    tok = TE.Tokenizer.from_folder(os.path.join(root, "tokenizer"))
    te = TE.TextEncoder(toy_assets.toy_text_config(tok), tok)
    toy_assets.init_weights(te)
    toy_assets.save_text_encoder(te, root)
    mm = M.MMDiT(M.PRESETS["tiny"]).init_weights()
    with torch.no_grad():
        for p in mm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    M.save_mmdit(mm, os.path.join(root, "transformer"))
    with open(os.path.join(root, "model_index.json"), "w") as f:
        json.dump({"_class_name": "QwenImageEditPipeline", "nanounipic_pixel_budget": budget}, f)
    return root


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    return make_tiny_pipeline(str(tmp_path_factory.mktemp("pipeline")))


def torchrun(*args, nproc=2, timeout=300, env=None):
    """`torchrun --standalone --nproc_per_node=NPROC ARGS` from the repository root (gloo, CPU, one thread per
    process; `env` adds variables) → CompletedProcess. A worker killed by SIGABRT is a native crash, not a Python
    error: one was seen in CI (rank 0 of train_cm's 2-step run; 0 in 32 local reruns, 2 at a time included). It
    gets one rerun and a warning quoting the workers' own lines (faulthandler on, so a crash leaves its Python
    stack); any other failure, or a second abort, is returned as it is."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, PYTHONFAULTHANDLER="1", **(env or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    for attempt in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
        if r.returncode == 0 or "(SIGABRT)" not in r.stderr or attempt:
            return r
        warnings.warn(f"torchrun {os.path.basename(args[0])}: a worker aborted (SIGABRT), rerun once; the workers "
                      f"said: {workers_said(r)}")


def workers_said(r, n=3000):
    """The end of what the workers wrote to stderr, without torchrun's own ChildFailedError report after it."""
    return r.stderr.split("Traceback (most recent call last):\n  File \"<frozen runpy>\"")[0][-n:]
