import subprocess
import sys

from conftest import ROOT


def test_bench_harness_runs_at_tiny_size():
    result = subprocess.run([sys.executable, "-m", "bench", "--quick"], capture_output=True, text=True, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| tracking overhead, tiny preset" in result.stdout
    assert "| checkpoint / (trainable x 12 B), tiny" in result.stdout
    assert "| trace over 200,000 sample rows" in result.stdout and "| grep | jq over the legacy JSONL" in result.stdout
    assert "| throughput: loratrace (tracked) / HF Trainer + PEFT" in result.stdout
    assert "| evaluation, tiny preset: batched (32) / one by one" in result.stdout
