"""What the example scripts share: arguments, model/processor/data builders, the run.

`run_pretraining.py` and `run_retrieval.py` are `run(...)` with their model and collator. The downstream
scripts (`run_vqa.py`, `run_nlvr.py`, `run_ve.py`, `run_grounding.py`) compose `parse_arguments`,
`build_task_model`, `build_processor`, `read_task_data`, `build_transform` and `train_evaluate_save`.

Kept next to the scripts (not in the package) so that each script stays a readable recipe, like the
transformers examples, without copying this part several times.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from transformers import BertTokenizerFast, HfArgumentParser

from albef_hf import AlbefConfig, AlbefForPreTraining, AlbefImageProcessor, AlbefProcessor
from albef_hf.data.downstream import TaskDataset, read_task_table
from albef_hf.data.readers import (
    build_image_text_dataset,
    load_named_dataset,
    read_albef_json,
    read_hf_dataset,
)
from albef_hf.data.transforms import build_train_transform
from albef_hf.evaluation import retrieval_eval_set_from_samples
from albef_hf.trainer import AlbefTrainer, AlbefTrainingArguments

logger = logging.getLogger("albef_example")


@dataclass
class ModelArguments:
    """Which model to train and how to tokenise for it."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "An ALBEF folder or Hub id to start from (omit to build from a config)."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "AlbefConfig folder, json file or Hub id (default: ALBEF-base)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated key=value config changes, nested with dots, e.g. "
            "'embed_dim=64,vision_config.num_hidden_layers=2,text_config.hidden_size=64'."
        },
    )
    vision_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A transformers ViT to initialise the image encoder (alone: the text tower is built from the "
            "config, its sizes from --config_name / --config_overrides)."
        },
    )
    text_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A BERT to initialise the text and fusion layers (alone: the vision tower is built from the "
            "config, its sizes from --config_name / --config_overrides)."
        },
    )
    processor_name: str | None = field(
        default=None, metadata={"help": "AlbefProcessor folder or Hub id (default: model_name_or_path)."}
    )
    tokenizer_name: str = field(
        default="bert-base-uncased",
        metadata={
            "help": "BERT tokenizer used when no processor is found; 'synthetic': the synthetic world's own words "
            "(the demo's vocabulary, for models trained from scratch on it)."
        },
    )
    image_size: int | None = field(
        default=None, metadata={"help": "Training resolution (default: the model's)."}
    )
    max_length: int | None = field(default=None, metadata={"help": "Longest text in tokens (with [CLS])."})
    attn_implementation: str = field(
        default="auto",
        metadata={
            "help": "Attention: 'eager', 'sdpa', or 'auto' (default): eager on a CPU, where torch's SDPA kernels are "
            "slower at ALBEF's short sequences (see benchmarks/bench_attention.py), SDPA elsewhere."
        },
    )
    original_tokenization: bool = field(
        default=False,
        metadata={"help": "Encode '[CLS] tokens' without [SEP], as the original (converted checkpoints)."},
    )


