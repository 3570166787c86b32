"""Tests of albef_hf.momentum: the EMA teacher, the feature queues and the momentum state file."""

import logging

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from albef_hf import AlbefForImageTextRetrieval, AlbefForPreTraining
from albef_hf.momentum import (
    FeatureQueues,
    MomentumTeacher,
    check_queue_size,
    load_momentum_state,
    save_momentum_state,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def student():
    return AlbefForPreTraining(tiny_config())


def perturb(model, scale=0.1):
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * scale)


def test_teacher_is_a_detached_copy(student):
    teacher = MomentumTeacher(student, momentum=0.9)
    teacher_params = list(teacher.parameters())
    assert teacher_params and not any(p.requires_grad for p in teacher_params)
    assert not {id(p) for p in teacher_params} & {id(p) for p in student.parameters()}
    assert all(torch.equal(a, b) for a, b in zip(teacher_params, student.parameters(), strict=True))
    with pytest.raises(ValueError, match="momentum"):
        MomentumTeacher(student, momentum=1.5)


def test_ema_update_is_exactly_the_original_formula(student):
    m = 0.995
    teacher = MomentumTeacher(student, momentum=m)
    perturb(teacher.model)
    perturb(student)
    before = {n: p.clone() for n, p in teacher.model.named_parameters()}
    teacher.update(student)
    for name, param in teacher.model.named_parameters():
        expected = before[name] * m + dict(student.named_parameters())[name] * (1.0 - m)
        assert torch.equal(param, expected), name


def test_teacher_outputs_have_no_grad(student, batch):
    teacher = MomentumTeacher(student)
    masked, labels = student.draw_mlm_masks(batch["input_ids"], torch.Generator().manual_seed(0))
    out = teacher(**batch, mlm_input_ids=masked, mlm_labels=labels)
    assert out.image_feat.shape == (4, 16) and not out.image_feat.requires_grad
    assert out.mlm_logits is not None and not out.mlm_logits.requires_grad


def test_queue_enqueue_ring_buffer_and_ids():
    queues = FeatureQueues(6, 3, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(queues.image.norm(dim=1), torch.ones(6))
    assert (queues.idx == -100).all()
    first = torch.arange(12.0).view(4, 3)
    queues.enqueue(first, -first, torch.tensor([1, 2, 3, 4]))
    assert torch.equal(queues.image[:4], first) and torch.equal(queues.text[:4], -first)
    assert queues.idx.tolist()[:4] == [1, 2, 3, 4] and queues.ptr == 4
    second = torch.full((4, 3), 7.0)
    queues.enqueue(second, second)  # wraps around, without ids
    assert torch.equal(queues.image[4:], second[:2]) and torch.equal(queues.image[:2], second[2:])
    assert queues.idx.tolist() == [-100, -100, 3, 4, -100, -100] and queues.ptr == 2


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    check_queue_size(64, 16)
    with pytest.raises(ValueError, match="multiple of the global batch"):
        check_queue_size(65536, 48)


def test_momentum_state_round_trip(tmp_path, student):
    teacher = MomentumTeacher(student, momentum=0.9)
    perturb(teacher.model)
    queues = FeatureQueues(8, 16)
    queues.enqueue(torch.randn(4, 16), torch.randn(4, 16), torch.arange(4))
    path = tmp_path / "momentum_state.safetensors"
    save_momentum_state(path, teacher, queues)

    tensors = load_file(path)
    assert "teacher.vision_model.blocks.0.attn.qkv.weight" in tensors
    assert "teacher.text_encoder.embeddings.word_embeddings.weight" in tensors
    assert "teacher.mlm_head.bias" in tensors
    assert tensors["image_queue"].shape == (8, 16) and tensors["idx_queue"].dtype == torch.int64
    assert tensors["queue_ptr"].dim() == 0 and int(tensors["queue_ptr"]) == 4
    assert set(tensors) - {"image_queue", "text_queue", "idx_queue", "queue_ptr"} == {
        f"teacher.{name}" for name in student.state_dict()
    }

    other_teacher, other_queues = MomentumTeacher(student), FeatureQueues(8, 16)
    load_momentum_state(path, other_teacher, other_queues, student)
    for a, b in zip(
        teacher.model.state_dict().values(), other_teacher.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)
    for key, value in queues.state_dict().items():
        assert torch.equal(value, other_queues.state_dict()[key])


def test_missing_teacher_tensors_come_from_the_student_and_are_logged(tmp_path, student, caplog):
    """The original has no momentum ITM head (nor temperature): those start as the student's."""
    source = AlbefForPreTraining(tiny_config())
    tensors = {
        f"teacher.{name}": tensor
        for name, tensor in source.state_dict().items()
        if not name.startswith("itm_head") and name != "temp"
    }
    queues = FeatureQueues(8, 16)
    tensors.update({k: v for k, v in queues.state_dict().items() if k != "idx_queue"})
    path = tmp_path / "converted.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)

    teacher, loaded = MomentumTeacher(student), FeatureQueues(8, 16)
    loaded.idx.fill_(5)
    with caplog.at_level(logging.WARNING):
        load_momentum_state(path, teacher, loaded, student)
    assert "initialised them from the student" in caplog.text
    state = teacher.model.state_dict()
    assert torch.equal(state["itm_head.weight"], student.state_dict()["itm_head.weight"])
    assert torch.equal(state["vision_proj.weight"], source.state_dict()["vision_proj.weight"])
    assert (loaded.idx == -100).all()  # pretraining states have no ids


def test_retrieval_teacher_from_pretraining_state_at_another_resolution(tmp_path):
    """Fine-tuning at a higher resolution: the MLM head is ignored, position embeddings interpolated."""
    pretrained = AlbefForPreTraining(tiny_config())
    path = tmp_path / "state.safetensors"
    save_momentum_state(path, MomentumTeacher(pretrained), FeatureQueues(8, 16))
    config = tiny_config()
    config.vision_config.image_size = 48
    retrieval = AlbefForImageTextRetrieval(config)
    teacher = MomentumTeacher(retrieval)
    load_momentum_state(path, teacher, FeatureQueues(8, 16), retrieval)
    assert teacher.model.vision_model.pos_embed.shape == (1, 37, 32)
    assert torch.equal(teacher.model.text_proj.weight, pretrained.text_proj.weight)
    with pytest.raises(ValueError, match="queue_size to 8"):
        load_momentum_state(path, queues=FeatureQueues(16, 16))
