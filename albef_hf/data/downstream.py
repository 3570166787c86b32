"""Readers of the downstream tasks' data: the original ALBEF json files and any table of rows.

Every reader yields the samples the task collators (`albef_hf.data.collators`) and evaluations
(`albef_hf.evaluation`) take. The sentence, question, hypothesis or expression is always ``"text"``:

=========== ======================================================================================
task        sample
=========== ======================================================================================
vqa         ``image``, ``text`` (the question), ``answers`` (list[str]; absent for test questions),
            ``weights`` (list[float] or None: the collator then weighs answers by their counts)
nlvr2       ``images`` ([left, right]), ``text`` (the statement), ``label`` (1 true, 0 false)
ve          ``image``, ``text`` (the hypothesis), ``label`` (0 contradiction, 1 neutral, 2 entailment)
grounding   ``image``, ``text`` (the expression), ``image_id`` (training: positives are the
            expressions of one image); for evaluation ``box`` ([x, y, w, h] pixels of the image)
            and ``candidate_boxes`` (list of [x, y, w, h]: the boxes to choose from)
=========== ======================================================================================

Other fields of a record (``question_id``, ``question_type``, ``ref_id``, ...) are passed through.
Images are PIL RGB, decoded when a sample is read.

Sources
-------
- The original's json files (lists of entries), with the image roots the original's configs name:
  `read_vqa_json` (``{"question", "answer": [str] | str, "image", "dataset": "vqa" | "vg"}``),
  `read_nlvr_json` (``{"images": [left, right], "sentence", "label": "True" | "False"}``),
  `read_ve_json` (``{"image": Flickr30K id, "sentence", "label": "entailment" | ...}``, image
  ``<id>.jpg``), `read_grounding_json` (``{"image", "text", "ref_id"}``; for evaluation each
  entry also needs ``box`` and ``candidate_boxes``, which the original takes from the REFER toolkit
  and its detections file).
- Any table: `read_task_table` over a `datasets.Dataset`, the synthetic world's `SyntheticDataset`
  or a list of dicts, with the columns in `TASK_COLUMNS` (the synthetic world's names) or others
  given by ``columns``.

Bad samples follow `albef_hf.data.readers`: a missing or unreadable image is counted in
``skip_stats`` and replaced by the next readable sample; a missing column, key or file, or a label
that is not one of the task's, is a `ValueError` / `FileNotFoundError` when the reader is built.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Subset

from .readers import (
    SkipStats,
    _annotation_paths,
    _check_dir,
    _json_entries,
    _load_image,
    _MapStyleReader,
    _prepare_image_column,
)

__all__ = [
    "TASK_COLUMNS",
    "TaskDataset",
    "collect_answers",
    "read_grounding_json",
    "read_nlvr_json",
    "read_task_table",
    "read_ve_json",
    "read_vqa_json",
]

#: Column of each sample field per task, for tables (`read_task_table`); None: optional.
TASK_COLUMNS: dict[str, dict[str, str | None]] = {
    "vqa": {"image": "image", "text": "question", "answers": "answers", "weights": "weights"},
    "nlvr2": {"image0": "image0", "image1": "image1", "text": "sentence", "label": "label"},
    "ve": {"image": "image", "text": "hypothesis", "label": "label"},
    "grounding": {
        "image": "image",
        "text": "text",
        "image_id": "image_id",
        "box": "box",
        "candidate_boxes": "candidate_boxes",
    },
}
# Fields a table may lack: answers (VQA test questions), weights, image ids (the row then) and boxes (training).
_OPTIONAL = {"answers", "weights", "image_id", "box", "candidate_boxes"}
_IMAGE_FIELDS = ("image", "image0", "image1")
_LABELS = {
    "nlvr2": {"false": 0, "true": 1},
    "ve": {"contradiction": 0, "neutral": 1, "entailment": 2},
}
BOX_FORMATS = ("xywh", "xyxy")


def _label(value: Any, task: str) -> int:
    """A class id from an int, a bool, or a label name ("True", "entailment", ...)."""
    names = _LABELS[task]
    if isinstance(value, str):
        if value.strip().lower() not in names:
            raise ValueError(f"unknown {task} label {value!r}; expected one of {sorted(names)} or an id")
        return names[value.strip().lower()]
    if isinstance(value, bool) or (isinstance(value, int) and 0 <= value < len(names)):
        return int(value)
    raise ValueError(f"unknown {task} label {value!r}; expected one of {sorted(names)} or an id")


def _box(value: Any, box_format: str) -> list[float]:
    """A box as [x, y, w, h]; "xyxy" boxes ([x0, y0, x1, y1], x1 and y1 exclusive) are converted."""
    if not isinstance(value, Sequence) or len(value) != 4:
        raise ValueError(f"a box needs 4 numbers, got {value!r}")
    x, y, a, b = (float(v) for v in value)
    return [x, y, a - x, b - y] if box_format == "xyxy" else [x, y, a, b]


class TaskDataset(_MapStyleReader):
    """A map-style dataset of downstream samples: `convert(records[i], i)` with its images decoded.

    `convert` returns the sample's fields with the images still undecoded (paths, bytes, PIL images) under
    "image", or "image0" and "image1" for a pair (which become "images"); relative paths are joined to
    `image_root` (or to the sample's own "_image_root") when the sample is read.
    """

    def __init__(
        self,
        records: Sequence[Any],
        convert: Callable[[Any, int], dict[str, Any]],
        image_root: str | None = None,
        name: str = "dataset",
    ) -> None:
        _check_dir(image_root, "image root")
        self.records = records
        self.convert = convert
        self.image_root = image_root
        self.skip_stats = SkipStats(name)

    def __len__(self) -> int:
        return len(self.records)

    def head(self, count: int) -> TaskDataset:
        """The first `count` samples (all when there are fewer)."""
        records = Subset(self.records, range(min(count, len(self.records))))
        return TaskDataset(records, self.convert, self.image_root, self.skip_stats.name)

    def sample(self, count: int, seed: int) -> TaskDataset:
        """`count` samples drawn at random without replacement (all when there are fewer), in their order here.

        The first samples of a file are often not typical of it (sorted by image, by question type, ...); a
        seeded draw gives a representative subset that is the same in every run.
        """
        if count >= len(self.records):
            return self
        rows = np.sort(np.random.default_rng(seed).choice(len(self.records), size=count, replace=False))
        records = Subset(self.records, rows.tolist())
        return TaskDataset(records, self.convert, self.image_root, self.skip_stats.name)

    def fields(self, index: int) -> dict[str, Any]:
        """Sample `index` without decoding its images (cheap for json entries and tables)."""
        return self.convert(self.records[index], index)

    def _sample(self, index: int) -> dict[str, Any]:
        sample = self.fields(index)
        root = sample.pop("_image_root", None) or self.image_root
        if "image0" in sample:
            sample["images"] = [_load_image(sample.pop(key), root) for key in ("image0", "image1")]
        else:
            sample["image"] = _load_image(sample.get("image"), root)
        return sample


def _load_entries(
    paths: str | os.PathLike | Sequence[str | os.PathLike], required: Sequence[str]
) -> list[dict]:
    entries = []
    for where, entry in _json_entries(_annotation_paths(paths)):
        lacking = [key for key in required if not isinstance(entry, dict) or key not in entry]
        if lacking:
            raise ValueError(f"{where}: an entry needs the keys {list(required)}; lacks {lacking}")
        entries.append(entry)
    return entries


def _source_name(kind: str, paths: str | os.PathLike | Sequence[str | os.PathLike]) -> str:
    return f"{kind} json {', '.join(os.path.basename(path) for path in _annotation_paths(paths))}"


def _extras(record: Mapping[str, Any], used: Sequence[str]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in used}


def read_vqa_json(
    paths: str | Sequence[str], vqa_root: str | None = None, vg_root: str | None = None
) -> TaskDataset:
    """The original's VQA files: `{"question_id", "question", "answer", "image", "dataset"}` entries.

    Training entries of `"dataset": "vqa"` list the annotators' answers (repeats allowed; weights by counts, as
    the original); `"vg"` entries (Visual Genome) have one answer of weight 0.5, as the original. Test entries
    have no `"answer"`. Images are under `vqa_root` (`vg_root` for Visual Genome entries).
    """
    entries = _load_entries(paths, ("question", "image"))
    _check_dir(vg_root, "Visual Genome image root")

    def convert(entry: dict[str, Any], index: int) -> dict[str, Any]:
        sample = {**_extras(entry, ("question", "answer", "image")), "image": entry["image"]}
        sample["text"] = entry["question"]
        if entry.get("dataset") == "vg":
            sample["_image_root"] = vg_root
        if "answer" in entry:
            answers = entry["answer"]
            sample["answers"] = [answers] if isinstance(answers, str) else list(answers)
            sample["weights"] = [0.5] if entry.get("dataset") == "vg" else None
        return sample

    return TaskDataset(entries, convert, vqa_root, _source_name("VQA", paths))


def read_nlvr_json(paths: str | Sequence[str], image_root: str | None = None) -> TaskDataset:
    """The original's NLVR2 files: `{"images": [left, right], "sentence", "label": "True" | "False"}` entries."""
    entries = _load_entries(paths, ("images", "sentence", "label"))
    for entry in entries:
        entry["label"] = _label(entry["label"], "nlvr2")

    def convert(entry: dict[str, Any], index: int) -> dict[str, Any]:
        left, right = entry["images"]
        sample = _extras(entry, ("images", "sentence"))
        return {**sample, "image0": left, "image1": right, "text": entry["sentence"]}

    return TaskDataset(entries, convert, image_root, _source_name("NLVR2", paths))


