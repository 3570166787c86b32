#!/usr/bin/env python
"""Fine-tune ALBEF for visual question answering with momentum distillation, and evaluate it.

`AlbefForQuestionAnswering` encodes the question with the image (text and fusion layers) and scores answers with
an answer decoder initialised from the pretrained fusion layers, embeddings and MLM head. Training: every answer of
a question, weighted (by the annotators' counts, or given weights), "[CLS] answer [SEP]" (the original's end token),
loss distilled from the momentum teacher's decoder. Evaluation, as the original: rank a closed answer list (the
first-token shortlist of --vqa_k, then each answer's full likelihood) and take the best; --do_predict also writes
the --vqa_top_k answers of each question with probabilities. With --vqa_generate, answers are generated freely
(`generate()`, --vqa_num_beams) instead.

Score (`eval_vqa_score`, percent): the VQA soft score min(1, matches / 3) for questions with several annotators'
answers, exact match for questions with one; `eval_vqa_score_<type>` per question type when the data has types.

Data (samples: albef_hf.data.downstream):
- the original's json (--train_file vqa_train.json vqa_val.json vg_qa.json --image_root coco --vg_root vg
  --eval_file vqa_test.json --answer_list answer_list.json): `[{"question_id", "question", "answer": [str] | str,
  "image", "dataset": "vqa" | "vg"}]` (test entries without "answer": predictions only);
- a Hugging Face dataset (--dataset_name) with columns `image`, `question`, `answers` (str or list of the
  annotators' answers) and optionally `weights`, `question_type`, `question_id`;
- the synthetic world (--dataset_name synthetic), answered from its answer list.
The answer list is --answer_list (a json list of strings), else the synthetic world's, else the distinct answers
of the training data, most frequent first.

    python examples/run_vqa.py --output_dir out --model_name_or_path path/to/pretrained --image_size 384 \\
        --train_file vqa_train.json vqa_val.json vg_qa.json --image_root coco --vg_root visual-genome \\
        --eval_file vqa_test.json --answer_list answer_list.json --do_train --do_predict \\
        --num_train_epochs 8 --per_device_train_batch_size 32

The saved folder serves `pipeline("visual-question-answering", model=out)`. For a small dataset of your own, a
pretrained BERT with a vision tower from scratch (--text_model_name_or_path with --config_overrides), and the
augmentations that keep its answers true, see the README's "Fine-tuning on your own data".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import partial

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

from albef_hf import AlbefConfig, AlbefForQuestionAnswering
from albef_hf.data.collators import AlbefVqaCollator
from albef_hf.data.downstream import collect_answers, read_vqa_json
from albef_hf.evaluation import VqaEvalSet
from albef_hf.modeling_albef_downstream import answer_decoder_config
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments

logger = logging.getLogger("albef_example")


@dataclass
class VqaTrainingArguments(AlbefTrainingArguments):
    """The original VQA defaults (configs/VQA.yaml): lr 2e-5 to 1e-6, alpha 0.4 ramped over the first epoch."""

    learning_rate: float = field(default=2e-5, metadata={"help": "Peak learning rate."})
    warmup_start_lr: float | None = field(
        default=1e-5, metadata={"help": "Learning rate at the start of the warm-up."}
    )
    min_lr: float | None = field(default=1e-6, metadata={"help": "Final learning rate of the cosine."})


@dataclass
class VqaArguments:
    """The answer list, Visual Genome images, and the answer decoder."""

    answer_list: str | None = field(
        default=None, metadata={"help": "json list of candidate answers (the original's answer_list.json)."}
    )
    answer_list_size: int | None = field(
        default=None,
        metadata={"help": "Keep the N most frequent training answers when the list is collected."},
    )
    vg_root: str | None = field(default=None, metadata={"help": "Image root of the Visual Genome entries."})
    decoder_layers: int | None = field(
        default=None,
        metadata={
            "help": "Layers of a new answer decoder (default: one per pretrained fusion layer, each initialised "
            "from it: 6 for ALBEF-base, as the original)."
        },
    )


def decoder_config(config: AlbefConfig, layers: int | None) -> dict:
    text = config.text_config
    depth = layers or text.num_hidden_layers - text.fusion_layer
    return {"decoder_config": answer_decoder_config(text, num_layers=depth)}


def answer_list(vqa_args: VqaArguments, data_args: TaskDataArguments, train_set) -> list[str] | None:
    if vqa_args.answer_list:
        with open(vqa_args.answer_list) as file:
            return json.load(file)
    if data_args.dataset_name == "synthetic":
        from albef_hf.data.synthetic import VQA_ANSWER_LIST

        return list(VQA_ANSWER_LIST)
    if train_set is not None:
        answers = collect_answers(train_set, vqa_args.answer_list_size)
        logger.warning("answer list: the %d distinct training answers, most frequent first", len(answers))
        return answers
    return None


def main(argv: list[str] | None = None) -> AlbefTrainer:
    model_args, data_args, vqa_args, training_args = parse_arguments(
        (ModelArguments, TaskDataArguments, VqaArguments, VqaTrainingArguments), argv
    )
    model = build_task_model(
        AlbefForQuestionAnswering, model_args, partial(decoder_config, layers=vqa_args.decoder_layers)
    )
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length=25)
    read_json = partial(read_vqa_json, vg_root=vqa_args.vg_root)
    seed = training_args.seed
    train_set = read_task_data("vqa", data_args, "train", image_size, seed, read_json)
    eval_samples = read_task_data("vqa", data_args, "eval", image_size, seed, read_json)
    answers = answer_list(vqa_args, data_args, train_set)
    if answers is None and not training_args.vqa_generate and eval_samples is not None:
        raise ValueError("ranking needs an answer list: pass --answer_list, training data, or --vqa_generate")
    eval_set = VqaEvalSet(eval_samples, answers) if eval_samples is not None else None
    collator = AlbefVqaCollator(processor, build_transform(data_args, image_size))
    trainer = AlbefTrainer(model, training_args, collator, train_set, eval_set, processing_class=processor)
    train_evaluate_save(trainer, training_args, predict_set=eval_set)
    return trainer


if __name__ == "__main__":
    main()
