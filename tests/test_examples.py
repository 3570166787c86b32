"""The example scripts end to end on a tiny model, reading each kind of data with a bad image and an empty caption."""

import importlib.util
import io
import json
import os
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import tiny_config, tiny_processor
from PIL import Image
from transformers import BertConfig, BertModel

from albef_hf import (
    AlbefForImageTextRetrieval,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefModel,
    AlbefProcessor,
)
from albef_hf.data.synthetic import VQA_ANSWER_LIST

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")
CAPTIONS = ["a red circle", "two dogs running", "a blue square", "a cat on the left", "a man", "three cats",
            "a green triangle", "a small yellow circle"]  # fmt: skip
BAD_IMAGE = b"\xff\xd8\xff\xe0 not really a jpeg"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def load_script(name):
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    spec = importlib.util.spec_from_file_location(name, os.path.join(EXAMPLES, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def png(index):
    pixels = np.random.default_rng(index).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tiny_config().save_pretrained(folder / "config")
    tiny_processor().save_pretrained(folder / "processor")
    return folder


def common_args(model_files, output_dir, *extra):
    return [
        "--config_name", str(model_files / "config"), "--processor_name", str(model_files / "processor"),
        "--output_dir", str(output_dir), "--do_train", "--per_device_train_batch_size", "3", "--queue_size", "9",
        "--use_cpu", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1",
        "--disable_tqdm", "true", "--warmup_steps", "1", *extra,
    ]  # fmt: skip


def albef_json(folder):
    """7 images, one with two captions, plus an unreadable image and an empty caption: 9 samples."""
    images = folder / "images"
    images.mkdir()
    entries = []
    for i, caption in enumerate(CAPTIONS[:7]):
        (images / f"{i}.png").write_bytes(png(i))
        entries.append({"image": f"{i}.png", "caption": [caption, "an image"] if i == 0 else caption})
    (images / "bad.jpg").write_bytes(BAD_IMAGE)
    entries.insert(3, {"image": "bad.jpg", "caption": "a broken picture"})
    entries.append({"image": "1.png", "caption": "   "})
    (folder / "train.json").write_text(json.dumps(entries))
    return folder / "train.json", images


def check_skips(trainer, expected):
    """The reader counted exactly the expected bad samples, and the training logs report them."""
    counts = trainer.train_dataset.skip_stats.as_dict()
    assert counts == {reason: expected.get(reason, 0) for reason in counts}
    for reason, count in expected.items():
        assert any(entry.get(f"skipped_{reason}") == count for entry in trainer.state.log_history), reason


def test_run_pretraining_on_albef_json_saves_a_loadable_model(tmp_path, model_files):
    train_file, images = albef_json(tmp_path)
    out = tmp_path / "out"
    trainer = load_script("run_pretraining").main(
        common_args(
            model_files,
            out,
            "--train_file",
            str(train_file),
            "--image_root",
            str(images),
            "--num_train_epochs",
            "1",
            "--config_overrides",
            "mlm_probability=0.3",
        )  # fmt: skip
    )
    assert trainer.state.global_step == 3  # 8 captions + the bad image (substituted when drawn), batch 3
    check_skips(trainer, {"unreadable_image": 1, "empty_text": 1})
    model = AlbefModel.from_pretrained(out)
    assert model.config.mlm_probability == 0.3
    assert torch.equal(model.text_proj.weight, trainer.model.text_proj.weight)
    assert AlbefProcessor.from_pretrained(out).max_length == tiny_processor().max_length
    assert "momentum_state.safetensors" not in os.listdir(out) and "README.md" in os.listdir(out)


def test_run_pretraining_on_an_imagefolder(tmp_path, model_files):
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = []
    for i, caption in enumerate(CAPTIONS[:5]):
        (folder / f"{i}.png").write_bytes(png(i))
        rows.append({"file_name": f"{i}.png", "text": caption})
    (folder / "bad.png").write_bytes(BAD_IMAGE)
    rows.insert(2, {"file_name": "bad.png", "text": "a broken picture"})
    (folder / "5.png").write_bytes(png(5))
    rows.append({"file_name": "5.png", "text": ""})
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    trainer = load_script("run_pretraining").main(
        common_args(
            model_files,
            tmp_path / "out",
            "--dataset_name",
            "imagefolder",
            "--data_dir",
            str(folder),
            "--cache_dir",
            str(tmp_path / "cache"),
            "--num_train_epochs",
            "1",
        )  # fmt: skip
    )
    assert trainer.state.global_step == 2
    check_skips(trainer, {"unreadable_image": 1, "empty_text": 1})


def test_run_pretraining_on_webdataset_shards(tmp_path, model_files):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as archive:
            for i in range(4):
                key = f"{shard}{i:04d}"
                image = BAD_IMAGE if (shard, i) == (0, 0) else png(10 * shard + i)
                text = "" if (shard, i) == (1, 0) else CAPTIONS[i + 4 * shard]
                for suffix, data in (("jpg", image), ("txt", text.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size = len(data)
                    archive.addfile(info, io.BytesIO(data))
    trainer = load_script("run_pretraining").main(
        common_args(
            model_files,
            tmp_path / "out",
            "--train_shards",
            str(tmp_path / "{00000..00001}.tar"),
            "--max_steps",
            "2",
            "--alpha_warmup_steps",
            "0",
        )  # fmt: skip
    )
    assert trainer.state.global_step == 2
    check_skips(trainer, {"unreadable_image": 1, "empty_text": 1})


def test_run_retrieval_trains_and_evaluates(tmp_path, model_files):
    train_file, images = albef_json(tmp_path)
    out = tmp_path / "out"
    trainer = load_script("run_retrieval").main(
        common_args(
            model_files,
            out,
            "--train_file",
            str(train_file),
            "--image_root",
            str(images),
            "--eval_file",
            str(train_file),
            "--do_eval",
            "--max_steps",
            "2",
            "--retrieval_k",
            "4",
        )  # fmt: skip
    )
    assert isinstance(trainer.model, AlbefForImageTextRetrieval)
    results = json.loads((out / "eval_results.json").read_text())
    assert {"eval_txt_r1", "eval_img_r10", "eval_r_mean"} <= set(results)
    assert "txt_r1" in (out / "README.md").read_text()


def synthetic_task_args(model_files, output_dir, *extra):
    """A tiny fine-tuning run on the synthetic world: 8 training samples at 32 px, 5 held-out ones."""
    return [
        *common_args(model_files, output_dir), "--dataset_name", "synthetic", "--synthetic_train_items", "8",
        "--synthetic_eval_items", "5", "--image_size", "32", "--max_steps", "2", "--do_eval", "--do_predict",
        "--per_device_eval_batch_size", "2", "--random_crop", "false", "--horizontal_flip", "false", *extra,
    ]  # fmt: skip


def check_task_run(out, metric, model_class):
    results = json.loads((out / "eval_results.json").read_text())
    assert 0.0 <= results[metric] <= 100.0
    assert metric.removeprefix("eval_") in (out / "README.md").read_text()
    assert len(json.loads((out / "predictions.json").read_text())) == 5
    return model_class.from_pretrained(out)


def test_run_vqa_on_the_synthetic_world(tmp_path, model_files, capsys):
    out = tmp_path / "out"
    trainer = load_script("run_vqa").main(synthetic_task_args(model_files, out, "--vqa_top_k", "3"))
    printed = capsys.readouterr().out
    assert "AlbefForQuestionAnswering initialised from AlbefForPreTraining" in printed
    # a model from scratch: nothing is reported as copied from the (new) source
    assert "answer_head: newly initialised in the source" in printed
    assert "copied" not in printed and "duplicated" not in printed
    model = check_task_run(out, "eval_vqa_score", AlbefForQuestionAnswering)
    # the decoder has one layer per fusion layer of the (new) source
    assert model.config.decoder_config.num_hidden_layers == 2
    prediction = json.loads((out / "predictions.json").read_text())[0]
    assert len(prediction["top_answers"]) == 3 and prediction["answer"] in VQA_ANSWER_LIST
    assert trainer.teacher is not None and trainer.queues is None


@pytest.fixture(scope="module")
def plain_bert(tmp_path_factory):
    """A saved `BertModel` (no MLM head, as all-MiniLM-L6-v2) over the tiny vocabulary, with its tokenizer."""
    folder = tmp_path_factory.mktemp("bert")
    text = tiny_config().text_config
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=text.vocab_size, hidden_size=24, num_hidden_layers=4, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(folder)  # fmt: skip
    tiny_processor().tokenizer.save_pretrained(folder)
    return folder


def test_run_vqa_with_a_pretrained_text_tower_and_a_vision_tower_from_scratch(
    tmp_path, model_files, plain_bert, capsys
):
    out = tmp_path / "out"
    overrides = "embed_dim=8,vision_config.hidden_size=16,vision_config.conv_stem_channels=[4,8],text_config.fusion_layer=1"
    load_script("run_vqa").main(
        synthetic_task_args(
            model_files, out, "--text_model_name_or_path", str(plain_bert), "--config_overrides", overrides
        )
    )
    printed = capsys.readouterr().out
    assert "a new vision tower" in printed and "corrupted" not in printed
    assert "answer_head: newly initialised in the source" in printed
    model = check_task_run(out, "eval_vqa_score", AlbefForQuestionAnswering)
    config = model.config
    assert (config.embed_dim, config.vision_config.hidden_size, config.fusion_layer) == (8, 16, 1)
    assert config.vision_config.conv_stem_channels == [4, 8] and config.text_config.hidden_size == 24


@pytest.mark.parametrize("attention", [None, "sdpa"])
def test_the_attention_flag_and_a_random_eval_sample_reach_the_run(tmp_path, model_files, attention):
    out = tmp_path / "out"
    flag = ["--attn_implementation", attention] if attention else []
    trainer = load_script("run_ve").main(
        synthetic_task_args(
            model_files, out, "--max_steps", "1", "--max_eval_samples", "3", "--sample_seed", "0", *flag
        )
    )
    config = trainer.model.config
    expected = attention or "eager"  # "auto" on a CPU
    assert {config.vision_config._attn_implementation, config.text_config._attn_implementation} == {expected}
    assert len(trainer.eval_dataset) == 3
    sampled = [trainer.eval_dataset.fields(i)["text"] for i in range(3)]
    first = load_script("run_ve").main(synthetic_task_args(model_files, tmp_path / "first", "--max_steps", "1",
                                                           "--max_eval_samples", "3"))  # fmt: skip
    assert sampled != [first.eval_dataset.fields(i)["text"] for i in range(3)]


def test_config_overrides_of_a_pretrained_tower_fail_loudly(tmp_path, model_files, plain_bert):
    args = common_args(
        model_files, tmp_path, "--text_model_name_or_path", str(plain_bert), "--config_overrides"
    )
    with pytest.raises(ValueError, match="text_config.hidden_size is fixed by the pretrained tower"):
        load_script("run_vqa").main([*args, "text_config.hidden_size=32", "--dataset_name", "synthetic"])
    with pytest.raises(ValueError, match="unknown key 'vision_config.hidden_sise'"):
        load_script("run_vqa").main([*args, "vision_config.hidden_sise=32", "--dataset_name", "synthetic"])


def test_run_nlvr_with_the_text_assignment_step(tmp_path, model_files, capsys):
    out = tmp_path / "out"
    load_script("run_nlvr").main(
        synthetic_task_args(
            model_files,
            out,
            "--do_ta",
            "--ta_dataset_name",
            "synthetic",
            "--ta_synthetic_images",
            "6",
            "--ta_max_steps",
            "1",
        )  # fmt: skip
    )
    printed = capsys.readouterr().out
    assert "AlbefForTextAssignment initialised from AlbefForPreTraining" in printed
    assert "AlbefForVisualReasoning initialised from AlbefForTextAssignment" in printed
    assert (
        AlbefForTextAssignment.from_pretrained(out / "text_assignment").config.text_config.num_hidden_layers
        == 6
    )
    check_task_run(out, "eval_accuracy", AlbefForVisualReasoning)


def test_run_ve_from_the_original_json(tmp_path, model_files):
    images = tmp_path / "images"
    images.mkdir()
    entries = []
    for i, label in enumerate(["entailment", "neutral", "contradiction", "entailment", "neutral"]):
        (images / f"{i}.jpg").write_bytes(png(i))
        entries.append({"image": str(i), "sentence": CAPTIONS[i], "label": label})
    (tmp_path / "ve.json").write_text(json.dumps(entries))
    out = tmp_path / "out"
    load_script("run_ve").main(
        common_args(
            model_files,
            out,
            "--train_file",
            str(tmp_path / "ve.json"),
            "--eval_file",
            str(tmp_path / "ve.json"),
            "--image_root",
            str(images),
            "--max_steps",
            "2",
            "--do_eval",
            "--do_predict",
            "--per_device_eval_batch_size",
            "2",
        )  # fmt: skip
    )
    check_task_run(out, "eval_accuracy", AlbefForVisualEntailment)


def test_run_grounding_on_the_synthetic_world(tmp_path, model_files):
    out = tmp_path / "out"
    trainer = load_script("run_grounding").main(synthetic_task_args(model_files, out, "--queue_size", "6"))
    check_task_run(out, "eval_box_accuracy", AlbefForImageTextRetrieval)
    assert trainer.queues is not None and "visual-grounding" in (out / "README.md").read_text()
