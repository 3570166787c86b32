"""Image-text dataset readers: ALBEF annotation json, Hugging Face datasets, webdataset tar shards.

Every reader yields the same sample form::

    {"image": PIL.Image.Image (RGB), "text": str, "image_id": int, **extras}

- ``text`` is the caption as stored (normalisation is the processor's job); an entry with a list of
  captions becomes one sample per caption, all with the same ``image_id``.
- ``image_id`` is equal for all captions of one image and differs between images of one reader,
  which is what retrieval training (positives by image) and evaluation (text -> image) need. How
  it is derived is stated per reader.
- ``extras`` are the other fields of the record (json keys, dataset columns, webdataset ``key`` and
  ``metadata``); they never override the three keys above.

Bad samples are skipped and counted, never fatal
------------------------------------------------
A missing or undecodable image, an empty or whitespace-only caption, or an unreadable tar shard is
recorded in the reader's `SkipStats` (``reader.skip_stats``) with a warning, and no sample is
produced for it. The counters live in shared memory, so counts made inside DataLoader worker
processes are visible in the main process, where a trainer can report them.

- Map-style readers drop empty captions when they are built (captions are already in memory, so
  this is cheap) and check images lazily: when the image of index ``i`` cannot be read,
  ``__getitem__`` counts it and returns the next readable sample (``i + 1``, ``i + 2``, ... modulo
  the length) instead. A collator therefore never sees a bad sample and a worker never crashes; the
  price is that a substituted neighbour appears twice in that epoch. A bad image is counted each
  time its own index is requested, i.e. once per epoch.
- Iterable readers simply do not yield bad samples.

Arguments that cannot work (a missing annotation file, image root or column, a shard pattern that
matches nothing) raise `FileNotFoundError` / `ValueError` at construction.

Distributed streaming
---------------------
Iterable readers split their stream over the DataLoader workers of a process automatically and over
processes only when given ``rank`` and ``world_size`` explicitly. They do not read RANK/WORLD_SIZE
from the environment on purpose: `transformers.Trainer` (through accelerate) already splits an
iterable dataset across processes by default (process 0 reads and dispatches batches), and a
stream split twice silently loses data. Pass ``rank``/``world_size`` only in a loop that does not.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import logging
import multiprocessing
import multiprocessing.context
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

__all__ = [
    "SKIP_REASONS",
    "AlbefJsonDataset",
    "HFImageTextDataset",
    "HFStreamingImageTextDataset",
    "SkipStats",
    "WebDatasetShards",
    "build_image_text_dataset",
    "expand_shard_pattern",
    "load_named_dataset",
    "read_albef_json",
    "read_hf_dataset",
    "read_webdataset",
]

logger = logging.getLogger(__name__)

#: Why a sample can be skipped.
SKIP_REASONS: tuple[str, ...] = ("missing_image", "unreadable_image", "empty_text", "unreadable_shard")
_RESERVED_KEYS = ("image", "text", "image_id")
# PIL raises all of these for truncated, corrupt or hostile files depending on the format.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class SkipStats:
    """Counts of skipped samples per reason (`SKIP_REASONS` by default), shared across processes.

    The counters sit in shared memory (a `multiprocessing.RawArray`), inherited by DataLoader
    worker processes (fork) or handed to them as they start (spawn, forkserver), so that
    ``as_dict()`` in the main process includes what the workers skipped. Each worker writes only
    its own row of counters, which needs no lock (a lock would tie the object to one
    multiprocessing start method). Any other copy (`copy.deepcopy`, `pickle`) carries a detached
    snapshot of the counts.

    Args:
        name: shown in the warnings, to tell several datasets apart.
        reasons: the reasons counted (the collators count their own).
    """

    # row 0: the main process; rows 1...: DataLoader workers (ids beyond the rows share them)
    _ROWS = 256

    def __init__(self, name: str = "dataset", reasons: Sequence[str] = SKIP_REASONS):
        self.name = name
        self.reasons = tuple(reasons)
        self._counts = multiprocessing.RawArray("q", self._ROWS * len(self.reasons))

    def _row_start(self) -> int:
        worker = get_worker_info()
        row = 0 if worker is None else 1 + worker.id % (self._ROWS - 1)
        return row * len(self.reasons)

    def record(self, reason: str, detail: str) -> None:
        """Count one skipped sample and log a warning with the running count. A process warns
        at its 1st, 2nd, 4th, 8th, ... skip of each reason, so that a badly broken corpus does
        not flood the log."""
        slot = self._row_start() + self.reasons.index(reason)
        self._counts[slot] += 1
        own = self._counts[slot]
        if own & (own - 1) == 0:
            logger.warning(
                "%s: skipped a sample (%s: %s); %d skipped for this reason so far",
                self.name,
                reason,
                detail,
                self.as_dict()[reason],
            )

    def as_dict(self) -> dict[str, int]:
        """{reason: number of skipped samples} for every counted reason."""
        totals = np.frombuffer(self._counts, dtype=np.int64).reshape(self._ROWS, -1).sum(axis=0)
        return dict(zip(self.reasons, totals.tolist(), strict=True))

    @property
    def total(self) -> int:
        """Number of skipped samples, all reasons together."""
        return sum(self.as_dict().values())

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        if multiprocessing.context.get_spawning_popen() is None:
            # Shared memory should only travel to a process being started; anything else gets a copy.
            state["_counts"] = list(self._counts)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if isinstance(state["_counts"], list):
            state["_counts"] = multiprocessing.RawArray("q", state["_counts"])
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.as_dict()})"


class _BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _stable_id(value: Any) -> int:
    """A non-negative int for ``value``: ints and digit strings as they are (img2dataset keys,
    COCO ids), anything else through a 63-bit hash, equal in every process and run."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    data = value if isinstance(value, bytes) else str(value).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big") >> 1


