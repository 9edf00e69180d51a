"""Influence throughput and memory, side by side: `python -m bench.influence [--quick]`.

  throughput  training examples x checkpoints per second of tracin-cp's work per checkpoint (LoRA tensors swapped in,
              the test gradients, every training example's gradient dotted with them): batched (`ExampleGradients`,
              vmap over `--batch` examples) / one at a time (a plain `torch.autograd.grad` per example, SDPA
              attention, as a hand-written loop would), on the tiny preset and a Qwen2.5-0.5B-shaped model (random
              weights, built offline from its config: `model.tiny_shape=qwen2.5-0.5b`, LoRA r=16 on q/k/v/o)
  memory      peak resident memory of the batched work with T test gradients kept, exact / `--project-dim K`

Each arm runs in its own process (`--arm JSON`), so its peak RSS is its own; the "checkpoints" are random LoRA
states (swapping a file's tensors in is `load_state_dict`, the same either way). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_arm(shape: str, mode: str, n_train: int, n_test: int, checkpoints: int, batch: int,
            project_dim: int | None) -> dict:
    import torch

    from loratrace.attribution.gradients import ExampleGradients, Projection
    from loratrace.config import LoraConfig, ModelConfig
    from loratrace.data.datasets import load_split
    from loratrace.data.encoding import collate, encode, padding_token_id
    from loratrace.training.model import add_lora, load_base
    from loratrace.training.module import answer_statistics

    torch.manual_seed(0)
    model, tokenizer = load_base(ModelConfig(tiny_shape=shape) if shape != "tiny" else ModelConfig())
    model = add_lora(model, LoraConfig(dropout=0.0), 0)
    model.eval()
    examples = encode(load_split("arc-challenge", "sample", "train", n_train + n_test), tokenizer, 256)
    train, tests = examples[:n_train], examples[n_train:]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    states = [{n: torch.randn_like(p) * 0.02 for n, p in trainable.items()} for _ in range(checkpoints)]
    pad = padding_token_id(tokenizer)
    size = sum(p.numel() for p in trainable.values())
    base_rss = _rss_mb()
    computer = None
    if mode == "batched":
        projection = Projection(project_dim, 0, size) if project_dim else None
        computer = ExampleGradients(model, pad, batch, projection)

    def plain(example) -> torch.Tensor:
        encoded = collate([example], pad)
        logits = model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"]).logits
        loss = answer_statistics(logits, encoded)["losses"][0]
        return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(trainable.values()))]).double()

    started = time.perf_counter()
    checksum = 0.0
    for state in states:
        model.load_state_dict(state, strict=False)
        if computer is not None:
            test_grads = computer.matrix(tests).double()
            for _, grads in computer.gradients(train):
                checksum += float((grads.double() @ test_grads.T).sum())
        else:
            test_grads = torch.stack([plain(e) for e in tests])
            for example in train:
                checksum += float((plain(example) @ test_grads.T).sum())
    seconds = time.perf_counter() - started
    return {"seconds": seconds, "pairs_per_s": n_train * checkpoints / seconds, "trainable": size,
            "base_rss_mb": base_rss, "peak_rss_mb": _rss_mb(), "checksum": checksum}


def arm(**spec) -> dict:
    """`run_arm` in a fresh process: its own peak memory, nothing cached from another arm."""
    result = subprocess.run([sys.executable, "-m", "bench.influence", "--arm", json.dumps(spec)], capture_output=True,
                            text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smallest counts: a smoke run")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(**json.loads(args.arm))))
        return
    import torch

    q = args.quick
    sizes = {"tiny": dict(n_train=16 if q else 96, n_test=2 if q else 8, checkpoints=2, batch=16),
             "qwen2.5-0.5b": dict(n_train=2 if q else 4, n_test=1, checkpoints=1, batch=4)}
    rows = []
    for shape, size in sizes.items():
        batched = arm(shape=shape, mode="batched", project_dim=None, **size)
        single = arm(shape=shape, mode="single", project_dim=None, **size)
        assert abs(batched["checksum"] - single["checksum"]) <= 1e-4 * abs(single["checksum"]) + 1e-6
        rows.append((f"influence throughput, {shape} ({batched['trainable']:,} LoRA parameters): train examples x "
                     f"checkpoints per s, batched ({size['batch']}) / one at a time ({size['n_train']} x "
                     f"{size['checkpoints']}, {size['n_test']} test)",
                     f"{batched['pairs_per_s']:.2f} / {single['pairs_per_s']:.2f}",
                     f"{batched['pairs_per_s'] / single['pairs_per_s']:.2f}x"))
    memory = dict(shape="qwen2.5-0.5b", mode="batched", n_train=2, n_test=8 if q else 16, checkpoints=1, batch=2)
    dim = 64 if q else 256
    exact, projected = arm(project_dim=None, **memory), arm(project_dim=dim, **memory)
    rows.append((f"peak RSS, qwen2.5-0.5b, {memory['n_test']} test gradients kept: exact / --project-dim {dim} "
                 f"(after the model: {exact['base_rss_mb']:,.0f} / {projected['base_rss_mb']:,.0f} MB)",
                 f"{exact['peak_rss_mb']:,.0f} MB / {projected['peak_rss_mb']:,.0f} MB",
                 f"{exact['peak_rss_mb'] / projected['peak_rss_mb']:.2f}x"))
    rows.append((f"time of that work: exact / --project-dim {dim}", f"{exact['seconds']:.1f} s / "
                 f"{projected['seconds']:.1f} s", f"{exact['seconds'] / projected['seconds']:.2f}x"))
    print("| figure | measured | ratio |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")


if __name__ == "__main__":
    main()