def read_ve_json(paths: str | Sequence[str], image_root: str | None = None) -> TaskDataset:
    """The original's SNLI-VE files: `{"image": Flickr30K id, "sentence", "label": name}` entries.

    The image of an entry is `<image>.jpg` under `image_root` (an `image` with an extension is used as it is).
    """
    entries = _load_entries(paths, ("image", "sentence", "label"))
    for entry in entries:
        entry["label"] = _label(entry["label"], "ve")

    def convert(entry: dict[str, Any], index: int) -> dict[str, Any]:
        image = str(entry["image"])
        image = image if os.path.splitext(image)[1] else f"{image}.jpg"
        return {**_extras(entry, ("image", "sentence")), "image": image, "text": entry["sentence"]}

    return TaskDataset(entries, convert, image_root, _source_name("SNLI-VE", paths))


def read_grounding_json(
    paths: str | Sequence[str], image_root: str | None = None, box_format: str = "xywh"
) -> TaskDataset:
    """The original's RefCOCO+ files: `{"image", "text", "ref_id"}` entries.

    `image_id` numbers the image file names (the last path component) in order of first appearance, as the
    original's training set does. For evaluation every entry also needs `"box"` (the referred object) and
    `"candidate_boxes"` (what to choose from, e.g. detections), `[x, y, w, h]` in image pixels (or corners with
    `box_format="xyxy"`).
    """
    _check_box_format(box_format)
    entries = _load_entries(paths, ("image", "text"))
    ids: dict[str, int] = {}
    for entry in entries:
        entry["image_id"] = ids.setdefault(str(entry["image"]).split("/")[-1], len(ids))

    def convert(entry: dict[str, Any], index: int) -> dict[str, Any]:
        return _grounding_boxes(dict(entry), box_format)

    return TaskDataset(entries, convert, image_root, _source_name("grounding", paths))


