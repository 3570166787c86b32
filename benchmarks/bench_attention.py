#!/usr/bin/env python
"""Eager attention against torch's SDPA on this machine, at the shapes a small ALBEF trains with.

Why the demo and `bench_training.py` build their models with `attn_implementation="eager"` on a CPU while the
library default stays SDPA: for ALBEF's short sequences (30 text tokens, 65 image tokens) torch's CPU SDPA
kernels are slower than a plain `softmax(q k^T / sqrt(d)) v` in matmuls, most of all under bf16 autocast.
Each row times forward + backward of one attention call (self-attention of the text and of the image, and
the fusion layers' cross-attention from text to image), median over repeats, on `--threads` threads.

    python benchmarks/bench_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F


def eager_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    scores = torch.matmul(query, key.transpose(-1, -2)) * query.shape[-1] ** -0.5
    return torch.matmul(scores.softmax(dim=-1), value)


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(query, key, value)


def time_call(function, inputs: list[torch.Tensor], dtype: torch.dtype, repeats: int) -> float:
    """Median seconds of forward + backward of `function(*inputs)` under CPU autocast to `dtype`."""
    times = []
    for _ in range(repeats + 3):
        for tensor in inputs:
            tensor.grad = None
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            output = function(*inputs)
        output.float().sum().backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=64, help="rows (a pretraining step runs about 4x batch)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = {"text self-attention": (30, 30), "image self-attention": (65, 65), "cross-attention": (30, 65)}
    print(
        f"batch {args.batch}, {args.heads} heads of {args.head_dim}, {args.threads} threads, forward + backward"
    )
    print(f"{'attention':<22}{'dtype':<7}{'eager ms':>10}{'sdpa ms':>10}{'sdpa/eager':>12}")
    generator = torch.Generator().manual_seed(0)
    for name, (queries, keys) in shapes.items():
        size = (args.batch, args.heads)
        query = torch.randn(*size, queries, args.head_dim, generator=generator, requires_grad=True)
        key = torch.randn(*size, keys, args.head_dim, generator=generator, requires_grad=True)
        value = torch.randn(*size, keys, args.head_dim, generator=generator, requires_grad=True)
        torch.testing.assert_close(eager_attention(query, key, value), sdpa_attention(query, key, value))
        for dtype in (torch.float32, torch.bfloat16):
            eager = time_call(eager_attention, [query, key, value], dtype, args.repeats)
            sdpa = time_call(sdpa_attention, [query, key, value], dtype, args.repeats)
            label = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{name:<22}{label:<7}{eager * 1e3:>10.2f}{sdpa * 1e3:>10.2f}{sdpa / eager:>12.2f}")


if __name__ == "__main__":
    main()
