"""Crash-safe checkpoints: a training process killed at any moment resumes from its newest complete checkpoint
exactly as an uninterrupted run continues, and resumes that would silently differ are refused."""

import concurrent.futures
import json
import logging
import multiprocessing
import os
import shutil
import signal

import pytest
from conftest import tiny_config
from safetensors.torch import load_file
from trainer_helpers import KILL_POINTS, tiny_trainer, train_until_killed

from albef_hf import AlbefForPreTraining
from albef_hf.trainer import (
    CHECKPOINT_MANIFEST_NAME,
    INCOMPLETE_CHECKPOINTS_DIR,
    checkpoint_problem,
    last_complete_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted tiny run: 6 steps, checkpoints 2, 4 and 6."""
    output = tmp_path_factory.mktemp("straight")
    tiny_trainer(str(output), save_strategy="steps", save_steps=2).train()
    return output


def max_difference(first, second) -> float:
    """Largest absolute difference between the student, teacher and queue tensors of two checkpoints."""
    worst = 0.0
    for name in ("model.safetensors", "momentum_state.safetensors"):
        a, b = load_file(first / name), load_file(second / name)
        assert a.keys() == b.keys()
        for key in a:
            if a[key].numel():
                worst = max(worst, float((a[key].double() - b[key].double()).abs().max()))
    return worst


def test_checkpoints_are_published_whole_with_a_manifest(straight):
    assert sorted(p.name for p in straight.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-2",
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not (straight / INCOMPLETE_CHECKPOINTS_DIR).exists()
    manifest = json.loads((straight / "checkpoint-4" / CHECKPOINT_MANIFEST_NAME).read_text())
    for name in ("model.safetensors", "momentum_state.safetensors", "optimizer.pt", "trainer_state.json"):
        assert manifest["files"][name] == (straight / "checkpoint-4" / name).stat().st_size
    assert manifest["run"] == {
        "world_size": 1,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "queue_size": 8,
    }


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_a_run_killed_anywhere_resumes_exactly_from_its_last_complete_checkpoint(
    point, straight, tmp_path, caplog
):
    """SIGKILL a real training process mid-step or inside the save of a checkpoint (weights, teacher and
    queues half written, optimizer, manifest), then resume with `resume_from_checkpoint=True`."""
    output = tmp_path / point
    process = multiprocessing.get_context("fork").Process(
        target=train_until_killed, args=(str(output), point)
    )
    process.start()
    process.join(timeout=120)
    if process.is_alive():
        process.kill()
        pytest.fail(f"the run to kill at {point} hung")
    assert process.exitcode == -signal.SIGKILL, process.exitcode

    step = KILL_POINTS[point]
    published = sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-"))
    assert published == [f"checkpoint-{s}" for s in range(2, step + 1, 2)]
    left_incomplete = point.startswith("save_")
    assert (output / INCOMPLETE_CHECKPOINTS_DIR / "checkpoint-4").is_dir() == left_incomplete
    assert last_complete_checkpoint(output) == str(output / f"checkpoint-{step}")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="albef_hf.trainer"):
        tiny_trainer(str(output), save_strategy="steps", save_steps=2).train(resume_from_checkpoint=True)
    warned = "left incomplete by a killed run" in caplog.text
    assert warned == left_incomplete
    assert not (output / INCOMPLETE_CHECKPOINTS_DIR).exists()
    assert max_difference(output / "checkpoint-6", straight / "checkpoint-6") <= 1e-6
    # the straight run's last step really moved everything (the comparison is not between two copies of one)
    assert max_difference(straight / "checkpoint-4", straight / "checkpoint-6") > 1e-4


def copy_run(straight, tmp_path, steps=(2, 4)):
    output = tmp_path / "run"
    for step in steps:
        shutil.copytree(straight / f"checkpoint-{step}", output / f"checkpoint-{step}")
    return output


def test_a_damaged_checkpoint_is_skipped_or_refused(straight, tmp_path, caplog):
    output = copy_run(straight, tmp_path)
    weights = output / "checkpoint-4" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # e.g. a copy cut short
    assert "model.safetensors has 1000 bytes" in checkpoint_problem(output / "checkpoint-4")
    with caplog.at_level(logging.WARNING, logger="albef_hf.trainer"):
        assert last_complete_checkpoint(output) == str(output / "checkpoint-2")
    assert "skipping the damaged checkpoint" in caplog.text
    with pytest.raises(
        ValueError, match="cannot resume from .*checkpoint-4: model.safetensors has 1000 bytes"
    ):
        tiny_trainer(str(output), save_strategy="steps", save_steps=2).train(
            resume_from_checkpoint=str(output / "checkpoint-4")
        )
    (output / "checkpoint-2" / "optimizer.pt").unlink()
    assert checkpoint_problem(output / "checkpoint-2") == "optimizer.pt is missing"
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        tiny_trainer(str(output)).train(resume_from_checkpoint=True)


def test_resumes_that_would_silently_differ_are_refused(straight, tmp_path):
    output = copy_run(straight, tmp_path, steps=(4,))

    def resume(trainer):
        trainer.train(resume_from_checkpoint=True)

    with pytest.raises(ValueError, match=r"queue_size: 8 -> 16"):
        resume(tiny_trainer(str(output), queue_size=16))
    with pytest.raises(ValueError, match=r"per_device_train_batch_size: 4 -> 2.*queue_size: 8 -> 16"):
        resume(tiny_trainer(str(output), queue_size=16, per_device_train_batch_size=2))
    manifest_path = output / "checkpoint-4" / CHECKPOINT_MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["run"]["world_size"] = 2  # as written by a run of two processes
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"world_size: 2 -> 1"):
        resume(tiny_trainer(str(output)))
    manifest["run"]["world_size"] = 1
    manifest_path.write_text(json.dumps(manifest))

    trainer = tiny_trainer(str(output))
    trainer.model = AlbefForPreTraining(tiny_config(mlm_probability=0.3, itm_weight=0.5))
    with pytest.raises(
        ValueError, match=r"config itm_weight: 1.0 -> 0.5; config mlm_probability: 0.15 -> 0.3"
    ):
        resume(trainer)


def test_rotation_and_a_repeated_save_keep_whole_checkpoints(straight, tmp_path):
    """save_total_limit rotates the published checkpoints; a run resumed from an older checkpoint replaces the
    newer ones it saves again whole."""
    output = copy_run(straight, tmp_path, steps=(2, 4, 6))
    tiny_trainer(str(output), save_strategy="steps", save_steps=2, save_total_limit=2).train(
        resume_from_checkpoint=str(output / "checkpoint-2")
    )
    assert sorted(p.name for p in output.iterdir() if p.name.startswith("checkpoint-")) == [
        "checkpoint-4",
        "checkpoint-6",
    ]
    assert not (output / INCOMPLETE_CHECKPOINTS_DIR).exists()
    assert checkpoint_problem(output / "checkpoint-6") is None
    assert max_difference(output / "checkpoint-6", straight / "checkpoint-6") <= 1e-6


def test_a_checkpoint_is_pushed_once_complete(tmp_path, monkeypatch):
    """hub_strategy="checkpoint" uploads in the background: it must read the published `checkpoint-N`, not the
    folder being written (which is renamed right after)."""
    import transformers.trainer as hf_trainer

    uploads = []

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Url", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, path_in_repo=None, **kwargs):
            uploads.append((path_in_repo, folder_path, sorted(os.listdir(folder_path))))
            done = concurrent.futures.Future()
            done.set_result(None)
            return done

    monkeypatch.setattr(hf_trainer, "hf_api", lambda: FakeApi())
    output = tmp_path / "albef-tiny"
    tiny_trainer(
        str(output),
        max_steps=2,
        save_strategy="steps",
        save_steps=2,
        push_to_hub=True,
        hub_strategy="checkpoint",
    ).train()
    pushed = [(folder, files) for path_in_repo, folder, files in uploads if path_in_repo == "last-checkpoint"]
    assert pushed == [(str(output / "checkpoint-2"), sorted(os.listdir(output / "checkpoint-2")))]
    assert CHECKPOINT_MANIFEST_NAME in pushed[0][1]
