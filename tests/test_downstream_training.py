"""Training the downstream models with AlbefTrainer: momentum distillation, the TA step, collators, readers and
the task evaluations (VQA ranking and score, classification accuracy, grounding box accuracy)."""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_images, tiny_config, tiny_processor
from PIL import Image
from safetensors.torch import load_file

from albef_hf import (
    AlbefConfig,
    AlbefForImageTextRetrieval,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    gradcam_itm,
    select_box,
    upsample_heatmap,
)
from albef_hf.data.collators import (
    SAMPLE_KEY,
    AlbefClassificationCollator,
    AlbefImageTextCollator,
    AlbefVqaCollator,
    vqa_answer_weights,
)
from albef_hf.data.downstream import (
    TaskDataset,
    collect_answers,
    read_grounding_json,
    read_nlvr_json,
    read_task_table,
    read_ve_json,
    read_vqa_json,
)
from albef_hf.data.synthetic import SyntheticDataset
from albef_hf.data.transforms import build_train_transform
from albef_hf.evaluation import GroundingEvalSet, VqaEvalSet, vqa_score
from albef_hf.modeling_albef_downstream import answer_decoder_config
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments

pytestmark = pytest.mark.usefixtures("one_torch_thread")

QUESTIONS = ["what colour is the circle?", "how many cats are there?", "is there a dog?"]
ANSWERS = [["red", "red", "blue"], ["two"], ["yes", "no", "yes", "yes"]]
SENTENCES = ["a red circle", "two dogs running", "a blue square", "the cat on the left", "a man"]
ANSWER_LIST = ["red", "blue", "two", "three", "yes", "no", "green square"]


def paired(config: AlbefConfig) -> AlbefConfig:
    values = config.to_dict()
    text = values["text_config"]
    text["num_hidden_layers"] = text["fusion_layer"] + 2 * (text["num_hidden_layers"] - text["fusion_layer"])
    return AlbefConfig.from_dict(values)


def build(task: str):
    torch.manual_seed(0)
    config = tiny_config()
    if task == "vqa":
        return AlbefForQuestionAnswering(
            tiny_config(decoder_config=answer_decoder_config(config.text_config, num_layers=2))
        )
    if task in ("nlvr2", "ta"):
        return (AlbefForVisualReasoning if task == "nlvr2" else AlbefForTextAssignment)(paired(config))
    return AlbefForVisualEntailment(config)


def samples(task: str, count: int = 8, seed: int = 1) -> list[dict]:
    images = random_images(2 * count, seed=seed)
    out = []
    for i in range(count):
        if task == "vqa":
            out.append({"image": images[i], "text": QUESTIONS[i % 3], "answers": ANSWERS[i % 3]})
        elif task == "nlvr2":
            out.append({"images": images[2 * i : 2 * i + 2], "text": SENTENCES[i % 5], "label": i % 2})
        elif task == "ve":
            out.append({"image": images[i], "text": SENTENCES[i % 5], "label": i % 3})
        else:
            out.append({"image": images[i], "text": SENTENCES[i % 5]})
    return out


def collator(task: str, transform=None):
    processor = tiny_processor()
    if task == "vqa":
        return AlbefVqaCollator(processor, transform)
    if task == "ta":
        return AlbefImageTextCollator(processor, transform)
    return AlbefClassificationCollator(
        processor, transform, images_per_sample=2 if task == "nlvr2" else 1, num_labels=3
    )


