"""Convert the original ALBEF checkpoints (salesforce/ALBEF `.pth` files) into albef-hf model folders.

The conversion is a renaming plus checks, never a guess: every key of the checkpoint is either mapped onto a
weight of the target model (or of its momentum teacher), checked and dropped (a tied copy, a constant buffer),
left out by a rule of the target task (the MLM head for zero-shot retrieval from a pretraining checkpoint), or
named in an error; every weight of the target model must receive a tensor of its exact shape. Sizes are read from the tensors; what
the tensors cannot tell (attention heads, activation, epsilons, dropout) comes from an original config file
or the ALBEF-base defaults.

Typical use::

    from albef_hf.conversion import convert_original_checkpoint

    result = convert_original_checkpoint("ALBEF.pth", "albef-base-14m", tokenizer="bert-base-uncased/")
    result.model  # an AlbefForPreTraining holding the converted weights

`convert/convert_albef_original_to_hf.py` is the command-line front end of `main`.

The momentum encoders and feature queues of a checkpoint are not model weights: they are written to
`momentum_state.safetensors` (`teacher.<name>` with the student's parameter names, `image_queue` and
`text_queue` as `(queue_size, embed_dim)`, `idx_queue` `(queue_size,)`, `queue_ptr` 0-dim), which
`AlbefTrainer` resumes from.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from .image_processing_albef import AlbefImageProcessor
from .modelcard import AlbefCardInfo, build_model_card, save_model_card
from .modeling_albef import interpolate_pos_embed
from .processing_albef import AlbefProcessor

__all__ = [
    "MOMENTUM_STATE_FILE",
    "TASKS",
    "CheckpointError",
    "ConversionResult",
    "ConvertedState",
    "OriginalCheckpoint",
    "convert_original_checkpoint",
    "convert_state_dict",
    "detect_layout",
    "files_to_push",
    "infer_config",
    "load_original_checkpoint",
    "main",
    "map_original_key",
    "original_name",
    "push_to_hub_folder",
    "read_original_config",
]

MOMENTUM_STATE_FILE = "momentum_state.safetensors"

# Tasks a checkpoint can be converted for; "auto" reads it from the keys.
TASKS = ("pretrain", "retrieval", "vqa", "nlvr", "nlvr_ta", "ve", "grounding")

# Which target tasks each source layout can be converted to. A pretraining checkpoint also serves zero-shot
# retrieval and grounding (the original fine-tuning scripts start from it): the MLM head is then dropped.
_COMPATIBLE_TASKS = {
    "pretrain": ("pretrain", "retrieval", "grounding"),
    "retrieval": ("retrieval", "grounding"),
    "vqa": ("vqa",),
    "nlvr": ("nlvr",),
    "nlvr_ta": ("nlvr_ta",),
    "ve": ("ve",),
}

# The albef_hf class that holds each task's weights (looked up by name: the downstream classes are optional).
_MODEL_CLASSES = {
    "pretrain": "AlbefForPreTraining",
    "retrieval": "AlbefForImageTextRetrieval",
    "grounding": "AlbefForImageTextRetrieval",
    "vqa": "AlbefForQuestionAnswering",
    "nlvr": "AlbefForVisualReasoning",
    "nlvr_ta": "AlbefForTextAssignment",
    "ve": "AlbefForVisualEntailment",
}

# Model-card task names (albef_hf.modelcard.TASKS).
_CARD_TASKS = {
    "pretrain": "pretraining",
    "retrieval": "retrieval",
    "grounding": "grounding",
    "vqa": "vqa",
    "nlvr": "nlvr",
    "nlvr_ta": "nlvr",
    "ve": "ve",
}

# Longest text the original feeds each task: pretraining truncates at 25 tokens, retrieval at 30; the other
# tasks pad to the longest text without truncating (their texts are cut at 30 words, VQA questions at 50).
_MAX_TEXT_LENGTH = {"pretrain": 25, "retrieval": 30, "grounding": 30}
_MAX_WORDS = {"vqa": 50}

_QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")

# Teacher weights the original never had: no momentum ITM head, no momentum temperature (the teacher uses
# the student's). The Trainer fills these from the student.
_TEACHER_OPTIONAL = ("itm_head.", "temp")


class CheckpointError(ValueError):
    """A checkpoint that cannot be converted: unreadable, unsafe, of an unknown layout, or with keys that do not
    match the model it describes. The message names the file or the keys."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


@dataclass
class OriginalCheckpoint:
    """The tensors of an original ALBEF checkpoint.

    Args:
        state_dict: the model's state dict (the `"model"` entry of a training checkpoint, or the file itself).
        path: the file it was read from.
        sha256: hex digest of the file, for the model card.
    """

    state_dict: dict[str, torch.Tensor]
    path: str
    sha256: str


