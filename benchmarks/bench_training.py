#!/usr/bin/env python
"""Training throughput and peak memory of `AlbefTrainer` on a small ALBEF, fp32 and bf16 autocast.

The configuration of issue 3: images 128 px (patch 16), ViT width 256 x 4 layers, BERT hidden 256 x 6
layers with fusion from layer 3, vocabulary 30,522, batch 16, texts of 30 tokens, queue 1,024. A step is
one optimizer step of the Trainer as it trains: EMA update, momentum teacher forward (features and MLM
scores), student forward and backward (ITC + ITM with hard negatives + MLM, distilled), AdamW, enqueue.
Batches are pre-built tensors, so data loading is not measured.

    python benchmarks/bench_training.py                 # fp32 and bf16, 2 threads, CPU
    python benchmarks/bench_training.py --device cuda   # on a GPU
    python benchmarks/bench_training.py --attn sdpa     # with the library default attention

Attention defaults to eager on a CPU (for these short sequences torch's CPU SDPA kernels are slower than the
plain matmul-softmax-matmul, see benchmarks/bench_attention.py) and to SDPA on a GPU.

Each precision runs in its own process, so that its peak memory is its own (CPU: peak resident set size of
the process, and its growth over the process before the Trainer is built; GPU: peak allocated memory).
`median_cpu_s_per_step` is the process CPU time of a step (all threads): on a busy machine, wall time
suffers from other processes, CPU time much less (with one thread it estimates the undisturbed wall time).
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

import torch
from torch.utils.data import Dataset, default_collate
from transformers import TrainerCallback

from albef_hf import AlbefConfig, AlbefForPreTraining, AlbefTextConfig, AlbefVisionConfig
from albef_hf.losses import mask_tokens
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments

BATCH, TEXT_LENGTH, QUEUE = 16, 30, 1024


def small_config() -> AlbefConfig:
    vision = AlbefVisionConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        image_size=128,
        patch_size=16,
    )
    text = AlbefTextConfig(
        vocab_size=30522,
        hidden_size=256,
        num_hidden_layers=6,
        num_attention_heads=4,
        intermediate_size=1024,
        fusion_layer=3,
    )
    return AlbefConfig(vision_config=vision, text_config=text, embed_dim=256)


class RandomPairs(Dataset):
    """Pre-built pretraining samples: random pixels, 30 random tokens after [CLS], MLM masks drawn once."""

    def __init__(self, count: int, config: AlbefConfig) -> None:
        generator = torch.Generator().manual_seed(0)
        text = config.text_config
        self.pixels = torch.randn(count, 3, config.image_size, config.image_size, generator=generator)
        ids = torch.randint(1000, text.vocab_size, (count, TEXT_LENGTH), generator=generator)
        ids[:, 0] = text.cls_token_id
        self.ids = ids
        self.masked, self.labels = mask_tokens(
            ids, text.vocab_size, text.mask_token_id, (text.pad_token_id, text.cls_token_id), 0.15, generator
        )

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "pixel_values": self.pixels[index],
            "input_ids": self.ids[index],
            "attention_mask": torch.ones(TEXT_LENGTH, dtype=torch.long),
            "mlm_input_ids": self.masked[index],
            "mlm_labels": self.labels[index],
        }


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (from `on_step_begin`, after the batches are fetched, to `on_step_end`)."""

    def __init__(self, device: str) -> None:
        self.device, self.times, self.cpu_times, self._start, self._cpu_start = device, [], [], 0.0, 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start, self._cpu_start = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)
        self.cpu_times.append(time.process_time() - self._cpu_start)


def measure(precision: str, steps: int, warmup: int, threads: int, device: str, attn: str) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    config = small_config()
    model = AlbefForPreTraining._from_config(config, attn_implementation=attn)
    with tempfile.TemporaryDirectory() as output_dir:
        args = AlbefTrainingArguments(
            output_dir,
            per_device_train_batch_size=BATCH,
            max_steps=warmup + steps,
            queue_size=QUEUE,
            alpha_warmup_steps=0,
            bf16=precision == "bf16",
            use_cpu=device == "cpu",
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        timer = StepTimer(device)
        trainer = AlbefTrainer(
            model, args, default_collate, RandomPairs(BATCH * (warmup + steps), config), callbacks=[timer]
        )
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    measured = timer.times[warmup:]
    step = statistics.median(measured)
    result = {
        "precision": precision,
        "device": device,
        "attention": attn,
        "threads": threads,
        "steps_measured": len(measured),
        "median_s_per_step": round(step, 4),
        "mean_s_per_step": round(statistics.mean(measured), 4),
        "min_s_per_step": round(min(measured), 4),
        "samples_per_s": round(BATCH / step, 2),
        "median_cpu_s_per_step": round(statistics.median(timer.cpu_times[warmup:]), 4),
    }
    if device == "cuda":
        result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["peak_rss_mib"] = round(peak, 1)
        result["peak_rss_growth_mib"] = round(peak - baseline_rss, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps run before measuring")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (CPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--attn", choices=["eager", "sdpa"], help="attention (default: eager on CPU, sdpa on GPU)"
    )
    parser.add_argument("--inline", action="store_true", help="measure in this process (one precision)")
    args = parser.parse_args()
    args.attn = args.attn or ("eager" if args.device == "cpu" else "sdpa")
    if args.inline:
        result = measure(args.precision[0], args.steps, args.warmup, args.threads, args.device, args.attn)
        print(json.dumps(result))
        return
    params = sum(p.numel() for p in AlbefForPreTraining(small_config()).parameters())
    print(f"ALBEF small: {params / 1e6:.1f}M parameters, batch {BATCH}, text {TEXT_LENGTH}, queue {QUEUE}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for precision in args.precision:
        command = [sys.executable, os.path.abspath(__file__), "--inline", "--precision", precision]
        command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        command += ["--device", args.device, "--attn", args.attn]
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
        print(output.strip().splitlines()[-1])


if __name__ == "__main__":
    main()
