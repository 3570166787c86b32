"""Tests of albef_hf.trainer: EMA timing, gradients, schedules, weight decay, resumption, saving, evaluation."""

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import random_images, tiny_config, tiny_processor
from safetensors.torch import load_file
from trainer_helpers import tiny_pretraining_model, tiny_samples, tiny_trainer

from albef_hf import AlbefForImageTextRetrieval, AlbefModel
from albef_hf.data.collators import AlbefRetrievalCollator
from albef_hf.evaluation import RetrievalEvalSet
from albef_hf.momentum import save_momentum_state
from albef_hf.trainer import (
    AlbefTrainer,
    AlbefTrainingArguments,
    albef_cosine_lr,
    albef_epoch_cosine_lr,
)

HERE = os.path.dirname(os.path.abspath(__file__))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_teacher_gets_no_grad_and_is_not_in_the_optimizer(tmp_path):
    trainer = tiny_trainer(str(tmp_path), max_steps=2)
    trainer.train()
    teacher_params = list(trainer.teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher_params)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in trainer.model.parameters()}
    assert not optimized & {id(p) for p in teacher_params}
    # the teacher did move away from its initial copy, and not by gradient
    assert not torch.equal(
        trainer.teacher.model.vision_proj.weight, tiny_pretraining_model().vision_proj.weight
    )


def test_ema_moves_once_per_optimizer_step_before_the_teacher_runs(tmp_path):
    """Gradient accumulation 2: per optimizer step one EMA update, exactly m*teacher + (1-m)*student, first."""
    trainer = tiny_trainer(str(tmp_path), max_steps=2, gradient_accumulation_steps=2, momentum=0.9)
    trainer.setup_momentum()
    events, checks = [], []
    teacher, student = trainer.teacher, trainer.model
    original_update, original_outputs = teacher.update, teacher.model.compute_teacher_outputs

    def update(model):
        before = [p.clone() for p in teacher.parameters()]
        original_update(model)
        for old, new, current in zip(before, teacher.parameters(), student.parameters(), strict=True):
            checks.append(torch.equal(new, old * 0.9 + current * (1 - 0.9)))
        events.append(("update", trainer.state.global_step))

    def outputs(**inputs):
        events.append(("teacher", trainer.state.global_step))
        return original_outputs(**inputs)

    teacher.update, teacher.model.compute_teacher_outputs = update, outputs
    trainer.train()
    assert events == [
        ("update", 0),
        ("teacher", 0),
        ("teacher", 0),
        ("update", 1),
        ("teacher", 1),
        ("teacher", 1),
    ]
    assert checks and all(checks)


def test_alpha_ramps_over_the_first_epoch_like_the_original(tmp_path):
    """alpha * min(1, i / len(loader)) in the first epoch, alpha after (4 optimizer steps per epoch)."""
    trainer = tiny_trainer(str(tmp_path), max_steps=6)
    seen = []
    forward = trainer.model.forward

    def recording_forward(*args, **kwargs):
        seen.append(kwargs["alpha"])
        return forward(*args, **kwargs)

    trainer.model.forward = recording_forward
    trainer.train()
    assert seen == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    assert tiny_trainer(str(tmp_path), distill=False).current_alpha() == 0.0


# Learning rates of the original (timm's CosineLRScheduler, driven as Pretrain.py / Retrieval.py drive it)
# at these optimizer steps, for Pretrain.yaml with 2,500 steps per epoch and Retrieval_flickr.yaml with 250.
ORIGINAL_PRETRAIN_LR = {
    0: 1e-05, 1: 1e-05, 100: 1e-05, 101: 1.45e-05, 150: 1.45e-05, 1000: 5.05e-05, 1999: 9.55e-05,
    2000: 9.55e-05, 2001: 0.0001, 2499: 0.0001, 2500: 9.97534852915723e-05, 5000: 9.901664203302126e-05,
    7499: 9.901664203302126e-05, 7500: 9.779754323328192e-05, 72499: 1.0983357966978745e-05,
    72500: 1.0246514708427697e-05, 74999: 1.0246514708427697e-05,
}  # fmt: skip
ORIGINAL_RETRIEVAL_LR = {
    0: 1e-05, 101: 1e-05, 249: 1e-05, 250: 9.779754323328192e-06, 500: 9.140576474687265e-06,
    2249: 1.8594235253127369e-06, 2250: 1.220245676671809e-06, 2499: 1.220245676671809e-06,
}  # fmt: skip