def trainer_for(task: str, output_dir, eval_dataset=None, transform=None, **overrides) -> AlbefTrainer:
    settings = dict(
        per_device_train_batch_size=4,
        per_device_eval_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        warmup_steps=0,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # fp32 whatever the CPU, so that results compare exactly
        disable_tqdm=True,
        seed=3,
    )
    settings.update(overrides)
    args = AlbefTrainingArguments(output_dir=str(output_dir), **settings)
    return AlbefTrainer(
        build(task),
        args,
        collator(task, transform),
        samples(task),
        eval_dataset,
        processing_class=tiny_processor(),
    )


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "ve"])
def test_downstream_models_are_distilled_from_an_ema_teacher(tmp_path, task):
    """Gradient accumulation 2: one exact EMA update per optimizer step, before the teacher runs; the student gets
    the teacher's outputs and alpha; the teacher has no grad and no queues; alpha changes the loss."""
    trainer = trainer_for(
        task, tmp_path, gradient_accumulation_steps=2, momentum=0.9, alpha=0.4, alpha_warmup_steps=0
    )
    trainer.setup_momentum()
    assert trainer.queues is None
    teacher, student = trainer.teacher, trainer.model
    events, ema_exact, calls = [], [], []
    original_update, original_outputs = teacher.update, teacher.model.compute_teacher_outputs
    forward = student.forward

    def update(model):
        before = [p.clone() for p in teacher.parameters()]
        original_update(model)
        for old, new, current in zip(before, teacher.parameters(), student.parameters(), strict=True):
            ema_exact.append(torch.equal(new, old * 0.9 + current * (1 - 0.9)))
        events.append(("update", trainer.state.global_step))

    def outputs(**inputs):
        events.append(("teacher", trainer.state.global_step))
        result = original_outputs(**inputs)
        calls.append({"inputs": inputs, "teacher": result})
        return result

    def recording_forward(*args, **kwargs):
        calls[-1].update(alpha=kwargs.get("alpha"), passed=kwargs.get("teacher_outputs"))
        return forward(*args, **kwargs)

    teacher.update, teacher.model.compute_teacher_outputs = update, outputs
    student.forward = recording_forward
    trainer.train()
    assert events == [
        ("update", 0),
        ("teacher", 0),
        ("teacher", 0),
        ("update", 1),
        ("teacher", 1),
        ("teacher", 1),
    ]
    assert ema_exact and all(ema_exact)
    assert all(call["alpha"] == 0.4 and call["passed"] is call["teacher"] for call in calls)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in teacher.parameters()}

    student.forward = forward
    batch = {k: v for k, v in calls[-1]["inputs"].items()}
    teacher_outputs = calls[-1]["teacher"]
    with torch.no_grad():
        plain = student(**batch).loss
        assert torch.equal(student(**batch, teacher_outputs=teacher_outputs, alpha=0.0).loss, plain)
        assert not torch.allclose(student(**batch, teacher_outputs=teacher_outputs, alpha=0.4).loss, plain)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["alpha"] == 0.4 and "temp" not in entry for entry in logged)


def test_vqa_resumed_from_a_checkpoint_continues_exactly(tmp_path):
    """The teacher is saved in every checkpoint (no queues) and restored: 4 steps = 2 + resumed 2."""
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2, transform=build_train_transform(32))
    trainer_for("vqa", tmp_path / "straight", **settings).train()
    resumed = trainer_for("vqa", tmp_path / "resumed", **settings)
    with torch.no_grad():  # whatever the new run starts from, the checkpoint replaces it
        for param in resumed.model.parameters():
            param.add_(0.1)
    resumed.train(resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-2"))
    for name in ("model.safetensors", "momentum_state.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoint-4" / name)
        b = load_file(tmp_path / "resumed" / "checkpoint-4" / name)
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a), name
    state = load_file(tmp_path / "straight" / "checkpoint-4" / "momentum_state.safetensors")
    assert "image_queue" not in state and all(key.startswith("teacher.") for key in state)


def test_downstream_without_distillation_has_no_teacher(tmp_path):
    trainer = trainer_for("ve", tmp_path, distill=False)
    trainer.train()
    assert trainer.teacher is None and trainer.current_alpha() == 0.0


