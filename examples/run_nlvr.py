#!/usr/bin/env python
"""Fine-tune ALBEF for NLVR2 (is a statement true of a pair of images?), after the text-assignment step.

As the original: with --do_ta, the pretrained ALBEF first becomes an `AlbefForTextAssignment` (every fusion layer
doubled, one copy per image) trained for one epoch on image-caption pairs to tell which of two images a caption
describes, if any (no momentum distillation in this step, as the original); then `AlbefForVisualReasoning` starts
from it and is fine-tuned on NLVR2 with momentum distillation. Without --do_ta, `AlbefForVisualReasoning` starts
from the pretrained ALBEF directly (its fusion layers duplicated).

Data (samples: albef_hf.data.downstream):
- NLVR2: the original's json (--train_file nlvr_train.json --eval_file nlvr_dev.json --image_root NLVR2):
  `[{"images": [left, right], "sentence": str, "label": "True" | "False"}]`; a Hugging Face dataset
  (--dataset_name) with columns `image0`, `image1`, `sentence`, `label` (1 true, 0 false); or the synthetic
  world (--dataset_name synthetic).
- Text assignment: image-caption pairs, as for pretraining: ALBEF json files (--ta_train_file, --ta_image_root),
  a Hugging Face dataset with `image` and `text` columns (--ta_dataset_name), or the synthetic world's captions
  (--ta_dataset_name synthetic).

    python examples/run_nlvr.py --output_dir out --model_name_or_path path/to/pretrained --image_size 384 \\
        --do_ta --ta_train_file coco.json vg.json cc3m_train.json sbu.json --ta_image_size 256 \\
        --train_file nlvr_train.json --eval_file nlvr_dev.json --image_root NLVR2 \\
        --do_train --do_eval --num_train_epochs 10 --per_device_train_batch_size 16

Metrics: `eval_accuracy` (percent). The text-assignment model is saved in `<output_dir>/text_assignment`; the
final folder loads with `AlbefForVisualReasoning.from_pretrained`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

from albef_example_utils import (
    DataArguments,
    ModelArguments,
    TaskDataArguments,
    build_processor,
    build_task_model,
    build_train_dataset,
    build_transform,
    parse_arguments,
    read_task_data,
    train_evaluate_save,
)

from albef_hf import AlbefForTextAssignment, AlbefForVisualReasoning
from albef_hf.data.collators import AlbefClassificationCollator, AlbefImageTextCollator
from albef_hf.data.downstream import read_nlvr_json
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments

logger = logging.getLogger("albef_example")


@dataclass
class NlvrTrainingArguments(AlbefTrainingArguments):
    """The original NLVR2 defaults (configs/NLVR.yaml): lr 2e-5 to 1e-6, alpha 0.4 ramped over the first epoch."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-6, metadata={"help": "Final learning rate of the cosine."})


@dataclass
class TextAssignmentArguments:
    """The text-assignment (TA) step before fine-tuning (the original's Pretrain_nlvr.py, configs/NLVR_pretrain.yaml)."""

    do_ta: bool = field(default=False, metadata={"help": "Run the text-assignment step first."})
    ta_train_file: list[str] | None = field(
        default=None, metadata={"help": "ALBEF json file(s) of image-caption pairs for the TA step."}
    )
    ta_image_root: str | None = field(default=None, metadata={"help": "Image root of --ta_train_file."})
    ta_dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "TA pairs from a Hugging Face dataset (image, text columns) or 'synthetic' (captions)."
        },
    )
    ta_synthetic_images: int = field(
        default=2000, metadata={"help": "Images of the synthetic world's captions for the TA step."}
    )
    ta_image_size: int | None = field(
        default=None,
        metadata={"help": "Resolution of the TA step (the original: 256; default: the model's)."},
    )
    ta_learning_rate: float = field(default=2e-5, metadata={"help": "TA learning rate (the original: 2e-5)."})
    ta_min_lr: float = field(default=1e-5, metadata={"help": "TA final learning rate (the original: 1e-5)."})
    ta_num_train_epochs: float = field(default=1.0, metadata={"help": "TA epochs (the original: 1)."})
    ta_max_steps: int = field(default=-1, metadata={"help": "TA optimizer steps (overrides the epochs)."})


def text_assignment_step(
    model_args: ModelArguments,
    ta_args: TextAssignmentArguments,
    data_args: TaskDataArguments,
    training_args: NlvrTrainingArguments,
) -> AlbefForTextAssignment:
    """Train `AlbefForTextAssignment` from the pretrained ALBEF; saved in `<output_dir>/text_assignment`."""
    model_args = dataclasses.replace(model_args, image_size=ta_args.ta_image_size or model_args.image_size)
    model = build_task_model(AlbefForTextAssignment, model_args)
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length=25)
    pairs = DataArguments(
        train_file=ta_args.ta_train_file,
        image_root=ta_args.ta_image_root,
        dataset_name=ta_args.ta_dataset_name,
        synthetic_images=ta_args.ta_synthetic_images,
        synthetic_eval_images=0,
    )
    world_seed = data_args.synthetic_seed if data_args.synthetic_seed is not None else training_args.seed
    samples = build_train_dataset(pairs, image_size, world_seed)
    output_dir = os.path.join(training_args.output_dir, "text_assignment")
    args = dataclasses.replace(
        training_args,
        output_dir=output_dir,
        learning_rate=ta_args.ta_learning_rate,
        warmup_start_lr=None,
        min_lr=ta_args.ta_min_lr,
        num_train_epochs=ta_args.ta_num_train_epochs,
        max_steps=ta_args.ta_max_steps,
        do_eval=False,
        push_to_hub=False,
        resume_from_checkpoint=None,
    )
    transform = build_transform(
        data_args, image_size, crop="pretrain"
    )  # the original's pretraining transform
    trainer = AlbefTrainer(
        model, args, AlbefImageTextCollator(processor, transform), samples, processing_class=processor
    )
    trainer.train()
    trainer.save_model()
    logger.warning("text-assignment model saved in %s", output_dir)
    return model


def main(argv: list[str] | None = None) -> AlbefTrainer:
    model_args, data_args, ta_args, training_args = parse_arguments(
        (ModelArguments, TaskDataArguments, TextAssignmentArguments, NlvrTrainingArguments), argv
    )
    if ta_args.do_ta:
        ta_model = text_assignment_step(model_args, ta_args, data_args, training_args)
        model, report = AlbefForVisualReasoning.from_pretrained_albef(
            ta_model, image_size=model_args.image_size, output_loading_info=True
        )
        print(f"AlbefForVisualReasoning {report}", flush=True)
    else:
        model = build_task_model(AlbefForVisualReasoning, model_args)
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length=30)
    seed = training_args.seed
    train_set = read_task_data("nlvr2", data_args, "train", image_size, seed, read_nlvr_json)
    eval_set = read_task_data("nlvr2", data_args, "eval", image_size, seed, read_nlvr_json)
    collator = AlbefClassificationCollator(
        processor,
        build_transform(data_args, image_size),
        images_per_sample=2,
        num_labels=len(AlbefForVisualReasoning.label_names),
    )
    trainer = AlbefTrainer(model, training_args, collator, train_set, eval_set, processing_class=processor)
    train_evaluate_save(trainer, training_args, predict_set=eval_set)
    return trainer


if __name__ == "__main__":
    main()
