"""The FSDP2 path (--fsdp true) at a size where memory shows: no rank holds the whole model, the EMA and the checkpoints
are sharded, the export is streamed, resume is exact, and CM / DMD use the same plumbing.

The memory test fine-tunes a random ~300M-parameter MMDiT saved as the official release is (bf16 safetensors
shards + index) with two gloo processes: --init load + one step + checkpoint + export, then --resume + one step +
checkpoint + export, and prints every rank's peak host memory per phase. Run as a script under torchrun, this file
is the probe: it runs a trainer's main() and reports its memory (VmHWM, reset at each phase boundary).
"""
import json
import os
import re
import sys
import time

import pytest
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import conftest  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402
import sharded as SH  # noqa: E402
import train_common as T  # noqa: E402

# ~260M parameters (0.96 GiB in fp32), 12 blocks of width 768; text width 64 = the tiny pipeline's text encoder
BIG = M.MMDiTConfig(num_layers=12, attention_head_dim=128, num_attention_heads=6, joint_attention_dim=64,
                    axes_dims_rope=(16, 56, 56))
GiB = 2**30


def write_official(folder, cfg, seed=0, shard_bytes=200 * 2**20):
    """A random MMDiT folder as the official release stores it: config.json, bf16 safetensors shards and their
    index, written a shard at a time (the whole model is never in memory)."""
    meta = SH.meta_mmdit(cfg)
    config = {"_class_name": "QwenImageTransformer2DModel", **{k: getattr(cfg, k) for k in
              ("patch_size", "in_channels", "out_channels", "num_layers", "attention_head_dim",
               "num_attention_heads", "joint_attention_dim", "guidance_embeds")}, "axes_dims_rope": list(cfg.axes_dims_rope)}
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    g = torch.Generator().manual_seed(seed)
    shards, size = [{}], 0
    for k, v in meta.state_dict().items():
        if shards[-1] and size + v.numel() * 2 > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.shape
        size += v.numel() * 2
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shapes, name in zip(shards, names):
        save_file({k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()},
                  os.path.join(folder, name))
    weight_map = {k: name for shapes, name in zip(shards, names) for k in shapes}
    json.dump({"metadata": {}, "weight_map": weight_map},
              open(os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json"), "w"))
    return folder


def torchrun(*args, nproc=2, timeout=600, malloc=True):
    """malloc: glibc returns every freed block of 256 KB or more to the system at once (a fixed mmap threshold), so
    resident memory follows the live tensors; by default glibc keeps much of what training frees in its heap and
    resident memory only shows the heap's high-water mark (measured: up to +2F on a resumed step)."""
    return conftest.torchrun(*args, nproc=nproc, timeout=timeout,
                             env={"MALLOC_MMAP_THRESHOLD_": str(256 * 1024)} if malloc else None)


def probe(trainer, *flags):
    """Run `trainer`'s main() under torchrun through this file's probe; returns ({rank: {phase: bytes}}, result)."""
    r = torchrun(os.path.abspath(__file__), trainer, *flags)
    assert r.returncode == 0, r.stdout[-2000:] + conftest.workers_said(r)
    mem = {}
    for line in r.stdout.splitlines():
        if line.startswith("MEMORY "):
            m = json.loads(line[7:])
            mem[m.pop("rank")] = m
    return mem, r


def train_flags(pipeline, out, init, steps, *extra):
    return ["--assets", pipeline, "--n_data", "4", "--budget", str(64 * 64), "--cache", os.path.join(out, "..", "cache"),
            "--out", out, "--init", init, "--steps", str(steps), "--batch", "2", "--micro_batch", "1",
            "--eval_cases", "0", "--save_every", "1", "--log_every", "1", "--lr", "1e-4", "--warmup", "0",
            "--fsdp", "true", *extra]


def test_fsdp_memory_per_rank_stays_near_the_sharded_state(tiny_pipeline, tmp_path):
    """Each rank's peak host memory above its baseline, per phase, in units of F = the whole model in fp32. On this
    CPU the training state itself is host memory: weights, gradients, two AdamW moments and the EMA, each sharded,
    2.5F per rank with two processes (what a GPU node keeps on its devices). The test bounds what comes on top of
    that state in each phase (on a GPU node, the host's share): loading holds no whole copy (+1F in fp32),
    checkpoints and exports gather nothing whole, the step's transients stay under 0.7F. The code before this path
    existed peaked at 5.8F on this run."""
    init = write_official(str(tmp_path / "official"), BIG)
    params = sum(v.numel() for v in SH.meta_mmdit(BIG).state_dict().values())
    F = params * 4
    out = str(tmp_path / "run")
    t0 = time.time()
    first, _ = probe("train_fm", *train_flags(tiny_pipeline, out, init, 1))
    second, r = probe("train_fm", *train_flags(tiny_pipeline, out, init, 2, "--resume", "true"))
    assert "resumed from step 1" in r.stdout
    print(f"\n{params / 1e6:.0f}M parameters, F = {F / GiB:.2f} GiB (fp32); peak above each rank's baseline, "
          f"in GiB and in F ({time.time() - t0:.0f} s for both runs):")
    for name, mem in (("--init + 1 step + save + export", first), ("--resume + 1 step + save + export", second)):
        for rank, m in sorted(mem.items()):
            phases = ", ".join(f"{k} {m[k] / GiB:.2f} ({m[k] / F:.2f}F, {m['seconds'][k]:.0f} s)" for k in m["seconds"])
            print(f"  {name}, rank {rank} (baseline {m['baseline'] / GiB:.2f} GiB): {phases}")
    # on a GPU node the training state lives on the devices; on this CPU it is host memory too, so it is the
    # floor here: weights, gradients, exp_avg, exp_avg_sq and EMA, each sharded over 2 ranks (2.5F; 2.0F outside
    # the step, when there are no gradients; 1.0F after loading: weights and EMA)
    floor = {"load": 1.0, "resume": 2.0, "step": 2.5, "save": 2.0, "export": 2.0}
    over = {p: max(m[p] / F - floor[p] for m in list(first.values()) + list(second.values())) for p in floor}
    print("  above that floor, worst rank: " + ", ".join(f"{p} +{v:.2f}F" for p, v in over.items()))
    assert over["load"] < 0.2  # no rank reads the whole model (a bf16 copy would be +0.5F, fp32 +1F)
    assert over["save"] < 0.3 and over["export"] < 0.3 and over["resume"] < 0.3  # nothing gathered whole
    assert max(over.values()) < 0.7

    # the streamed export is the checkpoint's weights exactly, and loads in diffusers with the same outputs
    import torch.distributed.checkpoint as dcp

    ema = SH.meta_mmdit(BIG).to_empty(device="cpu")
    dcp.load({"ema": ema.state_dict()}, checkpoint_id=os.path.join(T.latest_checkpoint(out), "dcp"), no_dist=True)
    exported = M.load_mmdit(os.path.join(out, "ema_transformer"))
    assert all(torch.equal(v, exported.state_dict()[k]) for k, v in ema.state_dict().items())
    del ema
    from diffusers import QwenImageTransformer2DModel

    ref = QwenImageTransformer2DModel.from_pretrained(os.path.join(out, "ema_transformer")).eval()
    g = torch.Generator().manual_seed(0)
    x, txt = torch.randn(1, 8 + 4, 64, generator=g), torch.randn(1, 5, 64, generator=g)
    t = torch.tensor([0.6])
    with torch.no_grad():
        ours = exported(x, [[(2, 4), (2, 2)]], txt, torch.ones(1, 5, dtype=torch.bool), t)
        theirs = ref(x, txt, torch.ones(1, 5, dtype=torch.bool), t, img_shapes=[[(1, 2, 4), (1, 2, 2)]]).sample
    assert (ours - theirs).abs().max() < 1e-4 * theirs.abs().max()


SMALL = M.MMDiTConfig(num_layers=3, attention_head_dim=16, num_attention_heads=3, joint_attention_dim=64,
                      axes_dims_rope=(4, 6, 6))  # width 48, 3 blocks: rows that split unevenly over 2 ranks


def small_flags(pipeline, out, init, steps, *extra):
    return ["--assets", pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache", os.path.join(out, "..", "cache"),
            "--out", out, "--init", init, "--steps", str(steps), "--batch", "4", "--micro_batch", "1",
            "--eval_cases", "0", "--save_every", "1", "--log_every", "1", "--lr", "1e-3", "--lr_min", "1e-3",
            "--warmup", "0", *extra]


def losses(out):
    return [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in l]


def test_fsdp_loads_trains_and_resumes_exactly(tiny_pipeline, tmp_path):
    """train_fm.py --fsdp true from a bf16 official folder: the sharded load reads the right rows (the losses are
    DDP's), --resume from the sharded checkpoint continues bit-identically (losses and both exported folders),
    the checkpoint also loads into one plain process (another world size), and the toy evaluation runs."""
    init = write_official(str(tmp_path / "official"), SMALL, shard_bytes=20_000)
    a, b, ddp = (str(tmp_path / n) for n in ("a", "b", "ddp"))
    for out, steps, extra in ((a, 2, ("--fsdp", "true", "--eval_cases", "1", "--eval_steps", "2", "--eval_every", "2")),
                              (b, 1, ("--fsdp", "true")), (b, 2, ("--fsdp", "true", "--resume", "true")),
                              (ddp, 2, ())):
        r = torchrun("train_fm.py", *small_flags(tiny_pipeline, out, init, steps, *extra), malloc=False)
        assert r.returncode == 0, conftest.workers_said(r)
    assert losses(b) == losses(a) and len(losses(a)) == 2
    assert all(abs(x - y) < 1e-5 * abs(y) for x, y in zip(losses(a), losses(ddp)))
    for name in ("transformer", "ema_transformer"):
        fa, fb = (os.path.join(o, name, "diffusion_pytorch_model.safetensors") for o in (a, b))
        assert open(fa, "rb").read() == open(fb, "rb").read()
        assert json.load(open(os.path.join(a, name, "config.json")))["_name_or_path"] == "nanounipic-teacher"
    assert os.path.isdir(os.path.join(a, "eval_000002"))
    # the step-2 checkpoint (written by 2 ranks) into one plain process: the exported weights come back
    model, ema = M.MMDiT(SMALL), M.MMDiT(SMALL)
    T.freeze_unused(model)
    step, _ = T.load_checkpoint(T.latest_checkpoint(a), model, ema, T.make_optimizer(model, 1e-3))
    assert step == 2
    for m, name in ((model, "transformer"), (ema, "ema_transformer")):
        ref = M.load_mmdit(os.path.join(a, name)).state_dict()
        assert all(torch.equal(v, ref[k]) for k, v in m.state_dict().items())


def test_export_sharded_writes_what_save_mmdit_writes(tmp_path):
    """The streamed export (one tensor at a time) and save_mmdit write the same folder: files, index, config,
    tensors; and a LoRA model is exported merged, as merge_lora does."""
    torch.manual_seed(0)
    model = M.MMDiT(SMALL).init_weights()
    lora.add_lora(model, 2, 4.0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)
    SH.export_sharded(model, str(tmp_path / "s"), "x", rank=0, max_shard_bytes=30_000)
    M.save_mmdit(lora.merge_lora(model), str(tmp_path / "m"), max_shard_bytes=30_000, name_or_path="x")
    assert sorted(os.listdir(tmp_path / "s")) == sorted(os.listdir(tmp_path / "m"))
    for f in os.listdir(tmp_path / "m"):
        if f.endswith(".json"):
            assert json.load(open(tmp_path / "s" / f)) == json.load(open(tmp_path / "m" / f)), f
    a, b = M.load_mmdit(str(tmp_path / "s")).state_dict(), M.load_mmdit(str(tmp_path / "m")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("trainer", ["cm", "dmd_lora", "dmd_full"])
def test_cm_and_dmd_run_sharded(tiny_pipeline, tmp_path, trainer):
    """train_cm.py (guidance from the frozen, sharded teacher) and train_dmd.py (LoRA fake score on the sharded
    teacher, or a full copy) under --fsdp true --bf16 true: two steps with sharded checkpoints and exports; the
    LoRA DMD run stops after one and resumes (extra models in the sharded checkpoint)."""
    teacher = write_official(str(tmp_path / "official"), SMALL, shard_bytes=20_000)
    out = str(tmp_path / "run")
    common = ["--assets", tiny_pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache",
              os.path.join(out, "..", "cache"), "--out", out, "--init", teacher, "--eval_cases", "0", "--save_every",
              "1", "--log_every", "1", "--fsdp", "true", "--bf16", "true", "--batch", "2", "--micro_batch", "1"]
    if trainer == "cm":
        script, flags = "train_cm.py", ["--guidance", "1.0", "--guidance_from", "teacher"]
    else:
        script = "train_dmd.py"
        flags = ["--teacher", teacher, "--fake_updates", "1", "--fake_lora_rank", "4" if trainer == "dmd_lora" else "0"]
    runs = [(1, []), (2, ["--resume", "true"])] if trainer == "dmd_lora" else [(2, [])]
    for steps, extra in runs:
        r = torchrun(script, *common, *flags, "--steps", str(steps), *extra, malloc=False)
        assert r.returncode == 0, conftest.workers_said(r)
    assert trainer != "dmd_lora" or "resumed from step 1" in r.stdout
    assert os.path.isdir(os.path.join(T.latest_checkpoint(out), "dcp"))
    M.load_mmdit(os.path.join(out, "ema_transformer"))

def saved_bytes(layers, img_tokens, txt_tokens, ckpt):
    """Bytes of activations autograd keeps for the backward of an MMDiT of width 256 under bf16 (bf16 weights, as
    FSDP2 gathers them under --bf16, and autocast), the weights themselves excluded."""
    cfg = M.MMDiTConfig(num_layers=layers, attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64)
    model = M.MMDiT(cfg).init_weights().to(torch.bfloat16)
    model.gradient_checkpointing = ckpt
    weights, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x, txt = torch.randn(1, img_tokens, 64), torch.randn(1, txt_tokens, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
        model(x, [[(img_tokens // 32, 32)]], txt, torch.ones(1, txt_tokens, dtype=torch.bool), torch.tensor([0.5]))
    return sum(seen.values())


def test_memory_plan_counts():
    """memory_plan's activation constants are what autograd saves per block (56 bytes per token per unit of width,
    2 with --grad_ckpt), and its state is the issue's arithmetic for the 20.4B model on 8 GPUs."""
    for ckpt, per in ((False, SH.ACT_BYTES), (True, SH.CKPT_BYTES)):
        block = saved_bytes(2, 1024, 128, ckpt) - saved_bytes(1, 1024, 128, ckpt)
        assert abs(block / ((1024 + 128) * 256) - per) < 0.05 * per, block / ((1024 + 128) * 256)
    plan = SH.memory_plan()
    assert 20.3 < plan["params (B)"] < 20.5
    assert plan["state"]["FM"] == pytest.approx(20 * plan["params (B)"] / 8)  # GB per GPU: fp32 w, g, 2 moments, EMA
    assert plan["state"]["DMD, full fake score"] == pytest.approx(38 * plan["params (B)"] / 8)  # 776 GB in all
    assert plan["total, grad_ckpt"]["DMD, LoRA fake score"] < 80 < plan["total, grad_ckpt"]["DMD, full fake score"]


# -----------------------------------------------------------------------------
# the probe: `torchrun tests/test_fsdp_memory.py TRAINER FLAGS…`


def _status(key):
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def _phase(mem, name):
    """Record the peak resident memory since the last phase boundary (above the baseline), then reset the peak."""
    mem[name] = max(mem.get(name, 0), _status("VmHWM") - mem["baseline"])
    mem.setdefault("seconds", {})[name] = round(time.time() - mem.pop("t", time.time()), 1)
    mem["t"] = time.time()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def _probe():
    import importlib

    trainer = importlib.import_module(sys.argv[1])
    sys.argv = [sys.argv[1] + ".py"] + sys.argv[2:]
    mem = {}
    start_run, resume, save, export = T.start_run, T.resume, T.save_checkpoint, T.export

    def hook(f, before=None, after=None):
        def run(*a, **kw):
            if before:
                _phase(mem, before)
            out = f(*a, **kw)
            if after:
                _phase(mem, after)
            return out
        return run

    def started(cfg):
        out = start_run(cfg)  # processes, the latent cache: before any model
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        mem["baseline"], mem["t"] = _status("VmRSS"), time.time()
        return out

    T.start_run = started
    T.resume = hook(resume, before="load", after="resume")
    T.save_checkpoint = hook(save, before="step", after="save")
    T.export = hook(export, after="export")
    trainer.main(T.parse_config(trainer.Config))
    mem.pop("t", None)
    sys.stdout.write("MEMORY " + json.dumps({"rank": int(os.environ.get("RANK", 0)), **mem}) + "\n")  # one write
    sys.stdout.flush()


if __name__ == "__main__":
    _probe()
