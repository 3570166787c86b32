"""The demo: pretrain a small ALBEF on the synthetic world, evaluate zero-shot retrieval, save, report."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from typing import Any

import torch
from huggingface_hub import ModelCard
from transformers import TrainerCallback, pipeline
from transformers.utils import logging

from ..configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from ..data.collators import AlbefPretrainingCollator
from ..data.synthetic import SyntheticWorldConfig, build_retrieval_eval, grounding_sample, render_scene
from ..evaluation import compute_retrieval_scores, itm_eval
from ..grounding import box_iou
from ..hub import push_to_hub
from ..image_processing_albef import AlbefImageProcessor
from ..modelcard import AlbefCardInfo, build_model_card, save_model_card
from ..modeling_albef import AlbefForPreTraining
from ..precision import native_bf16_available, parse_bf16
from ..processing_albef import AlbefProcessor
from ..trainer import AlbefTrainer, AlbefTrainingArguments
from .config import DemoConfig
from .data import SyntheticPairs, synthetic_tokenizer
from .report import write_report

logger = logging.get_logger(__name__)

__all__ = [
    "DemoResult",
    "build_model",
    "demo_processor",
    "evaluate_zero_shot",
    "pretrain",
    "run_demo",
    "training_arguments",
    "with_recipe",
]


def world_config(demo: DemoConfig) -> SyntheticWorldConfig:
    return SyntheticWorldConfig(
        image_size=demo.image_size, noisy_caption_fraction=demo.noisy_caption_fraction
    )


def build_model(demo: DemoConfig, tokenizer) -> AlbefForPreTraining:
    """A randomly initialised ALBEF of the demo's size over the tokenizer's vocabulary (eager attention: on
    a CPU it is faster than SDPA for these short sequences, see benchmarks/bench_attention.py)."""
    vision = AlbefVisionConfig(
        hidden_size=demo.hidden_size,
        num_hidden_layers=demo.vision_layers,
        num_attention_heads=demo.num_attention_heads,
        intermediate_size=demo.intermediate_size,
        image_size=demo.image_size,
        patch_size=demo.patch_size,
        conv_stem_channels=demo.stem_channels,
    )
    text = AlbefTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=demo.hidden_size,
        num_hidden_layers=demo.text_layers,
        num_attention_heads=demo.num_attention_heads,
        intermediate_size=demo.intermediate_size,
        fusion_layer=demo.fusion_layer,
        max_position_embeddings=max(64, demo.max_length),
        # an endless synthetic world does not overfit: no dropout
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        mask_token_id=tokenizer.mask_token_id,
    )
    config = AlbefConfig(
        vision_config=vision,
        text_config=text,
        embed_dim=demo.embed_dim,
        initializer_range=demo.init_std,
        itc_weight=demo.itc_weight,
        itm_weight=demo.itm_weight,
        mlm_weight=demo.mlm_weight,
        hard_negatives=demo.hard_negatives,
    )
    torch.manual_seed(demo.seed)
    return AlbefForPreTraining._from_config(config, attn_implementation="eager")


class _TimeBudget(TrainerCallback):
    """Stops training when the wall-clock budget is spent (a slow machine still finishes the demo)."""

    def __init__(self, minutes: float | None) -> None:
        self.seconds = None if minutes is None else 60 * minutes
        self.start = time.time()
        self.stopped_at: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.seconds is not None and time.time() - self.start > self.seconds:
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


class DemoResult(dict):
    """Where things are and what was measured: `model_dir`, `report` (paths), `summary` (settings and
    metrics, as in summary.json) and `log_history` (the Trainer's logs)."""


def demo_processor(demo: DemoConfig, world: SyntheticWorldConfig) -> AlbefProcessor:
    """The world's word-level tokenizer with the original tokenisation, and the image processor."""
    tokenizer = synthetic_tokenizer(replace(world, noisy_caption_fraction=0.0), demo.seed)
    return AlbefProcessor(
        AlbefImageProcessor(size=demo.image_size),
        tokenizer,
        max_length=demo.max_length,
        original_tokenization=True,
    )


def with_recipe(demo: DemoConfig) -> DemoConfig:
    """`demo` with the batch size, steps and learning rate of the recipe of the precision it will train in
    (`RECIPES`)."""
    policy = parse_bf16(demo.bf16)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return demo.with_recipe(native_bf16_available(device) if policy == "auto" else policy)


def training_arguments(demo: DemoConfig) -> AlbefTrainingArguments:
    """The demo's `AlbefTrainingArguments`: bf16 follows `demo.bf16` ("auto": only where it is native)."""
    return AlbefTrainingArguments(
        output_dir=demo.output_dir,
        max_steps=demo.steps,
        per_device_train_batch_size=demo.batch_size,
        learning_rate=demo.learning_rate,
        min_lr=demo.min_lr,
        warmup_steps=demo.warmup_steps,
        momentum=demo.momentum,
        alpha=demo.alpha,
        alpha_warmup_steps=demo.alpha_warmup_steps,
        distill=demo.distill,
        queue_size=demo.queue_size,
        bf16=demo.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=demo.seed,
        logging_steps=demo.logging_steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=demo.dataloader_workers,
    )


def pretrain(
    demo: DemoConfig,
    world: SyntheticWorldConfig,
    processor: AlbefProcessor,
    callbacks: tuple[TrainerCallback, ...] = (),
) -> AlbefTrainer:
    """Pretrain a fresh model on the world's training pairs with `AlbefTrainer` (with extra `callbacks`);
    returns the trainer."""
    demo = with_recipe(demo)
    model = build_model(demo, processor.tokenizer)
    args = training_arguments(demo)
    budget = _TimeBudget(None if demo.time_budget_minutes is None else demo.time_budget_minutes * demo.scale)
    trainer = AlbefTrainer(
        model,
        args,
        data_collator=AlbefPretrainingCollator(processor, max_length=demo.max_length),
        train_dataset=SyntheticPairs(world, demo.train_images, demo.seed),
        processing_class=processor,
        callbacks=[budget, *callbacks],
    )
    trainer.train()
    trainer.stopped_by_time_budget = budget.stopped_at is not None
    if trainer.stopped_by_time_budget:
        logger.warning(
            f"time budget spent: training stopped after {budget.stopped_at} of {demo.steps} steps "
            "(--time-budget-minutes 0 lifts the limit)"
        )
    return trainer


def evaluate_zero_shot(
    model: AlbefForPreTraining, processor: AlbefProcessor, eval_set, demo: DemoConfig, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """The original retrieval protocol on held-out scenes: `(scores_i2t, scores_t2i, recall metrics)`, under
    bf16 autocast when `bf16` (the training run's resolved precision, `trainer.args.bf16`)."""
    model.eval()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        scores_i2t, scores_t2i = compute_retrieval_scores(
            model, processor, eval_set, k=demo.retrieval_k, batch_size=demo.eval_batch_size
        )
    metrics = itm_eval(scores_i2t.numpy(), scores_t2i.numpy(), eval_set.txt2img, eval_set.img2txt)
    return scores_i2t, scores_t2i, metrics


def run_demo(demo: DemoConfig) -> DemoResult:
    """Run the whole demo; returns the paths, the summary (settings and metrics) and the training log."""
    start = time.time()
    demo = with_recipe(demo)
    os.makedirs(demo.output_dir, exist_ok=True)
    world = world_config(demo)
    processor = demo_processor(demo, world)
    trainer = pretrain(demo, world, processor)
    train_seconds = time.time() - start
    model = trainer.model
    eval_set = build_retrieval_eval(demo.eval_images, seed=demo.seed, config=world)
    scores_i2t, scores_t2i, metrics = evaluate_zero_shot(
        model, processor, eval_set, demo, bf16=trainer.args.bf16
    )

    model_dir = os.path.join(demo.output_dir, "model")
    trainer.save_model(model_dir)
    summary = {
        "seed": demo.seed,
        "objectives": _objectives(demo),
        "steps": trainer.state.global_step,
        "planned_steps": demo.steps,
        "stopped_by_time_budget": trainer.stopped_by_time_budget,
        "train_seconds": round(train_seconds, 1),
        "bf16": trainer.args.bf16,
        "eval_images": demo.eval_images,
        "retrieval_k": demo.retrieval_k,
        "gradcam_itc_block": demo.gradcam_itc_block,
        "metrics": metrics,
    }
    grounding, accuracy, summary["grounding_chance"] = _grounding_examples(demo, world, model_dir)
    summary["grounding_accuracy_itc"], summary["grounding_accuracy_itm"] = accuracy["itc"], accuracy["itm"]
    _write_card(demo, model_dir, summary)
    if demo.push_to_hub:
        push_to_hub(
            demo.push_to_hub,
            model=AlbefForPreTraining.from_pretrained(model_dir),
            processor=processor,
            model_card=ModelCard.load(os.path.join(model_dir, "README.md")),
        )
    report = write_report(
        demo.output_dir,
        summary,
        trainer.state.log_history,
        {
            "images": eval_set.images,
            "texts": eval_set.texts,
            "txt2img": eval_set.txt2img,
            "img2txt": eval_set.img2txt,
            "scores_i2t": scores_i2t,
            "scores_t2i": scores_t2i,
        },
        grounding,
        _pipeline_examples(model_dir, eval_set),
        examples=demo.report_examples,
    )
    summary["total_seconds"] = round(time.time() - start, 1)
    with open(os.path.join(demo.output_dir, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return DemoResult(
        model_dir=model_dir, report=report, summary=summary, log_history=trainer.state.log_history
    )


def _xywh(box) -> list[float]:
    x0, y0, x1, y1 = box
    return [x0, y0, x1 - x0, y1 - y0]


def _grounding_examples(demo: DemoConfig, world: SyntheticWorldConfig, model_dir: str, count: int = 100):
    """Grad-CAM box selection on `count` test referring expressions, both ways: the ITC variant on ViT block
    `demo.gradcam_itc_block` (its maps go to the report) and the paper's ITM variant on the last fusion layer.

    Returns the report's examples, the accuracies (IoU >= 0.5 with the target) `{"itc": ..., "itm": ...}`
    and the accuracy of a random pick among the candidates."""
    grounder = pipeline("visual-grounding", model=model_dir)
    variants = {"itc": {"mode": "itc", "layer": demo.gradcam_itc_block}, "itm": {"mode": "itm"}}
    examples, hits, chance = [], dict.fromkeys(variants, 0), 0.0
    for index in range(count):
        sample = grounding_sample(world, demo.seed, "test", index)
        image = render_scene(sample.scene)
        candidates = [obj.box for obj in sample.scene.objects]
        target = candidates[sample.target]
        chance += 1 / len(candidates)
        for name, options in variants.items():
            result = grounder(image, sample.text, boxes=[_xywh(box) for box in candidates], **options)
            chosen = candidates[result["box_index"]]
            hit = box_iou(_xywh(chosen), _xywh(target)) >= 0.5
            hits[name] += hit
            if name == "itc" and len(examples) < demo.report_examples:
                examples.append(
                    {
                        "image": image,
                        "overlay": result["overlay"],
                        "text": sample.text,
                        "target": target,
                        "chosen": chosen,
                        "hit": hit,
                    }
                )
    accuracy = {name: 100.0 * value / count for name, value in hits.items()}
    return examples, accuracy, 100.0 * chance / count


def _pipeline_examples(model_dir: str, eval_set) -> list[tuple[str, str, str]]:
    """Zero-shot classification and image-text matching pipelines, loaded from the saved folder."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # loading AlbefModel from a pretraining folder reports the unused heads
    try:
        classify = pipeline("zero-shot-image-classification", model=model_dir)
    finally:
        logging.set_verbosity(verbosity)
    match = pipeline("image-text-matching", model=model_dir)
    rows = []
    count = len(eval_set.images)
    for image_index in range(min(3, count)):
        image = eval_set.images[image_index]
        labels = ["circle", "square", "triangle", "diamond", "cross", "star"]
        best = classify(image, candidate_labels=labels, hypothesis_template="a picture of a {}")[:2]
        rows.append(
            (
                "zero-shot-image-classification",
                f"test image {image_index}, shapes",
                ", ".join(f"{r['label']} {r['score']:.2f}" for r in best),
            )
        )
        own = eval_set.texts[eval_set.img2txt[image_index][0]]
        other = eval_set.texts[eval_set.img2txt[(image_index + 3) % count][0]]
        for text in (own, other):
            result = match(image, text)
            rows.append(
                (
                    "image-text-matching",
                    f"test image {image_index} + '{text}'",
                    f"match probability {result['itm_probability']:.2f}, similarity {result['itc_similarity']:.2f}",
                )
            )
    return rows


def _objectives(demo: DemoConfig) -> str:
    """The objectives of this run in words, e.g. `ITC (in-batch) + ITM (hard negatives) + MLM, distilled`."""
    parts = []
    if demo.itc_weight:
        parts.append(f"ITC ({f'queue of {demo.queue_size}' if demo.queue_size else 'in-batch'})")
    if demo.itm_weight:
        parts.append(f"ITM ({'hard' if demo.hard_negatives else 'random'} negatives)")
    if demo.mlm_weight:
        parts.append("MLM")
    distilled = f", distilled from the momentum model (alpha {demo.alpha})" if demo.distill else ""
    return " + ".join(parts) + distilled


def _write_card(demo: DemoConfig, model_dir: str, summary: dict[str, Any]) -> None:
    metrics = summary["metrics"]
    info = AlbefCardInfo(
        model_name="albef-synthetic-demo",
        task="pretraining",
        model_class="AlbefForPreTraining",
        source="pretrained from scratch on the albef-hf synthetic world (python -m albef_hf.demo)",
        training={
            "steps": summary["steps"],
            "batch size": demo.batch_size,
            "seed": demo.seed,
            "image size": demo.image_size,
            "objectives": summary["objectives"],
            "noisy captions": demo.noisy_caption_fraction,
        },
        metrics={
            f"zero-shot {key}": metrics[key] for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean")
        },
        dataset_name="albef-hf synthetic world",
        dataset_split=f"test ({demo.eval_images} held-out images x 5 captions)",
    )
    save_model_card(build_model_card(info), model_dir)
