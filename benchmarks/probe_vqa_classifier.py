#!/usr/bin/env python
"""Is the answer decoder what holds the synthetic world's VQA back? VQA as classification over the answer list.

Instead of ALBEF's answer decoder (which ranks the closed answer list by the likelihood of spelling each
answer), a two-layer MLP on the multimodal [CLS] of (image, question) gives one logit per answer of the
synthetic world's list, trained with cross-entropy: the head of `AlbefForVisualEntailment`, sized to the answer
list. Everything else is run A of the README's VQA table: the towers and fusion layers of a pretrained ALBEF
(`--model`, a `make demo` model) or, with `--scratch`, the same sizes newly initialised (`--stem` adds the
convolutional stem with 8-px patches); 1,000 steps of 32 over 8,000 training questions, AdamW (weight decay
0.02) at 2e-4 with 50 warm-up steps then a half cosine, no augmentation, no distillation, eager attention, bf16
autocast where the CPU computes it natively. It prints the accuracy per question type (each synthetic question
has one answer, so this is the VQA score) on 500 of its training questions and on the 500 held-out ones.

    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model
    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model --steps 3000 --train-items 32000
    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model --scratch --stem --learning-rate 5e-4

Compare with the answer decoder's scores in the README ("Fine-tuning on your own data") and with the
question-only baselines of `benchmarks/vqa_baselines.py`.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from albef_hf import AlbefProcessor
from albef_hf.data.synthetic import VQA_ANSWER_LIST, build_vqa_dataset
from albef_hf.modeling_albef_downstream import AlbefForVisualEntailment
from albef_hf.precision import cpu_has_native_bf16


class AnswerClassifier(AlbefForVisualEntailment):
    """The visual-entailment model with one class per answer of the synthetic world's list."""

    label_names = tuple(VQA_ANSWER_LIST)


def build_model(source: str, scratch: bool, stem: bool) -> AnswerClassifier:
    model = AnswerClassifier.from_pretrained_albef(source)
    if scratch:
        config = model.config
        if stem:
            config.vision_config.patch_size = 8
            config.vision_config.conv_stem_channels = [32, 64, 128]
        model = AnswerClassifier(config)
    model.set_attn_implementation("eager")
    return model


def encode(processor: AlbefProcessor, dataset, rows: list[int]) -> tuple[dict, torch.Tensor, list[str]]:
    """Processor inputs, answer indices and question types of the dataset's `rows`."""
    items = dataset[rows]
    inputs = processor(images=items["image"], text=items["question"], pairs=True, max_length=25)
    labels = torch.tensor([VQA_ANSWER_LIST.index(answers[0]) for answers in items["answers"]])
    return dict(inputs), labels, items["question_type"]


@torch.no_grad()
def accuracy(model: AnswerClassifier, processor: AlbefProcessor, dataset, count: int) -> dict[str, float]:
    """Percent correct per question type on the dataset's first `count` rows, plus `"overall"`."""
    model.eval()
    hits, totals = Counter(), Counter()
    for start in range(0, count, 64):
        inputs, labels, types = encode(processor, dataset, list(range(start, min(count, start + 64))))
        correct = (model(**inputs).logits.argmax(-1) == labels).tolist()
        for question_type, hit in zip(types, correct, strict=True):
            hits[question_type] += hit
            totals[question_type] += 1
    model.train()
    scores = {kind: round(100 * hits[kind] / totals[kind], 1) for kind in sorted(totals)}
    scores["overall"] = round(100 * sum(hits.values()) / sum(totals.values()), 1)
    return scores


def train(model: AnswerClassifier, processor: AlbefProcessor, dataset, args: argparse.Namespace) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.02)
    rng = np.random.default_rng(args.seed)
    epochs = args.steps * args.batch_size // len(dataset) + 1
    order = np.concatenate([rng.permutation(len(dataset)) for _ in range(epochs)]).tolist()
    bf16 = cpu_has_native_bf16()
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        warmup = min(1.0, (step + 1) / args.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = args.learning_rate * warmup * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        inputs, labels, _ = encode(
            processor, dataset, order[step * args.batch_size : (step + 1) * args.batch_size]
        )
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}, {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a pretrained ALBEF folder (a `make demo` model)")
    parser.add_argument("--scratch", action="store_true", help="the same sizes, newly initialised")
    parser.add_argument("--stem", action="store_true", help="with --scratch: 8-px patches after a conv stem")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--warmup-steps", type=int, default=50)
    parser.add_argument("--train-items", type=int, default=8000)
    parser.add_argument("--eval-items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.stem and not args.scratch:
        parser.error("--stem builds a new vision tower: give --scratch too")

    torch.manual_seed(args.seed)
    model = build_model(args.model, args.scratch, args.stem)
    processor = AlbefProcessor.from_pretrained(args.model)
    size = model.config.vision_config.image_size
    train_set = build_vqa_dataset("train", args.train_items, seed=args.seed, image_size=size)
    test_set = build_vqa_dataset("test", args.eval_items, seed=args.seed, image_size=size)
    train(model, processor, train_set, args)
    results = {
        "train": accuracy(model, processor, train_set, min(500, args.train_items)),
        "test": accuracy(model, processor, test_set, args.eval_items),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
