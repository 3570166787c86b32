"""`AlbefTrainer`: transformers' Trainer with ALBEF's momentum distillation, feature queues and task evaluations.

Everything Trainer users know keeps working (TrainingArguments, callbacks, logging, checkpoints,
`push_to_hub`, `accelerate launch` / `torchrun` DDP, bf16, gradient accumulation). On top of it:

- a `MomentumTeacher` (EMA copy of the student, no grad, never in the optimizer) runs in `compute_loss`
  and its outputs, the feature queues and the distillation weight `alpha` go into the model's loss;
- `FeatureQueues` receive the teacher features of every micro-batch, gathered from all processes;
- the EMA moves once per optimizer step, at its first micro-batch and before the teacher runs, which is
  exactly the original's update-then-use order (the original updates at the start of every forward; one
  forward is one optimizer step there), so gradient accumulation does not change its meaning;
- every checkpoint holds `momentum_state.safetensors` (teacher + queues) next to the model, optimizer,
  scheduler and RNG states, and the data order and per-sample augmentation are a function of
  `(seed, epoch, index)`, so `resume_from_checkpoint` continues exactly;
- checkpoints are written under a temporary folder and renamed whole once complete, with a manifest of their
  files and of the settings a resume must share, so a killed run resumes (`resume_from_checkpoint=True`) from its
  newest complete checkpoint, and a resume under other settings is refused;
- `save_model` / `push_to_hub` write the student only, with a model card that says how it was trained;
- `evaluate()` runs the original's retrieval evaluation (ITC ranking, ITM re-ranking of the top k,
  TR/IR recall@1/5/10 and means), with the re-ranking split across processes.

One mechanism trains every ALBEF task; what differs is decided by the model class:

========================================= =========================== ====== ==================================
model                                     teacher                     queues evaluation
========================================= =========================== ====== ==================================
`AlbefForPreTraining`                     ITC/ITM/MLM targets         yes    retrieval recall
`AlbefForImageTextRetrieval`              ITC targets                 yes    retrieval recall, or box accuracy
                                                                             (grounding) on a `GroundingEvalSet`
`AlbefForQuestionAnswering`               answer-token distributions  no     VQA score (`VqaEvalSet`)
`AlbefForVisualReasoning`, `...Entailment` class distributions         no     accuracy (transformers' loop)
`AlbefForTextAssignment`                  none (not distilled, as the no     none
                                          original's TA step)
========================================= =========================== ====== ==================================

The downstream teachers are used in training only: an evaluation loss is the plain loss of the student.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, IterableDataset
from transformers import Trainer, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import (
    PREFIX_CHECKPOINT_DIR,
    PredictionOutput,
    has_length,
    rotate_checkpoints,
    speed_metrics,
)
from transformers.utils import is_torch_xla_available

from .data.collators import (
    AlbefClassificationCollator,
    AlbefImageTextCollator,
    AlbefPretrainingCollator,
    AlbefRetrievalCollator,
    AlbefVqaCollator,
    EpochKeyedSampler,
    KeyedDataset,
)
from .evaluation import (
    GroundingEvalSet,
    VqaEvalSet,
    classification_metrics,
    compute_retrieval_scores,
    grounding_metrics,
    itm_eval,
    predict_grounding,
    predict_vqa,
    retrieval_eval_set_from_samples,
    vqa_metrics,
)
from .modelcard import AlbefCardInfo, build_model_card, save_model_card, task_for_model_class
from .modeling_albef import AlbefForImageTextRetrieval, AlbefForPreTraining
from .modeling_albef_downstream import (
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
)
from .momentum import (
    MOMENTUM_STATE_NAME,
    FeatureQueues,
    MomentumTeacher,
    check_queue_size,
    load_momentum_state,
    save_momentum_state,
)
from .precision import resolve_bf16

__all__ = [
    "ALBEF_LR_SCHEDULES",
    "CHECKPOINT_MANIFEST_NAME",
    "INCOMPLETE_CHECKPOINTS_DIR",
    "AlbefTrainer",
    "AlbefTrainingArguments",
    "albef_cosine_lr",
    "albef_epoch_cosine_lr",
    "albef_no_decay",
    "checkpoint_problem",
    "last_complete_checkpoint",
]

logger = logging.getLogger(__name__)

#: Learning-rate schedules of the original, selectable with `lr_scheduler_type`.
ALBEF_LR_SCHEDULES = ("albef_cosine", "albef_epoch_cosine")
# The original moves its warm-up learning rate every 100 iterations (`step_size` in Pretrain.py).
ORIGINAL_WARMUP_INTERVAL = 100

#: Written last into every checkpoint: the size of each of its files and the run settings a resume must share.
CHECKPOINT_MANIFEST_NAME = "albef_checkpoint.json"
#: Checkpoints are written under this folder of the output directory and renamed to `checkpoint-N` once
#: complete, so that a `checkpoint-N` folder is always whole. The leading "_" keeps it out of `push_to_hub`.
INCOMPLETE_CHECKPOINTS_DIR = "_incomplete_checkpoints"
_CHECKPOINT_RE = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# Config fields that say how a model was saved or what it returns, not what it computes: a resume may change them.
_CONFIG_FIELDS_NOT_COMPARED = frozenset(
    {
        "transformers_version",
        "_name_or_path",
        "architectures",
        "auto_map",
        "dtype",
        "torch_dtype",
        "_attn_implementation",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
    }
)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules and weight decay of the original
# ----------------------------------------------------------------------------------------------


def _cosine(progress: float, peak_lr: float, min_lr: float) -> float:
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def albef_cosine_lr(
    step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, warmup_start_lr: float, min_lr: float
) -> float:
    """The original's schedule, per optimizer step: linear warm-up, then a half cosine.

    `warmup_start_lr` at step 0, linearly up to `peak_lr` at `warmup_steps`, then
    `min_lr + (peak_lr - min_lr) * (1 + cos(pi * p)) / 2` with `p` going from 0 to 1 over the remaining steps.
    """
    if step < warmup_steps:
        return warmup_start_lr + (peak_lr - warmup_start_lr) * step / warmup_steps
    return _cosine((step - warmup_steps) / max(1, total_steps - warmup_steps), peak_lr, min_lr)


def albef_epoch_cosine_lr(
    step: int,
    *,
    peak_lr: float,
    warmup_steps: int,
    steps_per_epoch: int,
    num_epochs: int,
    warmup_start_lr: float,
    min_lr: float,
) -> float:
    """The original's schedule exactly as Pretrain.py / Retrieval.py run it (timm's CosineLRScheduler).

    - First epoch: the warm-up rate moves every 100 optimizer steps: at step `s >= 1` it is
      `warmup_start_lr + t * (peak_lr - warmup_start_lr) / W` with `t = (s - 1) // 100` and
      `W = warmup_steps / 100` levels (step 0 uses level 0), and `peak_lr` once `t >= W`; the warm-up only
      happens in the first epoch.
    - Epoch `e >= 1`: `min_lr + (peak_lr - min_lr) * (1 + cos(pi * e / num_epochs)) / 2` for the whole epoch.
    """
    epoch, position = divmod(step, steps_per_epoch)
    if epoch == 0:
        levels = warmup_steps / ORIGINAL_WARMUP_INTERVAL
        level = max(position - 1, 0) // ORIGINAL_WARMUP_INTERVAL
        if level < levels:
            return warmup_start_lr + level * (peak_lr - warmup_start_lr) / levels
        return peak_lr
    return _cosine(epoch / num_epochs, peak_lr, min_lr)


def albef_no_decay(name: str, param: torch.Tensor, skip: frozenset[str] = frozenset()) -> bool:
    """Whether the original exempts a parameter from weight decay: 1-D tensors, biases and `skip` names.

    Note the original's quirks that follow from this rule: the 0-dim temperature and the 3-D ViT position
    embedding and class token *are* decayed.
    """
    return param.ndim == 1 or name.endswith(".bias") or name in skip


# ----------------------------------------------------------------------------------------------
# Crash-safe checkpoints
# ----------------------------------------------------------------------------------------------


def _fsync_dir(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: str) -> None:
    """Flush every file under `root`, and the folders, to disk: a rename must not reach the disk before the
    data it publishes (a power cut would leave a complete-looking checkpoint of empty files)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as file:
                os.fsync(file.fileno())
        _fsync_dir(folder)


