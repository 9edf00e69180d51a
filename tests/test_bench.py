import json
import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT


@pytest.mark.slow
def test_bench_harness_runs_at_tiny_size():
    result = subprocess.run([sys.executable, "-m", "bench", "--quick"], capture_output=True, text=True, cwd=ROOT,
                            timeout=3600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| tracking overhead, tiny preset" in result.stdout
    accounted = re.search(r"\| tracking overhead by the tracker's accounting, tiny preset: .* \| \(([\d.]+) \+ "
                          r"([\d.]+) ms\) / ([\d.]+) ms \| ([\d.]+)-([\d.]+) \|", result.stdout)
    assert accounted, result.stdout
    thread, writer, untracked, low, high = map(float, accounted.groups())
    assert thread > 0 and writer > 0 and untracked > 0
    assert low == pytest.approx(1 + thread / untracked, abs=2e-3) and high > low
    assert "| checkpoint / (trainable x 12 B), tiny" in result.stdout
    assert "| trace over 200,000 sample rows" in result.stdout and "| grep | jq over the legacy JSONL" in result.stdout
    assert "| throughput: loratrace (tracked) / HF Trainer + PEFT" in result.stdout
    assert "| resume: start to first new update, at step 200 / at step 10 of one epoch" in result.stdout
    assert "| resume, HF Trainer + PEFT (skips batches): at step 200 / at step 10" in result.stdout
    assert "| evaluation, tiny preset: batched (32) / one by one" in result.stdout


@pytest.mark.slow
def test_gpu_script_runs_on_cpu_at_tiny_size(tmp_path):
    result = subprocess.run(["bash", "bench/gpu.sh", str(tmp_path / "out"), "--device", "cpu", "--quick"],
                            capture_output=True, text=True, cwd=ROOT, timeout=3600,
                            env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-2000:]
    table = (tmp_path / "out" / "results.md").read_text()
    for row in ("| tracking overhead: update time tracked / untracked", "| .ckpt / (trainable x 12 B)",
                "| full-model checkpoint / loratrace .ckpt", "| throughput: loratrace (tracked) / HF Trainer + PEFT",
                "| HF Trainer + PEFT: tokens/s, model TFLOP/s, MFU"):
        assert row in table
    figures = json.loads((tmp_path / "out" / "results.json").read_text())
    assert figures["full_bytes"] > figures["ckpt_bytes"] > figures["trainable"] * 12
    assert all(arm["tokens_s"] > 0 and arm["tflops"] > 0 for arm in figures["arms"].values())
    accounted = figures["accounted_overhead"]
    assert 1 < accounted["low"] < accounted["high"] and accounted["thread_ms"] > 0
    assert "| tracking overhead by the tracker's accounting, tiny preset" in table
    smoke = (tmp_path / "out" / "fsdp_smoke.md").read_text()  # on the CPU under ddp: Lightning's FSDP needs CUDA
    assert "training.strategy=ddp" in smoke and smoke.count("| ok |") == 5 and "FAILED" not in smoke


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_gpu_script_without_cuda_says_so_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "--out", str(tmp_path)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "bench.gpu: no CUDA device visible (torch.cuda.is_available() is False); use --device cpu --quick for the "
        "smoke run"]
    usage = subprocess.run(["bash", "bench/gpu.sh"], capture_output=True, text=True, cwd=ROOT)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: bench/gpu.sh OUT_DIR")
