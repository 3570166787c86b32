#!/usr/bin/env python
"""The demo's training step against this machine's own matrix-multiply rate, fp32 and (where native) bf16.

Trains the demo model (`python -m albef_hf.demo`'s defaults, or `--set name=value` overrides) through the demo's
own `pretrain` path for `--warmup + --steps` optimizer steps and prints, per precision, in one process:

- GFLOP of one optimizer step (teacher and student forward, backward), counted with
  `torch.utils.flop_counter.FlopCounterMode` and averaged over `--count-steps` steps after the timed ones
  (batches differ in caption lengths, and the padding is skipped, so steps differ by a few percent);
- seconds per step: the median of the measured steps, compute only (from the Trainer's `on_step_begin`, after
  the batch is fetched, to `on_step_end`) and wall time between consecutive steps (data loading included);
- the achieved GFLOP/s, the matmul rate of a 2048^3 product measured in the same process, and their ratio;
- the training compute of the whole demo (`max_steps` steps) in TFLOP;
- the median compute time of each hundred measured steps, with `--steps` of 200 or more (do steps slow down as a
  run goes on?), and the process's peak resident memory.

bf16 runs only where the CPU computes it natively (AVX512-BF16 or AMX); elsewhere it is skipped with a message,
unless `--emulated-bf16` asks to time the emulation too (a few steps: it is about 20x slower than fp32).

    python benchmarks/bench_demo.py                          # fp32, and bf16 where native; 2 threads
    python benchmarks/bench_demo.py --precision fp32 --steps 30
    python benchmarks/bench_demo.py --set batch_size=32 hidden_size=192
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import fields, replace

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import TrainerCallback

from albef_hf.demo.config import DemoConfig
from albef_hf.demo.run import demo_processor, pretrain, with_recipe, world_config
from albef_hf.precision import cpu_has_native_bf16


class StepProbe(TrainerCallback):
    """Times every optimizer step before `count_from` and counts the FLOPs of each step from `count_from` on
    (counting slows a step down, so those are not timed)."""

    def __init__(self, count_from: int) -> None:
        self.count_from = count_from
        self.compute, self.cpu, self.wall, self.flops = [], [], [], []
        self._begin = self._cpu_begin = self._last_end = None
        self._counter: FlopCounterMode | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.count_from:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._begin, self._cpu_begin = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now, cpu_now = time.perf_counter(), time.process_time()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops.append(self._counter.get_total_flops())
            self._counter = None
            return
        self.compute.append(now - self._begin)
        self.cpu.append(cpu_now - self._cpu_begin)
        if self._last_end is not None:
            self.wall.append(now - self._last_end)
        self._last_end = now


def matmul_rate(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """GFLOP per wall second and per CPU second (all threads) of a `size`^3 matrix product in `dtype`, best of
    `repeats`."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    a @ b
    best = best_cpu = float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        a @ b
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - cpu_start)
    flop = 2 * size**3 / 1e9
    return flop / best, flop / best_cpu


def measure(precision: str, demo: DemoConfig, steps: int, warmup: int, count_steps: int) -> dict:
    torch.manual_seed(0)
    # the demo's recipe for this precision (its batch size; its steps for the totals)
    demo = with_recipe(replace(demo, bf16="true" if precision.startswith("bf16") else "false"))
    with tempfile.TemporaryDirectory() as output_dir:
        run = replace(
            demo,
            output_dir=output_dir,
            max_steps=warmup + steps + count_steps,
            scale=1.0,
            time_budget_minutes=None,
            logging_steps=10**6,
        )
        world = world_config(run)
        probe = StepProbe(count_from=warmup + steps)
        pretrain(run, world, demo_processor(run, world), callbacks=(probe,))
    rate, cpu_rate = matmul_rate(torch.bfloat16 if precision.startswith("bf16") else torch.float32)
    gflop = statistics.mean(probe.flops) / 1e9
    measured = probe.compute[warmup:]
    compute = statistics.median(measured)
    cpu = statistics.median(probe.cpu[warmup:])
    wall = statistics.median(probe.wall[warmup:])
    hundreds = [measured[start : start + 100] for start in range(0, len(measured) - 99, 100)]
    return {
        "precision": precision,
        "threads": torch.get_num_threads(),
        "batch_size": demo.batch_size,
        "gflop_per_step": round(gflop, 2),
        "s_per_step_compute": round(compute, 4),
        "s_per_step_wall": round(wall, 4),
        "achieved_gflop_s": round(gflop / compute, 1),
        "matmul_gflop_s": round(rate, 1),
        "ratio_to_matmul": round(gflop / compute / rate, 3),
        # the same ratio per CPU second: on a busy machine wall time suffers from other processes, CPU time much
        # less (with one thread it estimates the undisturbed ratio)
        "cpu_s_per_step": round(cpu, 4),
        "ratio_to_matmul_cpu_time": round(gflop / cpu / cpu_rate, 3),
        "data_share_of_wall": round(max(0.0, wall - compute) / wall, 3),
        "demo_steps": demo.steps,
        "demo_training_tflop": round(gflop * demo.steps / 1e3, 2),
        "demo_training_minutes_estimate": round(wall * demo.steps / 60, 2),
        **(
            {"s_per_step_compute_by_100": [round(statistics.median(h), 4) for h in hundreds]}
            if len(hundreds) > 1
            else {}
        ),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def parse_overrides(items: list[str]) -> dict:
    types = {field.name: type(getattr(DemoConfig(), field.name)) for field in fields(DemoConfig)}
    overrides = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"unknown DemoConfig field {name!r}")
        kind = types[name]
        overrides[name] = value.lower() in ("true", "1") if kind is bool else kind(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=5, help="optimizer steps before measuring")
    parser.add_argument("--count-steps", type=int, default=10, help="optimizer steps whose FLOPs are counted")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--emulated-bf16", action="store_true", help="time bf16 also where it is emulated")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="DemoConfig overrides")
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = replace(DemoConfig(), **parse_overrides(args.set))
    if args.inline:
        print(json.dumps(measure(args.precision[0], demo, args.steps, args.warmup, args.count_steps)))
        return
    native = cpu_has_native_bf16()
    print(f"CPU: {cpu_model()}; native bf16: {native}; torch {torch.__version__}, {args.threads} threads")
    print(f"demo settings: {json.dumps(parse_overrides(args.set)) if args.set else 'defaults'}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for precision in args.precision:
        steps, count_steps = args.steps, args.count_steps
        if precision == "bf16" and not native:
            if not args.emulated_bf16:
                print("bf16: skipped, this CPU has no native bf16 (--emulated-bf16 times the emulation)")
                continue
            precision, steps, count_steps = "bf16-emulated", min(steps, 3), 1
        command = [sys.executable, os.path.abspath(__file__), "--inline", "--precision", precision[:4]]
        command += [
            "--steps",
            str(steps),
            "--warmup",
            str(min(args.warmup, steps)),
            "--threads",
            str(args.threads),
            "--count-steps",
            str(count_steps),
        ]
        command += ["--set", *args.set] if args.set else []
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        result["precision"] = precision
        print(json.dumps(result))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    main()
