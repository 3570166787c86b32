"""Model cards for ALBEF checkpoints: Hub metadata (tags, pipeline tag, license, metrics) and a README body.

One function builds every card the package writes (the Trainer's, the converter's, the demo's), so that
they look alike and validate as Hub card metadata.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

# The card reads the classes (their tasks, pipelines and Auto classes); the models know nothing of cards.
from . import modeling_albef_downstream  # noqa: F401  (defines the task models looked up by name)
from .modeling_albef import AlbefContrastiveMixin, AlbefPreTrainedModel

__all__ = [
    "AlbefCardInfo",
    "build_model_card",
    "has_remote_code",
    "save_model_card",
    "served_pipelines",
    "task_for_model_class",
]

CITATION = """@inproceedings{li2021align,
  title={Align before Fuse: Vision and Language Representation Learning with Momentum Distillation},
  author={Junnan Li and Ramprasaath R. Selvaraju and Akhilesh Deepak Gotmare and Shafiq Joty and Caiming Xiong and Steven Hoi},
  booktitle={Advances in Neural Information Processing Systems},
  year={2021}
}"""

# Hub pipeline tag and a short description per ALBEF task.
TASKS = {
    "pretraining": ("zero-shot-image-classification", "image-text pretraining (ITC, ITM, MLM)"),
    "retrieval": ("zero-shot-image-classification", "image-text retrieval"),
    "vqa": ("visual-question-answering", "visual question answering"),
    "nlvr": ("image-text-to-text", "visual reasoning over image pairs (NLVR2)"),
    "ve": ("image-text-to-text", "visual entailment (SNLI-VE)"),
    "grounding": ("zero-shot-image-classification", "weakly-supervised visual grounding"),
}


def _model_class(name: str) -> type | None:
    classes = {cls.__name__: cls for cls in _subclasses(AlbefPreTrainedModel)}
    return classes.get(name)


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def served_pipelines(model_class: str, task: str | None = None) -> tuple[str, ...]:
    """The `pipeline()` tasks a checkpoint of the ALBEF class `model_class` serves.

    They are the tasks albef_hf registers whose pipeline names the class in `checkpoint_classes` (in registration
    order; a `"grounding"` card puts `visual-grounding` first), then `zero-shot-image-classification` for a class
    with ITC projections (transformers' pipeline loads its folder as `AlbefModel`). None for an unknown class.
    """
    cls = _model_class(model_class)
    if cls is None:
        return ()
    tasks = [
        name
        for name, pipeline_class in AlbefPreTrainedModel.folder_pipelines.items()
        if model_class in getattr(pipeline_class, "checkpoint_classes", ())
    ]
    if task == "grounding" and "visual-grounding" in tasks:
        tasks.insert(0, tasks.pop(tasks.index("visual-grounding")))
    if issubclass(cls, AlbefContrastiveMixin):
        tasks.append("zero-shot-image-classification")
    return tuple(tasks)


def has_remote_code(model_class: str) -> bool:
    """Whether a folder saved from the ALBEF class `model_class` carries its code (the class is registered for
    an Auto class), so that `trust_remote_code=True` loads it (and serves its pipelines) without albef_hf."""
    cls = _model_class(model_class)
    return cls is not None and cls._auto_class is not None


_MODEL_CLASS_TASKS = {
    "AlbefModel": "pretraining",
    "AlbefForPreTraining": "pretraining",
    "AlbefForImageTextRetrieval": "retrieval",
    "AlbefForQuestionAnswering": "vqa",
    "AlbefForVisualReasoning": "nlvr",
    "AlbefForTextAssignment": "nlvr",
    "AlbefForVisualEntailment": "ve",
}


def task_for_model_class(name: str) -> str:
    """The card task of a checkpoint saved from the ALBEF class `name` (`"pretraining"` for an unknown one)."""
    return _MODEL_CLASS_TASKS.get(name, "pretraining")


@dataclass
class AlbefCardInfo:
    """What a card says about a checkpoint.

    Args:
        model_name: name shown as the card title.
        task: one of `TASKS` (`"pretraining"`, `"retrieval"`, `"vqa"`, `"nlvr"`, `"ve"`, `"grounding"`).
        model_class: the class that loads it (for the usage snippet).
        source: where the weights come from (an original checkpoint file, a base model...).
        training: a short description of how it was trained (key -> value, rendered as a table).
        metrics: measured results, `{metric name: value}`, with `dataset_name` / `dataset_split` describing them.
        dataset_name, dataset_split: the data the metrics were measured on.
        license: SPDX identifier of the weights' license.
        extra_tags: more Hub tags.
        notes: free text appended to the card.
        repo_id: the Hub repository, used in the usage snippets (default: a placeholder).
        datasets: Hub ids of the datasets it was trained on (card metadata).
        base_model: the Hub id of the checkpoint it was fine-tuned or converted from (card metadata).
        language: language(s) of the texts (card metadata).
    """

    model_name: str
    task: str = "pretraining"
    model_class: str = "AlbefModel"
    source: str | None = None
    training: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    dataset_name: str | None = None
    dataset_split: str | None = None
    license: str = "bsd-3-clause"
    extra_tags: list[str] = field(default_factory=list)
    notes: str | None = None
    repo_id: str | None = None
    datasets: list[str] = field(default_factory=list)
    base_model: str | None = None
    language: str | list[str] | None = "en"


def build_model_card(info: AlbefCardInfo) -> ModelCard:
    """A `huggingface_hub.ModelCard` with validated metadata and a README body for an ALBEF checkpoint."""
    if info.task not in TASKS:
        raise ValueError(f"unknown task {info.task!r}; expected one of {sorted(TASKS)}")
    pipeline_tag, task_description = TASKS[info.task]
    eval_results = [
        EvalResult(
            task_type=pipeline_tag,
            dataset_type=info.dataset_name or "custom",
            dataset_name=info.dataset_name or "custom",
            dataset_split=info.dataset_split,
            metric_type=name,
            metric_name=name,
            metric_value=float(value),
        )
        for name, value in info.metrics.items()
    ]
    served = served_pipelines(info.model_class, info.task)
    tags = ["albef", "vision-language", "albef-hf", info.task, *served, *info.extra_tags]
    data = ModelCardData(
        model_name=info.model_name,
        library_name="transformers",
        license=info.license,
        language=info.language,
        pipeline_tag=pipeline_tag,
        tags=list(dict.fromkeys(tags)),
        datasets=info.datasets or None,
        base_model=info.base_model,
        eval_results=eval_results or None,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{_body(info, task_description)}")


def _body(info: AlbefCardInfo, task_description: str) -> str:
    lines = [
        f"# {info.model_name}",
        "",
        f"ALBEF ([Align before Fuse](https://arxiv.org/abs/2107.07651)) for {task_description}, "
        "as a Hugging Face transformers model of the albef-hf package.",
        "",
    ]
    if info.source:
        lines += [f"**Source:** {info.source}", ""]
    if info.training:
        lines += ["## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in info.training.items()]
        lines.append("")
    if info.metrics:
        where = " ".join(part for part in (info.dataset_name, info.dataset_split) if part)
        lines += [f"## Results{f' on {where}' if where else ''}", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {float(value):.2f} |" for name, value in info.metrics.items()]
        lines.append("")
    repo = info.repo_id or "path/or/repo"
    remote = has_remote_code(info.model_class)
    pipelines = served_pipelines(info.model_class, info.task)
    lines += [
        "## Usage",
        "",
        "```python",
        "import albef_hf  # registers the ALBEF classes"
        + (" (or pass trust_remote_code=True without it)" if remote else ""),
        f"from albef_hf import AlbefProcessor, {info.model_class}",
        "",
        f'model = {info.model_class}.from_pretrained("{repo}")',
        f'processor = AlbefProcessor.from_pretrained("{repo}")',
        "```",
        "",
    ]
    if pipelines:
        served = ", ".join(f"`{task}`" for task in pipelines)
        how = "after `import albef_hf`" + (
            ", or with `trust_remote_code=True` where it is not installed" if remote else ""
        )
        keyword = ", trust_remote_code=True" if remote else ""
        lines += [
            f"With `pipeline()` ({how}), this checkpoint serves: {served}.",
            "",
            "```python",
            *([] if remote else ["import albef_hf"]),
            "from transformers import pipeline",
            "",
            f'pipe = pipeline("{pipelines[0]}", model="{repo}"{keyword})',
            "```",
            "",
        ]
    if info.notes:
        lines += [info.notes, ""]
    lines += ["## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def save_model_card(card: ModelCard, save_directory: str | os.PathLike) -> str:
    """Write `card` as `README.md` in `save_directory`; returns the path."""
    path = os.path.join(save_directory, "README.md")
    card.save(path)
    return path
