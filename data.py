"""
Data for nanoUniPic (paper §4.1): the official jsonl triplets, the toy world (toyworld.py) as a dataset, and the
latent cache the three trainers share. Official format, one json object per line, paths relative to its folder:
    {"input_images": ["a.png", "b.png"], "output_image": "t.png", "instruction": "..."}
The toy world adds a "scene" key: the exact index of what the target contains, read by the judge in eval.py.
Datasets give dict(input_images, output_image, instruction, scene) resized by the joint pixel-budget rule (pack.py);
load them with DataLoader(ds, batch_size=B, collate_fn=list), as every sample keeps its own shapes.

    python data.py --out data_cache/toy --n 1000        # writes a toy jsonl dataset, prints samples/s
"""
import argparse
import json
import os
import time
import warnings

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

import model as M
import pack
from sample import HelpFormatter
from toyworld import LAYOUTS, MAX_IMAGES, TOY_BUDGET, TRAIN_SEED, ToyWorld, WorldConfig

MAX_PIXELS = 4096 * 4096  # larger images are skipped by the loader

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
    """The trainers' --data: "toy" or "toy:LAYOUT" (e.g. toy:posed) → a WorldConfig; None for an official jsonl."""
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
    """Official jsonl triplets. Bad lines (json, keys, counts, missing / unreadable / oversized images, aspect outside
    0.1–10) are skipped into .skipped as (line number, reason), with one counted warning. With verify=False a corrupt
    image met while loading is skipped alike and the next good sample returned, so an epoch never crashes."""

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
            raise ValueError(self._report(what))
        if self.skipped:
            warnings.warn(self._report(f"skipped {len(self.skipped)} of {len(self.samples) + len(self.skipped)} lines"))

    def _report(self, what):  # "path: what (line 2: reason; line 5: reason ...)", naming the first five bad lines
        shown = "; ".join(f"line {n}: {r}" for n, r in self.skipped[:5])
        return f"{self.path}: {what}" + (f" ({shown}{' ...' if len(self.skipped) > 5 else ''})" if shown else "")

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
                warnings.warn(self._report(f"skipped line {n} while loading"))
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
    """encode_image: x [1, 3, H, W] in [-1, 1] -> z [1, C, h, w] (e.g. normalised VAE mean); encode_text: (prompts
    [str], images [[PIL]]) -> (emb [B, L, D], mask [B, L]), e.g. TextEncoder.encode. null_prompt (e.g. " "): also
    cache its embedding with the same images, for condition dropout. Writes path/shard-XXXXX.safetensors, each whole
    (temp file + rename) with its items' index entries in its metadata, and path/index.json last. A killed build
    resumes at the first shard not on disk; readers need index.json, so a partial cache is never served."""
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
            names = ["target"] + [f"ref{r}" for r in range(len(zs) - 1)]  # [C, h, w], then each [C, h_k, w_k]
            tensors |= {f"{i}.{name}": z.float().contiguous() for name, z in zip(names, zs)}
            for j, name in enumerate(["txt", "neg"][:len(prompts)]):  # [L, D], real tokens only
                tensors[f"{i}.{name}"] = emb[j][mask[j].bool()].float().contiguous()
            entries.append(dict(shard=k, refs=len(zs) - 1, neg=null_prompt is not None,
                                instruction=s["instruction"], scene=s["scene"]))
            pbar.update(1)
        meta = {"items": f"{lo}:{hi}", "index": json.dumps(entries)}
        M.atomic_write(shard_file(path, k), lambda p: save_file(tensors, p, metadata=meta))
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
    whole = meta.get("items") == f"{lo}:{hi}" and len(entries) == hi - lo
    return entries if whole and all(item_keys(i, e) <= keys for i, e in zip(range(lo, hi), entries)) else None


def item_keys(i, e):  # the tensor names of cached item i with index entry e
    refs = {f"{i}.ref{r}" for r in range(e["refs"])}
    return {f"{i}.target", f"{i}.txt"} | refs | ({f"{i}.neg"} if e.get("neg") else set())


class LatentDataset(torch.utils.data.Dataset):
    """A cache written by cache_latents; item i: dict(target [C, h, w], refs [[C, h_k, w_k]], txt [L, D], neg,
    instruction, scene). Shard headers are read up front: a bad shard is a ValueError naming it and its rebuild."""

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


def main(argv=None):
    p = argparse.ArgumentParser(description="Write a toy-world dataset in the official jsonl format (PNGs + "
                                            "data.jsonl).", formatter_class=HelpFormatter)
    p.add_argument("--out", default="data_cache/toy", help="output folder")
    p.add_argument("--n", type=int, default=1000, help="samples")
    p.add_argument("--seed", type=int, default=TRAIN_SEED, help="world seed (training seeds are below 1,000,000)")
    args = p.parse_args(argv)
    t = time.time()
    path = write_jsonl(args.out, args.n, args.seed)
    print(f"wrote {args.n} samples to {path} ({args.n / (time.time() - t):.0f} samples/s with PNG writing)")


if __name__ == "__main__":
    main()
