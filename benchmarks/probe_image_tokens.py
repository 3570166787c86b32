#!/usr/bin/env python
"""What a checkpoint's image tokens carry, on single-object synthetic-world scenes.

For any ALBEF checkpoint of the synthetic world (a demo model, a fine-tuned VQA model, ...), three figures:

- `spread`: how much the image encoder's output depends on the image: the standard deviation across images of
  each output token dimension, averaged (the tokens are LayerNorm outputs: overall standard deviation
  about 1).
  A tower that a task has taught to ignore its input ("collapsed") has a spread near 0.
- `cell_from_grid`: a linear probe (logistic regression, fit on training scenes, scored on held-out ones) that
  finds the object's grid cell from all output tokens together: the token grid says where the object is.
- `position_from_token`: a linear probe that tells each patch token's own position from that token's vector
  alone. Attention reads a weighted sum of token vectors, so this is the position that cross-attention can
  pass on; chance is one over the number of patches. With it, the mean norms of the position embeddings and
  of the patch embeddings (the two terms the ViT adds at its input).

    python benchmarks/probe_image_tokens.py --model outputs/demo/model
    python benchmarks/probe_image_tokens.py --model out/vqa --init   # also a fresh model of the same config
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from probe_vision_supervised import single_object_scenes
from transformers.utils import logging as hf_logging

from albef_hf import AlbefModel, AlbefProcessor
from albef_hf.data.synthetic import SyntheticWorldConfig


def linear_probe_accuracy(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor
) -> float:
    """Held-out accuracy (%) of a logistic regression on standardised features (L-BFGS, light L2)."""
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(train_labels.max()) + 1
    weight = torch.zeros(train.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=300)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return round(100 * ((test @ weight + bias).argmax(1) == test_labels).float().mean().item(), 1)


@torch.no_grad()
def image_tokens(model: AlbefModel, pixels: torch.Tensor) -> torch.Tensor:
    """The image encoder's output tokens `(images, 1 + patches, width)`, [CLS] first."""
    return torch.cat([model.encode_image(chunk).last_hidden_state for chunk in pixels.split(250)])


def probe(model: AlbefModel, train: tuple, test: tuple, spread_images: int) -> dict[str, float]:
    """The figures of the module docstring for `model` on (pixels, shapes, cells) training and test scenes."""
    model.eval()
    train_tokens, test_tokens = image_tokens(model, train[0]), image_tokens(model, test[0])
    spread = test_tokens[:spread_images].std(0).mean().item()
    patches = train_tokens.shape[1] - 1
    # every patch token of a third of the training scenes is a sample (tens of thousands already)
    own_train = train_tokens[: len(train_tokens) // 3, 1:]
    own_test = test_tokens[:, 1:]
    vision = model.vision_model
    with torch.no_grad():
        patch_norm = vision.patch_embed(test[0][:spread_images]).norm(dim=-1).mean().item()
    return {
        "spread": round(spread, 3),
        "position_embedding_norm": round(vision.pos_embed[0, 1:].norm(dim=-1).mean().item(), 2),
        "patch_embedding_norm": round(patch_norm, 2),
        "cell_from_grid": linear_probe_accuracy(
            train_tokens.flatten(1), train[2], test_tokens.flatten(1), test[2]
        ),
        "position_from_token": linear_probe_accuracy(
            own_train.flatten(0, 1),
            torch.arange(patches).repeat(own_train.shape[0]),
            own_test.flatten(0, 1),
            torch.arange(patches).repeat(own_test.shape[0]),
        ),
        "position_chance": round(100 / patches, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an ALBEF checkpoint folder of the synthetic world")
    parser.add_argument(
        "--init", action="store_true", help="also probe a freshly initialised model of its config"
    )
    parser.add_argument("--train-scenes", type=int, default=3000)
    parser.add_argument("--test-scenes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="the world seed the model was trained on")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()  # a task checkpoint loaded as AlbefModel lists its heads as unexpected
    model = AlbefModel.from_pretrained(args.model)
    processor = AlbefProcessor.from_pretrained(args.model)
    world = SyntheticWorldConfig(image_size=model.config.vision_config.image_size)
    train = single_object_scenes(world, "train", args.train_scenes, args.seed, processor.image_processor)
    test = single_object_scenes(world, "test", args.test_scenes, args.seed, processor.image_processor)
    results = {"trained": probe(model, train, test, spread_images=64)}
    if args.init:
        torch.manual_seed(args.seed)
        results["init"] = probe(AlbefModel._from_config(model.config), train, test, spread_images=64)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
