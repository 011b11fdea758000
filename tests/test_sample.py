"""sample.py: the official schedules and the denoising loop, against diffusers' scheduler + transformer + the
CFG formula (a reference loop written the way the official pipeline runs), and against analytic velocities."""
import os
import re
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import model as M
import sample as S
from pack import pack

diffusers = pytest.importorskip("diffusers")


def official_scheduler():
    return diffusers.FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential")


@pytest.mark.parametrize("size", [(1024, 1024), (1376, 768), (512, 512), (128, 128), (832, 1248)])
@pytest.mark.parametrize("steps", [50, 40, 8])
def test_teacher_sigmas_equal_the_scheduler(size, steps):
    import numpy as np

    seq = (size[0] // 16) * (size[1] // 16)
    sc = official_scheduler()
    sc.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=S.calculate_mu(seq, S.SchedulerConfig()))
    ours = S.teacher_sigmas(steps, seq, S.SchedulerConfig())
    assert ours.dtype == torch.float32 and len(ours) == steps + 1
    assert torch.equal(ours, sc.sigmas)  # bit-identical: the same fp32 operations in the same order


def test_fewstep_times_official_worked_list():
    """reference/unipic3_official.md §3.4: 1024², 8 steps."""
    t = S.fewstep_times(8, 4096, S.SchedulerConfig())
    expect = [1.0, 0.93336, 0.85719, 0.76930, 0.66676, 0.54555, 0.40010, 0.22229, 0.0]
    assert max(abs(a - b) for a, b in zip(t.tolist(), expect)) < 1e-5
    assert abs(S.calculate_mu(4096, S.SchedulerConfig()) - 0.693548) < 1e-6
    assert S.fewstep_times(4, 4096, S.SchedulerConfig()).tolist()[1:4] == pytest.approx([0.85719, 0.66676, 0.40010], abs=1e-5)


def test_time_shift_is_one_formula_for_every_caller():
    """The teacher's sigmas, the few-step grid and the trainers' t all shift by t → shift·t / (1 + (shift − 1)·t); if
    this fails the one function that computes it is off (scalar or per-sample shift)."""
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for shift in (0.5, 1.0, 2.0008, 3.0):
        assert torch.allclose(S.time_shift(t, shift), shift * t / (1 + (shift - 1) * t), rtol=0, atol=1e-15)
    shift, t = torch.tensor([1.5, 2.5, 2.5]), torch.tensor([0.3, 0.7, 0.0])
    assert torch.allclose(S.time_shift(t, shift), shift * t / (1 + (shift - 1) * t), rtol=0, atol=1e-6)


CFG = dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), in_channels=16, out_channels=4)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    torch.manual_seed(0)
    ref = diffusers.QwenImageTransformer2DModel(**CFG)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * (0.05 if p.ndim == 2 else 0.2))
    folder = tmp_path_factory.mktemp("t")
    ref.save_pretrained(folder)
    return ref.eval(), M.load_mmdit(str(folder))


