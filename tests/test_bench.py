"""bench.py at toy-of-toy size. The GPU script is only ever run on a CUDA machine lent for minutes: if this fails, it
would crash there (or print a wrong FLOP floor) instead of measuring. The CPU table test guards the README's
speed table: it must still build, with a ratio in every row when the references are installed."""
import re

import torch

import bench
import model as M


def test_flop_floor_is_the_issues_167_tflop():
    """1024² target + one 1024² reference + 256 text tokens through all 60 blocks of the released width: 167 TFLOP.
    A wrong count here makes every MFU the GPU script prints wrong."""
    assert abs(bench.mmdit_flops(M.MMDiTConfig(), 64 * 64 * 2 + 256) / 1e12 - 167.4) < 0.1


def test_gpu_script_runs_tiny(capsys):
    threads = torch.get_num_threads()
    bench.main(["--gpu", "--tiny", "--repeats", "1", "--threads", str(threads)])
    out = capsys.readouterr().out
    for row in ("| forward |", "| forward+backward |", "| Euler, 50 steps, CFG |", "| few-step, 8 steps |",
                "FSDP2 train_fm step"):
        assert row in out, f"missing {row!r} in:\n{out}"
    if bench.diffusers:
        assert re.search(r"\| forward \| [\d.]+ m?s \| [\d.]+ m?s \| \*\*[\d.]+×\*\*", out)


def test_cpu_table_runs_tiny(capsys):
    threads = torch.get_num_threads()
    bench.main(["--tiny", "--repeats", "1", "--threads", str(threads)])
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| MMDiT") or line.startswith("| VAE")]
    assert len(table) >= 6, out
    if bench.diffusers:
        for line in table:
            assert "**" in line, f"no ratio in {line}"  # both sides measured
            diff = line.rstrip(" |").rsplit("| ", 1)[1]
            assert diff == "—" or float(diff) < 1e-4, f"ours and the reference disagree: {line}"
    assert "samples/s" in out and "| few-step, 8 steps |" in out