def load_original_checkpoint(path: str | os.PathLike) -> OriginalCheckpoint:
    """Read an original ALBEF checkpoint safely.

    The file is untrusted input: it is unpickled with `weights_only=True`, which refuses any object that would
    run code. Both `{"model": state_dict, ...}` (what the original training scripts save; the optimizer and
    other entries are ignored) and a bare state dict are accepted.

    Raises:
        CheckpointError: the file is missing, is not a PyTorch checkpoint, holds objects that would run code,
            holds no state dict of tensors, or NaN or infinite values.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist or is not a file")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for such files
        reason = _unpickler_reason(error)
        if "Unsupported global" in reason:
            raise CheckpointError(
                f"refusing to load {path!r}: it contains pickled objects other than tensors and plain "
                "containers, and unpickling them could run arbitrary code. An original ALBEF checkpoint holds "
                f"only tensors; this file is not one, or has been tampered with. (torch: {reason})"
            ) from error
        raise CheckpointError(
            f"{path!r} is not a PyTorch checkpoint that can be loaded safely ({reason})"
        ) from error
    state_dict = _find_state_dict(loaded, path)
    return OriginalCheckpoint(state_dict=state_dict, path=path, sha256=_sha256(path))


def _find_state_dict(loaded: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping):
        loaded = loaded["model"]
    if not isinstance(loaded, Mapping) or not loaded:
        raise CheckpointError(
            f"{path!r} holds no state dict: expected {{'model': state_dict}} or a state dict, "
            f"got {type(loaded).__name__}"
        )
    not_tensors = sorted(str(key) for key, value in loaded.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise CheckpointError(
            f"{path!r} is not a state dict: these entries are not tensors: {_names(not_tensors)}"
        )
    not_finite = sorted(
        str(key)
        for key, value in loaded.items()
        if value.is_floating_point() and not torch.isfinite(value).all()
    )
    if not_finite:
        raise CheckpointError(
            f"{path!r} holds NaN or infinite values in {_names(not_finite)}: a damaged checkpoint, or one saved "
            "after training diverged"
        )
    return dict(loaded)


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickler_reason(error: BaseException) -> str:
    """The informative line of a torch.load error (the weights-only unpickler buries it in advice)."""
    text = str(error)
    marker = "WeightsUnpickler error:"
    if marker in text:
        return " ".join(text.split(marker, 1)[1].split("Check the documentation")[0].split())
    return f"{type(error).__name__}: {_first_line(error)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _names(names: Sequence[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


# ----------------------------------------------------------------------------------------------
# Layout and task
# ----------------------------------------------------------------------------------------------


def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """Name the original model a state dict comes from, from its keys.

    Returns one of `"pretrain"` (ALBEF.pth, ALBEF_4M.pth), `"retrieval"` (mscoco.pth, flickr30k.pth and
    refcoco.pth, which share the retrieval model), `"vqa"`, `"nlvr"`, `"nlvr_ta"` (the text-assignment
    checkpoint) and `"ve"`.
    """
    keys = list(state_dict)
    if not any(key.startswith("visual_encoder.") for key in keys):
        raise CheckpointError(
            "not an ALBEF checkpoint: it has no visual_encoder.* keys "
            f"(its first keys: {_names(sorted(keys), 8)})"
        )

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("text_decoder."):
        return "vqa"
    if has("ta_head."):
        return "nlvr_ta"
    if has("cls_head."):
        head = state_dict.get("cls_head.2.weight")
        if head is None or head.dim() != 2 or head.shape[0] not in (2, 3):
            raise CheckpointError(
                "a cls_head checkpoint needs cls_head.2.weight with 2 (NLVR2) or 3 (SNLI-VE) output rows"
            )
        return "nlvr" if head.shape[0] == 2 else "ve"
    if has("text_encoder.bert.") or has("text_encoder.cls."):
        return "pretrain"
    if has("text_encoder.") and has("itm_head."):
        return "retrieval"
    raise CheckpointError(
        "cannot tell which ALBEF model this checkpoint belongs to: it has neither text_decoder.*, ta_head.*, "
        "cls_head.*, text_encoder.bert.* nor text_encoder.* with itm_head.*; pass the task explicitly"
    )


def resolve_task(layout: str, task: str = "auto") -> str:
    """The task to convert for: the layout's own task for `"auto"`, else `task` if the layout serves it."""
    if task == "auto":
        return layout
    if task not in TASKS:
        raise CheckpointError(f"unknown task {task!r}; expected 'auto' or one of {', '.join(TASKS)}")
    if task not in _COMPATIBLE_TASKS[layout]:
        raise CheckpointError(
            f"the checkpoint has the original {layout!r} layout, which cannot be converted for task {task!r} "
            f"(it serves: {', '.join(_COMPATIBLE_TASKS[layout])})"
        )
    return task


# ----------------------------------------------------------------------------------------------
# Key mapping
# ----------------------------------------------------------------------------------------------

_DROP = None  # target of a rule whose keys are deliberately left out

# (original prefix, albef_hf prefix); a prefix without a trailing dot is a whole key. The longest match wins.
_COMMON_RULES = (
    ("visual_encoder.", "vision_model."),
    ("vision_proj.", "vision_proj."),
    ("text_proj.", "text_proj."),
    ("itm_head.", "itm_head."),
    ("temp", "temp"),
)
_LAYOUT_RULES = {
    "pretrain": (
        ("text_encoder.bert.", "text_encoder."),
        ("text_encoder.cls.predictions.", "mlm_head."),
    ),
    "retrieval": (("text_encoder.", "text_encoder."),),
    "vqa": (
        ("text_encoder.", "text_encoder."),
        ("text_decoder.bert.", "text_decoder."),
        ("text_decoder.cls.predictions.", "answer_head."),
    ),
    "nlvr": (("text_encoder.", "text_encoder."), ("cls_head.", "cls_head.")),
    "ve": (("text_encoder.", "text_encoder."), ("cls_head.", "cls_head.")),
    "nlvr_ta": (("text_encoder.", "text_encoder."), ("ta_head.", "ta_head.")),
}
# Rules that change with the target task.
_TASK_RULES = {
    # Zero-shot retrieval and grounding from a pretraining checkpoint: as the original fine-tuning scripts,
    # leave the MLM head behind.
    ("pretrain", "retrieval"): (("text_encoder.cls.", _DROP),),
    ("pretrain", "grounding"): (("text_encoder.cls.", _DROP),),
    # The original text-assignment model holds a text projection and a temperature that its forward never
    # uses (it compares images only, at a fixed temperature); AlbefForTextAssignment has neither.
    ("nlvr_ta", "nlvr_ta"): (("text_proj.", _DROP), ("temp", _DROP)),
}

