"""The three trainers fail fast and recover (issue 19): every bad flag is one `error:` line before anything is built
or written; a damaged newest checkpoint is skipped for the one before it; SIGTERM / SIGUSR1 finish the step,
checkpoint and exit 0 (under torchrun on every rank at the same step), and the run resumes bit-identically; a
killed latent-cache build resumes where it stopped; a corrupt shard is one line naming it and its fix."""
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import data as D
import train_cm as C
import train_common as T
import train_dmd as DMD
import train_fm as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINERS = {"fm": F, "cm": C, "dmd": DMD}


def config(trainer, pipeline, out, cache, **kw):
    """A tiny run of `trainer` (8 cached samples, 4 steps, constant lr so the total steps do not matter)."""
    init = os.path.join(pipeline, "transformer")
    common = dict(assets=pipeline, n_data=8, budget=64 * 64, cache=cache, out=out, steps=4, lr=1e-3, lr_min=1e-3,
                  save_every=2, eval_every=0, eval_cases=0, log_every=1, seed=0)
    own = {"fm": dict(preset="tiny", batch=4, micro_batch=2, warmup=0),
           "cm": dict(init=init, batch=4, micro_batch=2, warmup=0, guidance=1.0),
           "dmd": dict(teacher=init, init=init, batch=2, micro_batch=1, fake_updates=2, lr_fake=1e-3)}[trainer]
    return TRAINERS[trainer].Config(**{**common, **own, **kw})


def run(trainer, pipeline, out, cache, **kw):
    """Run in this process; returns [(step, loss)] of the metrics log."""
    TRAINERS[trainer].main(config(trainer, pipeline, out, cache, **kw))
    return losses(out)


def losses(out):
    return [(m["step"], m["loss"]) for m in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in m]


@pytest.fixture(scope="module")
def cache(tiny_pipeline, tmp_path_factory):
    """One latent cache for the module's runs (the three trainers share it, as on the toy)."""
    path = str(tmp_path_factory.mktemp("cache"))
    T.build_cache(config("fm", tiny_pipeline, "", path), 0, 1)
    return path


# -----------------------------------------------------------------------------
# flags: one line, exit code 1, before any process group, model or cache, nothing written


def bad_jsonl(tmp_path):
    """Three lines, none usable: broken json, a missing key, a missing image."""
    rec = dict(input_images=["a.png"], output_image="t.png", instruction="x")
    lines = ["{not json", json.dumps({k: v for k, v in rec.items() if k != "instruction"}), json.dumps(rec)]
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "bad.jsonl")


ROWS = [  # (trainer, flags, what the line must say); the first nine are the table
    ("fm", dict(data="{tmp}/missing.jsonl"), r"--data .*missing\.jsonl: no such file"),
    ("fm", dict(data="BAD"), r"--data .*bad\.jsonl: .*none of its 3 lines is usable \(line 1: .*; line 2: .*; line 3: "),
    ("fm", dict(init="{tmp}/nope"), r"--init .*nope' is not a transformer folder \(no such folder\)"),
    ("fm", dict(preset="nope"), r"--preset must be one of .*tiny.*'nope'"),
    ("fm", dict(steps=-5), r"--steps must be > 0, got -5"),
    ("fm", dict(lr=0.0), r"--lr must be > 0, got 0\.0"),
    ("fm", dict(assets="{tmp}/no_assets"), r"--assets .*no_assets' is not a folder"),
    ("fm", dict(micro_batch=0), r"--micro_batch must be > 0, got 0"),
    ("fm", dict(batch=6, micro_batch=4), r"--batch 6 must split into 1 process\(es\) × a multiple of --micro_batch 4"),
    ("fm", dict(data="toy:nope"), r"--data toy:nope: unknown toy layout 'nope'"),
    ("fm", dict(keep_ckpts=0), r"--keep_ckpts must be > 0"),
    ("fm", dict(assets="{tmp}"), r"--assets .* has no vae/ folder"),
    ("cm", dict(guidance_from="nope"), r"--guidance_from must be one of teacher, ema"),
    ("cm", dict(init="{tmp}"), r"--init .* is not a transformer folder \(config\.json: .*No such file"),
    ("dmd", dict(teacher="{tmp}/nope"), r"--teacher .* is not a transformer folder"),
    ("dmd", dict(weighting="nope"), r"--weighting must be one of official, paper"),
    ("dmd", dict(fake_updates=0), r"--fake_updates must be > 0"),
]


@pytest.mark.parametrize("trainer,flags,message", ROWS, ids=[f"{t}-{next(iter(f))}" for t, f, _ in ROWS])
def test_bad_flag_is_one_error_line_before_any_work(trainer, flags, message, tiny_pipeline, tmp_path, monkeypatch):
    flags = {k: bad_jsonl(tmp_path) if v == "BAD" else v.format(tmp=tmp_path) if isinstance(v, str) else v
             for k, v in flags.items()}
    monkeypatch.setattr(T, "setup_dist", lambda: pytest.fail("a process group was started before the check"))
    out, cache = str(tmp_path / "out"), str(tmp_path / "cache")
    with pytest.raises(SystemExit) as e:
        TRAINERS[trainer].main(config(trainer, tiny_pipeline, out, cache, **flags))
    line = e.value.code
    assert isinstance(line, str) and line.startswith("error: --") and "\n" not in line, line  # exit code 1
    assert re.search(message, line), line
    assert not os.path.exists(out) and not os.path.exists(cache)