def test_text_assignment_trains_without_teacher_and_checkpoints_without_momentum_state(tmp_path):
    trainer = trainer_for("ta", tmp_path, save_strategy="steps", save_steps=2)
    trainer.train()
    assert trainer.teacher is None and trainer.queues is None
    assert trainer.args.ddp_find_unused_parameters  # vision_proj only draws the pairs
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(np.isfinite(losses))
    checkpoint = tmp_path / "checkpoint-2"
    assert checkpoint.is_dir() and "momentum_state.safetensors" not in os.listdir(checkpoint)
    trainer.save_model()
    card = (tmp_path / "README.md").read_text()
    assert "text assignment" in card and "not distilled" in card
    with pytest.raises(ValueError, match="no evaluation"):
        trainer.evaluate(samples("ta", 3))


@pytest.mark.parametrize("task", ["nlvr2", "ve"])
def test_classification_evaluation_sees_every_sample_without_augmentation(tmp_path, task):
    """5 samples in batches of 2 (none dropped), images only resized, the student's plain loss and accuracy."""
    eval_samples = samples(task, 5, seed=9)
    trainer = trainer_for(task, tmp_path, eval_dataset=eval_samples, transform=build_train_transform(32))
    metrics = trainer.evaluate()
    model, processor = trainer.model.eval(), tiny_processor()
    if task == "nlvr2":
        images = [image for sample in eval_samples for image in sample["images"]]
    else:
        images = [sample["image"] for sample in eval_samples]
    inputs = processor(images=images, text=[sample["text"] for sample in eval_samples])
    if task == "nlvr2":
        inputs["pixel_values"] = inputs["pixel_values"].unflatten(0, (5, 2))
    labels = torch.tensor([sample["label"] for sample in eval_samples])
    with torch.no_grad():
        logits = model(**inputs).logits
    assert metrics["eval_accuracy"] == pytest.approx(
        100.0 * (logits.argmax(-1) == labels).float().mean().item()
    )
    # the loop weighs each batch's mean loss by its size
    batch_losses = [F.cross_entropy(logits[i : i + 2], labels[i : i + 2], reduction="sum") for i in (0, 2, 4)]
    assert metrics["eval_loss"] == pytest.approx(float(sum(batch_losses)) / 5, rel=1e-4)
    output = trainer.predict(eval_samples)
    assert output.predictions.shape == (5, len(model.label_names))
    # one pass for both: the same predictions, the evaluation's metrics, and they reach the card
    both = trainer.evaluate_and_predict(eval_samples)
    np.testing.assert_allclose(both.predictions, output.predictions, rtol=1e-5, atol=1e-6)
    assert both.metrics["eval_accuracy"] == metrics["eval_accuracy"]
    assert both.metrics["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-5)
    assert f"| accuracy | {metrics['eval_accuracy']:.2f} |" in trainer._model_card().content


def test_vqa_evaluation_ranks_the_answer_list_and_predicts_top_answers(tmp_path):
    eval_samples = samples("vqa", 5, seed=4)
    eval_samples[0]["question_type"] = "colour"
    eval_samples[0]["question_id"] = 17
    eval_set = VqaEvalSet(eval_samples, ANSWER_LIST)
    trainer = trainer_for("vqa", tmp_path, eval_dataset=eval_set, vqa_k=4, vqa_top_k=3)
    output = trainer.predict(eval_set)
    processor, model = tiny_processor(), trainer.model.eval()
    answers = processor.tokenize_answers(ANSWER_LIST)
    inputs = processor(
        images=[s["image"] for s in eval_samples],
        text=[s["text"] for s in eval_samples],
        text_normalization="question",
    )
    ranking = model.rank_answers(answers["input_ids"], answers["attention_mask"], k=4, **inputs)
    predictions = output.predictions
    assert [p["index"] for p in predictions] == list(range(5)) and predictions[0]["question_id"] == 17
    for prediction, ids, probs in zip(predictions, ranking.answer_ids, ranking.probs, strict=True):
        assert [a["answer"] for a in prediction["top_answers"]] == [ANSWER_LIST[i] for i in ids[:3]]
        assert [a["probability"] for a in prediction["top_answers"]] == pytest.approx(probs[:3].tolist())
        assert prediction["answer"] == prediction["top_answers"][0]["answer"]
    expected = [vqa_score(p["answer"], s["answers"]) for p, s in zip(predictions, eval_samples, strict=True)]
    metrics = trainer.evaluate()
    assert metrics["eval_vqa_score"] == pytest.approx(100 * np.mean(expected))
    assert metrics["eval_vqa_score_colour"] == pytest.approx(100 * expected[0])
    both = trainer.evaluate_and_predict(eval_set)
    assert both.predictions == predictions
    assert {k: v for k, v in both.metrics.items() if not k.endswith("_runtime")} == pytest.approx(
        {k: v for k, v in metrics.items() if not k.endswith("_runtime")}
    )
    trainer.args.vqa_generate = True
    generated = trainer.predict(eval_set).predictions
    assert all(isinstance(p["answer"], str) and "top_answers" not in p for p in generated)


def test_grounding_evaluation_chooses_boxes_by_gradcam(tmp_path):
    torch.manual_seed(0)
    model = AlbefForImageTextRetrieval(tiny_config()).eval()
    images = random_images(3, seed=5, size=(40, 48))
    boxes = [[0, 0, 24, 20], [24, 0, 24, 20], [0, 20, 48, 20]]
    eval_samples = [
        {"image": image, "text": SENTENCES[i], "box": boxes[i], "candidate_boxes": boxes, "split": "val"}
        for i, image in enumerate(images)
    ]
    args = AlbefTrainingArguments(
        str(tmp_path), per_device_eval_batch_size=2, use_cpu=True, bf16=False, report_to="none"
    )
    trainer = AlbefTrainer(
        model, args, eval_dataset=GroundingEvalSet(eval_samples), processing_class=tiny_processor()
    )
    predictions = trainer.predict(GroundingEvalSet(eval_samples)).predictions
    inputs = tiny_processor()(images=images, text=[s["text"] for s in eval_samples])
    maps = gradcam_itm(model, inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]).gradcam
    chosen = [select_box(upsample_heatmap(grid[None], (40, 48))[0], boxes) for grid in maps]
    assert [p["candidate"] for p in predictions] == chosen
    correct = [c == i for i, c in enumerate(chosen)]
    metrics = trainer.evaluate()
    assert metrics["eval_box_accuracy"] == pytest.approx(100 * np.mean(correct))
    assert metrics["eval_box_accuracy_val"] == metrics["eval_box_accuracy"]
    assert "grounding" in trainer._model_card().content