def _read_manifest(checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's manifest, or None when it has none (a transformers Trainer or older checkpoint)."""
    path = os.path.join(checkpoint, CHECKPOINT_MANIFEST_NAME)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        manifest = json.load(file)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError("no 'files' table")
    return manifest


def checkpoint_problem(checkpoint: str | os.PathLike) -> str | None:
    """Why `checkpoint` is not a complete checkpoint (a file missing or of another size than its manifest
    says), or None. A checkpoint without a manifest (written by transformers' Trainer or an older albef-hf)
    cannot be checked and counts as complete."""
    checkpoint = os.fspath(checkpoint)
    if not os.path.isdir(checkpoint):
        return "not a directory"
    try:
        manifest = _read_manifest(checkpoint)
    except (OSError, ValueError) as error:
        return f"unreadable {CHECKPOINT_MANIFEST_NAME} ({error})"
    for name, size in (manifest or {"files": {}})["files"].items():
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size}"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest `checkpoint-N` of `output_dir` that passes `checkpoint_problem` (damaged ones are skipped
    with a warning), or None."""
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        return None
    found = [
        (int(match.group(1)), name)
        for name in os.listdir(output_dir)
        if (match := _CHECKPOINT_RE.match(name)) and os.path.isdir(os.path.join(output_dir, name))
    ]
    for _, name in sorted(found, reverse=True):
        path = os.path.join(output_dir, name)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("skipping the damaged checkpoint %s: %s", path, problem)
    return None


def _differences(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """`name: saved -> current` for every field that differs between two config dicts (recursively)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return [] if saved == current else [f"{prefix.rstrip('.')}: {saved!r} -> {current!r}"]
    found = []
    for key in sorted(set(saved) | set(current), key=str):
        if key in _CONFIG_FIELDS_NOT_COMPARED:
            continue
        found += _differences(saved.get(key), current.get(key), f"{prefix}{key}.")
    return found


# ----------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------


