"""Fuzzing of every public entry point with Hypothesis: each generated case ends in a result that is checked
(right shapes, finite values) or in a `ValueError`, `TypeError` or `FileNotFoundError` with a message; no other
exception, no hang (a 30-second alarm per case), no silent garbage.

The runs are derandomised (the same cases on every run) and bounded by `CASES` so that the whole module stays
well under a minute; the README's reliability section gives these counts.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import pathlib
import shutil
import signal
import struct
import tarfile
import tempfile
import zlib

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch.utils.data import IterableDataset
from transformers import pipeline

from albef_hf import AlbefForPreTraining, AlbefForQuestionAnswering, AlbefModel
from albef_hf.conversion import convert_original_checkpoint
from albef_hf.data.collators import (
    AlbefClassificationCollator,
    AlbefImageTextCollator,
    AlbefPretrainingCollator,
    AlbefRetrievalCollator,
    AlbefVqaCollator,
)
from albef_hf.data.readers import build_image_text_dataset, read_albef_json, read_webdataset
from albef_hf.modeling_albef_downstream import answer_decoder_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: Generated cases per entry point (the README's reliability section quotes them).
CASES = {
    "processor": 400,
    "collators": 200,
    "pipelines": 150,
    "json reader": 100,
    "image folder reader": 10,
    "webdataset reader": 100,
    "converter": 5,  # for each of 10 kinds of damage
    "from_pretrained": 60,
}
ACCEPTED = (ValueError, TypeError, FileNotFoundError)
HERE = pathlib.Path(__file__).resolve().parent


def fuzz(entry_point: str):
    return settings(
        max_examples=CASES[entry_point],
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


@contextlib.contextmanager
def no_hang(seconds: int = 30):
    """Fail a case that runs longer than `seconds` (SIGALRM interrupts it with a TimeoutError)."""

    def interrupt(signum, frame):
        raise TimeoutError(f"the case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(call, also: tuple[type[Exception], ...] = ()):
    """`call()`'s result, or the accepted error (`ACCEPTED` and `also`) it raised, which must say something."""
    with no_hang():
        try:
            result = call()
        except ACCEPTED + also as error:
            assert str(error).strip(), f"{type(error).__name__} without a message"
            event(f"refused: {type(error).__name__}")
            return error
    event("result")
    return result


def finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


# ----------------------------------------------------------------------------------------------
# Strategies
# ----------------------------------------------------------------------------------------------

_FOLDER = pathlib.Path(tempfile.mkdtemp(prefix="albef-fuzz-"))  # image files the strategies point at
atexit.register(shutil.rmtree, _FOLDER, True)