@dataclass
class DataArguments:
    """Where the image-text pairs come from (exactly one training source) and how they are augmented."""

    train_file: list[str] | None = field(
        default=None,
        metadata={"help": "ALBEF annotation json file(s): [{'image': path, 'caption': str or [str]}]."},
    )
    image_root: str | None = field(
        default=None, metadata={"help": "Directory the image paths are relative to."}
    )
    train_shards: list[str] | None = field(
        default=None, metadata={"help": "webdataset tar shards (paths, globs or {00000..00009} patterns)."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hugging Face dataset: Hub id, 'imagefolder' (with --data_dir), a save_to_disk folder, or "
            "'synthetic' for the built-in synthetic world."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    data_dir: str | None = field(
        default=None, metadata={"help": "data_dir of the dataset (imagefolder: the images)."}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches prepared data."})
    train_split: str = field(default="train", metadata={"help": "Split of the dataset to train on."})
    image_column: str = field(default="image", metadata={"help": "Image column of the dataset."})
    text_column: str = field(default="text", metadata={"help": "Caption column (str or list of str)."})
    id_column: str | None = field(
        default=None, metadata={"help": "Column identifying the image (retrieval ids)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset (needs --max_steps)."})
    shuffle_buffer: int = field(
        default=0, metadata={"help": "Shuffle buffer of webdataset shards (0: no shuffling)."}
    )
    synthetic_images: int = field(
        default=2000, metadata={"help": "Images of the synthetic world's training split."}
    )
    eval_file: list[str] | None = field(
        default=None, metadata={"help": "ALBEF json of the retrieval test set."}
    )
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Retrieval test set as a Hugging Face dataset, or 'synthetic'."}
    )
    eval_split: str = field(default="test", metadata={"help": "Split of eval_dataset_name."})
    eval_image_root: str | None = field(
        default=None, metadata={"help": "Image root of --eval_file (default: image_root)."}
    )
    synthetic_eval_images: int = field(
        default=200, metadata={"help": "Images of the synthetic retrieval test set."}
    )
    randaugment: bool = field(
        default=True, metadata={"help": "RandAugment with the original's ops and magnitude."}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Random horizontal flips."})
    random_crop: bool = field(
        default=True,
        metadata={
            "help": "RandomResizedCrop as the original; false: a plain resize (for data whose text counts objects "
            "or names positions, such as the synthetic world, where a crop can make the text false)."
        },
    )


@dataclass
class TaskDataArguments:
    """Where a downstream task's data come from and how its training images are augmented.

    Training and evaluation data each come from the original's json files (--train_file / --eval_file), or from
    one Hugging Face dataset (--dataset_name, its --train_split and --eval_split) with the columns of
    `albef_hf.data.downstream.TASK_COLUMNS` (others named with --column_names), or from the synthetic world
    (--dataset_name synthetic: its train split for training, its held-out test split for evaluation).
    """

    train_file: list[str] | None = field(
        default=None, metadata={"help": "The original's json file(s) of the training split."}
    )
    eval_file: list[str] | None = field(
        default=None, metadata={"help": "The original's json file(s) of the evaluation split."}
    )
    image_root: str | None = field(default=None, metadata={"help": "Directory image paths are relative to."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "A Hugging Face dataset with the task's columns (Hub id, save_to_disk folder, loading script), "
            "or 'synthetic' for the built-in synthetic world."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the dataset."})
    data_dir: str | None = field(default=None, metadata={"help": "data_dir of the dataset."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where `datasets` caches prepared data."})
    train_split: str = field(default="train", metadata={"help": "Split of --dataset_name to train on."})
    eval_split: str = field(default="test", metadata={"help": "Split of --dataset_name to evaluate on."})
    column_names: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated field=column pairs for --dataset_name, e.g. 'text=question,answers=answer' "
            "(fields and defaults: albef_hf.data.downstream.TASK_COLUMNS)."
        },
    )
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Train on N samples: the first N, or N drawn at random with --sample_seed."},
    )
    max_eval_samples: int | None = field(
        default=None,
        metadata={"help": "Evaluate on N samples: the first N, or N drawn at random with --sample_seed."},
    )
    sample_seed: int | None = field(
        default=None,
        metadata={
            "help": "Draw the --max_train_samples / --max_eval_samples at random with this seed (the same subset "
            "in every run) instead of taking the first ones, which are often not typical of a file."
        },
    )
    synthetic_train_items: int = field(
        default=4000, metadata={"help": "Samples of the synthetic world's training split."}
    )
    synthetic_eval_items: int = field(
        default=500, metadata={"help": "Samples of the synthetic world's held-out test split."}
    )
    synthetic_seed: int | None = field(
        default=None,
        metadata={
            "help": "Seed of the synthetic world (default: --seed, as run_pretraining.py uses): use the pretraining "
            "run's, so that the test layouts are ones the pretrained model never saw."
        },
    )
    randaugment: bool = field(
        default=True, metadata={"help": "RandAugment with the original's ops and magnitude."}
    )
    horizontal_flip: bool = field(
        default=True,
        metadata={
            "help": "Random horizontal flips (the original's; false for text that says left or right)."
        },
    )
    random_crop: bool = field(
        default=True,
        metadata={
            "help": "RandomResizedCrop as the original; false: a plain resize (for text that counts objects or "
            "names positions, such as the synthetic world's, which a crop can make false)."
        },
    )


def setup_logging(training_args: AlbefTrainingArguments) -> None:
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
    logging.getLogger("albef_hf").setLevel(level)
    logger.warning(
        "process rank %s, device %s, world size %s, bf16 %s",
        training_args.process_index,
        training_args.device,
        training_args.world_size,
        training_args.bf16,
    )


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_config_overrides(overrides: str | None) -> dict[str, Any]:
    """`"a=1,vision_config.b=[2,3]"` -> `{"a": 1, "vision_config.b": [2, 3]}` (values read as json when they are)."""
    parsed = {}
    for item in re.split(r",(?![^\[]*\])", overrides or ""):  # commas inside [...] belong to a list value
        if not item.strip():
            continue
        key, separator, value = item.strip().partition("=")
        if not separator:
            raise ValueError(f"config_overrides: expected key=value, got {item!r}")
        parsed[key.strip()] = _parse_value(value)
    return parsed


def apply_config_overrides(config: AlbefConfig, overrides: str | None) -> AlbefConfig:
    """A new config with `key=value` changes (nested keys with dots), re-validated by `AlbefConfig`."""
    parsed = parse_config_overrides(overrides)
    if not parsed:
        return config
    values = config.to_dict()
    for key, value in parsed.items():
        *parents, leaf = key.split(".")
        target = values
        for parent in parents:
            if not isinstance(target.get(parent), dict):
                raise ValueError(f"config_overrides: {key!r} does not name a nested config")
            target = target[parent]
        if leaf not in target:
            raise ValueError(f"config_overrides: unknown key {key!r}")
        target[leaf] = value
    return AlbefConfig(**{k: v for k, v in values.items() if k != "model_type"})


# AlbefConfig's own settings (not the towers'), which a model built from pretrained towers takes from the config
_TOP_LEVEL_SETTINGS = tuple(
    name
    for name in inspect.signature(AlbefConfig.__init__).parameters
    if name
    not in ("self", "vision_config", "text_config", "decoder_config", "fusion_layer", "image_size", "kwargs")
)
# keys of a pretrained tower's configuration that may still be set: they change no weight shape
_PRETRAINED_TOWER_SETTINGS = {"vision_config": ("image_size",), "text_config": ("fusion_layer",)}


def _build_from_towers(model_class: type, model_args: ModelArguments) -> Any:
    """Pretrained towers (one or both), the others built from --config_name / --config_overrides."""
    paths = {
        "vision_config": model_args.vision_model_name_or_path,
        "text_config": model_args.text_model_name_or_path,
    }
    overrides = parse_config_overrides(model_args.config_overrides)
    for key in overrides:
        tower, _, leaf = key.partition(".")
        if paths.get(tower) and leaf not in _PRETRAINED_TOWER_SETTINGS[tower]:
            raise ValueError(
                f"config_overrides: {key} is fixed by the pretrained tower {paths[tower]}; only "
                f"{', '.join(f'{tower}.{name}' for name in _PRETRAINED_TOWER_SETTINGS[tower])} can be set for it "
                "(or train that tower from scratch: drop its --*_model_name_or_path)"
            )
    base = AlbefConfig.from_pretrained(model_args.config_name) if model_args.config_name else AlbefConfig()
    config = apply_config_overrides(base, model_args.config_overrides)
    fusion_layer = next((overrides[key] for key in ("text_config.fusion_layer",) if key in overrides), None)
    image_size = model_args.image_size or next(
        (overrides[key] for key in ("vision_config.image_size",) if key in overrides), None
    )
    model, report = model_class.from_vision_text_pretrained(
        paths["vision_config"],
        paths["text_config"],
        fusion_layer=fusion_layer if paths["text_config"] else None,
        image_size=image_size,
        output_loading_info=True,
        vision_config=None if paths["vision_config"] else config.vision_config,
        text_config=None if paths["text_config"] else config.text_config,
        **{name: getattr(config, name) for name in _TOP_LEVEL_SETTINGS},
    )
    print(report, flush=True)
    return model


def build_model(model_class: type, model_args: ModelArguments) -> Any:
    """From a checkpoint, from pretrained towers (one or both), or from a (default) config.

    --config_overrides applies to all three: to the checkpoint's config, to what the pretrained towers leave open
    (the other tower's sizes, `embed_dim`, `fusion_layer`, ...; a size a pretrained tower fixes is an error), or to
    the config.
    """
    if model_args.model_name_or_path:
        config = AlbefConfig.from_pretrained(model_args.config_name or model_args.model_name_or_path)
        config = apply_config_overrides(config, model_args.config_overrides)
        model = model_class.from_pretrained(model_args.model_name_or_path, config=config)
    elif model_args.vision_model_name_or_path or model_args.text_model_name_or_path:
        model = _build_from_towers(model_class, model_args)
    else:
        config = (
            AlbefConfig.from_pretrained(model_args.config_name) if model_args.config_name else AlbefConfig()
        )
        config = apply_config_overrides(config, model_args.config_overrides)
        if model_args.image_size and model_args.image_size != config.image_size:
            config = AlbefConfig(**{**config.to_dict(), "image_size": model_args.image_size})
        model = model_class(config)
    return _with_attention(model, model_args)


def _with_attention(model: Any, model_args: ModelArguments) -> Any:
    """The model with --attn_implementation ("auto" is resolved to the device's by `parse_arguments`)."""
    model.set_attn_implementation(resolve_attention(model_args.attn_implementation, model.device))
    return model


def build_tokenizer(name: str) -> Any:
    """A BERT tokenizer from a folder or Hub id, or the synthetic world's (`"synthetic"`)."""
    if name == "synthetic":
        from albef_hf.data.synthetic import SyntheticWorldConfig
        from albef_hf.demo.data import synthetic_tokenizer

        return synthetic_tokenizer(SyntheticWorldConfig())
    return BertTokenizerFast.from_pretrained(name)


def build_processor(model_args: ModelArguments, model: Any, default_max_length: int) -> AlbefProcessor:
    """The processor of the model's checkpoint (or one built from --tokenizer_name), at the model's image size,
    checked against the model's vocabulary."""
    image_size = model.config.image_size
    source = model_args.processor_name or model_args.model_name_or_path
    processor = None
    if source:
        try:
            processor = AlbefProcessor.from_pretrained(source)
        except (OSError, ValueError) as error:
            if model_args.processor_name:
                raise
            logger.info(
                "no processor in %s (%s); building one from %s", source, error, model_args.tokenizer_name
            )
    if processor is None:
        processor = AlbefProcessor(
            AlbefImageProcessor(size=image_size), build_tokenizer(model_args.tokenizer_name)
        )
    processor.image_processor.size = {"height": image_size, "width": image_size}
    processor.max_length = model_args.max_length or (
        processor.max_length if model_args.processor_name else default_max_length
    )
    processor.original_tokenization = model_args.original_tokenization or processor.original_tokenization
    check_vocabulary(model, processor)
    return processor


def _synthetic_rows(split: str, count: int, image_size: int, seed: int) -> Any:
    from albef_hf.data.synthetic import build_caption_dataset

    return build_caption_dataset(split, count, seed=seed, image_size=image_size, one_row_per_caption=True)


def build_train_dataset(data_args: DataArguments, image_size: int, seed: int) -> Any:
    """One of: ALBEF json, webdataset shards, a Hugging Face dataset (incl. imagefolder, streaming), synthetic."""
    sources = [bool(data_args.train_file), bool(data_args.train_shards), bool(data_args.dataset_name)]
    if sum(sources) != 1:
        raise ValueError("give exactly one training source: --train_file, --train_shards or --dataset_name")
    if data_args.train_file:
        return read_albef_json(data_args.train_file, data_args.image_root)
    if data_args.train_shards:
        return build_image_text_dataset(
            data_args.train_shards, shuffle_buffer=data_args.shuffle_buffer, seed=seed
        )
    if data_args.dataset_name == "synthetic":
        rows = _synthetic_rows("train", data_args.synthetic_images, image_size, seed)
        return read_hf_dataset(
            rows.to_iterable_dataset() if data_args.streaming else rows, id_column="image_id"
        )
    return build_image_text_dataset(
        data_args.dataset_name,
        split=data_args.train_split,
        streaming=data_args.streaming,
        load_kwargs={
            "name": data_args.dataset_config_name,
            "data_dir": data_args.data_dir,
            "cache_dir": data_args.cache_dir,
        },
        image_column=data_args.image_column,
        text_column=data_args.text_column,
        image_root=data_args.image_root,
        id_column=data_args.id_column,
    )


def build_eval_set(data_args: DataArguments, image_size: int, seed: int) -> Any:
    """The retrieval test set, or None."""
    if data_args.eval_file:
        samples = read_albef_json(data_args.eval_file, data_args.eval_image_root or data_args.image_root)
    elif data_args.eval_dataset_name == "synthetic":
        from albef_hf.data.synthetic import build_retrieval_eval

        return build_retrieval_eval(data_args.synthetic_eval_images, seed=seed, image_size=image_size)
    elif data_args.eval_dataset_name:
        samples = build_image_text_dataset(
            data_args.eval_dataset_name,
            split=data_args.eval_split,
            load_kwargs={"name": data_args.dataset_config_name, "cache_dir": data_args.cache_dir},
            image_column=data_args.image_column,
            text_column=data_args.text_column,
            id_column=data_args.id_column,
        )
    else:
        return None
    return retrieval_eval_set_from_samples(samples)


def parse_arguments(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Parse the command line (or one json file of arguments) into the dataclasses, set up logging and the seed.

    The last dataclass must be the training arguments.
    """
    parser = HfArgumentParser(dataclass_types)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(sys.argv[1]))
    else:
        parsed = parser.parse_args_into_dataclasses(args=argv)
    setup_logging(parsed[-1])
    transformers.set_seed(parsed[-1].seed)
    for arguments in parsed:
        if isinstance(arguments, ModelArguments):
            arguments.attn_implementation = resolve_attention(
                arguments.attn_implementation, parsed[-1].device
            )
    return tuple(parsed)


def resolve_attention(name: str, device: Any) -> str:
    """`"auto"` -> eager on a CPU, SDPA elsewhere; `"eager"` / `"sdpa"` as they are."""
    if name == "auto":
        return "eager" if torch.device(device).type == "cpu" else "sdpa"
    if name not in ("eager", "sdpa"):
        raise ValueError(f"attn_implementation must be 'auto', 'eager' or 'sdpa', got {name!r}")
    return name


def build_task_model(
    model_class: type, model_args: ModelArguments, config_kwargs: Callable[[AlbefConfig], dict] | None = None
) -> Any:
    """A downstream model, and how it was initialised (printed).

    - --model_name_or_path holding a `model_class` checkpoint: loaded as it is (to evaluate or continue it);
    - holding another ALBEF (a pretrained `AlbefForPreTraining`; for NLVR2 also the text-assignment model):
      `model_class.from_pretrained_albef`, at --image_size when given, and its report is printed;
    - no path: a freshly initialised `AlbefForPreTraining` from the configuration (--config_name,
      --config_overrides, or the pretrained towers), turned into the task model the same way; without pretrained
      towers the report lists every weight as newly initialised.

    Args:
        config_kwargs: configuration overrides of the task model, computed from the source's configuration (the
            VQA decoder's depth, for example).
    """
    path = model_args.model_name_or_path
    if path:
        config = AlbefConfig.from_pretrained(path)
        if (config.architectures or [None])[0] == model_class.__name__:
            logger.warning("loading the %s checkpoint %s as it is", model_class.__name__, path)
            return _with_attention(model_class.from_pretrained(path), model_args)
        source = path
    else:
        source = build_model(AlbefForPreTraining, model_args)
        config = source.config
        if not (model_args.vision_model_name_or_path or model_args.text_model_name_or_path):
            # nothing pretrained: the report says that every weight starts new (none is "copied")
            source.newly_initialized_versions = {
                key: value._version for key, value in source.state_dict().items()
            }
    model, report = model_class.from_pretrained_albef(
        source,
        image_size=model_args.image_size,
        output_loading_info=True,
        **(config_kwargs(config) if config_kwargs else {}),
    )
    print(f"{model_class.__name__} {report}", flush=True)
    return _with_attention(model, model_args)


def _column_names(text: str | None) -> dict[str, str]:
    columns = {}
    for item in (text or "").split(","):
        if item.strip():
            field_name, separator, column = item.partition("=")
            if not separator:
                raise ValueError(f"column_names: expected field=column, got {item!r}")
            columns[field_name.strip()] = column.strip()
    return columns


def read_task_data(
    task: str,
    data_args: TaskDataArguments,
    split: str,
    image_size: int,
    seed: int,
    read_json: Callable[..., TaskDataset],
    box_format: str = "xywh",
) -> TaskDataset | None:
    """The training (`split="train"`) or evaluation (`"eval"`) samples of a task, or None when none are given.

    Args:
        task: "vqa", "nlvr2", "ve" or "grounding" (the synthetic world's and `read_task_table`'s names).
        read_json: the task's reader of the original's json files, called with the files and the image root.
        box_format: of a Hugging Face dataset's boxes (the synthetic world's are "xyxy" corners).
    """
    files = data_args.train_file if split == "train" else data_args.eval_file
    count = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
    if files:
        dataset = read_json(files, data_args.image_root)
    elif data_args.dataset_name == "synthetic":
        from albef_hf.data.synthetic import SyntheticDataset

        world_seed = data_args.synthetic_seed if data_args.synthetic_seed is not None else seed
        items = data_args.synthetic_train_items if split == "train" else data_args.synthetic_eval_items
        table = SyntheticDataset(
            task, "train" if split == "train" else "test", items, world_seed, image_size=image_size
        )
        dataset = read_task_table(table, task, box_format="xyxy")
    elif data_args.dataset_name:
        table = load_named_dataset(
            data_args.dataset_name,
            split=data_args.train_split if split == "train" else data_args.eval_split,
            load_kwargs={
                "name": data_args.dataset_config_name,
                "data_dir": data_args.data_dir,
                "cache_dir": data_args.cache_dir,
            },
        )
        dataset = read_task_table(
            table, task, _column_names(data_args.column_names), data_args.image_root, box_format
        )
    else:
        return None
    if count is None:
        return dataset
    return (
        dataset.head(count) if data_args.sample_seed is None else dataset.sample(count, data_args.sample_seed)
    )


def build_transform(data_args: Any, image_size: int, crop: str = "finetune") -> Any:
    """The original's training transform for `crop` ("pretrain", "finetune", "grounding"), as the flags allow."""
    return build_train_transform(
        image_size,
        crop if data_args.random_crop else "grounding",  # "grounding" is the original's resize-only geometry
        horizontal_flip=data_args.horizontal_flip,
        randaugment=data_args.randaugment,
    )


def check_vocabulary(model: Any, processor: AlbefProcessor) -> None:
    vocab_size = model.config.text_config.vocab_size
    if len(processor.tokenizer) > vocab_size:
        raise ValueError(
            f"the tokenizer has {len(processor.tokenizer)} tokens but the model only {vocab_size}"
        )


def train_evaluate_save(
    trainer: AlbefTrainer, training_args: AlbefTrainingArguments, predict_set: Any = None
) -> dict[str, float]:
    """Train, save the model and card, evaluate, predict (`predictions.json`), push; returns the eval metrics.

    When the predictions are of the evaluation set itself, one pass gives both (`evaluate_and_predict`)."""
    metrics: dict[str, float] = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    predict = training_args.do_predict and predict_set is not None
    output = None
    if training_args.do_eval:
        if predict and predict_set is trainer.eval_dataset:
            output = trainer.evaluate_and_predict(predict_set)
            metrics = output.metrics
        else:
            metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        if training_args.do_train:
            trainer.save_model()  # the card now carries the results
    if predict:
        if output is None:
            output = trainer.predict(predict_set)
            trainer.log_metrics("test", output.metrics)
            trainer.save_metrics("test", output.metrics)
        predictions = output.predictions
        if isinstance(predictions, np.ndarray):  # classifier logits
            predictions = predictions.argmax(-1).tolist()
        if trainer.is_world_process_zero():
            with open(os.path.join(training_args.output_dir, "predictions.json"), "w") as file:
                json.dump(predictions, file, indent=1)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


def run(
    model_class: type,
    collator_class: type,
    args_class: type[AlbefTrainingArguments],
    crop: str,
    default_max_length: int,
    argv: list[str] | None = None,
) -> AlbefTrainer:
    """Parse the arguments, build everything, train / evaluate / save / push; returns the trainer."""
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, args_class), argv)

    model = build_model(model_class, model_args)
    image_size = model.config.image_size
    processor = build_processor(model_args, model, default_max_length)
    train_dataset = (
        build_train_dataset(data_args, image_size, training_args.seed) if training_args.do_train else None
    )
    eval_set = build_eval_set(data_args, image_size, training_args.seed)
    if training_args.do_eval and eval_set is None:
        raise ValueError("--do_eval needs a retrieval test set: --eval_file or --eval_dataset_name")
    trainer = AlbefTrainer(
        model,
        training_args,
        collator_class(processor, transform=build_transform(data_args, image_size, crop)),
        train_dataset,
        eval_set,
        processing_class=processor,
    )
    train_evaluate_save(trainer, training_args)
    return trainer
