#!/usr/bin/env python
"""Pretrain ALBEF (ITC + ITM with hard negatives + MLM, momentum distillation) with `AlbefTrainer`.

Data: ALBEF annotation json (--train_file, --image_root), webdataset shards (--train_shards), any Hugging
Face dataset with image and text columns (--dataset_name, incl. imagefolder + metadata.jsonl, --streaming),
or the built-in synthetic world (--dataset_name synthetic). Every `AlbefTrainingArguments` flag applies.

    # one CPU, a tiny model on the synthetic world
    python examples/run_pretraining.py --output_dir out --do_train --dataset_name synthetic \\
        --config_overrides "embed_dim=64,vision_config.hidden_size=64,vision_config.num_hidden_layers=2,..." \\
        --image_size 64 --per_device_train_batch_size 32 --queue_size 1024 --max_steps 500

    # the original recipe on 8 GPUs
    torchrun --nproc_per_node 8 examples/run_pretraining.py --output_dir out --do_train \\
        --vision_model_name_or_path facebook/deit-base-patch16-224 --text_model_name_or_path bert-base-uncased \\
        --image_size 256 --train_file coco.json vg.json cc3m_train.json sbu.json --per_device_train_batch_size 64 \\
        --num_train_epochs 30 --warmup_steps 2000 --lr_scheduler_type albef_epoch_cosine --push_to_hub
"""

from __future__ import annotations

from dataclasses import dataclass, field

from albef_example_utils import run

from albef_hf import AlbefForPreTraining
from albef_hf.data.collators import AlbefPretrainingCollator
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments


@dataclass
class PretrainingArguments(AlbefTrainingArguments):
    """The original pretraining defaults (configs/Pretrain.yaml)."""

    learning_rate: float = field(default=1e-4, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-5, metadata={"help": "Final learning rate of the cosine."})


def main(argv: list[str] | None = None) -> AlbefTrainer:
    return run(AlbefForPreTraining, AlbefPretrainingCollator, PretrainingArguments, "pretrain", 25, argv)


if __name__ == "__main__":
    main()