# ----------------------------------------------------------------------------------------------
# collators
# ----------------------------------------------------------------------------------------------


def test_vqa_collator_weighs_answers_and_encodes_them_with_cls_and_sep():
    batch = collator("vqa")(samples("vqa", 3))
    assert batch["answers_per_question"].tolist() == [2, 1, 2]
    assert batch["answer_weights"].tolist() == pytest.approx([2 / 3, 1 / 3, 1.0, 3 / 4, 1 / 4])
    ids, mask = batch["answer_input_ids"], batch["answer_attention_mask"]
    tokenizer = tiny_processor().tokenizer
    decoded = [tokenizer.decode(row[row_mask.bool()]) for row, row_mask in zip(ids, mask, strict=True)]
    assert decoded == [
        "[CLS] red [SEP]",
        "[CLS] blue [SEP]",
        "[CLS] two [SEP]",
        "[CLS] yes [SEP]",
        "[CLS] no [SEP]",
    ]
    assert torch.equal(batch["labels"], ids.masked_fill(mask == 0, -100))
    # questions are cleaned with pre_question (the "?" goes) and, as in the pipeline, end with [SEP]
    assert tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()]) == (
        "[CLS] what colour is the circle [SEP]"
    )
    assert vqa_answer_weights(["a", "b", "a"], [0.2, 0.3, 0.5]) == (["a", "b"], pytest.approx([0.7, 0.3]))


