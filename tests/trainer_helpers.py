"""Tiny AlbefTrainer runs shared by the trainer tests and the scripts they launch in other processes.

`python tests/trainer_helpers.py resume OUT CHECKPOINT` resumes the standard tiny run in a new process;
`torchrun --nproc_per_node 2 tests/trainer_helpers.py distributed OUT` runs it on two CPU processes (gloo)
and records, after every step, what each rank holds; `... downstream_eval OUT` evaluates tiny VQA, grounding and
SNLI-VE models (`downstream_evaluations`) and records each rank's results.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from albef_hf import (  # noqa: E402
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForVisualEntailment,
)
from albef_hf.data.collators import AlbefPretrainingCollator  # noqa: E402
from albef_hf.data.transforms import build_train_transform  # noqa: E402
from albef_hf.evaluation import GroundingEvalSet, VqaEvalSet  # noqa: E402
from albef_hf.modeling_albef_downstream import answer_decoder_config  # noqa: E402
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments  # noqa: E402


def tiny_samples(count: int = 16) -> list[dict]:
    return [
        {"image": image, "text": CAPTIONS[i % len(CAPTIONS)], "image_id": i}
        for i, image in enumerate(random_images(count, seed=1))
    ]


def tiny_pretraining_model(seed: int = 0, dropout: float = 0.1) -> AlbefForPreTraining:
    torch.manual_seed(seed)
    config = tiny_config()
    config.text_config.hidden_dropout_prob = dropout  # dropout draws exercise the RNG restore on resume
    return AlbefForPreTraining(config)


def tiny_trainer(output_dir: str, samples: list[dict] | None = None, **overrides) -> AlbefTrainer:
    """A pretraining run of the tiny model: 16 samples, batch 4 (4 steps per epoch), queue 8, augmentation."""
    settings = dict(
        per_device_train_batch_size=4,
        max_steps=6,
        queue_size=8,
        learning_rate=1e-3,
        warmup_steps=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,  # fp32 whatever the CPU, so that results compare exactly
        disable_tqdm=True,
        seed=7,
    )
    settings.update(overrides)
    args = AlbefTrainingArguments(output_dir=output_dir, **settings)
    processor = tiny_processor()
    collator = AlbefPretrainingCollator(processor, transform=build_train_transform(32))
    return AlbefTrainer(
        tiny_pretraining_model(),
        args,
        collator,
        samples if samples is not None else tiny_samples(),
        processing_class=processor,
    )


class RecordSteps(TrainerCallback):
    """After each optimizer step, record this rank's teacher digest, queues and the features it enqueued."""

    def __init__(self, trainer: AlbefTrainer) -> None:
        self.trainer = trainer
        self.records: list[dict] = []
        self.enqueued: list[list[list[float]]] = []
        original = trainer.teacher.model.compute_teacher_outputs

        def recording(**inputs):
            outputs = original(**inputs)
            self.enqueued.append(outputs.image_feat.detach().float().tolist())
            return outputs

        trainer.teacher.model.compute_teacher_outputs = recording

    def on_step_end(self, args, state, control, **kwargs):
        queues = self.trainer.queues
        teacher_digest = sum(float(p.double().sum()) for p in self.trainer.teacher.parameters())
        self.records.append(
            {
                "step": state.global_step,
                "teacher_digest": teacher_digest,
                "teacher_first": self.trainer.teacher.model.vision_proj.weight.flatten()[:8].tolist(),
                "image_queue": queues.image.tolist(),
                "text_queue": queues.text.tolist(),
                "ptr": queues.ptr,
                "enqueued": self.enqueued[-1],
            }
        )


def run_distributed(output_dir: str) -> None:
    trainer = tiny_trainer(
        output_dir,
        max_steps=3,
        queue_size=16,
        per_device_train_batch_size=2,
        save_strategy="steps",
        save_steps=2,
    )
    trainer.setup_momentum()
    recorder = RecordSteps(trainer)
    trainer.add_callback(recorder)
    trainer.train()
    rank = trainer.args.process_index
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump({"world_size": trainer.args.world_size, "records": recorder.records}, file)


#: Where `train_until_killed` kills its process, and the step of the newest complete checkpoint it leaves.
KILL_POINTS = {
    "mid_step": 2,  # in step 4, after the teacher moved and the queues took the batch
    "save_model_weights": 2,  # in the save of checkpoint-4: the student is written, nothing else
    "save_momentum_state": 2,  # half of the teacher and queues file is written
    "save_rng_state": 2,  # optimizer and scheduler written, RNG and trainer state not
    "save_manifest": 2,  # every file and the manifest written, the folder not yet renamed
    "after_save": 4,  # checkpoint-4 is complete
}