def _grounding_boxes(sample: dict[str, Any], box_format: str) -> dict[str, Any]:
    if sample.get("box") is not None:
        sample["box"] = _box(sample["box"], box_format)
    if sample.get("candidate_boxes") is not None:
        sample["candidate_boxes"] = [_box(box, box_format) for box in sample["candidate_boxes"]]
    return sample


def _check_box_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")


def read_task_table(
    table: Any,
    task: str,
    columns: Mapping[str, str | None] | None = None,
    image_root: str | None = None,
    box_format: str = "xywh",
) -> TaskDataset:
    """Downstream samples from a table: a `datasets.Dataset`, a `SyntheticDataset`, or a list of dicts.

    Args:
        table: rows with the columns of `TASK_COLUMNS[task]` (or those named in `columns`).
        task: "vqa", "nlvr2", "ve" or "grounding".
        columns: `{field: column}` replacing defaults of `TASK_COLUMNS[task]` (e.g. `{"text": "sentence"}`); a
            field mapped to None is not read.
        image_root: directory relative image paths are under.
        box_format: "xywh" or "xyxy" (corners, x1/y1 exclusive: the synthetic world's).

    A VQA table without `answers` gives test questions; `weights` is optional (counts then); grounding without
    `image_id` numbers the rows; without boxes it serves training only. Labels may be ids or names.
    """
    if task not in TASK_COLUMNS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_COLUMNS)}")
    _check_box_format(box_format)
    mapping = {**TASK_COLUMNS[task], **(columns or {})}
    unknown = set(mapping) - set(TASK_COLUMNS[task])
    if unknown:
        raise ValueError(
            f"unknown {task} fields {sorted(unknown)}; the fields are {sorted(TASK_COLUMNS[task])}"
        )
    available = _column_names(table)
    if available is not None:
        missing = {
            f: c for f, c in mapping.items() if c is not None and c not in available and f not in _OPTIONAL
        }
        if missing:
            raise ValueError(
                f"{task}: columns {missing} not in the table; available columns: {sorted(available)}"
            )
        mapping = {f: c for f, c in mapping.items() if c is not None and c in available}
        for field in _IMAGE_FIELDS:
            if field in mapping and hasattr(table, "cast_column"):
                table = _prepare_image_column(table, mapping[field])
    used = set(mapping.values())

    def convert(row: Mapping[str, Any], index: int) -> dict[str, Any]:
        sample = {key: value for key, value in row.items() if key not in used}
        sample.update({field: row[column] for field, column in mapping.items()})
        if task == "vqa" and isinstance(sample.get("answers"), str):
            sample["answers"] = [sample["answers"]]
        if "label" in sample:
            sample["label"] = _label(sample["label"], task)
        if task == "grounding":
            sample.setdefault("image_id", index)
            sample = _grounding_boxes(sample, box_format)
        return sample

    return TaskDataset(table, convert, image_root, f"{task} table")


def _column_names(table: Any) -> set[str] | None:
    """The columns of a table: `column_names`, else the keys of its first row (None for an empty table)."""
    names = getattr(table, "column_names", None)
    if names is not None:
        return set(names)
    return set(table[0]) if len(table) else None


def collect_answers(dataset: Any, limit: int | None = None) -> list[str]:
    """The distinct answers of VQA samples, most frequent first (ties: first seen), at most `limit`.

    The original's answer list holds the most frequent training answers; this builds one from a training set
    (a `TaskDataset` is read without decoding its images).
    """
    counts: dict[str, int] = {}
    read = getattr(dataset, "fields", dataset.__getitem__)
    for index in range(len(dataset)):
        for answer in read(index).get("answers") or []:
            counts[answer] = counts.get(answer, 0) + 1
    ranked = sorted(counts, key=lambda answer: -counts[answer])
    return ranked[:limit] if limit else ranked
