#!/usr/bin/env python
"""Is the answer decoder what holds the synthetic world's VQA back? VQA as classification over the answer list.

Instead of ALBEF's answer decoder (which ranks the closed answer list by the likelihood of spelling each
answer), a two-layer MLP on the multimodal [CLS] of (image, question) gives one logit per answer of the
synthetic world's list, trained with cross-entropy: the head of `AlbefForVisualEntailment`, sized to the answer
list. Everything else is run A of the README's VQA table: the towers and fusion layers of a pretrained ALBEF
(`--model`, a `make demo` model) or, with `--scratch`, the same sizes newly initialised (`--stem` adds the
convolutional stem with 8-px patches); 1,000 steps of 32 over 8,000 training questions, AdamW (weight decay
0.02) at 2e-4 with 50 linear warm-up steps then a half cosine (transformers' schedule), no augmentation, no
distillation, eager attention, bf16 autocast where the CPU computes it natively. It prints the VQA score
(`albef_hf.evaluation.vqa_metrics`; each synthetic question has one answer, so it is the accuracy) overall and
per question type, on 500 of its training questions and on the 500 held-out ones.

    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model
    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model --steps 3000 --train-items 32000
    python benchmarks/probe_vqa_classifier.py --model outputs/demo/model --scratch --stem --learning-rate 5e-4

Compare with the answer decoder's scores in the README ("Fine-tuning on your own data") and with the
question-only baselines of `benchmarks/vqa_baselines.py`.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from transformers import get_cosine_schedule_with_warmup

from albef_hf import AlbefProcessor
from albef_hf.data.synthetic import VQA_ANSWER_LIST, build_vqa_dataset
from albef_hf.evaluation import vqa_metrics, vqa_score
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


def encode(processor: AlbefProcessor, items: dict) -> tuple[dict, torch.Tensor]:
    """Processor inputs and answer indices of a batch of dataset rows (`dataset[rows]`)."""
    inputs = processor(images=items["image"], text=items["question"], pairs=True, max_length=25)
    labels = torch.tensor([VQA_ANSWER_LIST.index(answers[0]) for answers in items["answers"]])
    return dict(inputs), labels


@torch.no_grad()
def scores(model: AnswerClassifier, processor: AlbefProcessor, dataset, count: int) -> dict[str, float]:
    """`vqa_metrics` (VQA score overall and per question type) on the dataset's first `count` rows."""
    model.eval()
    predictions = []
    for start in range(0, count, 64):
        items = dataset[start : min(count, start + 64)]
        inputs, _ = encode(processor, items)
        answers = [VQA_ANSWER_LIST[index] for index in model(**inputs).logits.argmax(-1).tolist()]
        for answer, truth, question_type in zip(
            answers, items["answers"], items["question_type"], strict=True
        ):
            predictions.append({"score": vqa_score(answer, truth), "question_type": question_type})
    model.train()
    return {name: round(value, 1) for name, value in vqa_metrics(predictions).items()}


def train(model: AnswerClassifier, processor: AlbefProcessor, dataset, args: argparse.Namespace) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.02)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)
    rng = np.random.default_rng(args.seed)
    epochs = args.steps * args.batch_size // len(dataset) + 1
    order = np.concatenate([rng.permutation(len(dataset)) for _ in range(epochs)]).tolist()
    bf16 = cpu_has_native_bf16()
    model.train()
    start = time.perf_counter()
    for step in range(args.steps):
        inputs, labels = encode(
            processor, dataset[order[step * args.batch_size : (step + 1) * args.batch_size]]
        )
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            logits = model(**inputs).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        schedule.step()
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
        "train": scores(model, processor, train_set, min(500, args.train_items)),
        "test": scores(model, processor, test_set, args.eval_items),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