def test_cli_prints_one_line_and_exits_1(tiny_pipeline, tmp_path):
    """The real command line: stderr is the one error line (no traceback), exit code 1, nothing written."""
    base = [sys.executable, "train_fm.py", "--assets", tiny_pipeline, "--out", str(tmp_path / "o"),
            "--cache", str(tmp_path / "c")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen(base + extra, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for extra in (["--data", str(tmp_path / "missing.jsonl")],
                                                       ["--micro_batch", "0"])]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 1 and err.startswith("error: --") and err.count("\n") == 1, err
    assert not os.listdir(tmp_path)


# -----------------------------------------------------------------------------
# checkpoints: the last K kept, a damaged newest one skipped with a warning


def test_truncated_latest_checkpoint_falls_back_to_the_previous(tiny_pipeline, cache, tmp_path, capsys):
    """--keep_ckpts 2 keeps the last two. With the newest truncated, --resume true warns once, naming it, and goes
    on from the one before, bit-identically; with none usable it stops with one error line."""
    whole = run("fm", tiny_pipeline, str(tmp_path / "a"), cache, steps=6)
    out = str(tmp_path / "b")
    run("fm", tiny_pipeline, out, cache, steps=4, save_every=1)
    assert [os.path.basename(c) for c in T.checkpoints(out)] == ["step_000004", "step_000003"]  # keep_ckpts 2
    bad = os.path.join(out, "ckpt", "step_000004", "checkpoint.pt")
    with open(bad, "r+b") as f:
        f.truncate(os.path.getsize(bad) // 2)
    capsys.readouterr()
    logged = len(losses(out))
    resumed = run("fm", tiny_pipeline, out, cache, steps=6, save_every=1, resume=True)[logged:]
    warned = [l for l in capsys.readouterr().err.splitlines() if "warning" in l]  # (tqdm writes there too)
    assert len(warned) == 1 and warned[0].startswith("warning: checkpoint ") and "step_000004 is unusable" in warned[0]
    assert resumed == whole[3:]  # steps 4-6 again from step 3, bit-identical

    for c in T.checkpoints(out):  # now damage every checkpoint: one error line after the warnings
        os.truncate(os.path.join(c, "state.json"), 10)
    with pytest.raises(SystemExit, match=r"^error: none of the 2 checkpoints under .* is usable"):
        run("fm", tiny_pipeline, out, cache, steps=8, resume=True)


# -----------------------------------------------------------------------------
# preemption


@pytest.mark.parametrize("trainer,sig", [("fm", signal.SIGTERM), ("cm", signal.SIGUSR1), ("dmd", signal.SIGTERM)],
                         ids=["fm-SIGTERM", "cm-SIGUSR1", "dmd-SIGTERM"])
def test_signal_finishes_the_step_checkpoints_and_resumes_bit_identically(trainer, sig, tiny_pipeline, cache,
                                                                          tmp_path, monkeypatch, capsys):
    """The signal arrives during step 3 (of 4): that step completes, step_000003 is written (not a save_every
    step), main returns normally (exit 0) with a line saying where; --resume true gives step 4 bit-identically."""
    whole = run(trainer, tiny_pipeline, str(tmp_path / "a"), cache)
    real = T.lr_at  # called once at the start of every step by all three trainers

    def signalling(step, *a):
        if step == 2:
            os.kill(os.getpid(), sig)
        return real(step, *a)

    monkeypatch.setattr(T, "lr_at", signalling)
    before = signal.getsignal(sig)
    out = str(tmp_path / "b")
    stopped = run(trainer, tiny_pipeline, out, cache)
    monkeypatch.undo()
    assert signal.getsignal(sig) == before  # the trainer's handler is gone again
    assert [s for s, _ in stopped] == [1, 2, 3] and stopped == whole[:3]
    assert f"stopped by {sig.name} after step 3: checkpoint {out}/ckpt/step_000003; continue with --resume true" \
        in capsys.readouterr().out
    assert [os.path.basename(c) for c in T.checkpoints(out)] == ["step_000003", "step_000002"]
    resumed = run(trainer, tiny_pipeline, out, cache, resume=True)
    assert resumed[3:] == whole[3:] and len(whole) == 4


def torchrun_fm(pipeline, out, cache, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_fm.py",
           "--assets", pipeline, "--n_data", "8", "--budget", str(64 * 64), "--cache", cache, "--out", out,
           "--preset", "tiny", "--batch", "4", "--micro_batch", "1", "--lr", "1e-3", "--lr_min", "1e-3", "--warmup",
           "0", "--eval_cases", "0", "--log_every", "1", "--save_every", "1000", *flags]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def worker(pid, rank):
    """The pid of torchrun's worker process with RANK=rank."""
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            ppid = int(open(f"/proc/{p}/stat").read().rpartition(")")[2].split()[1])
            if ppid == pid and f"RANK={rank}".encode() in open(f"/proc/{p}/environ", "rb").read().split(b"\0"):
                return int(p)
        except OSError:
            continue
    return None


def test_sigterm_under_torchrun_stops_every_rank_at_the_same_step(tiny_pipeline, cache, tmp_path):
    """Two gloo processes; SIGTERM reaches rank 1 only. Both stop after the same step (the flag is all-reduced),
    the checkpoint holds each rank's noise stream, both exit 0, and --resume true continues bit-identically
    (compared with an uninterrupted two-process run)."""
    out = str(tmp_path / "b")
    p = torchrun_fm(tiny_pipeline, out, cache, "--steps", "200")
    metrics = os.path.join(out, "metrics.jsonl")
    while p.poll() is None and not (os.path.exists(metrics) and open(metrics).read().count("\n") >= 2):
        time.sleep(0.02)  # two steps logged
    os.kill(worker(p.pid, 1), signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    line = [l for l in stdout.splitlines() if l.startswith("stopped by a signal to another process after step")]
    assert line and "ranks agree" in stdout, stdout + stderr[-2000:]  # rank 0 stopped for rank 1's signal
    stop = int(line[0].split("after step ")[1].split(":")[0])
    print(f"stopped after step {stop} of 200")
    assert 2 <= stop < 200 and [s for s, _ in losses(out)] == list(range(1, stop + 1))
    assert [os.path.basename(c) for c in T.checkpoints(out)] == [f"step_{stop:06d}"]

    steps = ["--steps", str(stop + 2)]
    resumed, whole = torchrun_fm(tiny_pipeline, out, cache, *steps, "--resume", "true"), \
        torchrun_fm(tiny_pipeline, str(tmp_path / "a"), cache, *steps)
    for q in (resumed, whole):
        assert q.wait(timeout=180) == 0, q.stderr.read()[-2000:]
    assert losses(out)[stop:] == losses(str(tmp_path / "a"))[stop:] and len(losses(out)) == stop + 2


# -----------------------------------------------------------------------------
# the latent cache


def test_killed_cache_build_resumes_and_a_corrupt_shard_is_one_line(tiny_pipeline, cache, tmp_path, monkeypatch,
                                                                    capsys):
    """Shards of 2 samples: the build dies while writing the third of four; the torn temp file is removed
    (model.atomic_write) and nothing is served (no index.json);
    the next run encodes only the last two shards, and the cache equals one built in a single go. Then a
    truncated shard stops the run with one line naming it and the command that rebuilds it; run, it does."""
    monkeypatch.setattr(D, "CACHE_SHARD", 2)
    real, writes = D.save_file, []

    def dying(tensors, path, **kw):
        writes.append(path)
        if len(writes) == 3:
            open(path, "wb").write(b"\0" * 100)  # a torn write
            raise KeyboardInterrupt
        real(tensors, path, **kw)

    monkeypatch.setattr(D, "save_file", dying)
    cfg = config("fm", tiny_pipeline, str(tmp_path / "out"), str(tmp_path / "cache"))
    with pytest.raises(KeyboardInterrupt):
        T.build_cache(cfg, 0, 1)
    part = os.path.dirname(writes[0])
    assert sorted(os.listdir(part)) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    kept = {f: os.stat(os.path.join(part, f)).st_mtime_ns for f in os.listdir(part)}
    monkeypatch.setattr(D, "save_file", real)
    capsys.readouterr()
    ds = T.build_cache(cfg, 0, 1)
    assert "cache: 2 of 4 shards" in capsys.readouterr().out
    assert all(os.stat(os.path.join(part, f)).st_mtime_ns == kept[f] for f in ("shard-00000.safetensors",
                                                                                "shard-00001.safetensors"))
    ref = T.build_cache(config("fm", tiny_pipeline, "", cache), 0, 1)
    for i in range(len(ref)):
        a, b = ds[i], ref[i]
        assert all(torch.equal(a[k], b[k]) for k in ("target", "txt", "neg")) and len(a["refs"]) == len(b["refs"])
        assert all(torch.equal(x, y) for x, y in zip(a["refs"], b["refs"])) and a["scene"] == b["scene"]

    shard = os.path.join(part, "shard-00001.safetensors")
    os.truncate(shard, os.path.getsize(shard) - 8)
    with pytest.raises(SystemExit) as e:
        F.main(dataclasses.replace(cfg, steps=1))
    line = e.value.code
    command = f"rm {shard} {os.path.join(part, 'index.json')}"
    assert line.startswith(f"error: latent cache shard {shard} is corrupt") and command in line and "\n" not in line
    subprocess.run(command.split(), check=True)
    F.main(dataclasses.replace(cfg, steps=1))
    assert "cache: 3 of 4 shards" in capsys.readouterr().out