def test_pair_collator_augments_each_image_with_its_own_draw():
    transform = build_train_transform(32)
    image = random_images(1, seed=3)[0]
    pair = {"images": [image, image], "text": "a red circle", "label": 1, SAMPLE_KEY: (0, 5)}
    single = {"image": image, "text": "a red circle", "label": 1, SAMPLE_KEY: (0, 5)}
    pixels = collator("nlvr2", transform)([pair])["pixel_values"]
    assert pixels.shape == (1, 2, 3, 32, 32)
    assert not torch.equal(pixels[0, 0], pixels[0, 1])
    assert torch.equal(pixels[0, 0], collator("ve", transform)([single])["pixel_values"][0])


def test_classification_collator_replaces_samples_with_bad_labels():
    batch_collator = collator("ve")
    bad = samples("ve", 3)
    bad[1]["label"] = 7
    batch = batch_collator(bad)
    assert batch["labels"].tolist() == [0, 2, 2] and batch_collator.num_skipped == 1


# ----------------------------------------------------------------------------------------------
# readers
# ----------------------------------------------------------------------------------------------


def write_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in zip(names, random_images(len(names)), strict=True):
        image.save(folder / name)


def test_readers_of_the_original_json_files(tmp_path):
    write_images(tmp_path / "coco", ["a.png", "b.png"])
    write_images(tmp_path / "vg", ["c.png"])
    vqa = [
        {
            "question_id": 1,
            "question": "what?",
            "answer": ["x", "y", "x"],
            "image": "a.png",
            "dataset": "vqa",
        },
        {"question_id": 2, "question": "where?", "answer": "z", "image": "c.png", "dataset": "vg"},
    ]
    (tmp_path / "vqa.json").write_text(json.dumps(vqa))
    dataset = read_vqa_json([str(tmp_path / "vqa.json")], str(tmp_path / "coco"), str(tmp_path / "vg"))
    first, second = dataset[0], dataset[1]
    assert (first["text"], first["answers"], first["weights"], first["question_id"]) == (
        "what?",
        ["x", "y", "x"],
        None,
        1,
    )
    assert (second["answers"], second["weights"]) == (["z"], [0.5])
    assert isinstance(second["image"], Image.Image) and collect_answers(dataset) == ["x", "y", "z"]

    nlvr = [{"images": ["a.png", "b.png"], "sentence": "s", "label": "True", "identifier": "dev-1"}]
    (tmp_path / "nlvr.json").write_text(json.dumps(nlvr))
    sample = read_nlvr_json(str(tmp_path / "nlvr.json"), str(tmp_path / "coco"))[0]
    assert len(sample["images"]) == 2 and (sample["text"], sample["label"], sample["identifier"]) == (
        "s",
        1,
        "dev-1",
    )

    write_images(tmp_path / "flickr", ["123.jpg"])
    (tmp_path / "ve.json").write_text(json.dumps([{"image": "123", "sentence": "h", "label": "neutral"}]))
    sample = read_ve_json(str(tmp_path / "ve.json"), str(tmp_path / "flickr"))[0]
    assert (sample["text"], sample["label"]) == ("h", 1) and isinstance(sample["image"], Image.Image)

    grounding = [
        {
            "image": "x/a.png",
            "text": "left dog",
            "ref_id": 5,
            "box": [1, 2, 3, 4],
            "candidate_boxes": [[1, 2, 3, 4]],
        },
        {"image": "y/b.png", "text": "cat", "ref_id": 6},
        {"image": "z/a.png", "text": "right dog", "ref_id": 7},
    ]
    (tmp_path / "ref.json").write_text(json.dumps(grounding))
    write_images(tmp_path / "coco" / "x", ["a.png"])
    write_images(tmp_path / "coco" / "y", ["b.png"])
    write_images(tmp_path / "coco" / "z", ["a.png"])
    dataset = read_grounding_json(str(tmp_path / "ref.json"), str(tmp_path / "coco"))
    assert [dataset.fields(i)["image_id"] for i in range(3)] == [0, 1, 0]  # by file name, as the original
    assert dataset[0]["box"] == [1, 2, 3, 4] and dataset[0]["ref_id"] == 5

    (tmp_path / "bad.json").write_text(json.dumps([{"image": "1", "sentence": "h", "label": "maybe"}]))
    with pytest.raises(ValueError, match="unknown ve label"):
        read_ve_json(str(tmp_path / "bad.json"))
    (tmp_path / "short.json").write_text(json.dumps([{"images": ["a.png", "b.png"], "label": "True"}]))
    with pytest.raises(ValueError, match="lacks \\['sentence'\\]"):
        read_nlvr_json(str(tmp_path / "short.json"))