def reference_teacher_loop(ref, noise_z, refs_z, txt, neg, steps, cfg):
    """The official teacher loop, written with diffusers' parts: Euler scheduler, transformer, CFG rescale."""
    import numpy as np

    C, h, w = noise_z.shape
    latents = pack(noise_z[None])
    ref_tok = torch.cat([pack(z[None]) for z in refs_z], dim=1)
    img_shapes = [[(1, h // 2, w // 2)] + [(1, z.shape[1] // 2, z.shape[2] // 2) for z in refs_z]]
    sc = official_scheduler()
    sc.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=S.calculate_mu(latents.shape[1], S.SchedulerConfig()))
    sc.set_begin_index(0)
    S0 = latents.shape[1]
    for t in sc.timesteps:
        x_in = torch.cat([latents, ref_tok], dim=1)
        ts = t.expand(1).to(latents.dtype) / 1000
        with torch.no_grad():
            v_c = ref(x_in, txt, None, ts, img_shapes=img_shapes).sample[:, :S0]
            v_u = ref(x_in, neg, None, ts, img_shapes=img_shapes).sample[:, :S0]
        comb = v_u + cfg * (v_c - v_u)
        v = comb * (torch.norm(v_c, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        latents = sc.step(v, t, latents, return_dict=False)[0]
    return latents[0]


def test_teacher_loop_matches_diffusers_reference(pair):
    """Same noise, same embeddings: the final latents of our loop equal the reference loop's (fp32, ≤1e-5)."""
    ref, ours = pair
    torch.manual_seed(1)
    noise_z = torch.randn(4, 8, 6)  # target latent: 4×3 token grid
    refs_z = [torch.randn(4, 4, 10), torch.randn(4, 6, 4)]
    txt, neg = torch.randn(1, 7, 24), torch.randn(1, 3, 24)
    expect = reference_teacher_loop(ref, noise_z, refs_z, txt, neg, steps=6, cfg=4.0)
    got = S.denoise(ours, [refs_z], [(4, 3)], txt, torch.ones(1, 7, dtype=torch.bool), neg, torch.ones(1, 3, dtype=torch.bool),
                    steps=6, cfg=4.0, sampler="euler", noise=[pack(noise_z[None])[0]])[0]
    assert (got - expect).abs().max().item() <= 1e-5


def test_mixed_batch_denoises_each_sample_as_alone(pair):
    _, ours = pair
    torch.manual_seed(2)
    cases = [([torch.randn(4, 4, 4)], (3, 2), 5), ([torch.randn(4, 6, 2), torch.randn(4, 2, 8)], (2, 4), 9)]
    noises = [torch.randn(h * w, 16) for _, (h, w), _ in cases]
    txts = [torch.randn(L, 24) for *_, L in cases]
    negs = [torch.randn(2, 24) for _ in cases]
    from pack import pad_text

    txt, mask = pad_text(txts)
    neg, neg_mask = pad_text(negs)
    kw = dict(steps=3, cfg=3.0, sampler="euler")
    batch = S.denoise(ours, [c[0] for c in cases], [c[1] for c in cases], txt, mask, neg, neg_mask, noise=noises, **kw)
    for b, (r, hw, L) in enumerate(cases):
        alone = S.denoise(ours, [r], [hw], txts[b][None], torch.ones(1, L, dtype=torch.bool), negs[b][None],
                          torch.ones(1, 2, dtype=torch.bool), noise=[noises[b]], **kw)[0]
        assert (batch[b] - alone).abs().max().item() <= 1e-5


class ExactVelocity(torch.nn.Module):
    """A 'model' that knows the answer x0*: v = (x_t − x0*)/t is the exact flow velocity toward x0*."""

    def __init__(self, x0):
        super().__init__()
        self.cfg = M.MMDiTConfig(in_channels=x0.shape[-1])
        self.x0 = x0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x, shapes, txt, txt_mask, t):
        n = self.x0.shape[0]
        v = torch.zeros_like(x)
        v[:, :n] = (x[:, :n] - self.x0) / t[:, None, None].clamp_min(1e-8)
        return v


@pytest.mark.parametrize("sampler,steps", [("euler", 10), ("fewstep", 8), ("fewstep", 1)])
def test_samplers_land_on_the_data_under_the_exact_velocity(sampler, steps):
    """Euler is exact on straight flow paths and x0-predict/re-noise recovers x0* at t=0: any wrong time grid,
    sign or update rule misses x0*."""
    torch.manual_seed(3)
    x0 = torch.randn(6, 16)
    got = S.denoise(ExactVelocity(x0), [[]], [(2, 3)], torch.zeros(1, 1, 24), torch.ones(1, 1, dtype=torch.bool),
                    steps=steps, cfg=1.0, sampler=sampler, generator=torch.Generator().manual_seed(0))[0]
    assert (got - x0).abs().max().item() <= 1e-4


def test_cfg_rescale_keeps_the_conditional_norm():
    v_c, v_u = torch.randn(2, 5, 64), torch.randn(2, 5, 64)
    v = S.cfg_combine(v_c, v_u, 4.0)
    assert torch.allclose(v.norm(dim=-1), v_c.norm(dim=-1), atol=1e-5)
    assert torch.allclose(S.cfg_combine(v_c, v_u, 1.0), v_c, atol=1e-6)


def test_generate_on_a_tiny_pipeline_mixed_batch(tiny_pipeline):
    """The whole path — joint resize, VL condition copies, VAE refs, denoise, decode — for a batch whose samples
    differ in the number and size of inputs (RGBA and L inputs converted)."""
    from PIL import Image

    pipe = S.load_pipeline(tiny_pipeline)
    ims = [[Image.new("RGB", (80, 60), "red"), Image.new("RGBA", (30, 90), (0, 0, 255, 100))], [Image.new("L", (64, 64), 128)]]
    out = S.generate(pipe, ["Show the person from Image1 wearing the cap from Image2.", "Remove the cap."], ims,
                     steps=2, cfg=4.0, progress=False)
    assert [o.size for o in out] == [(64, 64), (64, 64)]  # the budget's square by default
    alone = S.generate(pipe, ["Remove the cap."], [ims[1]], steps=2, cfg=4.0, seed=0, progress=False)[0]
    assert alone.size == (64, 64)
    few = S.generate(pipe, ["x"], [ims[1]], steps=2, cfg=1.0, sampler="fewstep", height=48, width=100, progress=False)[0]
    assert few.size == (96, 48)  # floored to multiples of 16, as the official pipeline does


def test_vae_tiles_in_generate(tiny_pipeline):
    """--vae-tile: one tile covering every image is the untiled result exactly; smaller tiles run at any size."""
    from PIL import Image

    pipe = S.load_pipeline(tiny_pipeline)
    ims, kw = [[Image.new("RGB", (80, 60), "red"), Image.new("RGB", (30, 90), "blue")]], dict(steps=2, progress=False)
    whole = np.asarray(S.generate(pipe, ["x"], ims, **kw)[0])
    assert np.array_equal(np.asarray(S.generate(pipe, ["x"], ims, vae_tile=64, **kw)[0]), whole)
    assert S.generate(pipe, ["x"], ims, vae_tile=32, width=96, **kw)[0].size == (96, 64)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_two_generate_calls_in_a_row_with_the_text_encoder_offloaded(tiny_pipeline, device):
    """One offload mechanism, the text encoder's own: it stays on the CPU and visits the device only while it
    encodes, so a second generate() finds it where the first left it, and the images are those of a pipeline that
    never offloads."""
    from PIL import Image

    ims, kw = [[Image.new("RGB", (80, 60), "red"), Image.new("RGB", (30, 90), "blue")]], dict(steps=2, progress=False)
    pipe = S.load_pipeline(tiny_pipeline, device=device, offload_text_encoder=True)
    first = np.asarray(S.generate(pipe, ["x"], ims, **kw)[0], dtype=np.int16)
    assert {p.device.type for p in pipe.text_encoder.parameters()} == {"cpu"}
    second = np.asarray(S.generate(pipe, ["x"], ims, **kw)[0], dtype=np.int16)
    plain = np.asarray(S.generate(S.load_pipeline(tiny_pipeline, device=device), ["x"], ims, **kw)[0], dtype=np.int16)
    assert np.array_equal(first, second)
    assert np.abs(first - plain).max() <= (0 if device == "cpu" else 2)


def test_cli_writes_png_and_grid(tiny_pipeline, tmp_path):
    from PIL import Image

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (50, 70), "green").save(a)
    Image.new("RGBA", (90, 40), (255, 0, 0, 128)).save(b)
    out = tmp_path / "o" / "out.png"
    S.main(["--ckpt", tiny_pipeline, "--images", str(a), str(b), "--prompt", "The person from Image1.",
            "--steps", "2", "--out", str(out), "--grid"])
    assert Image.open(out).size == (64, 64)
    g = Image.open(tmp_path / "o" / "out_grid.png").convert("RGB")
    assert g.height == 64 + 14  # the tiles under a strip of column labels (Image1, Image2, output)
    assert g.getpixel((1, 14 + 32)) == (0, 128, 0)  # Image1's first column, below the strip
    assert min(g.crop((0, 0, 40, 14)).getdata()) != (255, 255, 255)  # a label was written there


@pytest.mark.parametrize("argv,words", [
    (["--images"] + ["{a}"] * 7, "7 input images given; 1 to 6"),
    (["--images", "{bad}"], "cannot read image"),
    (["--images", "{a}", "--height", "8"], "--height 8 must be a multiple of 16"),
    (["--images", "{a}", "--steps", "0"], "--steps must be a positive"),
    (["--images", "{a}", "--steps", "-3"], "--steps must be a positive"),
    (["--images", "{a}", "--cfg", "nan"], "--cfg must be a finite number"),
    (["--images", "{a}", "--cfg", "inf"], "--cfg must be a finite number"),
    (["--images", "{a}", "--cfg", "-2"], "--cfg must be a finite number"),
    (["--images", "{a}", "--prompt", ""], "--prompt is empty"),
    (["--images", "{a}", "--height", "100000"], "beyond this pipeline's budget"),
    (["--images", "{a}", "--width", "17"], "--width 17 must be a multiple of 16"),
    (["--images", "{a}", "--ckpt", "{nope}"], "does not exist"),
    (["--images", "{a}", "--ckpt", "{novae}"], "missing its vae/ folder"),
    (["--images", "{a}", "--vae-tile", "40"], "--vae-tile 40 must be a positive multiple of 32"),
    (["--images", "{a}", "--sampler", "euler", "--steps", "1"], "the euler sampler needs at least 2 steps"),
])
def test_cli_bad_inputs_one_line_and_no_output(tiny_pipeline, tmp_path, argv, words):
    import shutil

    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    novae = tmp_path / "novae"
    shutil.copytree(tiny_pipeline, novae, ignore=shutil.ignore_patterns("vae"))
    subst = dict(a=tmp_path / "a.png", bad=tmp_path / "bad.png", nope=tmp_path / "nope", novae=novae)
    argv = [s.format(**subst) for s in argv]
    if "--ckpt" not in argv:
        argv += ["--ckpt", tiny_pipeline]
    if "--steps" not in argv:
        argv += ["--steps", "1"]
    out = tmp_path / "out.png"
    with pytest.raises(SystemExit) as e:
        S.main(argv + ["--out", str(out)])
    msg = str(e.value)
    assert words in msg and "\n" not in msg
    assert not out.exists() and not (tmp_path / "out.png.tmp").exists()


def test_a_bad_flag_exits_nonzero_with_one_line_on_stderr(tmp_path):
    """The bad-input table, as a user meets it: a non-zero exit code, one line on stderr, no traceback, no file."""
    import subprocess
    import sys

    out = tmp_path / "o.png"
    r = subprocess.run([sys.executable, "sample.py", "--steps", "-3", "--out", str(out)], capture_output=True, text=True,
                       cwd=os.path.dirname(os.path.abspath(S.__file__)))
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0 and "--steps must be a positive" in r.stderr
    assert not out.exists()


def test_a_tiny_input_is_resized_by_the_joint_rule_first(tiny_pipeline, tmp_path):
    """The 3×3 px row: the official rule resizes all inputs jointly to the budget before anything is checked, so a
    3×3 image is a valid input (every side is at least 32 px after it)."""
    from PIL import Image

    Image.new("RGB", (3, 3), "red").save(tmp_path / "a.png")
    out = tmp_path / "out.png"
    S.main(["--ckpt", tiny_pipeline, "--images", str(tmp_path / "a.png"), "--steps", "2", "--out", str(out)])
    assert Image.open(out).size == (64, 64)


def test_too_many_images_fail_before_any_model_is_loaded(tmp_path, monkeypatch):
    """Validation comes first: 7 images never reach load_pipeline (which takes seconds at real size)."""
    from PIL import Image

    Image.new("RGB", (40, 40)).save(tmp_path / "a.png")
    monkeypatch.setattr(S, "load_pipeline", lambda *a, **k: pytest.fail("loaded a model before validating"))
    with pytest.raises(SystemExit, match="7 input images given"):
        S.main(["--images"] + [str(tmp_path / "a.png")] * 7 + ["--out", str(tmp_path / "o.png")])


def test_default_command_uses_the_embedded_toy_model(tmp_path):
    """`python sample.py --steps 8` on a fresh clone: the committed toy pipeline and the built-in held-out example."""
    from PIL import Image

    out = tmp_path / "sample.png"
    S.main(["--steps", "2", "--out", str(out), "--grid"])
    assert Image.open(out).size == (128, 128)
    assert Image.open(tmp_path / "sample_grid.png").height == 128 + 14  # tiles under the label strip


def test_pipeline_defaults_follow_model_index(tiny_pipeline, tmp_path):
    """A pipeline folder can name its default transformer and its best CFG per sampler (the toy: its best 8-step
    student, CFG 1 for it); the teacher stays one flag away."""
    import json
    import shutil

    import model as M

    root = tmp_path / "p"
    shutil.copytree(tiny_pipeline, root)
    M.save_mmdit(M.load_mmdit(str(root / "transformer")), str(root / "transformer_dmd"), name_or_path="nanounipic-dmd")
    index = json.load(open(root / "model_index.json"))
    index |= {"nanounipic_default_transformer": "transformer_dmd", "nanounipic_cfg": {"euler": 2.5, "fewstep": 1.0}}
    json.dump(index, open(root / "model_index.json", "w"))
    pipe = S.load_pipeline(str(root))
    assert pipe.sampler == "fewstep" and pipe.default_cfg() == 1.0 and pipe.default_cfg("euler") == 2.5
    teacher = S.load_pipeline(str(root), str(root / "transformer"))
    assert teacher.sampler == "euler" and teacher.default_cfg() == 2.5
    assert S.load_pipeline(tiny_pipeline).default_cfg() == 4.0  # no record: the official value


# -----------------------------------------------------------------------------
# --help of every script: each flag's meaning and default; the docstring's examples as written


def help_text(main, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def flag_help(text):
    """{flag: its whole help entry} from an argparse --help text."""
    body = re.split(r"\n(?:options|optional arguments):\n", text)[1]
    return {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", "\n" + body) if e.strip()}


@pytest.mark.parametrize("script", ["sample", "eval", "bench", "data", "toy_assets", "reproduce", "train_fm", "train_cm",
                                    "train_dmd"])
def test_help_gives_every_flag_a_default(script, capsys):
    import importlib

    mod = importlib.import_module(script)
    main = mod.main if hasattr(mod, "Config") is False else (lambda argv: S.parse_config(mod.Config, argv, mod.__doc__))
    entries = flag_help(help_text(main, capsys))
    assert len(entries) > 3
    for flag, entry in entries.items():
        if flag != "-h":
            assert "default" in entry and len(entry.split()) > 3, entry  # a default, and words besides the flag


def test_help_keeps_the_docstring_lines_as_written(capsys):
    """Examples continued with a backslash stay on their lines (a raw docstring, a raw-description formatter)."""
    text = help_text(S.main, capsys)
    assert all(line in text for line in S.__doc__.strip().splitlines()) and "Image2\" \\\n" in text


@dataclass
class Demo:
    lr: float = 1e-3  # learning rate, 50% of the paper's
    steps: int = 10  # optimiser steps. The toy needs more because the
    #   world is large
    name: str = "a # b"
    quiet: bool = False  # no progress bar


def test_config_flags_take_their_help_from_the_field_comments(capsys):
    assert S.field_comments(Demo) == {"lr": "learning rate, 50% of the paper's", "steps": "optimiser steps.",
                                      "quiet": "no progress bar"}
    entries = flag_help(help_text(lambda argv: S.parse_config(Demo, argv, "demo"), capsys))
    assert entries["--lr"] == "--lr FLOAT learning rate, 50% of the paper's (default: 0.001)"
    assert entries["--steps"] == "--steps INT optimiser steps. (default: 10)"
    assert entries["--name"] == "--name STR (default: a # b)"
    cfg = S.parse_config(Demo, ["--lr", "3e-4", "--quiet", "true", "--name", "x"])
    assert cfg == Demo(lr=3e-4, steps=10, name="x", quiet=True)
    with pytest.raises(SystemExit):
        S.parse_config(Demo, ["--quiet", "ture"])  # not silently False
    assert "expected true or false" in capsys.readouterr().err


@dataclass
class DemoRun(Demo):
    lr: float = 3e-3
    steps: int = 20  # optimiser steps of this run
    seed: int = 0  # data order


def test_inherited_flags_keep_the_base_comment(capsys):
    """The trainers' Configs extend train_common.Config: a field a subclass only re-defaults keeps the base's
    comment, a subclass's own comment wins, and --help shows the subclass's defaults."""
    assert S.field_comments(DemoRun) == {"lr": "learning rate, 50% of the paper's", "quiet": "no progress bar",
                                         "steps": "optimiser steps of this run", "seed": "data order"}
    entries = flag_help(help_text(lambda argv: S.parse_config(DemoRun, argv, "demo"), capsys))
    assert entries["--lr"] == "--lr FLOAT learning rate, 50% of the paper's (default: 0.003)"
    assert entries["--seed"] == "--seed INT data order (default: 0)"
    import train_common as T
    import train_dmd

    assert issubclass(train_dmd.Config, T.Config)
    comments = S.field_comments(train_dmd.Config)
    assert comments["assets"].startswith("pipeline root") and comments["ema"] == "per student update (official)"
