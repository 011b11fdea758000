"""reproduce.py: the whole toy pipeline (assets → FM → CM → DMD → eval) runs end to end at toy-of-toy size,
exports the three bf16 transformers the samplers expect, prints the results table and resumes by skipping."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample as S

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def reproduce(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "reproduce.py", *args], cwd=ROOT, capture_output=True, text=True, env=env)


def test_tiny_pipeline_end_to_end_then_every_stage_is_reused(tmp_path):
    out = str(tmp_path / "r")
    p = reproduce("--tiny", "--procs", "1", "--out", out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = open(os.path.join(out, "results.md")).read()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| teacher, Euler, CFG 2", "| CM, few-step", "| DMD, few-step"]
    assert Image.open(os.path.join(out, "results.png")).width > 5 * 96  # inputs | teacher | CM | DMD | target
    pipe = os.path.join(out, "toy")
    kinds = {f: S.checkpoint_kind(os.path.join(pipe, f)) for f in ("transformer", "transformer_cm", "transformer_dmd")}
    assert kinds == {"transformer": "euler", "transformer_cm": "fewstep", "transformer_dmd": "fewstep"}
    for f in kinds:
        weights = load_file(os.path.join(pipe, f, "diffusion_pytorch_model.safetensors"))
        assert {v.dtype for v in weights.values()} == {torch.bfloat16}
    assert json.load(open(os.path.join(pipe, "model_index.json")))["nanounipic_default_transformer"] == "transformer_cm"
    again = reproduce("--tiny", "--procs", "1", "--out", out)
    assert again.returncode == 0 and "all stages reused" in again.stdout
    assert again.stdout.count("skipped") == 6  # assets, teacher (v3, v3.1, v3.2), cm, dmd


def test_bad_procs_is_one_line():
    p = reproduce("--procs", "0", "--out", "/nonexistent/never")
    assert p.returncode != 0 and p.stderr.strip().splitlines() == ["error: --procs must be >= 1, not 0"]


def test_toy_assets_refuses_to_overwrite_a_pipeline(capsys):
    """`python toy_assets.py assets/toy` would rewrite the committed toy models' encoders: one line, nothing written."""
    import toy_assets

    index = os.path.join(S.TOY_CKPT, "model_index.json")
    before = open(index).read()
    with pytest.raises(SystemExit):
        toy_assets.main([S.TOY_CKPT])
    assert "already holds a pipeline" in capsys.readouterr().err and open(index).read() == before