def _is_empty(text: Any) -> bool:
    return not isinstance(text, str) or not text.strip()


def _decode(data: bytes | str | os.PathLike, what: str) -> Image.Image:
    """Open image bytes or a file and return it fully decoded in RGB, or raise `_BadSample`."""
    try:
        if isinstance(data, bytes):
            with Image.open(io.BytesIO(data)) as image:
                return image.convert("RGB")
        with open(data, "rb") as file, Image.open(file) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise _BadSample("missing_image", what) from error
    except _DECODE_ERRORS as error:
        raise _BadSample("unreadable_image", f"{what}: {error}") from error


def _load_image(value: Any, image_root: str | None) -> Image.Image:
    """Decode what an image column holds: a PIL image, `datasets.Image(decode=False)`'s
    {"bytes", "path"} dict, raw bytes, or a path (joined to ``image_root`` when relative)."""
    if isinstance(value, Image.Image):
        try:
            return value.convert("RGB")  # also loads a lazily opened image: errors surface here
        except _DECODE_ERRORS as error:
            raise _BadSample("unreadable_image", f"PIL image: {error}") from error
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return _decode(value["bytes"], value.get("path") or "image bytes")
        value = value.get("path")
    if isinstance(value, bytes):
        return _decode(value, "image bytes")
    if not value:
        raise _BadSample("missing_image", "no image in the record")
    path = os.path.join(image_root, value) if image_root else value
    return _decode(path, path)


def _check_dir(path: str | None, what: str) -> None:
    if path is not None and not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} is not a directory")


def _make_sample(image: Image.Image, text: str, image_id: int, extras: dict[str, Any]) -> dict[str, Any]:
    extras = {key: value for key, value in extras.items() if key not in _RESERVED_KEYS}
    return {**extras, "image": image, "text": text, "image_id": image_id}