def _png(width: int, height: int, data: bytes = b"") -> bytes:
    """A PNG with the given header size and `data` as its (possibly broken) compressed pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _encoded(image: PIL.Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


_VALID = _encoded(random_images(1, seed=5, size=(9, 7))[0], "PNG")
FILE_CONTENTS = {
    "png": _VALID,
    "jpeg": _encoded(random_images(1, seed=6, size=(9, 7))[0], "JPEG"),
    "truncated png": _VALID[: len(_VALID) // 2],
    "truncated jpeg": _encoded(random_images(1, seed=6, size=(9, 7))[0], "JPEG")[:80],
    "garbage": bytes(range(256)) * 3,
    "empty": b"",
    "text": b"a caption, not an image",
    "decompression bomb": _png(60000, 60000, zlib.compress(b"\0" * 1000)),
    "0x0 png": _png(0, 0),
}


def _image_file(kind: str) -> str:
    path = _FOLDER / f"{kind.replace(' ', '_')}.img"
    if not path.exists():
        path.write_bytes(FILE_CONTENTS[kind])
    return str(path)


image_arrays = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int16, np.int64, np.float16, np.float32, np.float64, np.bool_]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
)
pil_images = st.builds(
    lambda mode, width, height: PIL.Image.new(mode, (width, height)),
    st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I", "F", "CMYK", "I;16"]),
    st.integers(0, 6),
    st.integers(0, 6),
)


def _opens(kind: str) -> bool:
    try:
        PIL.Image.open(io.BytesIO(FILE_CONTENTS[kind]))
    except Exception:  # which files PIL opens lazily is all that is asked here
        return False
    return True


# lazily decoded, as Image.open gives them: a truncated one opens and fails later
opened_files = st.sampled_from([kind for kind in FILE_CONTENTS if _opens(kind)]).map(
    lambda kind: PIL.Image.open(io.BytesIO(FILE_CONTENTS[kind]))
)
image_paths = st.one_of(
    st.sampled_from(list(FILE_CONTENTS)).map(_image_file),
    st.just(str(_FOLDER / "missing.png")),
    st.just(str(_FOLDER)),  # a directory
    st.just(f"file://{_FOLDER}/missing.png"),
)
junk = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.binary(max_size=20),
    st.text(max_size=10),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
good_images = st.sampled_from(random_images(4, seed=2))
images = st.one_of(
    good_images,
    image_arrays,
    image_arrays.map(lambda a: torch.from_numpy(a.copy())),
    pil_images,
    opened_files,
    image_paths,
    junk,
)
texts = st.one_of(
    st.sampled_from(CAPTIONS),
    st.text(max_size=40),
    st.sampled_from(["a red circle", "two dogs running", "", "   ", "?!", "[CLS] [SEP] [MASK]", "a" * 500]),
    junk,
)


def one_or_list(strategy):
    return st.one_of(strategy, st.lists(strategy, max_size=3))


# inputs that are mostly valid, so that many cases get past the checks and their results are checked
image_inputs = st.one_of(good_images, st.lists(good_images, min_size=1, max_size=3), one_or_list(images))
text_inputs = st.one_of(
    st.sampled_from(CAPTIONS), st.lists(st.sampled_from(CAPTIONS), min_size=1, max_size=3), one_or_list(texts)
)


# ----------------------------------------------------------------------------------------------
# Processor and collators
# ----------------------------------------------------------------------------------------------

PROCESSOR = tiny_processor()


@fuzz("processor")
@given(
    images=st.one_of(st.none(), image_inputs),
    text=st.one_of(st.none(), text_inputs),
    pairs=st.booleans(),
    normalization=st.sampled_from(["default", "caption", "question", None]),
)
def test_processor(images, text, pairs, normalization):
    result = outcome(
        lambda: PROCESSOR(images=images, text=text, pairs=pairs, text_normalization=normalization)
    )
    if isinstance(result, Exception):
        return
    if images is not None:
        pixels = result["pixel_values"]
        assert pixels.shape[1:] == (3, 32, 32) and finite(pixels)
        assert pixels.shape[0] == (len(images) if isinstance(images, list) else 1)
    if text is not None:
        ids = result["input_ids"]
        assert ids.shape[0] == (len(text) if isinstance(text, list) else 1)
        assert int(ids.min()) >= 0 and int(ids.max()) < PROCESSOR.tokenizer.vocab_size


COLLATORS = {
    "image-text": AlbefImageTextCollator(PROCESSOR, seed=0),
    "pretraining": AlbefPretrainingCollator(PROCESSOR, seed=0, mlm_probability=0.5),
    "retrieval": AlbefRetrievalCollator(PROCESSOR, seed=0),
    "ve": AlbefClassificationCollator(PROCESSOR, seed=0, num_labels=3),
    "nlvr": AlbefClassificationCollator(PROCESSOR, seed=0, images_per_sample=2, num_labels=2),
    "vqa": AlbefVqaCollator(PROCESSOR, seed=0),
}
samples = st.fixed_dictionaries(
    {
        "image": images,
        "images": st.lists(images, min_size=2, max_size=2) | junk,
        "text": texts,
        "image_id": st.integers(-5, 5) | junk,
        "label": st.integers(-1, 3) | junk,
        "answers": st.lists(st.sampled_from(["red", "two", "yes"]) | texts, min_size=1, max_size=3) | junk,
    },
    optional={
        "weights": st.lists(st.floats(), max_size=3) | junk,
        "sample_key": st.tuples(st.integers(0, 3), st.integers(0, 100)),
    },
)


# a sample every collator accepts, so that batches mixing good and bad samples get collated and checked
good_samples = st.fixed_dictionaries(
    {
        "image": good_images,
        "images": st.lists(good_images, min_size=2, max_size=2),
        "text": st.sampled_from(CAPTIONS),
        "image_id": st.integers(0, 5),
        "label": st.integers(0, 1),
        "answers": st.lists(st.sampled_from(["red", "two", "yes"]), min_size=1, max_size=3),
    }
)


@fuzz("collators")
@given(
    name=st.sampled_from(list(COLLATORS)),
    batch=st.one_of(
        st.lists(st.one_of(good_samples, samples), min_size=1, max_size=4),
        st.lists(st.one_of(samples, junk), max_size=4),
        junk,
    ),
)
def test_collators(name, batch):
    result = outcome(lambda: COLLATORS[name](batch))
    if isinstance(result, Exception):
        return
    assert result["pixel_values"].shape[0] == len(batch) and finite(result["pixel_values"])
    assert all(finite(value) for value in result.values() if isinstance(value, torch.Tensor))


# ----------------------------------------------------------------------------------------------
# Pipelines
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-pipelines")
    torch.manual_seed(0)
    config = tiny_config()
    vqa_config = tiny_config(decoder_config=answer_decoder_config(config.text_config, 2))
    for name, model in {
        "pretraining": AlbefForPreTraining(config),
        "vqa": AlbefForQuestionAnswering(vqa_config),
    }.items():
        model.save_pretrained(root / name)
        PROCESSOR.save_pretrained(root / name)
    pretraining = str(root / "pretraining")
    retriever = pipeline("image-text-retrieval", model=pretraining)
    return {
        "image-text-matching": pipeline("image-text-matching", model=pretraining),
        "feature-extraction": pipeline("feature-extraction", model=pretraining),
        "visual-grounding": pipeline("visual-grounding", model=pretraining),
        "visual-question-answering": pipeline("visual-question-answering", model=str(root / "vqa")),
        "image-text-retrieval": retriever,
        "index": retriever.build_index(images=random_images(3)),
    }


def check_pipeline_result(result) -> None:
    """Every number a pipeline returns is finite; probabilities lie in [0, 1]."""
    if isinstance(result, dict):
        for key, value in result.items():
            if key.endswith("probability"):
                assert 0.0 <= value <= 1.0, result
            check_pipeline_result(value)
    elif isinstance(result, (list, tuple)):
        for item in result:
            check_pipeline_result(item)
    elif isinstance(result, (float, np.floating)):
        assert np.isfinite(result)
    elif isinstance(result, (np.ndarray, torch.Tensor)):
        assert np.isfinite(np.asarray(result, dtype=np.float64)).all()


@fuzz("pipelines")
@given(
    task=st.sampled_from(
        [
            "image-text-matching",
            "feature-extraction",
            "visual-grounding",
            "visual-question-answering",
            "image-text-retrieval",
        ]
    ),  # fmt: skip
    images=image_inputs,
    text=text_inputs,
    extra=st.one_of(
        st.fixed_dictionaries({}),
        st.fixed_dictionaries({"top_k": st.one_of(st.integers(-1, 5), junk)}),
        st.fixed_dictionaries(
            {"boxes": st.one_of(st.lists(st.lists(st.floats(-5, 50), max_size=5), max_size=2), junk)}
        ),
        st.fixed_dictionaries({"candidate_answers": st.one_of(st.lists(texts, max_size=3), junk)}),
    ),
)
def test_pipelines(pipelines, task, images, text, extra):
    pipe = pipelines[task]
    extra = {
        key: value for key, value in extra.items() if not (key == "boxes" and task != "visual-grounding")
    }
    extra = {
        key: value
        for key, value in extra.items()
        if not (key == "candidate_answers" and task != "visual-question-answering")
    }
    if task == "image-text-retrieval":
        result = outcome(
            lambda: pipe(text if text is not None else images, index=pipelines["index"], **extra)
        )
    else:
        result = outcome(lambda: pipe(images, text, **extra))
    if not isinstance(result, Exception):
        check_pipeline_result(result)


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
file_names = st.sampled_from([*FILE_CONTENTS, "missing"])
entries = st.fixed_dictionaries(
    {},
    optional={
        "image": st.one_of(file_names, json_values),
        "caption": st.one_of(
            texts.filter(lambda t: isinstance(t, str)), st.lists(st.text(max_size=8), max_size=3), json_values
        ),
        "image_id": json_values,
    },
)


def _root_with_images(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir(parents=True, exist_ok=True)
    for kind, content in FILE_CONTENTS.items():
        (folder / kind).write_bytes(content)
    return folder


def drain(dataset, limit: int = 50) -> list[dict]:
    """Read up to `limit` samples, each checked: an RGB PIL image that is not empty, a non-empty caption."""
    read = []
    iterator = (
        iter(dataset) if isinstance(dataset, IterableDataset) else (dataset[i] for i in range(len(dataset)))
    )
    for sample in iterator:
        assert isinstance(sample["image"], PIL.Image.Image) and sample["image"].mode == "RGB"
        assert min(sample["image"].size) > 0
        assert isinstance(sample["text"], str) and sample["text"].strip()
        assert isinstance(sample["image_id"], int)
        read.append(sample)
        if len(read) == limit:
            break
    return read


@fuzz("json reader")
@given(
    content=st.one_of(
        st.lists(st.one_of(entries, json_values), max_size=5), json_values, st.binary(max_size=30)
    )
)
def test_json_reader(content):
    with tempfile.TemporaryDirectory() as folder:
        root = _root_with_images(pathlib.Path(folder) / "images")
        path = pathlib.Path(folder) / "train.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        outcome(lambda: drain(read_albef_json(str(path), image_root=str(root))))


@fuzz("image folder reader")
@given(
    metadata=st.lists(
        st.one_of(
            st.fixed_dictionaries(
                {"image": st.sampled_from(list(FILE_CONTENTS)), "caption": st.sampled_from(CAPTIONS)}
            ),
            entries,
            json_values,
        ),
        max_size=4,
    ),
)
def test_image_folder_reader(metadata, tmp_path_factory):
    folder = tmp_path_factory.mktemp("imagefolder")
    for kind in FILE_CONTENTS:
        (folder / f"{kind.replace(' ', '_')}.png").write_bytes(FILE_CONTENTS[kind])
    lines = []
    for item in metadata:
        if isinstance(item, dict) and isinstance(item.get("image"), str):
            item = {**item, "file_name": f"{item.pop('image').replace(' ', '_')}.png"}
        lines.append(json.dumps(item))
    (folder / "metadata.jsonl").write_text("\n".join(lines))
    cache = {"cache_dir": str(folder.parent / f"{folder.name}-cache")}  # not the user's datasets cache
    outcome(lambda: drain(build_image_text_dataset(str(folder), load_kwargs=cache, text_column="caption")))


members = st.lists(
    st.tuples(
        st.sampled_from(["000", "001", "002", "a.b", "", "dir/003"]),
        st.sampled_from(["jpg", "png", "txt", "json", "cls", "JPG", "", "webp"]),
        st.one_of(
            st.sampled_from(list(FILE_CONTENTS.values())),
            st.text(max_size=12).map(str.encode),
            st.binary(max_size=20),
        ),
    ),
    max_size=6,
)


@fuzz("webdataset reader")
@given(
    shards=st.lists(
        st.tuples(members, st.sampled_from(["whole", "truncated", "garbage"])), min_size=1, max_size=2
    )
)
def test_webdataset_reader(shards):
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for position, (content, damage) in enumerate(shards):
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for key, extension, data in content:
                    info = tarfile.TarInfo(f"{key}.{extension}" if extension else key or "noname")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            data = buffer.getvalue()
            data = {"whole": data, "truncated": data[: len(data) // 3], "garbage": FILE_CONTENTS["garbage"]}[
                damage
            ]
            paths.append(os.path.join(folder, f"{position:05d}.tar"))
            pathlib.Path(paths[-1]).write_bytes(data)
        outcome(lambda: drain(read_webdataset(paths)))


# ----------------------------------------------------------------------------------------------
# Converter and damaged folders
# ----------------------------------------------------------------------------------------------

ORIGINAL = HERE / "fixtures" / "albef_original" / "tiny_pretrain.pth"
ORIGINAL_CONFIG = HERE / "fixtures" / "albef_original" / "albef_tiny.yaml"  # the head counts


def _damaged_state(state: dict, action: str, key_index: int) -> dict:
    keys = sorted(state)
    key = keys[key_index % len(keys)]
    state = dict(state)
    if action == "drop a key":
        del state[key]
    elif action == "add a key":
        state["text_encoder.unknown.weight"] = torch.zeros(2)
    elif action == "reshape a tensor":
        state[key] = (
            torch.zeros(*state[key].shape[:-1], state[key].shape[-1] + 1)
            if state[key].ndim
            else torch.zeros(2)
        )
    elif action == "a non-tensor value":
        state[key] = [1, 2]
    elif action == "empty":
        state = {}
    elif action == "NaN weights":
        state[key] = (
            torch.full_like(state[key], float("nan")) if state[key].is_floating_point() else state[key]
        )
    return state


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "drop a key", "add a key", "reshape a tensor", "a non-tensor value", "empty",
     "NaN weights", "a list", "untouched"],
)  # fmt: skip
@fuzz("converter")
@given(
    fraction=st.floats(0.0, 0.99),
    key_index=st.integers(0, 10_000),
    task=st.sampled_from(["auto", "pretrain", "retrieval", "vqa", "nlvr", "nonsense"]),
)
def test_converter(damage, fraction, key_index, task):
    original = ORIGINAL.read_bytes()
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "checkpoint.pth"
        if damage == "truncate":
            path.write_bytes(original[: int(len(original) * fraction)])
        elif damage == "garbage":
            path.write_bytes(bytes((i * 37 + int(fraction * 100)) % 256 for i in range(2000)))
        elif damage == "a list":
            torch.save([torch.zeros(2)], path)
        else:
            loaded = torch.load(io.BytesIO(original), weights_only=True)  # a bare state dict
            torch.save({"model": _damaged_state(loaded, damage, key_index)}, path)
        result = outcome(lambda: convert_original_checkpoint(path, task=task, config=ORIGINAL_CONFIG))
        if damage == "NaN weights" and not isinstance(result, Exception):
            pytest.fail("a checkpoint holding NaN weights was converted")
        if not isinstance(result, Exception):
            assert all(torch.isfinite(p).all() for p in result.model.parameters())


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    AlbefForPreTraining(tiny_config()).save_pretrained(folder)
    PROCESSOR.save_pretrained(folder)
    return folder


# Values written into config.json: wrong types and out-of-range sizes (not sizes so large that building the
# model on them would fill the memory: such a config is valid, only too large for this machine).
config_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 64), st.floats(-1.0, 100.0) | st.just(float("nan")),
              st.text(max_size=5)),
    lambda children: st.one_of(st.lists(children, max_size=2), st.dictionaries(
        st.sampled_from(["hidden_size", "num_hidden_layers", "image_size", "patch_size", "vocab_size", "x"]),
        children, max_size=2)),
    max_leaves=4,
)  # fmt: skip


@fuzz("from_pretrained")
@given(
    damage=st.sampled_from(
        [
            "delete weights",
            "truncate weights",
            "garbage header",
            "delete config",
            "config not json",
            "config value",
            "config type",
            "delete processor",
        ]
    ),  # fmt: skip
    fraction=st.floats(0.0, 0.99),
    value=config_values,
    field=st.sampled_from(
        ["embed_dim", "vision_config", "text_config", "model_type", "temp", "mlm_probability"]
    ),
    loader=st.sampled_from(["model", "pipeline", "base"]),
)
def test_from_pretrained_on_damaged_folders(saved_model, damage, fraction, value, field, loader):
    with tempfile.TemporaryDirectory() as work:
        folder = pathlib.Path(work) / "model"
        shutil.copytree(saved_model, folder)
        weights, config = folder / "model.safetensors", folder / "config.json"
        if damage == "delete weights":
            weights.unlink()
        elif damage == "truncate weights":
            weights.write_bytes(weights.read_bytes()[: int(weights.stat().st_size * fraction)])
        elif damage == "garbage header":
            data = bytearray(weights.read_bytes())
            data[8 : 8 + 40] = b"{not json" + b"\x00" * 31
            weights.write_bytes(bytes(data))
        elif damage == "delete config":
            config.unlink()
        elif damage == "config not json":
            config.write_text("{ this is not json")
        elif damage in ("config value", "config type"):
            settings_ = json.loads(config.read_text())
            settings_[field] = value if damage == "config value" else str(value)
            config.write_text(json.dumps(settings_))
        elif damage == "delete processor":
            for name in os.listdir(folder):
                if name not in ("model.safetensors", "config.json"):
                    os.remove(folder / name)
        if loader == "model":
            load = lambda: AlbefForPreTraining.from_pretrained(folder)  # noqa: E731
        elif loader == "base":
            load = lambda: AlbefModel.from_pretrained(folder)  # noqa: E731
        else:
            load = lambda: pipeline("image-text-matching", model=str(folder))  # noqa: E731
        # transformers' pipeline() reads config.json and the processor itself, and raises OSError for an
        # unreadable one; the model classes' from_pretrained raises the accepted errors only
        outcome(load, also=(OSError,) if loader == "pipeline" else ())
