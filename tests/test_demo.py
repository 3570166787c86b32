"""The demo end to end, in a short version: it trains, evaluates, saves a loadable model and writes the report."""

from __future__ import annotations

import json
import os

import pytest
import torch

from albef_hf import AlbefForPreTraining, AlbefModel, AlbefProcessor, pre_caption
from albef_hf.data.synthetic import SyntheticWorldConfig, caption_sample, render_scene
from albef_hf.demo.__main__ import main, parse_args
from albef_hf.demo.config import RECIPES
from albef_hf.demo.data import SPECIAL_TOKENS, SyntheticPairs, synthetic_tokenizer, synthetic_vocabulary
from albef_hf.demo.run import build_model


def test_vocabulary_covers_the_world_and_is_deterministic():
    world = SyntheticWorldConfig()
    vocabulary = synthetic_vocabulary(world, seed=0)
    assert vocabulary[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert vocabulary == synthetic_vocabulary(world, seed=0)
    tokenizer = synthetic_tokenizer(world, seed=0)
    unknown = tokenizer.unk_token_id
    # cleaned as the processor cleans them, texts of other seeds and of the test split never fall back to [UNK]
    for index in range(200):
        for caption in caption_sample(world, 7, "test", index).captions:
            assert unknown not in tokenizer(pre_caption(caption))["input_ids"], caption


def test_pairs_index_images_and_captions():
    world = SyntheticWorldConfig(image_size=32, captions_per_image=5)
    pairs = SyntheticPairs(world, num_images=3, seed=0)
    assert len(pairs) == 15
    sample = pairs[7]
    assert sample["image_id"] == 1 and sample["image"].size == (32, 32)
    assert sample["text"] == caption_sample(world, 0, "train", 1).captions[2]
    # each image is generated once and kept; the rows are those generated on every access
    uncached = SyntheticPairs(world, num_images=3, seed=0, cache=False)
    for index in (7, 5, 7, 14):
        kept, fresh = pairs[index], uncached[index]
        assert kept["text"] == fresh["text"] and kept["image_id"] == fresh["image_id"]
        assert kept["image"].tobytes() == fresh["image"].tobytes()
    assert pairs[5]["image"] is pairs[7]["image"] and len(pairs._rows) == 2
    with pytest.raises(IndexError):
        pairs[15]


def test_command_line_sets_any_field():
    config = parse_args(["--seed", "3", "--scale", "2", "--set", "eval_images=50", "batch_size=16"])
    assert (config.seed, config.eval_images, config.batch_size) == (3, 50, 16)
    # the steps and learning rate left at 0 come from the recipe of the precision; a batch size that was set stays
    for bf16 in (True, False):
        resolved = config.with_recipe(bf16)
        assert resolved.max_steps == RECIPES[bf16][1] and resolved.steps == 2 * RECIPES[bf16][1]
        assert resolved.batch_size == 16 and resolved.learning_rate == RECIPES[bf16][2]
    assert parse_args([]).with_recipe(False).batch_size == RECIPES[False][0]
    assert parse_args(["--set", "learning_rate=5e-4"]).with_recipe(False).learning_rate == 5e-4
    with pytest.raises(ValueError, match="with_recipe"):
        _ = parse_args([]).steps
    assert parse_args(["--set", "distill=false"]).distill is False
    assert parse_args(["--set", "distill=true", "queue_size=64"]).queue_size == 64
    for bad in (["--set", "no_such_field=1"], ["--set", "distill=maybe"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_conv_stem_from_the_command_line():
    tokenizer = synthetic_tokenizer(SyntheticWorldConfig(), seed=0)
    assert build_model(parse_args([]), tokenizer).config.vision_config.conv_stem_channels is None
    config = parse_args(["--set", "patch_size=8", "conv_stem_channels=16,32"])
    model = build_model(config, tokenizer)
    assert model.config.vision_config.conv_stem_channels == [16, 32]
    pixels = torch.randn(2, 3, config.image_size, config.image_size)
    # 8-px patches of 64-px images: an 8 x 8 grid after the two stride-2 convolutions and the 2 x 2 projection
    assert model.encode_image(pixels).last_hidden_state.shape == (2, 1 + 64, config.hidden_size)
    with pytest.raises(ValueError, match="comma-separated channel counts"):
        build_model(parse_args(["--set", "conv_stem_channels=32;64"]), tokenizer)


def test_short_demo_end_to_end(tmp_path):
    output = tmp_path / "demo"
    main(
        [
            "--output-dir",
            str(output),
            "--max-steps",
            "300",
            "--time-budget-minutes",
            "0",  # a busy machine must not cut the 300 steps the test checks
            "--set",
            "batch_size=32",
            "eval_images=100",
            "train_images=2000",
            "report_examples=3",
            "warmup_steps=30",  # 300 steps: the default warm-up of 100 would take a third of them
        ]
    )
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 300
    for name in (
        "report.html",
        "losses.png",
        "retrieval_image_to_text.png",
        "retrieval_text_to_image.png",
        "gradcam.png",
    ):
        assert os.path.getsize(output / name) > 0, name
    assert "Zero-shot retrieval" in (output / "report.html").read_text()
    card = (output / "model" / "README.md").read_text()
    assert "txt_r1" in card

    # the saved model loads and ranks a test image's own captions above chance
    metrics = summary["metrics"]
    chance_r5 = 5.0  # 100 images with 5 captions each: a random ranking puts a right answer in the top 5 ~5% of the time
    assert metrics["txt_r5"] > 2 * chance_r5 and metrics["img_r5"] > 2 * chance_r5, metrics
    model = AlbefModel.from_pretrained(output / "model").eval()
    assert isinstance(AlbefForPreTraining.from_pretrained(output / "model"), AlbefForPreTraining)
    processor = AlbefProcessor.from_pretrained(output / "model")
    world = SyntheticWorldConfig(image_size=model.config.image_size)
    samples = [caption_sample(world, 0, "test", index) for index in range(20)]
    batch = processor(images=[render_scene(s.scene) for s in samples], text=[s.captions[0] for s in samples])
    with torch.no_grad():
        logits = model(**batch).logits_per_image
    correct = (logits.argmax(dim=1) == torch.arange(20)).float().mean().item()
    assert correct > 2 / 20, f"only {correct:.0%} of 20 test images pick their own caption (chance 5%)"