class _MapStyleReader(Dataset):
    """Map-style base: substitutes the next readable sample for one whose image fails to load."""

    skip_stats: SkipStats

    def __len__(self) -> int:
        raise NotImplementedError

    def _sample(self, index: int) -> dict[str, Any]:
        """The sample at ``index``, or `_BadSample`."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        length = len(self)
        if not -length <= index < length:
            raise IndexError(f"index {index} out of range for {length} samples")
        for offset in range(length):
            try:
                return self._sample((index + offset) % length)
            except _BadSample as bad:
                # Count only the requested index: a bad neighbour passed over here is counted when
                # its own index is requested, so each bad sample counts once per epoch.
                if offset == 0:
                    self.skip_stats.record(bad.reason, bad.detail)
        raise ValueError(f"no sample of {type(self).__name__} has a readable image; {self.skip_stats}")


def _annotation_paths(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """One path or several, as a list of strings; raises when there is none or a file is missing."""
    paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [str(path) for path in paths]
    if not paths:
        raise ValueError("no annotation file given")
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise FileNotFoundError(f"annotation file(s) not found: {missing}")
    return paths


def _json_entries(paths: Sequence[str]) -> list[tuple[str, Any]]:
    """`(where, entry)` for every entry of json files that each hold a list (`where` is `file[position]`)."""
    entries = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as file:
                loaded = json.load(file)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{path}: not a JSON annotation file ({error})") from error
        if not isinstance(loaded, list):
            raise ValueError(f"{path}: expected a list of annotation entries, got {type(loaded).__name__}")
        entries += [(f"{path}[{position}]", entry) for position, entry in enumerate(loaded)]
    return entries


class AlbefJsonDataset(_MapStyleReader):
    """Map-style reader of the original ALBEF annotation files; see `read_albef_json`."""

    def __init__(self, paths: str | Sequence[str], image_root: str | None = None, text_key: str = "caption"):
        paths = _annotation_paths(paths)
        entries = _json_entries(paths)
        _check_dir(image_root, "image root")
        self.image_root = image_root
        self.skip_stats = SkipStats(f"ALBEF json {os.path.basename(paths[0])}")
        # (image path, caption, image id, extras), one per caption
        self._samples: list[tuple[str, str, int, dict[str, Any]]] = []
        ids: dict[Any, int] = {}
        for where, entry in entries:
            self._add_entry(entry, text_key, ids, where)

    def _add_entry(self, entry: Any, text_key: str, ids: dict[Any, int], where: str) -> None:
        if not isinstance(entry, dict) or "image" not in entry or text_key not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise ValueError(f"{where}: an entry needs the keys 'image' and {text_key!r}; found {found}")
        captions = entry[text_key]
        captions = captions if isinstance(captions, list) else [captions]
        # consecutive ids in order of first appearance, as the original's retrieval datasets do
        image_id = ids.setdefault(entry.get("image_id", entry["image"]), len(ids))
        extras = {key: value for key, value in entry.items() if key not in ("image", text_key)}
        for caption in captions:
            if _is_empty(caption):
                self.skip_stats.record("empty_text", f"{where}: {caption!r}")
            else:
                self._samples.append((entry["image"], caption, image_id, extras))

    def __len__(self) -> int:
        return len(self._samples)

    def _sample(self, index: int) -> dict[str, Any]:
        image, caption, image_id, extras = self._samples[index]
        return _make_sample(_load_image(image, self.image_root), caption, image_id, extras)


def read_albef_json(
    paths: str | Sequence[str], image_root: str | None = None, text_key: str = "caption"
) -> AlbefJsonDataset:
    """Read ALBEF annotation files: json lists of ``{"image": path, "caption": str | [str], ...}``.

    Args:
        paths: one file or several, concatenated in order (the original's ``train_file`` list).
        image_root: directory the ``image`` paths are relative to; None when they are absolute or
            relative to the working directory (the original's pretraining files).
        text_key: the caption key ("caption"; the grounding files use "text").

    Returns:
        A map-style dataset, one sample per caption. ``image_id`` numbers the distinct
        ``image_id`` values of the entries (else their ``image`` paths) 0, 1, ... in order of first
        appearance; the other keys of an entry (e.g. ``ref_id``) are passed through.
    """
    return AlbefJsonDataset(paths, image_root, text_key)


def _require_columns(found: Sequence[str], wanted: dict[str, str | None]) -> None:
    for role, column in wanted.items():
        if column is not None and column not in found:
            raise ValueError(f"{role} {column!r} not in the dataset; available columns: {list(found)}")


def _prepare_image_column(dataset: Any, column: str) -> Any:
    """Ask `datasets` for undecoded {"bytes", "path"} so that decoding errors surface here, per
    sample, instead of inside `datasets` where they would abort the whole row access or stream."""
    import datasets

    features = dataset.features
    if features is not None and isinstance(features.get(column), datasets.Image) and features[column].decode:
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _caption_index(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """Flatten a text column of str or list[str] to (row, position in row, caption) arrays."""
    column = column.combine_chunks()
    if pa.types.is_list(column.type) or pa.types.is_large_list(column.type):
        lengths = pc.fill_null(pc.list_value_length(column), 0).to_numpy(zero_copy_only=False)
        rows = np.repeat(np.arange(len(column)), lengths)
        positions = np.arange(len(rows)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return rows, positions, pc.list_flatten(column)
    return np.arange(len(column)), np.zeros(len(column), dtype=np.int64), column


class HFImageTextDataset(_MapStyleReader):
    """Map-style reader of a `datasets.Dataset`; see `read_hf_dataset`."""

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        text_column: str = "text",
        image_root: str | None = None,
        id_column: str | None = None,
    ):
        _require_columns(
            dataset.column_names,
            {"image column": image_column, "text column": text_column, "id column": id_column},
        )
        _check_dir(image_root, "image root")
        text = dataset.with_format("arrow")[text_column]
        is_text = pa.types.is_string(text.type) or pa.types.is_large_string(text.type)
        is_text_list = (pa.types.is_list(text.type) or pa.types.is_large_list(text.type)) and (
            pa.types.is_string(text.type.value_type) or pa.types.is_large_string(text.type.value_type)
        )
        if not (is_text or is_text_list):
            raise ValueError(f"text column {text_column!r} must hold str or list of str, found {text.type}")
        self.dataset = _prepare_image_column(dataset, image_column)
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.image_root = image_root
        self.skip_stats = SkipStats(f"dataset column {text_column!r}")

        rows, positions, captions = _caption_index(text)
        keep = pc.fill_null(pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(captions)), 0), False)
        keep = keep.to_numpy(zero_copy_only=False)
        for row in rows[~keep]:
            self.skip_stats.record("empty_text", f"row {row}")
        empty_rows = np.setdiff1d(np.arange(len(text)), rows)  # null or [] captions
        for row in empty_rows:
            self.skip_stats.record("empty_text", f"row {row}: no caption")
        self._rows, self._positions = rows[keep], positions[keep]
        self._is_list = is_text_list

    def __len__(self) -> int:
        return len(self._rows)

    def _sample(self, index: int) -> dict[str, Any]:
        row = int(self._rows[index])
        record = self.dataset[row]
        text = record[self.text_column]
        caption = text[int(self._positions[index])] if self._is_list else text
        image = _load_image(record[self.image_column], self.image_root)
        image_id = _stable_id(record[self.id_column]) if self.id_column else row
        extras = {
            key: value for key, value in record.items() if key not in (self.image_column, self.text_column)
        }
        return _make_sample(image, caption, image_id, extras)


def _consumer(rank: int, world_size: int) -> tuple[int, int]:
    """(index, count) of this reader among all DataLoader workers of all processes."""
    worker = get_worker_info()
    workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
    return rank * workers + worker_id, world_size * workers


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")


class HFStreamingImageTextDataset(IterableDataset):
    """Iterable reader of a `datasets.IterableDataset`; see `read_hf_dataset`."""

    def __init__(
        self,
        dataset: Any,
        image_column: str = "image",
        text_column: str = "text",
        image_root: str | None = None,
        id_column: str | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        import datasets.distributed

        _check_rank(rank, world_size)
        # Without declared features the columns are only known from a record; peek at the first.
        columns = dataset.column_names or list(next(iter(dataset), {}))
        _require_columns(
            columns, {"image column": image_column, "text column": text_column, "id column": id_column}
        )
        _check_dir(image_root, "image root")
        dataset = _prepare_image_column(dataset, image_column)
        if world_size > 1:
            # by shards when they divide evenly, else every world_size-th record; `datasets` also
            # splits each process's part across its DataLoader workers by itself
            dataset = datasets.distributed.split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.dataset = dataset
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.image_root = image_root
        self.skip_stats = SkipStats(f"streaming dataset column {text_column!r}")

    def set_epoch(self, epoch: int) -> None:
        """Forwarded to the `datasets.IterableDataset` (reseeds its shuffling, if any)."""
        self.dataset.set_epoch(epoch)

    def _image_id(self, record: dict[str, Any]) -> int:
        # Row numbers differ between workers and ranks, so identify the image by what it is.
        if self.id_column:
            return _stable_id(record[self.id_column])
        value = record[self.image_column]
        if isinstance(value, dict):
            value = value.get("path") or value.get("bytes")
        if isinstance(value, Image.Image):
            value = value.tobytes()
        return _stable_id(value)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for record in self.dataset:
            texts = record[self.text_column]
            texts = texts if isinstance(texts, list) else [texts]
            captions = [text for text in texts if not _is_empty(text)]
            for text in texts:
                if _is_empty(text):
                    self.skip_stats.record("empty_text", repr(text))
            if not texts:
                self.skip_stats.record("empty_text", "no caption")
            if not captions:
                continue
            try:
                image = _load_image(record[self.image_column], self.image_root)
            except _BadSample as bad:
                # one bad image loses all its captions: count each, as a map-style reader would
                for _ in captions:
                    self.skip_stats.record(bad.reason, bad.detail)
                continue
            image_id = self._image_id(record)
            extras = {
                key: value
                for key, value in record.items()
                if key not in (self.image_column, self.text_column)
            }
            for caption in captions:
                yield _make_sample(image, caption, image_id, extras)


def read_hf_dataset(
    dataset: Any,
    image_column: str = "image",
    text_column: str = "text",
    *,
    image_root: str | None = None,
    id_column: str | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> HFImageTextDataset | HFStreamingImageTextDataset:
    """Read a Hugging Face dataset with an image column and a text column.

    Covers ``datasets.load_dataset("imagefolder", data_dir=...)`` with a ``metadata.jsonl``
    (columns "image" and your metadata fields), any Hub or local dataset, and streaming ones.

    Args:
        dataset: a `datasets.Dataset` (gives a map-style reader) or `datasets.IterableDataset`
            (gives an iterable one). Pick a split of a `DatasetDict` first.
        image_column: holds `datasets.Image` values (decoded here, so that a corrupt file is
            skipped, not fatal), PIL images, image bytes, or paths.
        text_column: holds a str or a list of str per row.
        image_root: directory that relative paths in ``image_column`` are relative to.
        id_column: column identifying the image (ints and digit strings kept, other values
            hashed). Without it ``image_id`` is the row number (map-style) or a hash of the image's
            path or bytes (streaming, where row numbers differ between workers).
        rank, world_size: this process's part of a stream (iterable form only; see the module
            docstring before using them with `transformers.Trainer`).

    Returns:
        One sample per non-empty caption; the other columns are passed through.
    """
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(
            f"got a dataset dict; pick a split first, e.g. dataset['train'] (splits: {list(dataset)})"
        )
    if isinstance(dataset, datasets.IterableDataset):
        return HFStreamingImageTextDataset(
            dataset, image_column, text_column, image_root, id_column, rank, world_size
        )
    if isinstance(dataset, datasets.Dataset):
        if world_size != 1:
            raise ValueError(
                "rank/world_size apply to streaming datasets; a map-style one is split by a sampler"
            )
        return HFImageTextDataset(dataset, image_column, text_column, image_root, id_column)
    raise TypeError(f"expected a datasets.Dataset or datasets.IterableDataset, got {type(dataset).__name__}")


_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")


def _expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00009}`` (zero-padded to the first bound's width) and ``{a,b}``."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numeric = _RANGE.match(body)
    if numeric:
        first, last = numeric.groups()
        options = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for option in options for path in _expand_braces(head + option + tail)]


def expand_shard_pattern(shards: str | Sequence[str]) -> list[str]:
    """Local shard paths from a path, a glob (``shards/*.tar``), a brace pattern
    (``shards/{00000..00009}.tar``) or a list of these, in order.

    Raises:
        FileNotFoundError: when a pattern matches nothing or a listed shard does not exist; the
            message names them and what the directory holds.
    """
    patterns = [shards] if isinstance(shards, (str, os.PathLike)) else list(shards)
    paths, missing = [], []
    for pattern in patterns:
        for candidate in _expand_braces(str(pattern)):
            if glob.has_magic(candidate):
                found = sorted(glob.glob(candidate))
            else:
                found = [candidate] if os.path.isfile(candidate) else []
            if not found:
                missing.append(candidate)
            paths.extend(found)
    if missing:
        directory = os.path.dirname(missing[0]) or "."
        if os.path.isdir(directory):
            found = sorted(os.path.basename(path) for path in glob.glob(os.path.join(directory, "*.tar*")))
            context = f"tar files in {directory!r}: {found[:5] or 'none'}{' ...' if len(found) > 5 else ''}"
        else:
            context = f"directory {directory!r} does not exist"
        raise FileNotFoundError(
            f"{len(missing)} shard pattern(s) match no file, e.g. {missing[:3]}; {context}"
        )
    if not paths:
        raise FileNotFoundError("no shard given")
    return paths


def _split_member(name: str) -> tuple[str, str]:
    """webdataset naming: the key is the path up to the first dot of the file name, the field the
    rest (``a/000001.seg.png`` -> ``("a/000001", "seg.png")``)."""
    directory, _, filename = name.rpartition("/")
    stem, _, field = filename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), field.lower()


class WebDatasetShards(IterableDataset):
    """Iterable reader of webdataset tar shards; see `read_webdataset`."""

    def __init__(
        self,
        shards: str | Sequence[str],
        image_extensions: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        text_extension: str = "txt",
        rank: int = 0,
        world_size: int = 1,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        seed: int = 0,
    ):
        _check_rank(rank, world_size)
        self.shards = expand_shard_pattern(shards)
        self.image_extensions = tuple(ext.lower() for ext in image_extensions)
        self.text_extension = text_extension.lower()
        self.rank, self.world_size = rank, world_size
        self.shuffle_shards, self.shuffle_buffer, self.seed = shuffle_shards, shuffle_buffer, seed
        self.epoch = 0
        self.skip_stats = SkipStats(f"webdataset {os.path.basename(self.shards[0])}...")

    def set_epoch(self, epoch: int) -> None:
        """Select the shard order and shuffling of ``epoch`` (the same in every process)."""
        self.epoch = epoch

    def _members(self, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        """(key, {field: bytes}) per sample of one shard; a broken shard is counted and left."""
        key, fields = None, {}
        try:
            # "r|*": a forward-only stream, so a shard is never loaded whole; compression autodetected
            with tarfile.open(shard, mode="r|*") as archive:
                for member in archive:
                    if not member.isfile():
                        continue
                    member_key, field = _split_member(member.name)
                    if member_key != key and key is not None:
                        yield key, fields
                        fields = {}
                    key = member_key
                    fields[field] = archive.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError) as error:
            # the sample being read when the shard broke is lost with it
            self.skip_stats.record("unreadable_shard", f"{shard}: {error}")
            return
        if key is not None:
            yield key, fields

    def _sample(self, key: str, fields: dict[str, bytes]) -> dict[str, Any]:
        raw_text = fields.get(self.text_extension)
        text = raw_text.decode("utf-8", errors="replace") if raw_text is not None else None
        if _is_empty(text):
            raise _BadSample("empty_text", f"{key}: {text!r}")
        image_field = next((ext for ext in self.image_extensions if ext in fields), None)
        if image_field is None:
            raise _BadSample("missing_image", f"{key}: fields {sorted(fields)}")
        image = _decode(fields[image_field], f"{key}.{image_field}")
        extras: dict[str, Any] = {"key": key}
        if "json" in fields:
            try:
                extras["metadata"] = json.loads(fields["json"])
            except ValueError:
                logger.debug("%s: unreadable json metadata, left out", key)
        # img2dataset keys are digit strings unique across shards: use them as ids
        return _make_sample(image, text, _stable_id(key), extras)

    def _own_samples(self) -> Iterator[dict[str, Any]]:
        consumer, consumers = _consumer(self.rank, self.world_size)
        shards = list(self.shards)
        if self.shuffle_shards:
            # same permutation in every consumer (seed and epoch only), so the split stays disjoint
            np.random.default_rng([self.seed, self.epoch]).shuffle(shards)
        if len(shards) >= consumers:
            shards, stride, phase = shards[consumer::consumers], 1, 0
        else:
            # fewer shards than readers: everyone reads every shard and keeps every n-th sample
            stride, phase = consumers, consumer
        position = 0
        for shard in shards:
            for key, fields in self._members(shard):
                position += 1
                if (position - 1) % stride != phase:
                    continue
                try:
                    yield self._sample(key, fields)
                except _BadSample as bad:
                    self.skip_stats.record(bad.reason, bad.detail)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        samples = self._own_samples()
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        consumer, _ = _consumer(self.rank, self.world_size)
        rng = np.random.default_rng([self.seed, self.epoch, consumer])
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            # yield a random buffered sample and put the new one in its place
            slot = int(rng.integers(len(buffer)))
            buffer[slot], sample = sample, buffer[slot]
            yield sample
        rng.shuffle(buffer)
        yield from buffer


def read_webdataset(
    shards: str | Sequence[str],
    *,
    image_extensions: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
    text_extension: str = "txt",
    rank: int = 0,
    world_size: int = 1,
    shuffle_shards: bool = False,
    shuffle_buffer: int = 0,
    seed: int = 0,
) -> WebDatasetShards:
    """Stream webdataset tar shards as img2dataset writes them (``00000.tar`` holding
    ``000000000.jpg``, ``000000000.txt``, ``000000000.json``, ...).

    Read with `tarfile` as a forward-only stream, not with the `datasets` "webdataset" builder: the
    builder infers one schema from the first five samples (dropping json keys it did not see there,
    rejecting shards where an early sample lacks a file), aborts the stream on a corrupt shard, and
    knows no brace patterns.

    Args:
        shards: paths, globs or brace patterns (see `expand_shard_pattern`); local files.
        image_extensions: image fields looked for, in order of preference.
        text_extension: the caption field.
        rank, world_size: this process's part (see the module docstring before using them with
            `transformers.Trainer`). Shards are dealt round-robin to all DataLoader workers of all
            processes; with fewer shards than workers, every worker reads every shard and keeps
            every n-th sample. Uneven shards give uneven streams, so bound training by steps.
        shuffle_shards: permute the shard order every epoch (`set_epoch`), identically everywhere.
            The epoch travels to DataLoader workers when they start, so with
            ``persistent_workers=True`` they keep the first epoch's order.
        shuffle_buffer: when > 1, shuffle samples through a buffer of this many (memory: that many
            decoded images per worker).
        seed: seed of both shuffles.

    Returns:
        An iterable dataset of samples with extras ``key`` (the sample's key) and ``metadata``
        (its parsed ``.json``, when present); ``image_id`` is the key's number (img2dataset keys are
        unique across shards) or a hash of a non-numeric key.
    """
    return WebDatasetShards(
        shards, image_extensions, text_extension, rank, world_size, shuffle_shards, shuffle_buffer, seed
    )


_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def build_image_text_dataset(
    source: str | Sequence[str],
    *,
    split: str = "train",
    streaming: bool = False,
    load_kwargs: dict[str, Any] | None = None,
    **reader_kwargs: Any,
) -> Dataset | IterableDataset:
    """Pick the reader for ``source`` (for command-line scripts).

    - ``*.json`` file(s): `read_albef_json` (reader_kwargs: image_root, text_key).
    - ``*.tar`` shards, globs or brace patterns: `read_webdataset` (always streaming).
    - anything else is a Hugging Face dataset: a folder written by ``save_to_disk`` is loaded
      with `datasets.load_from_disk`, otherwise ``datasets.load_dataset(source, split=split,
      streaming=streaming, **load_kwargs)`` (a Hub name, "imagefolder" with
      ``load_kwargs={"data_dir": ...}``, or a local folder of images with ``metadata.jsonl``),
      then `read_hf_dataset` (reader_kwargs: image_column, text_column, image_root, id_column,
      rank, world_size).

    Args:
        source: what to read, as above; several json files or shard patterns as a list.
        split: split of a Hugging Face dataset.
        streaming: stream a Hugging Face dataset instead of preparing it on disk.
        load_kwargs: extra arguments of `datasets.load_dataset`.
        reader_kwargs: arguments of the chosen reader.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    names = [str(item) for item in sources]
    if names and all(name.endswith(".json") for name in names):
        return read_albef_json(names, **reader_kwargs)
    if names and all(name.endswith(_TAR_SUFFIXES) for name in names):
        return read_webdataset(names, **reader_kwargs)
    if len(names) != 1:
        raise ValueError(f"expected json files, tar shards or one Hugging Face dataset, got {names}")
    dataset = load_named_dataset(names[0], split=split, streaming=streaming, load_kwargs=load_kwargs)
    return read_hf_dataset(dataset, **reader_kwargs)


def _check_metadata_lines(folder: str) -> None:
    """Every line of an image folder's ``metadata.jsonl`` files must be a JSON object: datasets reads them with
    pyarrow, whose JSON reader crashes the process (a segmentation fault, pyarrow 26) on a file holding
    ``null``, and fails with unclear errors on other values."""
    for root, _, names in os.walk(folder):
        if "metadata.jsonl" not in names:
            continue
        path = os.path.join(root, "metadata.jsonl")
        with open(path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {number}: not valid JSON ({error})") from error
                if not isinstance(record, dict):
                    raise ValueError(
                        f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
                    )


def load_named_dataset(
    name: str, split: str = "train", streaming: bool = False, load_kwargs: dict[str, Any] | None = None
) -> Any:
    """One split of a Hugging Face dataset: a folder written by ``save_to_disk`` (`datasets.load_from_disk`),
    else ``datasets.load_dataset(name, split=split, streaming=streaming, **load_kwargs)``."""
    import datasets

    if os.path.isfile(os.path.join(name, "state.json")) or os.path.isfile(
        os.path.join(name, "dataset_dict.json")
    ):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    for folder in (name, (load_kwargs or {}).get("data_dir")):  # a folder, or "imagefolder" with data_dir
        if isinstance(folder, (str, os.PathLike)) and os.path.isdir(folder):
            _check_metadata_lines(os.fspath(folder))
    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, **(load_kwargs or {}))
    except FileNotFoundError:
        raise
    except Exception as error:
        # datasets' builders fail on a malformed folder with whatever their code hits (IndexError on an empty
        # metadata.jsonl, pyarrow's ArrowInvalid, DatasetGenerationError): say what was being read
        raise ValueError(f"could not load the dataset {name!r}: {type(error).__name__}: {error}") from error