def test_task_tables_read_the_synthetic_world_and_renamed_columns():
    grounding = read_task_table(
        SyntheticDataset("grounding", "test", 2, image_size=48), "grounding", box_format="xyxy"
    )
    row, sample = SyntheticDataset("grounding", "test", 2, image_size=48)[1], grounding[1]
    x0, y0, x1, y1 = row["box"]
    assert sample["box"] == [x0, y0, x1 - x0, y1 - y0] and len(sample["candidate_boxes"]) == len(
        row["candidate_boxes"]
    )
    nlvr = read_task_table(SyntheticDataset("nlvr2", "train", 2, image_size=48), "nlvr2")[0]
    assert len(nlvr["images"]) == 2 and nlvr["label"] in (0, 1) and "pair_id" in nlvr
    rows = [{"picture": image, "q": "what?", "a": "red"} for image in random_images(2)]
    vqa = read_task_table(rows, "vqa", {"image": "picture", "text": "q", "answers": "a"})[1]
    assert (vqa["text"], vqa["answers"]) == ("what?", ["red"]) and "weights" not in vqa
    with pytest.raises(ValueError, match="columns .*'label'"):
        read_task_table([{"image": None, "hypothesis": "h"}], "ve")


@pytest.mark.parametrize("table", [False, True])
def test_head_keeps_the_first_samples_of_lists_and_tables(table):
    images = random_images(3, seed=8)
    records = [{"image": image, "text": f"caption {i}"} for i, image in enumerate(images)]
    if table:
        records = datasets.Dataset.from_list(records)
    dataset = TaskDataset(records, lambda record, index: {**record, "index": index}, None, "head test")
    head = dataset.head(2)
    assert len(head) == 2 and len(dataset.head(10)) == 3
    assert [head[i]["text"] for i in range(2)] == ["caption 0", "caption 1"]
    assert [head[i]["index"] for i in range(2)] == [0, 1]
    assert np.array_equal(np.asarray(head[1]["image"]), np.asarray(images[1]))
    with pytest.raises(IndexError):
        head[2]


def test_sample_draws_a_seeded_random_subset_in_order():
    records = [{"image": None, "text": f"caption {i}"} for i in range(20)]
    dataset = TaskDataset(records, lambda record, index: {**record, "index": index}, None, "sample test")
    indices = [dataset.sample(5, seed=3).fields(i)["text"] for i in range(5)]
    assert indices == [dataset.sample(5, seed=3).fields(i)["text"] for i in range(5)]  # the same every run
    numbers = [int(text.split()[1]) for text in indices]
    assert numbers == sorted(set(numbers)) and numbers != list(range(5))
    assert numbers != [int(dataset.sample(5, seed=4).fields(i)["text"].split()[1]) for i in range(5)]
    assert dataset.sample(50, seed=0) is dataset