# Copies the original stores twice: (albef_hf name of the copy, name of the weight it must equal). The copy is
# checked, then dropped, because the albef_hf head reads the original directly.
_TIED_COPIES = (
    ("mlm_head.decoder.weight", "text_encoder.embeddings.word_embeddings.weight"),
    ("mlm_head.decoder.bias", "mlm_head.bias"),
    ("answer_head.decoder.weight", "text_decoder.embeddings.word_embeddings.weight"),
    ("answer_head.decoder.bias", "answer_head.bias"),
)


def _rules(layout: str, task: str) -> list[tuple[str, str | None]]:
    """The rules to try in order: the task's first (they override), then the longest prefix first."""

    def longest_first(rules):
        return sorted(rules, key=lambda rule: len(rule[0]), reverse=True)

    return [
        *longest_first(_TASK_RULES.get((layout, task), ())),
        *longest_first([*_COMMON_RULES, *_LAYOUT_RULES.get(layout, ())]),
    ]


def map_original_key(key: str, layout: str, task: str | None = None) -> tuple[str | None, bool]:
    """The albef_hf name of an original key, and whether it belongs to the momentum teacher.

    Momentum copies (`visual_encoder_m.*`, `text_encoder_m.*`, `vision_proj_m.*`, ...) map like their
    student keys. Returns `(None, is_teacher)` for keys deliberately left out for this task.

    Raises:
        CheckpointError: the key matches no rule of the layout.
    """
    root, _, rest = key.partition(".")
    is_teacher = root.endswith("_m")
    student_key = f"{root[:-2]}.{rest}" if is_teacher and rest else key
    for source, target in _rules(layout, task or layout):
        if source.endswith(".") and student_key.startswith(source):
            return (None if target is None else target + student_key[len(source) :]), is_teacher
        if student_key == source:
            return target, is_teacher
    raise CheckpointError(f"no mapping for key {key!r} of the original {layout!r} layout")


def original_name(name: str, layout: str, task: str | None = None, teacher: bool = False) -> str:
    """The original key an albef_hf weight name comes from (the inverse of `map_original_key`), for messages
    about weights the checkpoint lacks."""
    targets = [(source, target) for source, target in _rules(layout, task or layout) if target is not None]
    for source, target in sorted(targets, key=lambda rule: len(rule[1]), reverse=True):
        if (target.endswith(".") and name.startswith(target)) or name == target:
            key = source + name[len(target) :]
            if teacher:
                root, _, rest = key.partition(".")
                key = f"{root}_m.{rest}" if rest else f"{root}_m"
            return key
    return name


@dataclass
class ConvertedState:
    """A checkpoint's tensors sorted into what the converted folder holds.

    Args:
        model: the student's weights, with albef_hf names.
        teacher: the momentum encoders' weights, with the student's albef_hf names (no `teacher.` prefix).
        queues: `image_queue`, `text_queue` `(queue_size, embed_dim)`, `idx_queue` `(queue_size,)` and
            `queue_ptr` (0-dim), those the checkpoint has.
        origin, teacher_origin: the original key of each model / teacher weight.
        checked: original keys that were verified (tied copies, position ids) and not kept.
        dropped: original keys deliberately left out for the target task.
    """

    model: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    queues: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    teacher_origin: dict[str, str] = field(default_factory=dict)
    checked: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def convert_state_dict(
    state_dict: Mapping[str, torch.Tensor], layout: str, task: str | None = None
) -> ConvertedState:
    """Rename an original state dict (see `map_original_key`) and sort it into model, teacher and queues.

    Tied copies (the MLM decoder) are checked to equal what they copy and the BERT `position_ids` buffer to
    be `0..n-1`, then left out. Every key that matches no rule is named in the error.

    Raises:
        CheckpointError: unmapped keys, two keys mapping to one name, a tied copy that differs, or malformed
            queues.
    """
    task = task or layout
    converted = ConvertedState()
    unmapped = []
    for key, tensor in state_dict.items():
        if key in _QUEUE_KEYS:
            converted.queues[key] = tensor
            continue
        try:
            target, is_teacher = map_original_key(key, layout, task)
        except CheckpointError:
            unmapped.append(key)
            continue
        if target is None:
            converted.dropped.append(key)
            continue
        weights, origin = (
            (converted.teacher, converted.teacher_origin)
            if is_teacher
            else (converted.model, converted.origin)
        )
        if target in weights:
            raise CheckpointError(f"keys {origin[target]!r} and {key!r} both map to {target!r}")
        weights[target], origin[target] = tensor, key
    if unmapped:
        raise CheckpointError(
            f"the checkpoint has keys that the original {layout!r} model does not have (unmapped): "
            f"{_names(sorted(unmapped))}"
        )
    converted.checked += _drop_checked_copies(converted.model, converted.origin)
    converted.checked += _drop_checked_copies(converted.teacher, converted.teacher_origin)
    converted.queues = _convert_queues(converted.queues)
    return converted