def train_until_killed(output_dir: str, point: str) -> None:
    """The tiny run of 6 steps with a checkpoint every 2 that SIGKILLs its own process at `point` (the
    second checkpoint, or step 4), hooked in where that moment happens."""
    import signal

    import albef_hf.trainer as trainer_module

    torch.set_num_threads(1)
    trainer = tiny_trainer(output_dir, save_strategy="steps", save_steps=2)
    trainer.setup_momentum()

    def at_kill_step() -> bool:
        return trainer.state.global_step == (3 if point == "mid_step" else 4)

    def die() -> None:
        os.kill(os.getpid(), signal.SIGKILL)

    def then_die(function, before: bool = True):
        def hooked(*args, **kwargs):
            if before and at_kill_step():
                die()
            result = function(*args, **kwargs)
            if not before and at_kill_step():
                die()
            return result

        return hooked

    if point == "mid_step":
        trainer.queues.enqueue = then_die(trainer.queues.enqueue, before=False)
    elif point == "save_model_weights":
        trainer._save_optimizer_and_scheduler = then_die(trainer._save_optimizer_and_scheduler)
    elif point == "save_momentum_state":
        save = trainer_module.save_momentum_state

        def half_written(path, *args):
            save(path, *args)
            if at_kill_step():
                os.truncate(path, os.path.getsize(path) // 2)
                die()

        trainer_module.save_momentum_state = half_written
    elif point == "save_rng_state":
        trainer._save_rng_state = then_die(trainer._save_rng_state)
    elif point == "save_manifest":
        trainer_module._fsync_tree = then_die(trainer_module._fsync_tree)
    elif point == "after_save":

        class DieAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if at_kill_step():
                    die()

        trainer.add_callback(DieAfterSave())
    else:
        raise ValueError(f"unknown kill point {point!r}; known: {sorted(KILL_POINTS)}")
    trainer.train()


def run_resume(output_dir: str, checkpoint: str) -> None:
    tiny_trainer(output_dir, save_strategy="steps", save_steps=3).train(resume_from_checkpoint=checkpoint)


def downstream_evaluations(output_dir: str) -> dict:
    """Metrics and predictions of tiny VQA, grounding and SNLI-VE models on 5 samples each (batches of 2)."""
    images = random_images(5, seed=2)
    args = AlbefTrainingArguments(
        output_dir, per_device_eval_batch_size=2, use_cpu=True, bf16=False, report_to="none"
    )
    processor = tiny_processor()
    results = {}
    torch.manual_seed(0)
    config = tiny_config()
    vqa = AlbefForQuestionAnswering(tiny_config(decoder_config=answer_decoder_config(config.text_config, 2)))
    questions = [
        {"image": image, "text": CAPTIONS[i % 4], "answers": ["red", "two"][: 1 + i % 2]}
        for i, image in enumerate(images)
    ]
    vqa_set = VqaEvalSet(questions, ["red", "blue", "two", "yes", "no"])
    trainer = AlbefTrainer(vqa, args, processing_class=processor)
    results["vqa"] = {
        "metrics": trainer.evaluate(vqa_set),
        "predictions": trainer.predict(vqa_set).predictions,
    }
    boxes = [[0, 0, 24, 20], [24, 0, 24, 20], [0, 20, 48, 20]]
    expressions = [
        {"image": image, "text": CAPTIONS[i % 4], "box": boxes[i % 3], "candidate_boxes": boxes}
        for i, image in enumerate(images)
    ]
    trainer = AlbefTrainer(AlbefForImageTextRetrieval(config), args, processing_class=processor)
    grounding = GroundingEvalSet(expressions)
    results["grounding"] = {
        "metrics": trainer.evaluate(grounding),
        "predictions": trainer.predict(grounding).predictions,
    }
    hypotheses = [{"image": image, "text": CAPTIONS[i % 4], "label": i % 3} for i, image in enumerate(images)]
    trainer = AlbefTrainer(AlbefForVisualEntailment(config), args, processing_class=processor)
    results["ve"] = {
        "metrics": trainer.evaluate(hypotheses),
        "predictions": trainer.predict(hypotheses).predictions.tolist(),
    }
    for task in results.values():
        task["metrics"] = {
            k: v for k, v in task["metrics"].items() if not k.endswith(("_runtime", "_per_second", "_time"))
        }
    return results


def run_downstream_eval(output_dir: str) -> None:
    results = downstream_evaluations(output_dir)
    rank = int(os.environ["RANK"])
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as file:
        json.dump(results, file)


if __name__ == "__main__":
    torch.set_num_threads(1)
    command, *rest = sys.argv[1:]
    {"distributed": run_distributed, "resume": run_resume, "downstream_eval": run_downstream_eval}[command](
        *rest
    )
    if torch.distributed.is_initialized():
        # tear gloo down while both ranks are alive: a rank that exits with the group still up can abort
        # ("terminate called without an active exception") when its peer closes the connection first
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
