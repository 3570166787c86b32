"""Momentum distillation state kept outside the model: the EMA teacher and the feature queues.

ALBEF's ITC compares each student feature with the momentum (teacher) features of the batch followed by
queues of teacher features from earlier batches, and distils the teacher's similarity (and MLM)
distributions into the student. The models stay pure: `MomentumTeacher` and `FeatureQueues` hold that
state, a trainer passes it into the model's loss (see `AlbefTrainer`).

Both are saved together in one safetensors file, `momentum_state.safetensors`:

- `teacher.<name>` for every tensor of the teacher, `<name>` exactly as in the student's `state_dict()`;
- `image_queue`, `text_queue`: `(queue_size, embed_dim)` float features, one row per queued sample
  (the original stores the transpose);
- `idx_queue`: `(queue_size,)` int64 image ids, -100 for slots without an id (optional);
- `queue_ptr`: 0-dim int64, the next row to write.

The converter writes the same file for an original pretraining checkpoint, so that continued pretraining
starts from its momentum encoders and queues.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .modeling_albef import AlbefTeacherOutput, interpolate_pos_embed

__all__ = [
    "MOMENTUM_STATE_NAME",
    "FeatureQueues",
    "MomentumTeacher",
    "all_gather_concat",
    "check_queue_size",
    "load_momentum_state",
    "save_momentum_state",
]

logger = logging.getLogger(__name__)

MOMENTUM_STATE_NAME = "momentum_state.safetensors"
TEACHER_PREFIX = "teacher."
# Tensors per fused EMA kernel call: bounds the temporary copy of the scaled student weights.
_EMA_CHUNK = 64


def all_gather_concat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every process along dim 0, in rank order (no gradient).

    A no-op without an initialised process group or with one process, so single-device training never
    needs torch.distributed (the original crashes there). Every process must pass the same shape.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered)


def check_queue_size(queue_size: int, global_batch_size: int) -> None:
    """Raise a `ValueError` unless `global_batch_size` divides `queue_size` (as the original requires)."""
    if global_batch_size <= 0 or queue_size % global_batch_size:
        raise ValueError(
            f"queue_size ({queue_size}) must be a multiple of the global batch size "
            f"(per-device batch x processes = {global_batch_size}), so that every write fills whole rows "
            "without wrapping; change --queue_size or the batch size"
        )


class MomentumTeacher:
    """An exponential moving average (EMA) copy of a student model, used as ALBEF's momentum teacher.

    The copy never requires grad and is not a submodule of the student, so no optimizer or DDP wrapper ever
    sees it. `update` applies `teacher = momentum * teacher + (1 - momentum) * student` to every parameter,
    computed as the original does (two rounded products, then their sum), so the result is bit-identical.

    Args:
        student: the model being trained (`AlbefForPreTraining` or `AlbefForImageTextRetrieval`), unwrapped.
        momentum: EMA coefficient `m` (0.995 in ALBEF).

    Example:
        >>> teacher = MomentumTeacher(model, momentum=0.995)
        >>> outputs = teacher(pixel_values=..., input_ids=..., attention_mask=...)
        >>> teacher.update(model)  # once per optimizer step
    """

    def __init__(self, student: nn.Module, momentum: float = 0.995) -> None:
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        if not hasattr(student, "compute_teacher_outputs"):
            raise TypeError(
                f"{type(student).__name__} has no `compute_teacher_outputs`; a momentum teacher needs an ALBEF "
                "model with a contrastive loss (AlbefForPreTraining or AlbefForImageTextRetrieval)"
            )
        self.momentum = momentum
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        if self.model.is_activation_checkpointing:
            # the teacher runs without grad: checkpointing would only cost a recomputation
            self.model.activation_checkpointing_disable()

    def parameters(self) -> Iterable[torch.Tensor]:
        """The teacher's parameters (they never require grad)."""
        return self.model.parameters()

    def _paired_parameters(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        teacher_params, student_params = [], []
        student_named = dict(student.named_parameters())
        for name, param in self.model.named_parameters():
            if name not in student_named:
                raise ValueError(f"the student has no parameter {name!r}; was the teacher built from it?")
            teacher_params.append(param.data)
            student_params.append(student_named[name].data.to(param.dtype))
        return teacher_params, student_params

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards `student`'s current parameters (buffers are not averaged)."""
        m = self.momentum
        teacher_params, student_params = self._paired_parameters(student)
        for start in range(0, len(teacher_params), _EMA_CHUNK):
            teachers = teacher_params[start : start + _EMA_CHUNK]
            scaled = torch._foreach_mul(student_params[start : start + _EMA_CHUNK], 1.0 - m)
            torch._foreach_mul_(teachers, m)
            torch._foreach_add_(teachers, scaled)

    @torch.no_grad()
    def copy_from(self, student: nn.Module, names: Iterable[str] | None = None) -> None:
        """Set teacher tensors (all, or those in `names`) to the student's values."""
        student_state = student.state_dict()
        wanted = set(names) if names is not None else None
        for name, tensor in self.model.state_dict().items():
            if wanted is None or name in wanted:
                tensor.copy_(student_state[name])

    def __call__(self, **inputs) -> AlbefTeacherOutput:
        """Teacher outputs for a batch: `compute_teacher_outputs` of the EMA model (no grad)."""
        return self.model.compute_teacher_outputs(**inputs)

    def train(self, mode: bool = True) -> MomentumTeacher:
        """Set the teacher's train/eval mode (the original runs its momentum encoders in train mode, dropout on)."""
        self.model.train(mode)
        return self

    def to(self, *args, **kwargs) -> MomentumTeacher:
        self.model.to(*args, **kwargs)
        return self

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`{"teacher.<name>": tensor}` for every tensor of the teacher's `state_dict()`."""
        return {TEACHER_PREFIX + name: tensor for name, tensor in self.model.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(
        self, tensors: dict[str, torch.Tensor], student: nn.Module | None = None
    ) -> list[str]:
        """Load `teacher.<name>` tensors; return the names that were missing.

        Missing teacher tensors (the original has no momentum ITM head, for example) are copied from `student`
        when it is given, and logged. Position embeddings of another resolution are interpolated (bicubic,
        class token kept), as the original does when it loads a checkpoint at a new image size. Other keys
        (queues, or teacher tensors this model does not have, such as an MLM head when fine-tuning for
        retrieval) are ignored.
        """
        own = self.model.state_dict()
        missing = []
        for name, target in own.items():
            source = tensors.get(TEACHER_PREFIX + name)
            if source is None:
                missing.append(name)
                continue
            if name.endswith("pos_embed") and source.shape != target.shape and source.dim() == 3:
                source = interpolate_pos_embed(source, target.shape[1] - 1)
            if source.shape != target.shape:
                raise ValueError(
                    f"momentum state: teacher.{name} has shape {tuple(source.shape)}, the model expects "
                    f"{tuple(target.shape)}"
                )
            target.copy_(source)
        unused = sorted(
            key[len(TEACHER_PREFIX) :]
            for key in tensors
            if key.startswith(TEACHER_PREFIX) and key[len(TEACHER_PREFIX) :] not in own
        )
        if unused:
            logger.info(
                "momentum state: ignored %d teacher tensors this model lacks, e.g. %s",
                len(unused),
                unused[:3],
            )
        if missing:
            if student is None:
                raise ValueError(f"momentum state lacks {len(missing)} teacher tensors, e.g. {missing[:3]}")
            self.copy_from(student, missing)
            logger.warning(
                "momentum state lacks %d teacher tensors (e.g. %s); initialised them from the student",
                len(missing),
                missing[:3],
            )
        return missing


class FeatureQueues:
    """ALBEF's queues of momentum image and text features (and image ids), written as a ring buffer.

    Rows are features (`(queue_size, embed_dim)`); the original stores the transpose. They start as
    L2-normalised Gaussian vectors (drawn like the original's, in its `(embed_dim, queue_size)` layout) and
    `idx` starts at -100. `enqueue` writes the features of all processes at the pointer.

    Args:
        queue_size: rows per queue (65,536 in ALBEF). The global batch (per-device batch x processes) must
            divide it; `check_queue_size` says so before training starts.
        embed_dim: feature size.
        device: where the queues live (the model's device).
        generator: optional `torch.Generator` for the initial random features.
        gather: function concatenating a tensor from all processes (default `all_gather_concat`).
    """

    def __init__(
        self,
        queue_size: int,
        embed_dim: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        gather: Callable[[torch.Tensor], torch.Tensor] = all_gather_concat,
    ) -> None:
        if queue_size <= 0 or embed_dim <= 0:
            raise ValueError(f"queue_size and embed_dim must be positive, got {queue_size} and {embed_dim}")
        self.queue_size = queue_size
        self.embed_dim = embed_dim
        self.gather = gather
        self.image = F.normalize(
            torch.randn(embed_dim, queue_size, generator=generator), dim=0
        ).T.contiguous()
        self.text = F.normalize(torch.randn(embed_dim, queue_size, generator=generator), dim=0).T.contiguous()
        self.idx = torch.full((queue_size,), -100, dtype=torch.long)
        self.ptr = 0
        self.to(device)

    def to(self, device: torch.device | str | None) -> FeatureQueues:
        if device is not None:
            self.image, self.text, self.idx = (t.to(device) for t in (self.image, self.text, self.idx))
        return self

    @torch.no_grad()
    def enqueue(
        self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor | None = None
    ) -> None:
        """Write this step's teacher features (gathered from all processes, in rank order) at the pointer.

        Args:
            image_feat, text_feat: `(batch, embed_dim)` teacher features of this process's batch.
            idx: optional `(batch,)` image ids; slots written without ids get -100.
        """
        image = self.gather(image_feat.detach().to(self.image.dtype))
        text = self.gather(text_feat.detach().to(self.text.dtype))
        if idx is None:
            ids = torch.full((image.shape[0],), -100, dtype=torch.long, device=image.device)
        else:
            ids = self.gather(idx.detach().view(-1).to(device=image.device, dtype=torch.long))
        count = image.shape[0]
        if count > self.queue_size:
            raise ValueError(f"cannot enqueue {count} features into a queue of {self.queue_size}")
        rows = (self.ptr + torch.arange(count, device=self.image.device)) % self.queue_size
        self.image.index_copy_(0, rows, image.to(self.image.device))
        self.text.index_copy_(0, rows, text.to(self.text.device))
        self.idx.index_copy_(0, rows, ids.to(self.idx.device))
        self.ptr = (self.ptr + count) % self.queue_size

    def state_dict(self) -> dict[str, torch.Tensor]:
        """`image_queue`, `text_queue`, `idx_queue` and the 0-dim `queue_ptr`."""
        return {
            "image_queue": self.image,
            "text_queue": self.text,
            "idx_queue": self.idx,
            "queue_ptr": torch.tensor(self.ptr, dtype=torch.long),
        }

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Load the queues; a missing `idx_queue` (pretraining checkpoints) leaves every id at -100."""
        for key in ("image_queue", "text_queue", "queue_ptr"):
            if key not in tensors:
                raise ValueError(f"momentum state has no {key!r}")
        image, text = tensors["image_queue"], tensors["text_queue"]
        if image.shape != self.image.shape or text.shape != self.text.shape:
            raise ValueError(
                f"momentum state holds queues of shape {tuple(image.shape)}, this run uses "
                f"{tuple(self.image.shape)} (queue_size, embed_dim); set queue_size to {image.shape[0]}"
            )
        self.image.copy_(image)
        self.text.copy_(text)
        if "idx_queue" in tensors:
            self.idx.copy_(tensors["idx_queue"].view(-1))
        else:
            self.idx.fill_(-100)
        self.ptr = int(tensors["queue_ptr"]) % self.queue_size


def save_momentum_state(
    path: str | os.PathLike, teacher: MomentumTeacher | None = None, queues: FeatureQueues | None = None
) -> None:
    """Write the teacher and/or the queues to one safetensors file (see the module docstring for the keys)."""
    tensors: dict[str, torch.Tensor] = {}
    if teacher is not None:
        tensors.update(teacher.state_dict())
    if queues is not None:
        tensors.update(queues.state_dict())
    seen: set[int] = set()
    for key, tensor in tensors.items():
        tensor = tensor.detach()
        # safetensors refuses tensors sharing memory: store a copy of any repeat
        if tensor.numel() and tensor.data_ptr() in seen:
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[key] = tensor.contiguous().cpu()
    metadata = {"format": "pt", "momentum": str(teacher.momentum) if teacher is not None else ""}
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_momentum_state(
    path: str | os.PathLike,
    teacher: MomentumTeacher | None = None,
    queues: FeatureQueues | None = None,
    student: nn.Module | None = None,
) -> None:
    """Restore the teacher and/or the queues from a momentum state file.

    Args:
        path: a `momentum_state.safetensors` (from a Trainer checkpoint or the converter).
        teacher: loaded from the `teacher.*` tensors; missing ones are copied from `student` and logged.
        queues: loaded from the queue tensors, when the file has them (else kept, with a warning).
        student: the model being trained, the source of missing teacher tensors.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"momentum state file {os.fspath(path)!r} does not exist")
    tensors = load_file(os.fspath(path))
    if teacher is not None:
        teacher.load_state_dict(tensors, student)
    if queues is not None:
        if "image_queue" in tensors:
            queues.load_state_dict(tensors)
        else:
            logger.warning("%s has no feature queues; keeping freshly initialised ones", os.fspath(path))