def _drop_checked_copies(weights: dict[str, torch.Tensor], origin: Mapping[str, str]) -> list[str]:
    checked = []
    for name in [name for name in weights if name.endswith("embeddings.position_ids")]:
        ids = weights.pop(name)
        if not torch.equal(ids.reshape(-1).long(), torch.arange(ids.numel())):
            raise CheckpointError(
                f"{origin[name]!r} is not 0..{ids.numel() - 1}: the converted model would place tokens "
                "differently from the original"
            )
        checked.append(origin[name])
    for copy, reference in _TIED_COPIES:
        if copy not in weights:
            continue
        if reference not in weights:
            raise CheckpointError(f"{origin[copy]!r} is a tied copy of a weight the checkpoint lacks")
        if weights[copy].shape != weights[reference].shape or not torch.equal(
            weights[copy], weights[reference]
        ):
            raise CheckpointError(
                f"{origin[copy]!r} must equal {origin[reference]!r} (they are tied in the original model), but "
                "the two tensors differ"
            )
        weights.pop(copy)
        checked.append(origin[copy])
    return checked


def _convert_queues(queues: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original queues are `(embed_dim, queue_size)`; albef_hf keeps one feature per row."""
    converted = {}
    sizes = {}
    for name in ("image_queue", "text_queue"):
        if name in queues:
            queue = queues[name]
            if queue.dim() != 2:
                raise CheckpointError(f"{name!r} must be (embed_dim, queue_size), got {tuple(queue.shape)}")
            converted[name] = queue.T.contiguous()
            sizes[name] = queue.shape[1]
    if "idx_queue" in queues:
        idx_queue = queues["idx_queue"]
        if idx_queue.dim() not in (1, 2) or (idx_queue.dim() == 2 and idx_queue.shape[0] != 1):
            raise CheckpointError(f"'idx_queue' must be (1, queue_size), got {tuple(idx_queue.shape)}")
        converted["idx_queue"] = idx_queue.reshape(-1).long().contiguous()
        sizes["idx_queue"] = idx_queue.numel()
    if "queue_ptr" in queues:
        if queues["queue_ptr"].numel() != 1:
            raise CheckpointError(f"'queue_ptr' must hold one value, got {tuple(queues['queue_ptr'].shape)}")
        converted["queue_ptr"] = queues["queue_ptr"].reshape(()).long().clone()
    if len(set(sizes.values())) > 1:
        raise CheckpointError(f"the queues disagree on the queue size: {sizes}")
    if set(converted) & {"image_queue", "text_queue"} not in (set(), {"image_queue", "text_queue"}):
        raise CheckpointError("the checkpoint has only one of image_queue and text_queue")
    if "image_queue" in converted and converted["image_queue"].shape != converted["text_queue"].shape:
        raise CheckpointError(
            f"image_queue {tuple(queues['image_queue'].shape)} and text_queue "
            f"{tuple(queues['text_queue'].shape)} differ in shape"
        )
    return converted


# ----------------------------------------------------------------------------------------------
# Sizes and configuration
# ----------------------------------------------------------------------------------------------

# Fields of the original BERT config json that the tensors do not hold, with their albef_hf names.
_BERT_FIELDS = {
    "num_attention_heads": "num_attention_heads",
    "hidden_act": "hidden_act",
    "hidden_dropout_prob": "hidden_dropout_prob",
    "attention_probs_dropout_prob": "attention_probs_dropout_prob",
    "layer_norm_eps": "layer_norm_eps",
    "initializer_range": "initializer_range",
    "pad_token_id": "pad_token_id",
}
# Widths the tensors hold: a BERT config that disagrees describes another model. (Layer counts are not
# compared: the original code itself overrides them, e.g. 18 layers for NLVR2 and 6 for the VQA decoder.)
_BERT_WIDTHS = (
    "hidden_size",
    "vocab_size",
    "intermediate_size",
    "max_position_embeddings",
    "type_vocab_size",
)


def read_original_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read `--config`: an original ALBEF config (yaml or json, e.g. configs/Retrieval_coco.yaml) or a BERT
    config json (e.g. configs/config_bert.json).

    Returns a dict with `"bert"` (the BERT config, when there is one: inline, the file itself, or the file its
    `bert_config` entry names), `"albef"` (the ALBEF entries: image_res, embed_dim, mlm_probability, ...),
    and the albef-hf extensions `"vision_config"` / `"text_config"` (dicts of `AlbefVisionConfig` /
    `AlbefTextConfig` fields, for what neither original file holds, e.g. the ViT's head count).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config {str(path)!r} does not exist")
    data = _read_mapping(path)
    if "num_attention_heads" in data or data.get("model_type") == "bert":
        return {"bert": data, "albef": {}, "vision_config": {}, "text_config": {}}
    bert = data.get("bert_config")
    if isinstance(bert, (str, os.PathLike)):
        bert = _read_mapping(_find_relative(bert, path))
    albef = {k: v for k, v in data.items() if k not in ("bert_config", "vision_config", "text_config")}
    return {
        "bert": bert,
        "albef": albef,
        "vision_config": dict(data.get("vision_config") or {}),
        "text_config": dict(data.get("text_config") or {}),
    }


def _read_mapping(path: Path) -> dict[str, Any]:
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:
        raise CheckpointError(f"could not parse config {str(path)!r}: {_first_line(error)}") from error
    if not isinstance(data, dict):
        raise CheckpointError(f"config {str(path)!r} must hold a mapping, got {type(data).__name__}")
    return data


def _find_relative(name: str | os.PathLike, config_path: Path) -> Path:
    # The original configs name "configs/config_bert.json" relative to the repository root.
    candidates = [Path(name), config_path.parent / name, config_path.parent.parent / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"{str(config_path)!r} names bert_config {str(name)!r}, which was not found (looked at "
        f"{', '.join(str(c) for c in candidates)}); pass the BERT config json itself with --config"
    )


def _layer_indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(match.group(1)) for key in state_dict if (match := pattern.match(key))})


def _require(state_dict: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointError(f"the checkpoint lacks {key!r}, which its sizes are read from")
    return state_dict[key]


def _count_layers(state_dict: Mapping[str, torch.Tensor], prefix: str, what: str) -> int:
    indices = _layer_indices(state_dict, prefix)
    if not indices:
        raise CheckpointError(f"the checkpoint has no {prefix}N.* keys ({what})")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise CheckpointError(f"{what}: layers {missing} are missing from {prefix}N.* (found {indices})")
    return len(indices)


def _vision_sizes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    patch = _require(state_dict, "visual_encoder.patch_embed.proj.weight")
    pos_embed = _require(state_dict, "visual_encoder.pos_embed")
    if patch.dim() != 4 or patch.shape[-1] != patch.shape[-2]:
        raise CheckpointError(
            f"visual_encoder.patch_embed.proj.weight must be (width, channels, patch, patch), got {tuple(patch.shape)}"
        )
    grid = round((pos_embed.shape[1] - 1) ** 0.5)
    if pos_embed.dim() != 3 or grid * grid != pos_embed.shape[1] - 1:
        raise CheckpointError(
            f"visual_encoder.pos_embed must be (1, 1 + grid * grid, width), got {tuple(pos_embed.shape)}"
        )
    return {
        "hidden_size": patch.shape[0],
        "num_channels": patch.shape[1],
        "patch_size": patch.shape[-1],
        "image_size": grid * patch.shape[-1],
        "num_hidden_layers": _count_layers(state_dict, "visual_encoder.blocks.", "vision encoder"),
        "intermediate_size": _require(state_dict, "visual_encoder.blocks.0.mlp.fc1.weight").shape[0],
        "qkv_bias": "visual_encoder.blocks.0.attn.qkv.bias" in state_dict,
    }


def _text_prefix(layout: str) -> str:
    return "text_encoder.bert." if layout == "pretrain" else "text_encoder."


def _text_sizes(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, Any]:
    embeddings = prefix + "embeddings."
    word = _require(state_dict, embeddings + "word_embeddings.weight")
    layers = _count_layers(state_dict, prefix + "encoder.layer.", prefix.split(".")[0])
    cross = [
        i for i in range(layers) if f"{prefix}encoder.layer.{i}.crossattention.self.key.weight" in state_dict
    ]
    if not cross or cross != list(range(cross[0], layers)):
        raise CheckpointError(
            f"cross-attention must run from one layer to the last of {prefix}encoder; the checkpoint has it "
            f"at layers {cross} of 0..{layers - 1}"
        )
    return {
        "vocab_size": word.shape[0],
        "hidden_size": word.shape[1],
        "max_position_embeddings": _require(state_dict, embeddings + "position_embeddings.weight").shape[0],
        "type_vocab_size": _require(state_dict, embeddings + "token_type_embeddings.weight").shape[0],
        "num_hidden_layers": layers,
        "intermediate_size": _require(state_dict, f"{prefix}encoder.layer.0.intermediate.dense.weight").shape[
            0
        ],
        "fusion_layer": cross[0],
        "encoder_width": state_dict[f"{prefix}encoder.layer.{cross[0]}.crossattention.self.key.weight"].shape[
            1
        ],
    }


def infer_config(
    state_dict: Mapping[str, torch.Tensor],
    layout: str,
    original_config: Mapping[str, Any] | None = None,
    image_size: int | None = None,
    tokenizer: Any = None,
) -> AlbefConfig:
    """The `AlbefConfig` of a checkpoint: sizes from the tensors, the rest from `original_config` (as returned by
    `read_original_config`) or the ALBEF-base defaults.

    Args:
        state_dict: the original state dict.
        layout: its layout (`detect_layout`).
        original_config: the parsed `--config`, if any.
        image_size: the resolution to convert to; by default the config's `image_res`, else the checkpoint's.
        tokenizer: when given, the special-token ids are taken from it (and its vocabulary must fit).
    """
    original_config = original_config or {}
    bert = dict(original_config.get("bert") or {})
    albef = dict(original_config.get("albef") or {})

    vision_extension = dict(original_config.get("vision_config") or {})
    text_extension = dict(original_config.get("text_config") or {})

    vision = _vision_sizes(state_dict)
    text = _text_sizes(state_dict, _text_prefix(layout))
    _check_agrees("the BERT config", bert, text, _BERT_WIDTHS)
    _check_agrees(
        "vision_config in the config", vision_extension, vision, [k for k in vision if k != "image_size"]
    )
    _check_agrees("text_config in the config", text_extension, text, list(text))
    if text["encoder_width"] != vision["hidden_size"]:
        raise CheckpointError(
            f"the cross-attention reads {text['encoder_width']}-wide image tokens but the vision encoder is "
            f"{vision['hidden_size']} wide"
        )
    _check_agrees(
        "the ALBEF config",
        {"vision_width": albef.get("vision_width")},
        {"vision_width": vision["hidden_size"]},
        ["vision_width"],
    )
    target_size = (
        image_size or vision_extension.get("image_size") or albef.get("image_res") or vision["image_size"]
    )
    vision_fields = {"num_attention_heads": 12, **vision_extension, **vision, "image_size": int(target_size)}
    text_fields = {name: bert[key] for key, name in _BERT_FIELDS.items() if key in bert}
    text_fields.update({**text_extension, **text, **_special_token_ids(tokenizer, text["vocab_size"])})
    try:
        vision_config = AlbefVisionConfig(**vision_fields)
        text_config = AlbefTextConfig(**text_fields)
    except ValueError as error:
        raise CheckpointError(
            f"{error}. Head counts are not stored in the tensors: without --config they default to ALBEF-base's "
            "12; give the text heads in the BERT config (num_attention_heads) and the vision heads as "
            "vision_config: {num_attention_heads: N} in the ALBEF config"
        ) from error

    extra: dict[str, Any] = {}
    if "vision_proj.weight" in state_dict:
        extra["embed_dim"] = state_dict["vision_proj.weight"].shape[0]
        _check_agrees("the ALBEF config", albef, extra, ["embed_dim"])
    if "temp" in state_dict:
        extra["temp"] = float(state_dict["temp"])
    if "mlm_probability" in albef:
        extra["mlm_probability"] = float(albef["mlm_probability"])
    if layout == "vqa":
        extra["decoder_config"] = _decoder_config(state_dict, text_config)
    return AlbefConfig(vision_config=vision_config, text_config=text_config, **extra)


def _decoder_config(state_dict: Mapping[str, torch.Tensor], text_config: AlbefTextConfig) -> AlbefTextConfig:
    """The VQA answer decoder: the text configuration with the decoder's depth, every layer cross-attending to
    the question states (as the original builds it)."""
    decoder = _text_sizes(state_dict, "text_decoder.bert.")
    if decoder["fusion_layer"] != 0:
        raise CheckpointError(
            f"every answer-decoder layer must have cross-attention; text_decoder's starts at layer "
            f"{decoder['fusion_layer']}"
        )
    if decoder["encoder_width"] != text_config.hidden_size:
        raise CheckpointError(
            f"the answer decoder reads {decoder['encoder_width']}-wide question states but the text encoder is "
            f"{text_config.hidden_size} wide"
        )
    values = {key: value for key, value in text_config.to_dict().items() if key != "model_type"}
    return AlbefTextConfig(**{**values, **decoder, "is_decoder": True})


def _check_agrees(
    source: str, given: Mapping[str, Any], from_tensors: Mapping[str, Any], keys: Sequence[str]
) -> None:
    """Sizes the tensors hold win; a config that disagrees on one describes another model."""
    conflicts = [
        f"{key}: {given[key]} in the config, {from_tensors[key]} in the tensors"
        for key in keys
        if given.get(key) is not None and given[key] != from_tensors[key]
    ]
    if conflicts:
        raise CheckpointError(f"{source} does not describe this checkpoint ({'; '.join(conflicts)})")


def _special_token_ids(tokenizer: Any, vocab_size: int) -> dict[str, int]:
    if tokenizer is None:
        return {}  # the AlbefTextConfig defaults are bert-base-uncased's ids
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's vocabulary only {vocab_size}"
        )
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "cls_token_id": tokenizer.cls_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "mask_token_id": tokenizer.mask_token_id,
    }
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise CheckpointError(
            f"the tokenizer lacks special tokens: {', '.join(missing)} (expected a BERT tokenizer)"
        )
    return ids


# ----------------------------------------------------------------------------------------------
# Building and checking the model
# ----------------------------------------------------------------------------------------------


def model_class_for(task: str) -> type:
    """The albef_hf model class that a converted checkpoint of `task` loads into."""
    import albef_hf

    name = _MODEL_CLASSES[task]
    cls = getattr(albef_hf, name, None)
    if cls is None:
        raise CheckpointError(f"task {task!r} needs albef_hf.{name}, which this version of albef_hf lacks")
    return cls


def _interpolate(weights: dict[str, torch.Tensor], config: AlbefConfig) -> bool:
    pos_embed = weights.get("vision_model.pos_embed")
    if pos_embed is None or pos_embed.shape[1] - 1 == config.vision_config.num_patches:
        return False
    weights["vision_model.pos_embed"] = interpolate_pos_embed(pos_embed, config.vision_config.num_patches)
    return True


def _check_against(
    weights: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    what: str,
    describe,
    optional: Sequence[str] = (),
) -> None:
    """Fail, naming every key, unless `weights` sets exactly the tensors of `expected` with their shapes.

    `describe(name)` gives a weight's original key with its albef_hf name, for the message.
    """
    missing = [
        describe(name)
        for name in expected
        if name not in weights and not any(name.startswith(prefix) for prefix in optional)
    ]
    unexpected = [describe(name) for name in weights if name not in expected]
    misshaped = [
        f"{describe(name)}: {tuple(weights[name].shape)} in the checkpoint, {tuple(expected[name].shape)} in the model"
        for name in weights
        if name in expected and weights[name].shape != expected[name].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing (the checkpoint does not set them): {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected (the model has no such weight): {_names(unexpected)}")
    if misshaped:
        problems.append(f"misshaped: {_names(misshaped)}")
    if problems:
        raise CheckpointError(f"{what} do not match the model:\n  " + "\n  ".join(problems))


def _describer(origin: Mapping[str, str], layout: str, task: str, teacher: bool = False):
    def describe(name: str) -> str:
        return f"{origin.get(name) or original_name(name, layout, task, teacher)} (albef_hf: {name})"

    return describe


def build_model(task: str, config: AlbefConfig, converted: ConvertedState, layout: str):
    """Instantiate the task's model and load the converted weights strictly (every weight set, nothing left
    over, every shape exact); check the momentum weights against the same model."""
    try:
        model = model_class_for(task)(config)
    except ValueError as error:
        raise CheckpointError(
            f"the checkpoint's sizes do not make a {_MODEL_CLASSES[task]}: {error}"
        ) from error
    expected = model.state_dict()
    _check_against(
        converted.model, expected, "the checkpoint's weights", _describer(converted.origin, layout, task)
    )
    if converted.teacher:
        _check_against(
            converted.teacher,
            expected,
            "the checkpoint's momentum weights (*_m keys)",
            _describer(converted.teacher_origin, layout, task, teacher=True),
            optional=_TEACHER_OPTIONAL,
        )
    _check_shared(model, converted.model, converted.origin)
    _check_shared(model, converted.teacher, converted.teacher_origin)
    model.load_state_dict(converted.model, strict=True)
    return model.eval()


def _check_shared(model, weights: Mapping[str, torch.Tensor], origin: Mapping[str, str]) -> None:
    """Weights the model shares between two names (NLVR2's paired cross-attention key/value) are stored under
    both names in the original; loading would silently keep one, so they must be equal."""
    shared = getattr(model, "_tied_weights_keys", None)
    if not isinstance(shared, Mapping):
        return
    differing = [
        f"{origin[copy]} != {origin[owner]}"
        for copy, owner in shared.items()
        if copy in weights and owner in weights and not torch.equal(weights[copy], weights[owner])
    ]
    if differing:
        raise CheckpointError(
            "these weights are shared in the model (and in the original), but the checkpoint holds different "
            f"values for them: {_names(differing)}"
        )


# ----------------------------------------------------------------------------------------------
# The whole conversion
# ----------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """What `convert_original_checkpoint` produced.

    Args:
        model: the converted model (eval mode).
        config: its configuration.
        task, layout: the target task and the original layout.
        converted: the sorted tensors (teacher and queues included).
        interpolated: whether the position embeddings were resized.
        output_dir: the folder written, if any.
        files: the files written there.
    """

    model: Any
    config: AlbefConfig
    task: str
    layout: str
    converted: ConvertedState
    interpolated: bool
    output_dir: str | None = None
    files: list[str] = field(default_factory=list)

    def summary(self) -> str:
        converted = self.converted
        lines = [
            f"task {self.task} (original layout {self.layout}) -> {type(self.model).__name__}",
            f"  weights: {len(converted.model)} tensors; image size {self.config.image_size}"
            + (" (position embeddings interpolated)" if self.interpolated else ""),
            f"  momentum teacher: {len(converted.teacher)} tensors; queues: "
            + (", ".join(f"{k} {tuple(v.shape)}" for k, v in converted.queues.items()) or "none"),
            f"  checked and not kept: {len(converted.checked)} keys; left out for this task: "
            + (_names(converted.dropped, 5) if converted.dropped else "none"),
        ]
        if self.output_dir:
            lines.append(f"  written to {self.output_dir}: {', '.join(self.files)}")
        return "\n".join(lines)


def convert_original_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    task: str = "auto",
    config: str | os.PathLike | Mapping[str, Any] | None = None,
    tokenizer: str | os.PathLike | Any = None,
    image_size: int | None = None,
    push_to_hub: str | None = None,
    model_name: str | None = None,
) -> ConversionResult:
    """Convert an original ALBEF checkpoint; optionally write (and push) a model folder.

    Args:
        checkpoint: path of the original `.pth` file.
        output_dir: folder to write (weights, config, processor, model card, momentum state); `None` converts
            in memory only.
        task: `"auto"` (from the keys) or one of `TASKS`.
        config: `--config`: a path to an original ALBEF yaml/json config or a BERT config json, or the dict
            `read_original_config` returns.
        tokenizer: a bert-base-uncased tokenizer folder (or tokenizer object) for the processor.
        image_size: convert to this resolution (position embeddings interpolated as the original does).
        push_to_hub: a Hub repository id to upload the folder to (needs `output_dir`).
        model_name: title of the model card (default: the output folder's name).

    Raises:
        CheckpointError: see `load_original_checkpoint`, `convert_state_dict` and `build_model`.
    """
    original = load_original_checkpoint(checkpoint)
    layout = detect_layout(original.state_dict)
    task = resolve_task(layout, task)
    if isinstance(config, (str, os.PathLike)):
        config = read_original_config(config)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = _load_tokenizer(tokenizer)
    albef_config = infer_config(original.state_dict, layout, config, image_size, tokenizer)
    converted = convert_state_dict(original.state_dict, layout, task)
    interpolated = _interpolate(converted.model, albef_config)
    _interpolate(converted.teacher, albef_config)
    model = build_model(task, albef_config, converted, layout)
    result = ConversionResult(model, albef_config, task, layout, converted, interpolated)
    if output_dir is not None:
        result.output_dir = os.fspath(output_dir)
        result.files = save_converted(result, original, tokenizer, model_name)
        if push_to_hub:
            push_to_hub_folder(result.output_dir, push_to_hub)
    elif push_to_hub:
        raise CheckpointError("push_to_hub needs an output_dir to write the folder to first")
    return result


def _load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(os.fspath(path))
    except Exception as error:
        raise CheckpointError(
            f"could not load a tokenizer from {os.fspath(path)!r} (expected a bert-base-uncased folder): "
            f"{_first_line(error)}"
        ) from error


def processor_for(task: str, config: AlbefConfig, tokenizer) -> AlbefProcessor:
    """The processor of a converted checkpoint: its image size, the original tokenisation and text cleaning."""
    return AlbefProcessor(
        AlbefImageProcessor(size=config.image_size),
        tokenizer,
        max_length=_MAX_TEXT_LENGTH.get(task, config.text_config.max_position_embeddings),
        max_words=_MAX_WORDS.get(task, 30),
        text_normalization="question" if task == "vqa" else "caption",
        original_tokenization=True,
    )


def momentum_state(converted: ConvertedState) -> dict[str, torch.Tensor]:
    """The tensors of `momentum_state.safetensors`: `teacher.<name>` and the queues."""
    state = {f"teacher.{name}": tensor.contiguous() for name, tensor in converted.teacher.items()}
    state.update({name: tensor.contiguous() for name, tensor in converted.queues.items()})
    return state


def save_converted(
    result: ConversionResult,
    original: OriginalCheckpoint,
    tokenizer=None,
    model_name: str | None = None,
) -> list[str]:
    """Write the converted folder; returns the names of the files written."""
    output_dir = Path(result.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    result.model.save_pretrained(output_dir)
    if tokenizer is not None:
        processor_for(result.task, result.config, tokenizer).save_pretrained(output_dir)
    else:
        AlbefImageProcessor(size=result.config.image_size).save_pretrained(output_dir)
    state = momentum_state(result.converted)
    if state:
        save_file(
            state,
            output_dir / MOMENTUM_STATE_FILE,
            metadata={"format": "pt", "source": os.path.basename(original.path)},
        )
    card = build_model_card(_card_info(result, original, tokenizer, model_name or output_dir.name))
    save_model_card(card, output_dir)
    return sorted(path.name for path in output_dir.iterdir() if path.is_file())


def _card_info(result: ConversionResult, original: OriginalCheckpoint, tokenizer, name: str) -> AlbefCardInfo:
    source = os.path.basename(original.path)
    converted = result.converted
    training = {
        "source checkpoint": f"`{source}`",
        "source sha256": f"`{original.sha256}`",
        "original model": result.layout,
        "image size": result.config.image_size,
    }
    if result.interpolated:
        training["position embeddings"] = "bicubically interpolated from the checkpoint's resolution"
    if converted.queues or converted.teacher:
        training["momentum teacher and queues"] = f"`{MOMENTUM_STATE_FILE}` (resumed by AlbefTrainer)"
    notes = [
        "Converted with `convert/convert_albef_original_to_hf.py` of albef-hf: every original key was mapped or "
        "checked, and the outputs match the original implementation to 1e-4 (fp32) on the package's tests.",
    ]
    if tokenizer is None:
        notes.append(
            "No tokenizer was given at conversion: use bert-base-uncased with `original_tokenization=True`."
        )
    if converted.dropped:
        notes.append(
            f"Left out for this task (unused by it): {len(converted.dropped)} original keys under "
            + ", ".join(sorted({f"`{key.split('.')[0]}`" for key in converted.dropped}))
            + "."
        )
    return AlbefCardInfo(
        model_name=name,
        task=_CARD_TASKS[result.task],
        model_class=type(result.model).__name__,
        source=f"original ALBEF checkpoint `{source}` (salesforce/ALBEF)",
        training=training,
        extra_tags=["converted-checkpoint"],
        notes="\n\n".join(notes),
    )


# ----------------------------------------------------------------------------------------------
# Hub
# ----------------------------------------------------------------------------------------------

# Written by save_pretrained / the converter; anything else in the folder (a user's file) is not uploaded.
_PUSHED_SUFFIXES = (".json", ".safetensors", ".md", ".py", ".txt")


def files_to_push(output_dir: str | os.PathLike) -> list[str]:
    """The files `push_to_hub_folder` uploads from a converted folder (sorted relative paths)."""
    output_dir = Path(output_dir)
    return sorted(
        path.name for path in output_dir.iterdir() if path.is_file() and path.suffix in _PUSHED_SUFFIXES
    )


def push_to_hub_folder(
    output_dir: str | os.PathLike, repo_id: str, private: bool | None = None, api=None
) -> str:
    """Upload a converted folder to the Hub repository `repo_id` (created when missing); returns its URL."""
    from huggingface_hub import HfApi

    api = api or HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    files = files_to_push(output_dir)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(output_dir),
        allow_patterns=files,
        commit_message="Convert original ALBEF checkpoint with albef-hf",
    )
    return f"https://huggingface.co/{repo_id}"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_albef_original_to_hf.py",
        description="Convert an original ALBEF checkpoint (salesforce/ALBEF .pth) into an albef-hf model folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="the original .pth file")
    parser.add_argument("--output", required=True, help="folder to write the converted model to")
    parser.add_argument(
        "--task", default="auto", choices=("auto", *TASKS), help="target task (default: read from the keys)"
    )
    parser.add_argument(
        "--config",
        help="the original ALBEF config (yaml/json, e.g. configs/Retrieval_coco.yaml) or BERT config json; "
        "without it the ALBEF-base defaults fill what the tensors do not hold (attention heads, ...)",
    )
    parser.add_argument("--tokenizer", help="a bert-base-uncased tokenizer folder, saved with the processor")
    parser.add_argument(
        "--image-size",
        type=int,
        help="convert to this resolution (position embeddings interpolated); default: the config's image_res, "
        "else the checkpoint's",
    )
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub repository")
    parser.add_argument("--model-name", help="title of the model card (default: the output folder's name)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (errors are printed, not raised)."""
    args = build_parser().parse_args(argv)
    try:
        result = convert_original_checkpoint(
            args.checkpoint,
            args.output,
            task=args.task,
            config=args.config,
            tokenizer=args.tokenizer,
            image_size=args.image_size,
            push_to_hub=args.push_to_hub,
            model_name=args.model_name,
        )
    except CheckpointError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(result.summary())
    return 0
