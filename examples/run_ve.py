#!/usr/bin/env python
"""Fine-tune ALBEF for visual entailment (SNLI-VE) with momentum distillation, and evaluate its accuracy.

Does the image entail, contradict, or say nothing about the hypothesis? `AlbefForVisualEntailment` puts a 3-way
MLP head on the multimodal [CLS]; the loss is `(1 - alpha) CE + alpha soft-CE` from the momentum teacher's
distribution (the original distils at a constant alpha, without ramp: `--alpha_warmup_steps 0` here).

Data (samples: albef_hf.data.downstream):
- the original's json (--train_file ve_train.json --eval_file ve_test.json --image_root flickr30k-images):
  `[{"image": "<Flickr30K id>", "sentence": str, "label": "entailment" | "neutral" | "contradiction"}]`;
- a Hugging Face dataset (--dataset_name) with columns `image`, `hypothesis`, `label` (0 contradiction,
  1 neutral, 2 entailment, or those names); others with --column_names "text=sentence";
- the synthetic world (--dataset_name synthetic).

    python examples/run_ve.py --output_dir out --model_name_or_path path/to/pretrained --image_size 384 \\
        --train_file ve_train.json --eval_file ve_test.json --image_root flickr30k-images \\
        --do_train --do_eval --num_train_epochs 5 --per_device_train_batch_size 32

Metrics: `eval_accuracy` (percent). The saved folder loads with `AlbefForVisualEntailment.from_pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from albef_example_utils import (
    ModelArguments,
    TaskDataArguments,
    build_processor,
    build_task_model,
    build_transform,
    parse_arguments,
    read_task_data,
    train_evaluate_save,
)

from albef_hf import AlbefForVisualEntailment
from albef_hf.data.collators import AlbefClassificationCollator
from albef_hf.data.downstream import read_ve_json
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments


@dataclass
class VeTrainingArguments(AlbefTrainingArguments):
    """The original SNLI-VE defaults (configs/VE.yaml): lr 2e-5 to 1e-6, alpha 0.4 without ramp."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-6, metadata={"help": "Final learning rate of the cosine."})
    alpha_warmup_steps: int | None = field(
        default=0, metadata={"help": "Steps over which alpha ramps up from 0 (the original: none)."}
    )


def main(argv: list[str] | None = None) -> AlbefTrainer:
    model_args, data_args, training_args = parse_arguments(
        (ModelArguments, TaskDataArguments, VeTrainingArguments), argv
    )
    model = build_task_model(AlbefForVisualEntailment, model_args)
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length=30)
    seed = training_args.seed
    train_set = read_task_data("ve", data_args, "train", image_size, seed, read_ve_json)
    eval_set = read_task_data("ve", data_args, "eval", image_size, seed, read_ve_json)
    collator = AlbefClassificationCollator(
        processor,
        build_transform(data_args, image_size),
        num_labels=len(AlbefForVisualEntailment.label_names),
    )
    trainer = AlbefTrainer(model, training_args, collator, train_set, eval_set, processing_class=processor)
    train_evaluate_save(trainer, training_args, predict_set=eval_set)
    return trainer


if __name__ == "__main__":
    main()
