#!/usr/bin/env python
"""Fine-tune ALBEF for image-text retrieval (ITC with image-id positives + ITM) and evaluate TR/IR recall.

The training data gives one sample per caption with an image id (ALBEF json: captions of one image share
it; Hugging Face datasets: --id_column, else the row). Evaluation follows the original: ITC ranking, ITM
re-ranking of the top --retrieval_k candidates, recall@1/5/10 with every caption of an image counted.

    python examples/run_retrieval.py --output_dir out --model_name_or_path path/to/pretrained \\
        --train_file flickr30k_train.json --image_root flickr30k-images --eval_file flickr30k_test.json \\
        --image_size 384 --do_train --do_eval --num_train_epochs 10 --warmup_steps 100 \\
        --lr_scheduler_type albef_epoch_cosine --per_device_train_batch_size 32 --retrieval_k 128

    # zero-shot evaluation only
    python examples/run_retrieval.py --output_dir out --model_name_or_path path --eval_file test.json --do_eval
"""

from __future__ import annotations

from dataclasses import dataclass, field

from albef_example_utils import run

from albef_hf import AlbefForImageTextRetrieval
from albef_hf.data.collators import AlbefRetrievalCollator
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments


@dataclass
class RetrievalArguments(AlbefTrainingArguments):
    """The original retrieval fine-tuning defaults (configs/Retrieval_flickr.yaml)."""

    learning_rate: float = field(default=1e-5, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-6, metadata={"help": "Final learning rate of the cosine."})


def main(argv: list[str] | None = None) -> AlbefTrainer:
    return run(AlbefForImageTextRetrieval, AlbefRetrievalCollator, RetrievalArguments, "finetune", 30, argv)


if __name__ == "__main__":
    main()