@dataclass
class AlbefTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus ALBEF's momentum distillation, queues, schedule and evaluation settings.

    Defaults that differ from `TrainingArguments` follow the original: `learning_rate=1e-4`,
    `weight_decay=0.02` (1-D parameters and biases exempt), `lr_scheduler_type="albef_cosine"`,
    `dataloader_drop_last=True` (the queues need full batches), and `remove_unused_columns=False` (the
    collators read the raw `image`/`text` fields); `per_device_eval_batch_size=64` (larger products, faster
    evaluation per sample).
    """

    learning_rate: float = field(
        default=1e-4,
        metadata={"help": "Peak learning rate (the original: 1e-4 pretraining, 1e-5 retrieval)."},
    )
    weight_decay: float = field(
        default=0.02, metadata={"help": "AdamW weight decay; 1-D parameters and biases are exempt."}
    )
    lr_scheduler_type: str = field(
        default="albef_cosine",
        metadata={
            "help": "Learning-rate schedule: 'albef_cosine' (linear warm-up from warmup_start_lr, then cosine to min_lr, "
            "per step), 'albef_epoch_cosine' (the original exactly: warm-up moving every 100 steps in the first epoch, "
            "cosine stepped per epoch), or any transformers schedule name."
        },
    )
    dataloader_drop_last: bool = field(
        default=True, metadata={"help": "Drop the last incomplete batch (the queues need full batches)."}
    )
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collators need the raw sample fields."}
    )
    per_device_eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "Evaluation batch per device (transformers' default of 8 makes small matrix products, slow per "
            "question on a CPU; see benchmarks/bench_vqa.py --batch-size)."
        },
    )

    # a str field (the parser reads "auto"/"true"/"false"; a bare --bf16 means "true"); Python callers may pass a
    # bool. __post_init__ leaves the bool the parent expects.
    bf16: str = field(
        default="auto",
        metadata={
            "help": "bf16 autocast: 'auto' (default) where the device computes bf16 natively (a CUDA GPU with bf16, a "
            "CPU with AVX512-BF16 or AMX), fp32 elsewhere; --bf16 forces it (with a warning where it is emulated, "
            "about 20x slower), --bf16 false turns it off.",
            "nargs": "?",
            "const": "true",
        },
    )
    momentum: float = field(default=0.995, metadata={"help": "EMA coefficient of the momentum teacher."})
    alpha: float = field(
        default=0.4, metadata={"help": "Distillation weight of the teacher's distributions (ITC and MLM)."}
    )
    alpha_warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps over which alpha ramps linearly from 0 (default: one epoch; 0: no ramp)."
        },
    )
    distill: bool = field(
        default=True,
        metadata={
            "help": "Distil from the teacher (alpha > 0). Without it the teacher still provides the ITC candidates."
        },
    )
    queue_size: int = field(
        default=65536,
        metadata={
            "help": "Rows of the feature queues; a multiple of the global batch. 0: in-batch candidates only."
        },
    )
    momentum_state_path: str | None = field(
        default=None,
        metadata={
            "help": "momentum_state.safetensors to start the teacher and queues from (continued pretraining)."
        },
    )
    clamp_temp: bool = field(
        default=True,
        metadata={
            "help": "Clamp the temperature parameter in place to [temp_min, temp_max] before each step, as the original."
        },
    )
    temp_min: float | None = field(
        default=None, metadata={"help": "Lower temperature bound (default: the model config's)."}
    )
    temp_max: float | None = field(
        default=None, metadata={"help": "Upper temperature bound (default: the model config's)."}
    )
    warmup_start_lr: float | None = field(
        default=None,
        metadata={"help": "Learning rate at the start of the warm-up (default: learning_rate / 10)."},
    )
    min_lr: float | None = field(
        default=None, metadata={"help": "Final learning rate of the cosine (default: learning_rate / 10)."}
    )
    retrieval_k: int = field(
        default=128, metadata={"help": "Candidates re-ranked with ITM per query in evaluation."}
    )
    vqa_k: int = field(
        default=128,
        metadata={
            "help": "VQA evaluation: answers kept by the first-token shortlist before full scoring (the original's "
            "k_test)."
        },
    )
    vqa_top_k: int = field(
        default=5, metadata={"help": "VQA predictions: answers returned per question, with probabilities."}
    )
    vqa_generate: bool = field(
        default=False,
        metadata={"help": "VQA evaluation: generate open answers instead of ranking the answer list."},
    )
    vqa_num_beams: int = field(default=1, metadata={"help": "VQA generation: beams (1: greedy)."})
    vqa_max_new_tokens: int = field(
        default=10, metadata={"help": "VQA generation: longest answer in tokens."}
    )
    gradcam_mode: str = field(
        default="itm",
        metadata={
            "help": "Grounding evaluation: Grad-CAM of the ITM score on a fusion layer's cross-attention ('itm', "
            "the paper's) or of the ITC similarity on a ViT block ('itc')."
        },
    )
    gradcam_layer: int | None = field(
        default=None,
        metadata={
            "help": "Grounding evaluation: the text layer (itm; default the third fusion layer) or ViT block (itc; "
            "default 8) of the Grad-CAM."
        },
    )

    def __post_init__(self) -> None:
        self._resolve_precision()
        albef_schedule = self.lr_scheduler_type if self.lr_scheduler_type in ALBEF_LR_SCHEDULES else None
        if albef_schedule is not None:
            self.lr_scheduler_type = "constant"  # a name the parent validates; restored below
        super().__post_init__()
        if albef_schedule is not None:
            self.lr_scheduler_type = albef_schedule
        checks = [
            (0.0 <= self.momentum <= 1.0, f"momentum must lie in [0, 1], got {self.momentum}"),
            (0.0 <= self.alpha <= 1.0, f"alpha must lie in [0, 1], got {self.alpha}"),
            (
                self.alpha_warmup_steps is None or self.alpha_warmup_steps >= 0,
                "alpha_warmup_steps must be >= 0",
            ),
            (self.queue_size >= 0, f"queue_size must be >= 0, got {self.queue_size}"),
            (self.retrieval_k >= 1, f"retrieval_k must be >= 1, got {self.retrieval_k}"),
            (self.vqa_k >= 1 and self.vqa_top_k >= 1, "vqa_k and vqa_top_k must be >= 1"),
            (
                self.vqa_num_beams >= 1 and self.vqa_max_new_tokens >= 1,
                "vqa generation needs >= 1 beam and token",
            ),
            (
                self.gradcam_mode in ("itm", "itc"),
                f"gradcam_mode must be 'itm' or 'itc', got {self.gradcam_mode}",
            ),
            (self.warmup_start_lr is None or self.warmup_start_lr >= 0, "warmup_start_lr must be >= 0"),
            (self.min_lr is None or self.min_lr >= 0, "min_lr must be >= 0"),
            (
                self.temp_min is None or self.temp_max is None or 0 < self.temp_min < self.temp_max,
                f"need 0 < temp_min < temp_max, got {self.temp_min}, {self.temp_max}",
            ),
            (
                self.momentum_state_path is None or os.path.isfile(self.momentum_state_path),
                f"momentum_state_path {self.momentum_state_path!r} is not a file",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def _resolve_precision(self) -> None:
        """Turn `bf16` ("auto", a bool, or "true"/"false") into the bool the parent expects, for the device
        this run will train on. Without a GPU, bf16 means CPU autocast, so `use_cpu` is set with it (the parent
        refuses bf16 on a machine without a bf16 GPU otherwise)."""
        accelerators = {
            "cuda": torch.cuda.is_available(),
            "xla": is_torch_xla_available(),
            "mps": torch.backends.mps.is_available(),
        }
        device = "cpu" if self.use_cpu else next((name for name, ok in accelerators.items() if ok), "cpu")
        self.bf16 = resolve_bf16(self.bf16, device)
        if self.bf16 and device == "cpu":
            self.use_cpu = True

    @property
    def resolved_warmup_start_lr(self) -> float:
        return self.learning_rate / 10 if self.warmup_start_lr is None else self.warmup_start_lr

    @property
    def resolved_min_lr(self) -> float:
        return self.learning_rate / 10 if self.min_lr is None else self.min_lr


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------

_LOSS_FIELDS = ("loss_itc", "loss_itm", "loss_mlm")
# Output fields transformers' evaluation loop must not collect for the classifiers (only their logits).
_NON_LOGIT_FIELDS = ["multimodal_embeds", "image_embeds", "cross_attentions"]
# What each model class optimises (for the model card).
_OBJECTIVES = {
    AlbefForPreTraining: "ITC + ITM (hard negatives) + MLM",
    AlbefForImageTextRetrieval: "ITC + ITM (hard negatives), image-id positives",
    AlbefForQuestionAnswering: "answer generation loss, weighted by answer weights",
    AlbefForVisualReasoning: "NLVR2 classification (cross-entropy)",
    AlbefForTextAssignment: "NLVR2 text assignment (3-way cross-entropy)",
    AlbefForVisualEntailment: "SNLI-VE classification (cross-entropy)",
}
_CLASSIFIERS = (AlbefForVisualReasoning, AlbefForVisualEntailment)


def _contrastive(model: nn.Module) -> bool:
    """Whether the model has ITC (feature queues, temperature) rather than a task head."""
    return isinstance(model, (AlbefForPreTraining, AlbefForImageTextRetrieval))


def _default_collator(model: nn.Module, processor: Any) -> Any:
    if isinstance(model, AlbefForPreTraining):
        return AlbefPretrainingCollator(processor)
    if isinstance(model, AlbefForImageTextRetrieval):
        return AlbefRetrievalCollator(processor)
    if isinstance(model, AlbefForQuestionAnswering):
        return AlbefVqaCollator(processor)
    if isinstance(model, _CLASSIFIERS):
        pairs = isinstance(model, AlbefForVisualReasoning)
        return AlbefClassificationCollator(
            processor, images_per_sample=2 if pairs else 1, num_labels=len(model.label_names)
        )
    return AlbefImageTextCollator(processor)


class AlbefTrainer(Trainer):
    """Trainer for every ALBEF model with momentum distillation (see the module docstring for what each gets).

    Args:
        model: the student: `AlbefForPreTraining` (ITC + ITM + MLM), `AlbefForImageTextRetrieval` (ITC + ITM with
            image-id positives; also grounding fine-tuning), `AlbefForQuestionAnswering`,
            `AlbefForVisualReasoning`, `AlbefForTextAssignment` or `AlbefForVisualEntailment`.
        args: `AlbefTrainingArguments`.
        data_collator: default: the model's collator over `processing_class` (`AlbefPretrainingCollator`,
            `AlbefRetrievalCollator`, `AlbefVqaCollator`, `AlbefClassificationCollator`, `AlbefImageTextCollator`
            for TA), without augmentation; pass one with a training transform for real runs. Unset collator fields
            (`seed`, `vocab_size`, `mlm_probability`) are filled from the run and the model config. Evaluation
            batches use its `for_evaluation()` copy (no training transform).
        train_dataset: reader samples (`albef_hf.data.readers`, `albef_hf.data.downstream`), map-style or iterable.
        eval_dataset: retrieval: a `RetrievalEvalSet` (or the synthetic world's `RetrievalEval`, or reader samples
            grouped by `image_id`); grounding: a `GroundingEvalSet`; VQA: a `VqaEvalSet`; NLVR2 / SNLI-VE: samples.
            Or a dict of them.
        processing_class: the `AlbefProcessor` (needed by the default collator and by evaluation; saved with
            the model).
        kwargs: the other `Trainer` arguments (callbacks, optimizers, ...).

    Example:
        >>> args = AlbefTrainingArguments("out", per_device_train_batch_size=64, queue_size=65536, bf16=True)
        >>> trainer = AlbefTrainer(model, args, collator, train_dataset, eval_set, processing_class=processor)
        >>> trainer.train()
        >>> trainer.evaluate()  # {"eval_txt_r1": ..., "eval_img_r1": ..., "eval_r_mean": ...}

        >>> vqa = AlbefForQuestionAnswering.from_pretrained_albef("path/to/pretrained")
        >>> trainer = AlbefTrainer(vqa, args, AlbefVqaCollator(processor, transform), train_samples,
        ...                        VqaEvalSet(test_samples, answer_list), processing_class=processor)
        >>> trainer.train(); trainer.evaluate()  # {"eval_vqa_score": ...}
    """

    def __init__(
        self,
        model: AlbefForPreTraining
        | AlbefForImageTextRetrieval
        | AlbefForQuestionAnswering
        | AlbefForVisualReasoning
        | AlbefForTextAssignment
        | AlbefForVisualEntailment
        | None = None,
        args: AlbefTrainingArguments | None = None,
        data_collator: Any = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        processing_class: Any = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("model_init") is not None:
            raise ValueError(
                "AlbefTrainer needs a model instance (model_init is not supported: the teacher copies it)"
            )
        if not isinstance(model, tuple(_OBJECTIVES)):
            names = ", ".join(cls.__name__ for cls in _OBJECTIVES)
            raise TypeError(f"AlbefTrainer trains {names}; got {type(model).__name__}")
        args = args if args is not None else AlbefTrainingArguments(output_dir="trainer_output")
        if not isinstance(args, AlbefTrainingArguments):
            raise TypeError(f"AlbefTrainer needs AlbefTrainingArguments, got {type(args).__name__}")
        config = model.config
        if args.ddp_find_unused_parameters is None and _has_unused_parameters(model):
            args.ddp_find_unused_parameters = True
        if data_collator is None:
            if processing_class is None:
                raise ValueError(
                    "pass a data_collator, or a processing_class (AlbefProcessor) to build the default one"
                )
            data_collator = _default_collator(model, processing_class)
            logger.info("using %s without augmentation as the data collator", type(data_collator).__name__)
        _fill_collator_defaults(data_collator, args, config)
        if isinstance(model, _CLASSIFIERS) and kwargs.get("compute_metrics") is None:
            kwargs["compute_metrics"] = classification_metrics
        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        self.model_accepts_loss_kwargs = (
            False  # our losses are batch means: Trainer scales them for accumulation
        )
        self.teacher: MomentumTeacher | None = None
        self.queues: FeatureQueues | None = None
        self._momentum_ready = False
        self._ema_step: int | None = None
        self._alpha_warmup_steps = args.alpha_warmup_steps
        self._steps_per_epoch: int | None = None
        self._loss_sums: dict[str, torch.Tensor] = {}
        self._loss_count = 0
        self._eval_sets: dict[int, tuple[Any, Any]] = {}
        self._last_eval_metrics: dict[str, float] = {}
        self._staging_root: str | None = None  # set while a checkpoint is written (see _save_checkpoint)
        self._push_pending = False

    # -- set-up --------------------------------------------------------------------------------------

    @property
    def student(self) -> AlbefForPreTraining | AlbefForImageTextRetrieval:
        """The model being trained, unwrapped from DDP and friends."""
        return self.accelerator.unwrap_model(self.model)

    @property
    def contrastive(self) -> bool:
        """Whether the student has ITC: feature queues, a temperature, the teacher in evaluation losses."""
        return _contrastive(self.student)

    def _check_training_setup(self) -> None:
        args = self.args
        if self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        ):
            raise ValueError(
                "AlbefTrainer keeps a full EMA copy of the student, which needs unsharded parameters: use DDP "
                "(torchrun / accelerate launch) or DeepSpeed ZeRO-1/2, not FSDP or ZeRO-3"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and args.world_size != launched:
            raise ValueError(
                f"{launched} processes were launched but the Trainer runs {args.world_size}: each would train alone "
                "with its own queues; on a machine without GPUs pass --use_cpu so that gloo DDP is set up"
            )
        if args.n_gpu > 1:
            raise ValueError(
                "AlbefTrainer does not support torch.nn.DataParallel (it would split the queues across GPUs); "
                "launch one process per GPU with torchrun or accelerate launch"
            )
        if args.queue_size and self.contrastive:
            check_queue_size(args.queue_size, args.per_device_train_batch_size * args.world_size)
        if not args.dataloader_drop_last and args.queue_size and self.contrastive:
            logger.warning(
                "dataloader_drop_last=False: a smaller last batch writes a partial block of the queues"
            )

    def setup_momentum(self, resuming: bool = False) -> None:
        """Build the teacher and the queues (once), loading `momentum_state_path` when given and not `resuming`
        (a resumed run takes them from its checkpoint).

        Models with ITC always get a teacher (it also provides the contrastive candidates) and, with
        `queue_size > 0`, the queues; the task heads get a teacher when `distill` is on and they can be distilled
        (not `AlbefForTextAssignment`), and never queues.
        """
        if self._momentum_ready:
            return
        args, student = self.args, self.student
        self._check_training_setup()
        self._momentum_ready = True
        distillable = hasattr(student, "compute_teacher_outputs")
        if self.contrastive or (distillable and args.distill):
            self.teacher = MomentumTeacher(student, args.momentum)
        elif distillable:
            logger.info("distill=False: %s trains without a momentum teacher", type(student).__name__)
        if args.queue_size and self.contrastive:
            self.queues = FeatureQueues(args.queue_size, student.config.embed_dim, device=student.device)
        if args.momentum_state_path and self.teacher is not None and not resuming:
            load_momentum_state(args.momentum_state_path, self.teacher, self.queues, student)
            logger.info("started the momentum teacher and queues from %s", args.momentum_state_path)
        if not self.contrastive:
            return
        config = student.config
        if args.temp_min is not None:
            config.temp_min = args.temp_min
        if args.temp_max is not None:
            config.temp_max = args.temp_max
        if config.temp_min >= config.temp_max:
            raise ValueError(f"need temp_min < temp_max, got {config.temp_min} and {config.temp_max}")

    def train(self, resume_from_checkpoint: str | bool | None = None, trial: Any = None, **kwargs: Any):
        """`Trainer.train`, after building the momentum teacher and queues.

        `resume_from_checkpoint=True` resumes from the newest complete checkpoint of `output_dir` (damaged ones
        are skipped with a warning); a resume whose results would differ from the run that wrote the checkpoint
        (another model configuration, world size, batch size, accumulation or queue size) raises a
        `ValueError` that names the differences. Incomplete checkpoints of a killed run are deleted with a
        warning.
        """
        if resume_from_checkpoint is False:
            resume_from_checkpoint = None
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        self._discard_incomplete_checkpoints()
        self.setup_momentum(resuming=resume_from_checkpoint is not None)
        if resume_from_checkpoint is not None:
            self._check_resume(os.fspath(resume_from_checkpoint))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def set_initial_training_values(self, args: TrainingArguments, dataloader: DataLoader):
        values = super().set_initial_training_values(args, dataloader)
        self._steps_per_epoch = values[1] if has_length(dataloader) else None
        if self._alpha_warmup_steps is None and self.args.distill and self.teacher is not None:
            if self._steps_per_epoch is None:
                raise ValueError(
                    "alpha ramps up over the first epoch by default, but the training data has no length: "
                    "set alpha_warmup_steps (0 for no ramp)"
                )
            self._alpha_warmup_steps = self._steps_per_epoch
        return values

    # -- data ----------------------------------------------------------------------------------------

    def _keyed(self, dataset: Any) -> bool:
        return (
            dataset is not None
            and not isinstance(dataset, IterableDataset)
            and has_length(dataset)
            and self.args.train_sampling_strategy in ("random", "sequential")
        )

    def get_train_dataloader(self) -> DataLoader:
        """The Trainer's DataLoader over `KeyedDataset(train_dataset)` for map-style data (exact resumption)."""
        if self.train_dataset is None:
            raise ValueError("Trainer: training requires a train_dataset.")
        dataset = KeyedDataset(self.train_dataset) if self._keyed(self.train_dataset) else self.train_dataset
        if not isinstance(dataset, KeyedDataset):
            logger.info(
                "iterable training data: a resumed run skips the consumed batches but redraws augmentations"
            )
        return self._get_dataloader(
            dataset=dataset,
            description="Training",
            batch_size=self._train_batch_size,
            sampler_fn=self._get_train_sampler,
            is_training=True,
        )

    def _get_train_sampler(self, train_dataset: Any = None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if isinstance(dataset, KeyedDataset):
            seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
            return EpochKeyedSampler(
                len(dataset), seed, shuffle=self.args.train_sampling_strategy == "random"
            )
        return super()._get_train_sampler(train_dataset)

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        return data_collator  # the collators read fields the model's forward does not name

    def _remove_unused_columns(self, dataset: Any, description: str | None = None) -> Any:
        return dataset

    # -- optimisation --------------------------------------------------------------------------------

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Parameters with weight decay, by the original's rule (`albef_no_decay`)."""
        skip_fn = getattr(model, "no_weight_decay", None)
        skip = frozenset(skip_fn()) if callable(skip_fn) else frozenset()
        return [name for name, param in model.named_parameters() if not albef_no_decay(name, param, skip)]

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        """The original's schedules for `albef_cosine` / `albef_epoch_cosine`, transformers' otherwise."""
        if self.args.lr_scheduler_type not in ALBEF_LR_SCHEDULES:
            return super().create_scheduler(num_training_steps, optimizer)
        if self.lr_scheduler is None:
            args = self.args
            schedule = dict(
                peak_lr=args.learning_rate,
                warmup_steps=args.get_warmup_steps(num_training_steps),
                warmup_start_lr=args.resolved_warmup_start_lr,
                min_lr=args.resolved_min_lr,
            )
            if args.lr_scheduler_type == "albef_cosine":
                lr_at = partial(albef_cosine_lr, total_steps=num_training_steps, **schedule)
            else:
                if self._steps_per_epoch is None:
                    raise ValueError(
                        "albef_epoch_cosine needs training data with a length (it is stepped per epoch)"
                    )
                num_epochs = math.ceil(num_training_steps / self._steps_per_epoch)
                lr_at = partial(
                    albef_epoch_cosine_lr,
                    steps_per_epoch=self._steps_per_epoch,
                    num_epochs=num_epochs,
                    **schedule,
                )
            optimizer = optimizer if optimizer is not None else self.optimizer
            self.lr_scheduler = LambdaLR(
                optimizer, partial(_relative_lr, lr_at=lr_at, peak_lr=args.learning_rate)
            )
            self._created_lr_scheduler = True
        return self.lr_scheduler

    def current_alpha(self) -> float:
        """Distillation weight at this optimizer step: `alpha * min(1, step / alpha_warmup_steps)`."""
        if not self.args.distill:
            return 0.0
        ramp = self._alpha_warmup_steps
        if not ramp:
            return self.args.alpha
        return self.args.alpha * min(1.0, self.state.global_step / ramp)

    # -- the step ------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        """The ALBEF loss of a batch, with the momentum teacher, the queues and `alpha`.

        In training mode this also moves the EMA (at the first micro-batch of each optimizer step, before the
        teacher runs), clamps the temperature, and enqueues the teacher features of all processes. The task heads
        use their teacher in training only (their evaluation loss is the student's plain loss); a model without a
        teacher (text assignment, `distill=False`, or before `train()`) computes its plain loss.
        """
        training = model.training
        if self.teacher is None or not (training or self.contrastive):
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss
        student = self.student
        inputs = dict(inputs)
        if training:
            if self._ema_step != self.state.global_step:
                self.teacher.update(student)
                self._ema_step = self.state.global_step
            if self.args.clamp_temp and self.contrastive:
                with torch.no_grad():
                    student.temp.clamp_(student.config.temp_min, student.config.temp_max)
        if (
            isinstance(student, AlbefForPreTraining)
            and student.config.mlm_weight > 0
            and inputs.get("mlm_input_ids") is None
        ):
            # teacher and student must see the same masks
            inputs["mlm_input_ids"], inputs["mlm_labels"] = student.draw_mlm_masks(inputs["input_ids"])
        self.teacher.train(training)
        with self.accelerator.autocast():
            teacher_outputs = self.teacher(**inputs)
        queue_inputs = {}
        if self.queues is not None:
            queue_inputs = {"image_queue": self.queues.image, "text_queue": self.queues.text}
            if inputs.get("idx") is not None:
                queue_inputs["idx_queue"] = self.queues.idx
        outputs = model(**inputs, teacher_outputs=teacher_outputs, alpha=self.current_alpha(), **queue_inputs)
        if training and self.queues is not None:
            self.queues.enqueue(teacher_outputs.image_feat, teacher_outputs.text_feat, inputs.get("idx"))
        if training:
            self._track_losses(outputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def _track_losses(self, outputs: Any) -> None:
        for name in _LOSS_FIELDS:
            value = getattr(outputs, name, None)
            if value is not None:
                value = value.detach().float()
                self._loss_sums[name] = self._loss_sums[name] + value if name in self._loss_sums else value
        self._loss_count += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean ITC/ITM/MLM losses since the last log, alpha, the temperature and skipped samples."""
        if "loss" in logs:
            if self._loss_count:
                for name, total in self._loss_sums.items():
                    logs[name] = round(float(total) / self._loss_count, 4)
                self._loss_sums, self._loss_count = {}, 0
            if self.teacher is not None:
                logs["alpha"] = round(self.current_alpha(), 4)
            if self.contrastive:
                logs["temp"] = round(float(self.student.temp.detach()), 5)
            stats = getattr(self.train_dataset, "skip_stats", None)
            if stats is not None and stats.total:
                logs.update(
                    {f"skipped_{reason}": count for reason, count in stats.as_dict().items() if count}
                )
            collator_skips = getattr(self.data_collator, "num_skipped", 0)
            if collator_skips:
                logs["collator_replaced_samples"] = collator_skips
        super().log(logs, start_time)

    # -- checkpoints ---------------------------------------------------------------------------------

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Transformers' checkpoint, written under `_incomplete_checkpoints/` and renamed to `checkpoint-N`
        once every process has written its part and the manifest is written last.

        A run killed at any moment thus leaves complete `checkpoint-N` folders and at most one incomplete one
        outside them, which `resume_from_checkpoint=True` cannot pick up and the next `train()` deletes.
        """
        run_dir = self._get_output_dir(trial)
        staging_root = os.path.join(run_dir, INCOMPLETE_CHECKPOINTS_DIR)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)
        self.accelerator.wait_for_everyone()  # no process writes into `staged` before it is emptied
        self._staging_root, self._push_pending = staging_root, False
        try:
            super()._save_checkpoint(model, trial)  # into `staged`: its run folder is `staging_root`
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its part (RNG state, shards)
        if self.args.should_save:
            self._complete_checkpoint(staged, final, run_dir)
            rotate_checkpoints(
                run_dir, self.args.save_total_limit, self.state.best_model_checkpoint, use_mtime=True
            )
        self.accelerator.wait_for_everyone()  # `checkpoint-N` exists for every process from here on
        if self._push_pending:
            self._push_pending = False
            super()._push_from_checkpoint(final)

    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_root if self._staging_root is not None else super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._staging_root is not None:
            # pushed from `checkpoint-N` once it is complete: the upload runs in the background
            self._push_pending = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _complete_checkpoint(self, staged: str, final: str, run_dir: str) -> None:
        """Write the manifest of `staged`, flush it to disk and rename it to `final`."""
        state = self.state
        if state.best_global_step:
            # transformers looked for the best checkpoint in the staging folder: point at the published one
            best = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.best_global_step}")
            if state.best_global_step == state.global_step or os.path.isdir(best):
                state.best_model_checkpoint = best
            state.save_to_json(os.path.join(staged, TRAINER_STATE_NAME))
        files = {
            os.path.relpath(os.path.join(folder, name), staged).replace(os.sep, "/"): os.path.getsize(
                os.path.join(folder, name)
            )
            for folder, _, names in os.walk(staged)
            for name in names
        }
        with open(os.path.join(staged, CHECKPOINT_MANIFEST_NAME), "w", encoding="utf-8") as file:
            json.dump({"files": files, "run": self._resume_settings()}, file, indent=1, sort_keys=True)
        _fsync_tree(staged)
        if os.path.isdir(final):
            # a run resumed from an earlier checkpoint saves this step again: swap the old one out whole
            replaced = f"{staged}.replaced"
            os.rename(final, replaced)
            os.rename(staged, final)
            shutil.rmtree(replaced)
        else:
            os.rename(staged, final)
        staging_root = os.path.dirname(staged)
        if not os.listdir(staging_root):
            os.rmdir(staging_root)
        _fsync_dir(run_dir)

    def _discard_incomplete_checkpoints(self) -> None:
        """Delete, with a warning, what a killed run left of the checkpoint it was writing."""
        root = os.path.join(self.args.output_dir, INCOMPLETE_CHECKPOINTS_DIR)
        if not self.args.should_save or not os.path.isdir(root):
            return
        for name in sorted(os.listdir(root)):
            logger.warning(
                "deleting %s, a checkpoint left incomplete by a killed run", os.path.join(root, name)
            )
        shutil.rmtree(root)

    def _resume_settings(self) -> dict[str, int]:
        """The settings that a resumed run must share with the run that wrote the checkpoint: they decide the
        data order, the global batch and what the queues hold."""
        args = self.args
        settings = {
            "world_size": args.world_size,
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
        }
        if self.contrastive:
            settings["queue_size"] = args.queue_size
        return settings

    def _check_resume(self, checkpoint: str) -> None:
        """Refuse to resume from a damaged checkpoint, or with settings under which the results would silently
        differ from the run that wrote it."""
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ValueError(f"cannot resume from {checkpoint}: {problem}")
        saved = (_read_manifest(checkpoint) or {}).get("run", {})
        differences = [
            f"{key}: {saved[key]!r} -> {value!r}"
            for key, value in self._resume_settings().items()
            if key in saved and saved[key] != value
        ]
        if os.path.isfile(os.path.join(checkpoint, "config.json")):
            config = self.student.config
            saved_config = json.loads(type(config).from_pretrained(checkpoint).to_json_string(use_diff=False))
            current = json.loads(config.to_json_string(use_diff=False))
            differences += [f"config {item}" for item in _differences(saved_config, current)]
        if differences:
            raise ValueError(
                f"cannot resume from {checkpoint}: this run differs from the one that wrote it "
                f"({'; '.join(differences)}); resume with the same settings, or start a new run from its "
                "weights (from_pretrained)"
            )

    # The teacher and the queues travel with the optimizer state: transformers saves and restores that for every
    # backend (DDP, FSDP, DeepSpeed), once per full checkpoint, after the model weights are in place.
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.args.should_save and self.teacher is not None:
            # written before the rest, so that a checkpoint pushed to the Hub or rotated includes it
            save_momentum_state(os.path.join(output_dir, MOMENTUM_STATE_NAME), self.teacher, self.queues)
        super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.teacher is None:
            return
        path = os.path.join(checkpoint, MOMENTUM_STATE_NAME)
        if os.path.isfile(path):
            load_momentum_state(path, self.teacher, self.queues, self.student)
        else:
            logger.warning(
                "%s has no %s: the teacher restarts as a copy of the student", checkpoint, MOMENTUM_STATE_NAME
            )
            self.teacher.copy_from(self.student)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the student (no teacher, no queues), the processor and a model card."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            save_model_card(self._model_card(), output_dir or self.args.output_dir)

    def create_model_card(self, model_name: str | None = None, **kwargs: Any) -> None:
        """Write the ALBEF model card (used by `push_to_hub`)."""
        if self.is_world_process_zero():
            save_model_card(self._model_card(model_name), self.args.output_dir)

    def _model_card(self, model_name: str | None = None) -> Any:
        args, student = self.args, self.student
        task = "grounding" if self._grounding else task_for_model_class(type(student).__name__)
        if self.teacher is None and not self.contrastive:
            distillation = "off" + (" (not distilled, as the original)" if args.distill else "")
        else:
            distillation = f"momentum {args.momentum:g}, alpha {args.alpha:g}" if args.distill else "off"
        training = {
            "trainer": "albef_hf.AlbefTrainer",
            "objectives": next(text for cls, text in _OBJECTIVES.items() if isinstance(student, cls)),
            "optimizer steps": self.state.global_step,
            "epochs": round(self.state.epoch or 0.0, 2),
            "global batch size": args.per_device_train_batch_size
            * args.world_size
            * args.gradient_accumulation_steps,
            "learning rate": f"{args.learning_rate:g} ({args.lr_scheduler_type})",
            "weight decay": f"{args.weight_decay:g} (1-D parameters and biases exempt)",
            "momentum distillation": distillation,
            "queue size": args.queue_size if self.contrastive else "none (no ITC)",
            "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        }
        metrics = {
            key.split("_", 1)[1]: value
            for key, value in self._last_eval_metrics.items()
            if _card_metric(key.split("_", 1)[-1])
        }
        info = AlbefCardInfo(
            model_name=model_name or args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir)),
            task=task,
            model_class=type(student).__name__,
            training=training,
            metrics=metrics,
            dataset_split="eval" if metrics else None,
        )
        return build_model_card(info)

    # -- evaluation ----------------------------------------------------------------------------------

    @property
    def _grounding(self) -> bool:
        """Whether this run evaluates grounding (its model card then says so)."""
        data = self.eval_dataset
        sets = data.values() if isinstance(data, dict) else [data]
        return any(isinstance(item, GroundingEvalSet) for item in sets)

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        """The evaluation of the student's task, split across processes.

        - `AlbefForPreTraining` / `AlbefForImageTextRetrieval`: retrieval as the original (TR/IR recall@1/5/10
          and means) on a `RetrievalEvalSet`-like object or reader samples; box accuracy by Grad-CAM on a
          `GroundingEvalSet` (`gradcam_mode`, `gradcam_layer`).
        - `AlbefForQuestionAnswering`: VQA score on a `VqaEvalSet` (answer-list ranking with `vqa_k`, or
          generation with `vqa_generate`); plain samples are answered by generation.
        - `AlbefForVisualReasoning` / `AlbefForVisualEntailment`: transformers' evaluation loop over samples
          (batches from the collator's `for_evaluation()` copy), `accuracy` by `compute_metrics`.

        Args:
            eval_dataset: default `self.eval_dataset`; a dict evaluates each under `{metric_key_prefix}_{name}`.
            ignore_keys: for the classifiers' evaluation loop (default: every output but the logits).
            metric_key_prefix: prefix of the metric names.

        Returns:
            `{prefix}_{metric}` in percent (`txt_r1`, ..., `r_mean`; `box_accuracy`; `vqa_score` and
            `vqa_score_<question type>`; `accuracy`), and `{prefix}_runtime`.
        """
        dataset = eval_dataset if eval_dataset is not None else self.eval_dataset
        if dataset is None:
            raise ValueError("evaluation needs an eval_dataset (see AlbefTrainer.evaluate for its kinds)")
        if isinstance(dataset, dict):
            metrics = {}
            for name, data in dataset.items():
                metrics.update(self.evaluate(data, ignore_keys, f"{metric_key_prefix}_{name}"))
            return metrics
        student = self.student
        if isinstance(student, AlbefForTextAssignment):
            raise ValueError(
                "the text-assignment step has no evaluation: fine-tune AlbefForVisualReasoning after it"
            )
        if isinstance(student, _CLASSIFIERS):
            metrics = super().evaluate(
                dataset, ignore_keys if ignore_keys is not None else _NON_LOGIT_FIELDS, metric_key_prefix
            )
            self._last_eval_metrics = metrics
            return metrics
        if self.processing_class is None:
            raise ValueError("evaluation needs the AlbefProcessor as processing_class")
        self._memory_tracker.start()
        start = time.time()
        with self.accelerator.autocast():
            if isinstance(dataset, GroundingEvalSet) or isinstance(student, AlbefForQuestionAnswering):
                results = self._task_predictions(dataset)[1]
            else:
                results = self._retrieval_metrics(dataset)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in results.items()}
        metrics.update(speed_metrics(metric_key_prefix, start))
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        self._memory_tracker.stop_and_update_metrics(metrics)
        self._last_eval_metrics = metrics
        return metrics

    def predict(
        self, test_dataset: Any, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"
    ) -> PredictionOutput:
        """Predictions of the student's task.

        For VQA (a `VqaEvalSet`, or samples: generation) and grounding (a `GroundingEvalSet`), `predictions` is a
        list with one dict per sample (VQA: `answer`, `top_answers` with probabilities, `question_id`; grounding:
        the chosen `box`, its `candidate` index, `iou`, `correct`), and `metrics` scores them where the samples
        have answers / boxes. Other models: `Trainer.predict`.
        """
        if not (
            isinstance(test_dataset, GroundingEvalSet) or isinstance(self.student, AlbefForQuestionAnswering)
        ):
            if ignore_keys is None and isinstance(self.student, _CLASSIFIERS):
                ignore_keys = _NON_LOGIT_FIELDS
            return super().predict(test_dataset, ignore_keys, metric_key_prefix)
        start = time.time()
        with self.accelerator.autocast():
            predictions, results = self._task_predictions(test_dataset)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in results.items()}
        metrics.update(speed_metrics(metric_key_prefix, start))
        self.control = self.callback_handler.on_predict(self.args, self.state, self.control, metrics)
        return PredictionOutput(predictions=predictions, label_ids=None, metrics=metrics)

    def evaluate_and_predict(self, dataset: Any) -> PredictionOutput:
        """`predict` on a labelled set whose metrics also count as its evaluation: one pass instead of
        `evaluate` + `predict`. The metrics carry the "eval" prefix, are logged and reach the model card."""
        output = self.predict(dataset, metric_key_prefix="eval")
        self.log(output.metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, output.metrics)
        self._last_eval_metrics = output.metrics
        return output

    def _task_predictions(self, dataset: Any) -> tuple[list[dict[str, Any]], dict[str, float]]:
        """VQA or grounding predictions for `dataset` and their metrics."""
        args, student = self.args, self.student
        common = dict(batch_size=args.per_device_eval_batch_size, device=args.device)
        if isinstance(dataset, GroundingEvalSet):
            predictions = predict_grounding(
                student, self.processing_class, dataset, args.gradcam_mode, args.gradcam_layer, **common
            )
            return predictions, grounding_metrics(predictions)
        if not isinstance(dataset, VqaEvalSet):
            dataset = VqaEvalSet(dataset)
        predictions = predict_vqa(
            student,
            self.processing_class,
            dataset,
            k=args.vqa_k,
            top_k=args.vqa_top_k,
            generate=args.vqa_generate,
            generate_kwargs={"num_beams": args.vqa_num_beams, "max_new_tokens": args.vqa_max_new_tokens},
            **common,
        )
        return predictions, vqa_metrics(predictions)

    def _retrieval_metrics(self, dataset: Any) -> dict[str, float]:
        # keyed by id() but holding the dataset too, so a new dataset that reuses a freed id is not mistaken
        cached = self._eval_sets.get(id(dataset))
        if cached is None or cached[0] is not dataset:
            cached = self._eval_sets[id(dataset)] = (dataset, retrieval_eval_set_from_samples(dataset))
        eval_set = cached[1]
        scores_i2t, scores_t2i = compute_retrieval_scores(
            self.student,
            self.processing_class,
            eval_set,
            k=self.args.retrieval_k,
            batch_size=self.args.per_device_eval_batch_size,
            device=self.args.device,
        )
        return itm_eval(scores_i2t.numpy(), scores_t2i.numpy(), eval_set.txt2img, eval_set.img2txt)

    def _get_dataloader(self, dataset: Any, description: str, batch_size: int, *args: Any, **kwargs: Any):
        """Evaluation and prediction batches come from the collator's `for_evaluation()` copy (no training
        transform), and none is dropped (`dataloader_drop_last` is for the queues of training)."""
        if kwargs.get("is_training", False):
            return super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)
        training_collator, drop_last = self.data_collator, self.args.dataloader_drop_last
        for_evaluation = getattr(training_collator, "for_evaluation", None)
        try:
            self.data_collator = for_evaluation() if callable(for_evaluation) else training_collator
            self.args.dataloader_drop_last = False
            return super()._get_dataloader(dataset, description, batch_size, *args, **kwargs)
        finally:
            self.data_collator, self.args.dataloader_drop_last = training_collator, drop_last


def _card_metric(name: str) -> bool:
    retrieval = ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean")
    return name in retrieval or name.startswith(("accuracy", "vqa_score", "box_accuracy"))


def _has_unused_parameters(model: nn.Module) -> bool:
    """Whether some parameter gets no gradient in a training step (DDP must then look for unused ones)."""
    if isinstance(model, AlbefForTextAssignment):
        return True  # vision_proj only draws the image pairs, without gradient
    if not _contrastive(model):
        return False
    config = model.config
    weights = [config.itc_weight, config.itm_weight]
    if isinstance(model, AlbefForPreTraining):
        weights.append(config.mlm_weight)
    return min(weights) == 0  # a switched-off objective leaves its head without grads


def _relative_lr(step: int, lr_at: Any, peak_lr: float) -> float:
    return lr_at(step) / peak_lr


def _fill_collator_defaults(collator: Any, args: AlbefTrainingArguments, config: Any) -> None:
    """Give the collator the run's data seed, the model's vocabulary size and MLM probability where unset."""
    if getattr(collator, "seed", 0) is None:
        collator.seed = args.data_seed if args.data_seed is not None else args.seed
    if hasattr(collator, "vocab_size") and collator.vocab_size is None:
        collator.vocab_size = config.text_config.vocab_size
    if hasattr(collator, "mlm_probability") and collator.mlm_probability is None:
        collator.mlm_probability = config.mlm_probability
