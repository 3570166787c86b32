#!/usr/bin/env python
"""Can a vision tower learn shapes and positions from a few thousand images? A supervised probe.

Each variant is the demo's ViT (width 128, 4 layers, 4 heads, MLP 512, initialiser std 0.05; 64-px images by
default) with its own patch size and convolutional stem, trained from scratch with a linear head on its [CLS]
state to classify the shape (6 classes) and the grid cell (9) of the single object of synthetic-world scenes:
AdamW (weight decay 0.02), 5% warm-up then cosine, batches drawn from a fixed training set of rendered scenes.
It prints the held-out accuracies along the way and the seconds per step, and their ratio to the first
variant's, all from the same run.

This separates what a tower *can* learn from what a task's objective makes it learn: ALBEF's objectives reach
the vision tower only through contrastive and cross-attention signals, so a tower that cannot learn shapes
even when it is told them directly cannot learn them from captions or questions either.

    python benchmarks/probe_vision_supervised.py                       # the four variants below
    python benchmarks/probe_vision_supervised.py --variants 16 8:32,64,128 --steps 2000

A variant is `PATCH` or `PATCH:C1,C2,...` (the stem's channels: stride-2 3x3 convolutions before the patch
projection, `vision_config.conv_stem_channels`). Chance is 16.7 (shape) and 11.1 (position).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from albef_hf import AlbefVisionConfig
from albef_hf.data.synthetic import SyntheticWorldConfig, caption_sample, render_scene
from albef_hf.data.synthetic.tasks import CaptionSample
from albef_hf.image_processing_albef import AlbefImageProcessor
from albef_hf.modeling_albef import AlbefVisionModel


def single_object_samples(world: SyntheticWorldConfig, split: str, seed: int) -> Iterator[CaptionSample]:
    """The caption samples of the world's `split` whose scene holds a single object, in order."""
    for index in itertools.count():
        sample = caption_sample(world, seed, split, index, noisy=False)
        if len(sample.scene.objects) == 1:
            yield sample


def single_object_scenes(
    world: SyntheticWorldConfig, split: str, count: int, seed: int, processor: AlbefImageProcessor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`count` scenes of one object of the world's `split`: pixels, shape index, grid-cell index."""
    samples = list(itertools.islice(single_object_samples(world, split, seed), count))
    objects = [sample.scene.objects[0] for sample in samples]
    pixels = processor(images=[render_scene(sample.scene) for sample in samples], return_tensors="pt")
    shapes = torch.tensor([world.shapes.index(obj.shape) for obj in objects])
    cells = torch.tensor([obj.cell[0] * world.grid_size + obj.cell[1] for obj in objects])
    return pixels["pixel_values"], shapes, cells


def parse_variant(text: str) -> tuple[int, list[int] | None]:
    patch, _, stem = text.partition(":")
    return int(patch), [int(channels) for channels in stem.split(",")] if stem else None


def train_variant(
    variant: str,
    train: tuple[torch.Tensor, ...],
    test: tuple[torch.Tensor, ...],
    world: SyntheticWorldConfig,
    args: argparse.Namespace,
) -> dict:
    patch, stem = parse_variant(variant)
    torch.manual_seed(args.seed)
    config = AlbefVisionConfig(
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=512,
        image_size=args.image_size,
        patch_size=patch,
        conv_stem_channels=stem,
        initializer_range=0.05,
    )
    tower = AlbefVisionModel(config)
    num_shapes, num_cells = len(world.shapes), world.grid_size**2
    head = nn.Linear(config.hidden_size, num_shapes + num_cells)
    parameters = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.02)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * max(0, step - warmup) / max(1, args.steps - warmup)))
        ),
    )

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        return head(tower(pixels).last_hidden_state[:, 0])

    @torch.no_grad()
    def accuracy() -> tuple[float, float]:
        tower.eval()
        scores = torch.cat([logits(chunk) for chunk in test[0].split(250)])
        tower.train()
        shape = (scores[:, :num_shapes].argmax(1) == test[1]).float().mean().item()
        cell = (scores[:, num_shapes:].argmax(1) == test[2]).float().mean().item()
        return round(100 * shape, 1), round(100 * cell, 1)

    generator = torch.Generator().manual_seed(args.seed)
    history, compute = [], 0.0
    for step in range(1, args.steps + 1):
        rows = torch.randint(0, train[0].shape[0], (args.batch_size,), generator=generator)
        start = time.perf_counter()
        scores = logits(train[0][rows])
        loss = F.cross_entropy(scores[:, :num_shapes], train[1][rows]) + F.cross_entropy(
            scores[:, num_shapes:], train[2][rows]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        compute += time.perf_counter() - start
        if step % args.eval_every == 0 or step == args.steps:
            shape, cell = accuracy()
            history.append({"step": step, "shape": shape, "position": cell})
            print(f"  {variant:>14}  step {step:5d}  shape {shape:5.1f}  position {cell:5.1f}", flush=True)
    return {
        "variant": variant,
        "tokens": (args.image_size // patch) ** 2,
        "s_per_step": compute / args.steps,
        "history": history,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["16", "16:32,64,128", "8", "8:32,64,128"])
    parser.add_argument(
        "--image-size", type=int, default=64, help="side of the rendered scenes (the demo's: 64)"
    )
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--train-scenes", type=int, default=4000, help="single-object training scenes")
    parser.add_argument("--test-scenes", type=int, default=500, help="held-out single-object scenes")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0, help="seed of the world, the model and the batches")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    world = SyntheticWorldConfig(image_size=args.image_size)
    processor = AlbefImageProcessor(size=args.image_size)
    train = single_object_scenes(world, "train", args.train_scenes, args.seed, processor)
    test = single_object_scenes(world, "test", args.test_scenes, args.seed, processor)
    print(
        f"{args.train_scenes} training / {args.test_scenes} held-out single-object scenes, "
        f"{args.steps} steps of {args.batch_size}; chance: shape {100 / len(world.shapes):.1f}, "
        f"position {100 / world.grid_size**2:.1f}"
    )
    results = [train_variant(v, train, test, world, args) for v in args.variants]
    base = results[0]["s_per_step"]
    print("\n| variant (patch[:stem]) | tokens | held-out shape | held-out position | s / step vs first |")
    print("|---|---|---|---|---|")
    for result in results:
        last = result["history"][-1]
        ratio = result["s_per_step"] / base
        cells = f"{result['variant']} | {result['tokens']} | {last['shape']} | {last['position']}"
        print(f"| {cells} | {ratio:.2f}x |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