def test_epoch_cosine_schedule_reproduces_the_original():
    pretrain = dict(
        peak_lr=1e-4,
        warmup_steps=2000,
        steps_per_epoch=2500,
        num_epochs=30,
        warmup_start_lr=1e-5,
        min_lr=1e-5,
    )
    for step, expected in ORIGINAL_PRETRAIN_LR.items():
        assert albef_epoch_cosine_lr(step, **pretrain) == pytest.approx(expected, rel=1e-12), step
    retrieval = dict(
        peak_lr=1e-5, warmup_steps=100, steps_per_epoch=250, num_epochs=10, warmup_start_lr=1e-5, min_lr=1e-6
    )
    for step, expected in ORIGINAL_RETRIEVAL_LR.items():
        assert albef_epoch_cosine_lr(step, **retrieval) == pytest.approx(expected, rel=1e-12), step


def test_step_cosine_schedule_and_its_use_by_the_trainer(tmp_path):
    schedule = dict(peak_lr=1e-4, warmup_steps=2000, total_steps=10000, warmup_start_lr=1e-5, min_lr=1e-5)
    assert albef_cosine_lr(0, **schedule) == pytest.approx(1e-5)
    assert albef_cosine_lr(1000, **schedule) == pytest.approx(5.5e-5)
    assert albef_cosine_lr(2000, **schedule) == pytest.approx(1e-4)
    assert albef_cosine_lr(6000, **schedule) == pytest.approx(5.5e-5)
    assert albef_cosine_lr(10000, **schedule) == pytest.approx(1e-5)

    trainer = tiny_trainer(str(tmp_path), max_steps=6, warmup_steps=2, learning_rate=1e-3, min_lr=1e-5)
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    expected = [
        albef_cosine_lr(s, peak_lr=1e-3, warmup_steps=2, total_steps=6, warmup_start_lr=1e-4, min_lr=1e-5)
        for s in range(6)
    ]
    assert logged == pytest.approx(expected)


def test_weight_decay_exemptions_follow_the_original(tmp_path):
    """1-D tensors and biases are exempt; the 0-dim temperature and the 3-D position embedding are decayed."""
    trainer = tiny_trainer(str(tmp_path))
    decayed = set(trainer.get_decay_parameter_names(trainer.model))
    for name in ("temp", "vision_model.pos_embed", "vision_model.cls_token", "vision_model.blocks.0.attn.qkv.weight",
                 "text_encoder.embeddings.word_embeddings.weight", "itm_head.weight"):  # fmt: skip
        assert name in decayed, name
    for name in ("vision_model.blocks.0.norm1.weight", "vision_model.blocks.0.attn.qkv.bias", "mlm_head.bias",
                 "text_encoder.embeddings.LayerNorm.weight", "vision_model.norm.bias"):  # fmt: skip
        assert name not in decayed, name
    optimizer = trainer.create_optimizer()
    by_decay = {group["weight_decay"]: {id(p) for p in group["params"]} for group in optimizer.param_groups}
    params = dict(trainer.model.named_parameters())
    assert by_decay[0.02] == {id(params[name]) for name in decayed}
    assert by_decay[0.0] == {id(p) for name, p in params.items() if name not in decayed}


