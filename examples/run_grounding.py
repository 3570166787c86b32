#!/usr/bin/env python
"""Weakly-supervised visual grounding with ALBEF: fine-tune with ITC + ITM on image ids, evaluate box accuracy.

As the original (Grounding.py): the model never sees a box in training. It is fine-tuned as for retrieval, each
referring expression a caption of its image (`AlbefForImageTextRetrieval`, positives by image id, momentum
distillation and queues); the training images are resized, not cropped (a crop could cut the referred object out).
At evaluation, the Grad-CAM of the ITM score on the cross-attention of the third fusion layer (--gradcam_layer;
--gradcam_mode itc for the ViT variant) is upsampled to the image, each candidate box is scored by its mass divided
by sqrt(area), and the best one is correct when its IoU with the true box is at least 0.5.

Data (samples: albef_hf.data.downstream):
- the original's json (--train_file refcoco+_train.json --eval_file refcoco+_val.json --image_root coco):
  `[{"image", "text", "ref_id"}]`, image ids from the file names; for evaluation each entry also needs "box" and
  "candidate_boxes" ([x, y, w, h] pixels; the original reads them from the REFER toolkit and its detections);
- a Hugging Face dataset (--dataset_name) with columns `image`, `text`, `image_id` (else the row), and for
  evaluation `box`, `candidate_boxes` (--box_format xywh or xyxy);
- the synthetic world (--dataset_name synthetic): every object's box is a candidate.

    python examples/run_grounding.py --output_dir out --model_name_or_path path/to/pretrained --image_size 384 \\
        --train_file refcoco+_train.json --eval_file refcoco+_val_boxes.json --image_root coco \\
        --do_train --do_eval --num_train_epochs 5 --per_device_train_batch_size 32 --queue_size 65536

Metrics: `eval_box_accuracy` (percent; `eval_box_accuracy_<split>` when samples have a "split").
The saved folder serves `pipeline("visual-grounding", model=out)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

from albef_example_utils import (
    ModelArguments,
    TaskDataArguments,
    build_model,
    build_processor,
    build_transform,
    parse_arguments,
    read_task_data,
    train_evaluate_save,
)

from albef_hf import AlbefForImageTextRetrieval
from albef_hf.data.collators import AlbefRetrievalCollator
from albef_hf.data.downstream import read_grounding_json
from albef_hf.evaluation import GroundingEvalSet
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments


@dataclass
class GroundingTrainingArguments(AlbefTrainingArguments):
    """The original grounding defaults (configs/Grounding.yaml): lr 1e-5 to 1e-6, alpha ramped over epoch 1."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-6, metadata={"help": "Final learning rate of the cosine."})


@dataclass
class BoxArguments:
    box_format: str = field(
        default="xywh",
        metadata={"help": "Boxes of the json / dataset: 'xywh' or 'xyxy' (corners; the synthetic world's)."},
    )


def main(argv: list[str] | None = None) -> AlbefTrainer:
    model_args, data_args, box_args, training_args = parse_arguments(
        (ModelArguments, TaskDataArguments, BoxArguments, GroundingTrainingArguments), argv
    )
    model = build_model(AlbefForImageTextRetrieval, model_args)
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length=30)
    read_json = partial(read_grounding_json, box_format=box_args.box_format)
    seed = training_args.seed
    train_set = read_task_data(
        "grounding", data_args, "train", image_size, seed, read_json, box_args.box_format
    )
    eval_samples = read_task_data(
        "grounding", data_args, "eval", image_size, seed, read_json, box_args.box_format
    )
    eval_set = GroundingEvalSet(eval_samples) if eval_samples is not None else None
    collator = AlbefRetrievalCollator(processor, build_transform(data_args, image_size, crop="grounding"))
    trainer = AlbefTrainer(model, training_args, collator, train_set, eval_set, processing_class=processor)
    train_evaluate_save(trainer, training_args, predict_set=eval_set)
    return trainer


if __name__ == "__main__":
    main()
