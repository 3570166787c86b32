"""Reliability: corrupt samples in DataLoader workers are skipped and counted, every pipeline gives the same
results when 8 threads call it at once, and a damaged model folder is refused with an error that says why."""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor
from trainer_helpers import tiny_trainer
from transformers import pipeline

from albef_hf import AlbefConfig, AlbefForPreTraining, AlbefForQuestionAnswering
from albef_hf.data.readers import AlbefJsonDataset
from albef_hf.modeling_albef_downstream import answer_decoder_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_corrupt_samples_in_dataloader_workers_are_skipped_and_counted(tmp_path):
    """One epoch over 16 annotations read by 2 worker processes: a truncated image and a missing one (the
    reader skips them) and a caption that is empty once normalised (the collator replaces it)."""
    entries = []
    for index, image in enumerate(random_images(16, seed=3)):
        path = tmp_path / f"{index}.png"
        image.save(path)
        entries.append({"image": path.name, "caption": CAPTIONS[index % 4], "image_id": index})
    (tmp_path / "5.png").write_bytes((tmp_path / "5.png").read_bytes()[:100])
    (tmp_path / "9.png").unlink()
    entries[12]["caption"] = "?! ..."
    (tmp_path / "train.json").write_text(json.dumps(entries))
    dataset = AlbefJsonDataset(str(tmp_path / "train.json"), image_root=str(tmp_path))

    trainer = tiny_trainer(str(tmp_path / "run"), samples=dataset, max_steps=4, dataloader_num_workers=2)
    trainer.train()
    assert trainer.state.global_step == 4
    counts = dataset.skip_stats.as_dict()
    assert counts["unreadable_image"] == 1 and counts["missing_image"] == 1
    assert trainer.data_collator.num_skipped == 1  # counted in a worker, seen here
    logged = trainer.state.log_history[-2]  # the last step's log (the last entry is the run summary)
    assert logged["skipped_unreadable_image"] == 1 and logged["skipped_missing_image"] == 1
    assert logged["collator_replaced_samples"] == 1


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("threads")
    torch.manual_seed(0)
    config = tiny_config()
    models = {
        "pretraining": AlbefForPreTraining(config),
        "vqa": AlbefForQuestionAnswering(
            tiny_config(decoder_config=answer_decoder_config(config.text_config, 2))
        ),
    }
    for name, model in models.items():
        model.save_pretrained(root / name)
        tiny_processor().save_pretrained(root / name)
    return {name: root / name for name in models}


def run_everywhere(call, inputs: list) -> tuple[list, list]:
    """`call` on every input in order, then on all of them from 8 threads at once (each input 3 times)."""
    sequential = [call(item) for item in inputs]
    with ThreadPoolExecutor(8) as pool:
        concurrent = list(pool.map(call, inputs * 3))
    return sequential * 3, concurrent


def assert_same(first, second) -> None:
    """Equal results, arrays and floats compared exactly: the threads must not perturb each other."""
    if isinstance(first, dict):
        assert first.keys() == second.keys()
        for key in first:
            assert_same(first[key], second[key])
    elif isinstance(first, (list, tuple)):
        assert len(first) == len(second)
        for a, b in zip(first, second, strict=True):
            assert_same(a, b)
    elif isinstance(first, (np.ndarray, torch.Tensor)):
        assert np.array_equal(np.asarray(first), np.asarray(second))
    elif hasattr(first, "tobytes"):  # PIL images
        assert first.tobytes() == second.tobytes()
    else:
        assert first == second


def test_every_pipeline_called_from_8_threads_gives_the_sequential_results(folders):
    images = random_images(8, seed=11)
    texts = [CAPTIONS[i % 4] for i in range(8)]
    pairs = list(zip(images, texts, strict=True))
    pretraining, vqa = str(folders["pretraining"]), str(folders["vqa"])

    matcher = pipeline("image-text-matching", model=pretraining)
    extractor = pipeline("feature-extraction", model=pretraining)
    grounder = pipeline("visual-grounding", model=pretraining)
    answerer = pipeline("visual-question-answering", model=vqa)
    retriever = pipeline("image-text-retrieval", model=pretraining)
    index = retriever.build_index(images=images)
    boxes = [[0, 0, 16, 16], [20, 10, 24, 24]]
    calls = {
        "matching": lambda pair: matcher(*pair),
        "features": lambda pair: extractor(*pair, return_tensors=True),
        "grounding": lambda pair: grounder(*pair, boxes=boxes),
        "vqa ranking": lambda pair: answerer(*pair, candidate_answers=["red", "two", "yes"], top_k=2),
        "vqa generation": lambda pair: answerer(*pair, max_new_tokens=3),
        "retrieval": lambda pair: retriever(pair[1], index=index, top_k=3),
    }
    for name, call in calls.items():
        sequential, concurrent = run_everywhere(call, pairs)
        try:
            assert_same(sequential, concurrent)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from error


@pytest.mark.parametrize("name", ["outputs/demo/model", "./model", "../model"])
def test_a_missing_folder_is_named_as_such(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no such folder exists
    with pytest.raises(FileNotFoundError, match=f"no folder '{re.escape(name)}'"):
        AlbefForPreTraining.from_pretrained(name)
    with pytest.raises(FileNotFoundError, match=f"no folder '{re.escape(name)}'"):
        AlbefForQuestionAnswering.from_pretrained_albef(name)
    with pytest.raises(FileNotFoundError, match=f"no folder '{re.escape(name)}'"):
        AlbefConfig.from_pretrained(name)


def test_a_config_file_path_still_loads(folders):
    config_file = folders["pretraining"] / "config.json"
    assert (
        AlbefConfig.from_pretrained(config_file).to_dict()
        == AlbefConfig.from_pretrained(folders["pretraining"]).to_dict()
    )


def test_from_pretrained_names_what_is_wrong_with_a_damaged_folder(folders, tmp_path):
    source = folders["pretraining"]
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        AlbefForPreTraining.from_pretrained(folder)
    config = AlbefConfig.from_pretrained(source)
    loaded = AlbefForPreTraining.from_pretrained(folder, config=config)  # a config given instead is enough
    assert torch.equal(loaded.temp, AlbefForPreTraining.from_pretrained(source).temp)

    settings = json.loads((source / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**settings, "embed_dim": 24}))
    with pytest.raises(ValueError, match="do not have the shapes its config describes"):
        AlbefForPreTraining.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({**settings, "embed_dim": -1}))
    with pytest.raises(ValueError, match="ALBEF embed_dim must be an integer >= 1, got -1"):
        AlbefForPreTraining.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(settings))
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="model.safetensors' is damaged or truncated"):
        AlbefForPreTraining.from_pretrained(folder)
