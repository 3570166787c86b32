#!/usr/bin/env python
"""The demo's data path without training: milliseconds per batch to fetch the training pairs and to collate them.

Draws the demo's batches (`SyntheticPairs` in a seeded random order, the demo's `AlbefPretrainingCollator`) for
`--steps` steps of `--batch-size`, with the per-image cache off and on, on one thread, and prints the mean time of
the items and of the collation per batch, and the growth of the peak resident memory.

    python benchmarks/bench_demo_data.py                      # 1000 batches of 64: the bf16 recipe
    python benchmarks/bench_demo_data.py --steps 1450 --batch-size 24
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from albef_hf.data.collators import AlbefPretrainingCollator
from albef_hf.demo.config import DemoConfig
from albef_hf.demo.data import SyntheticPairs
from albef_hf.demo.run import demo_processor, world_config


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    demo = DemoConfig()
    world = world_config(demo)
    collator = AlbefPretrainingCollator(demo_processor(demo, world), max_length=demo.max_length, seed=0)
    for cache in (False, True):
        pairs = SyntheticPairs(world, demo.train_images, demo.seed, cache=cache)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0)).tolist()
        start_rss, items_s, collate_s = peak_rss_mib(), 0.0, 0.0
        for step in range(args.steps):
            first = step * args.batch_size % len(pairs)
            start = time.perf_counter()
            samples = [pairs[index] for index in order[first : first + args.batch_size]]
            middle = time.perf_counter()
            collator(samples)
            items_s, collate_s = items_s + middle - start, collate_s + time.perf_counter() - middle
        print(
            json.dumps(
                {
                    "cache": cache,
                    "steps": args.steps,
                    "batch_size": args.batch_size,
                    "items_ms_per_batch": round(items_s / args.steps * 1e3, 1),
                    "collate_ms_per_batch": round(collate_s / args.steps * 1e3, 1),
                    "peak_rss_growth_mib": round(peak_rss_mib() - start_rss),
                }
            )
        )


if __name__ == "__main__":
    main()