def test_resume_in_a_new_process_continues_exactly(tmp_path):
    """Train 6 steps saving at 3; resume from step 3 in another process; student, teacher, queues agree."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tiny_trainer(str(straight), save_strategy="steps", save_steps=3).train()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "trainer_helpers.py"),
            "resume",
            str(resumed),
            str(straight / "checkpoint-3"),
        ],
        check=True,
        env=env,
        capture_output=True,
    )
    for name in ("model.safetensors", "momentum_state.safetensors"):
        a, b = load_file(straight / "checkpoint-6" / name), load_file(resumed / "checkpoint-6" / name)
        assert a.keys() == b.keys()
        diff = max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
        assert diff <= 1e-6, (name, diff)
    state = load_file(straight / "checkpoint-6" / "momentum_state.safetensors")
    student = load_file(straight / "checkpoint-6" / "model.safetensors")
    assert int(state["queue_ptr"]) == 6 * 4 % 8
    assert not torch.equal(state["teacher.vision_proj.weight"], student["vision_proj.weight"])
    start = load_file(straight / "checkpoint-3" / "momentum_state.safetensors")
    assert not torch.equal(state["image_queue"], start["image_queue"])


def test_save_model_writes_the_student_and_a_card(tmp_path):
    trainer = tiny_trainer(str(tmp_path / "run"), max_steps=2)
    trainer.train()
    out = tmp_path / "final"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "README.md", "processor_config.json"} <= files
    assert "momentum_state.safetensors" not in files
    assert set(load_file(out / "model.safetensors")) == set(trainer.model.state_dict())
    card = (out / "README.md").read_text()
    assert "AlbefTrainer" in card and "momentum 0.995, alpha 0.4" in card and "albef" in card
    model = AlbefModel.from_pretrained(out)
    assert torch.equal(model.vision_proj.weight, trainer.model.vision_proj.weight)


def test_push_to_hub_uploads_student_and_card(tmp_path, monkeypatch):
    import transformers.trainer as hf_trainer

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns=(), **kwargs):
            uploads.append((repo_id, sorted(os.listdir(folder_path)), ignore_patterns))

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    trainer = tiny_trainer(str(tmp_path / "albef-tiny"), max_steps=2, push_to_hub=True, hub_strategy="end")
    trainer.train()
    trainer.push_to_hub()
    repo, files, ignored = uploads[-1]
    assert repo == "user/albef-tiny"
    assert {"model.safetensors", "README.md", "config.json"} <= set(files)
    assert "momentum_state.safetensors" not in files and "checkpoint-*" in ignored
    assert "AlbefTrainer" in (tmp_path / "albef-tiny" / "README.md").read_text()


def test_retrieval_training_fills_the_id_queue_and_evaluates(tmp_path):
    processor = tiny_processor()
    samples = tiny_samples(8)
    for i, sample in enumerate(samples):
        sample["image_id"] = i // 2  # two captions per image
    args = AlbefTrainingArguments(
        str(tmp_path), per_device_train_batch_size=4, max_steps=2, queue_size=8, report_to="none",
        use_cpu=True, bf16=False, disable_tqdm=True, save_strategy="no", retrieval_k=3, eval_strategy="steps", eval_steps=2,
    )  # fmt: skip
    eval_set = RetrievalEvalSet(
        random_images(3), ["a red circle", "two dogs", "a cat", "a man"], [0, 1, 2, 0], [[0, 3], [1], [2]]
    )
    torch.manual_seed(0)
    trainer = AlbefTrainer(
        AlbefForImageTextRetrieval(tiny_config()), args, AlbefRetrievalCollator(processor), samples, eval_set,
        processing_class=processor,
    )  # fmt: skip
    trainer.train()
    assert sorted(trainer.queues.idx.tolist()) == sorted(i // 2 for i in range(8))
    evaluated = [entry for entry in trainer.state.log_history if "eval_txt_r1" in entry]
    assert len(evaluated) == 1 and set(evaluated[0]) >= {"eval_img_r10", "eval_r_mean", "eval_txt_r_mean"}
    metrics = trainer.evaluate({"flickr": eval_set})
    assert 0 <= metrics["eval_flickr_r_mean"] <= 100


def test_bad_settings_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="momentum"):
        AlbefTrainingArguments(str(tmp_path), momentum=2.0)
    with pytest.raises(ValueError, match="temp_min"):
        AlbefTrainingArguments(str(tmp_path), temp_min=0.5, temp_max=0.1)
    trainer = tiny_trainer(str(tmp_path), queue_size=10)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        trainer.train()
    assert trainer.state.global_step == 0

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(tiny_samples(8))

    with pytest.raises(ValueError, match="alpha_warmup_steps"):
        tiny_trainer(str(tmp_path), samples=Stream()).train()
    tiny_trainer(str(tmp_path), samples=Stream(), alpha_warmup_steps=0, max_steps=1).train()
    with pytest.raises(TypeError, match="AlbefTrainer trains AlbefForPreTraining, .*; got AlbefModel"):
        AlbefTrainer(AlbefModel(tiny_config()), AlbefTrainingArguments(str(tmp_path)))


def test_learning_rate_schedule_is_exact_per_epoch_in_the_trainer(tmp_path):
    trainer = tiny_trainer(str(tmp_path), max_steps=8, lr_scheduler_type="albef_epoch_cosine", warmup_steps=0,
                           learning_rate=1e-3, min_lr=1e-4)  # fmt: skip
    trainer.train()
    logged = [entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry]
    second_epoch = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi / 2))
    assert logged == pytest.approx([1e-3] * 4 + [second_epoch] * 4)


def test_continued_pretraining_starts_from_a_momentum_state_file(tmp_path):
    """--momentum_state_path (e.g. written by the converter) sets the teacher and the queues before step 0."""
    source = tiny_trainer(str(tmp_path / "source"))
    source.setup_momentum()
    with torch.no_grad():
        for param in source.teacher.parameters():
            param.add_(1.0)
    source.queues.enqueue(torch.randn(4, 16), torch.randn(4, 16))
    path = tmp_path / "momentum_state.safetensors"
    save_momentum_state(path, source.teacher, source.queues)

    trainer = tiny_trainer(str(tmp_path / "run"), momentum_state_path=str(path))
    trainer.setup_momentum()
    for a, b in zip(trainer.teacher.parameters(), source.teacher.parameters(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(trainer.queues.image, source.queues.image) and trainer.queues.ptr == 4
    with pytest.raises(ValueError, match="not a file"):
        AlbefTrainingArguments(str(tmp_path), momentum_state_path=str(tmp_path / "missing.safetensors"))
