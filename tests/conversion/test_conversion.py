"""The converter's behaviour beyond the fixtures' parity (issue 6, "done when" 2-4, and the folder it writes):
safe loading, layout detection, every key mapped or named in an error, sizes read from the tensors at other
widths, position-embedding interpolation as the original's, the momentum state file, the folder's Auto
classes, processor and card, and the files a Hub push sends."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from albef_hf import (
    AlbefConfig,
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualReasoning,
    AlbefImageProcessor,
    AlbefModel,
    AlbefProcessor,
    AlbefTextConfig,
    AlbefVisionConfig,
    interpolate_pos_embed,
)
from albef_hf.conversion import (
    MOMENTUM_STATE_FILE,
    CheckpointError,
    convert_original_checkpoint,
    detect_layout,
    files_to_push,
    load_original_checkpoint,
    main,
    push_to_hub_folder,
    read_original_config,
)

from .original_layout import (
    TINY_CONFIG,
    reference_bert,
    reference_mlm_logits,
    reference_vit,
    write_original_checkpoint,
)

PRETRAIN = write_original_checkpoint("pretrain", None)  # the original file itself


@pytest.fixture(scope="module")
def retrieval_checkpoint(tmp_path_factory):
    return write_original_checkpoint("retrieval", tmp_path_factory.mktemp("retrieval"))


@pytest.fixture(scope="module")
def original_pretrain() -> dict[str, torch.Tensor]:
    return torch.load(PRETRAIN, map_location="cpu", weights_only=True)


def _save(tmp_path, state, name="checkpoint.pth"):
    path = tmp_path / name
    torch.save(state, path)
    return path


def _convert(path, **kwargs):
    return convert_original_checkpoint(path, None, config=kwargs.pop("config", TINY_CONFIG), **kwargs)


# ----------------------------------------------------------------------------------------------
# Loading: untrusted files
# ----------------------------------------------------------------------------------------------


class _TouchesAFile:
    """Unpickling this object opens (creates) a file: what a malicious checkpoint would do, harmlessly."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    target = tmp_path / "touched"
    path = _save(tmp_path, {"model": {"temp": torch.tensor(0.07), "payload": _TouchesAFile(target)}})
    with pytest.raises(CheckpointError, match="refusing to load .*could run arbitrary code"):
        load_original_checkpoint(path)
    assert not target.exists()

    # The crafted file is a real attack: an unsafe load would have created the file.
    control = tmp_path / "touched_by_unsafe_load"
    unsafe = _save(tmp_path, {"payload": _TouchesAFile(control)}, "unsafe.pth")
    torch.load(unsafe, weights_only=False)
    assert control.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is a README, not a checkpoint\n", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_fails_clearly(tmp_path, content, message):
    path = tmp_path / "ALBEF.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_original_checkpoint(path)


def test_a_checkpoint_without_a_state_dict_fails_clearly(tmp_path):
    with pytest.raises(CheckpointError, match="holds no state dict"):
        load_original_checkpoint(_save(tmp_path, [1, 2, 3]))
    with pytest.raises(CheckpointError, match="not tensors: epoch"):
        load_original_checkpoint(_save(tmp_path, {"visual_encoder.cls_token": torch.zeros(1), "epoch": 3}))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_original_checkpoint(tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match="not an ALBEF checkpoint"):
        _convert(_save(tmp_path, {"weight": torch.zeros(2)}))


def test_training_checkpoint_and_bare_state_dict_load_alike(tmp_path, original_pretrain):
    wrapped = {
        "model": original_pretrain,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]},
        "lr_scheduler": {"last_epoch": 29},
        "config": {"image_res": 64, "bert_config": "configs/config_bert.json"},
        "epoch": 29,
    }
    from_wrapped = load_original_checkpoint(_save(tmp_path, wrapped, "wrapped.pth")).state_dict
    bare = load_original_checkpoint(PRETRAIN)
    assert from_wrapped.keys() == bare.state_dict.keys()
    assert all(torch.equal(from_wrapped[key], bare.state_dict[key]) for key in from_wrapped)
    assert len(bare.sha256) == 64


# ----------------------------------------------------------------------------------------------
# Layout and task
# ----------------------------------------------------------------------------------------------


def test_layouts_are_detected_from_the_keys(original_pretrain, retrieval_checkpoint):
    vision = {"visual_encoder.cls_token": torch.zeros(1, 1, 4)}
    retrieval = load_original_checkpoint(retrieval_checkpoint).state_dict
    assert detect_layout(original_pretrain) == "pretrain"
    assert detect_layout(retrieval) == "retrieval"
    assert (
        detect_layout({**vision, "text_decoder.bert.embeddings.word_embeddings.weight": torch.zeros(1)})
        == "vqa"
    )
    assert detect_layout({**vision, "ta_head.weight": torch.zeros(3, 4)}) == "nlvr_ta"
    assert detect_layout({**vision, "cls_head.2.weight": torch.zeros(2, 4)}) == "nlvr"
    assert detect_layout({**vision, "cls_head.2.weight": torch.zeros(3, 4)}) == "ve"
    with pytest.raises(CheckpointError, match="cannot tell"):
        detect_layout({**vision, "text_encoder.embeddings.word_embeddings.weight": torch.zeros(1)})


def test_a_task_the_layout_cannot_serve_is_refused(retrieval_checkpoint):
    with pytest.raises(
        CheckpointError, match="'retrieval' layout, which cannot be converted for task 'pretrain'"
    ):
        _convert(retrieval_checkpoint, task="pretrain")
    with pytest.raises(CheckpointError, match="unknown task"):
        _convert(retrieval_checkpoint, task="captioning")


def test_a_pretraining_checkpoint_converts_for_zero_shot_retrieval_without_its_mlm_head(original_pretrain):
    result = _convert(PRETRAIN, task="retrieval")
    assert isinstance(result.model, AlbefForImageTextRetrieval)
    expected = sorted(
        k
        for k in original_pretrain
        if k.split(".", 1)[0] in ("text_encoder", "text_encoder_m") and ".cls." in k
    )
    assert sorted(result.converted.dropped) == expected
    pretrain = _convert(PRETRAIN).model.state_dict()
    retrieval = result.model.state_dict()
    assert all(torch.equal(tensor, pretrain[name]) for name, tensor in retrieval.items())


# ----------------------------------------------------------------------------------------------
# Every key mapped, or named in an error
# ----------------------------------------------------------------------------------------------


def _convert_modified(tmp_path, state):
    return _convert(_save(tmp_path, {"model": state}))


def test_a_missing_key_is_named(tmp_path, original_pretrain):
    state = dict(original_pretrain)
    del state["visual_encoder.blocks.1.norm2.bias"]
    with pytest.raises(CheckpointError, match=r"missing.*visual_encoder\.blocks\.1\.norm2\.bias"):
        _convert_modified(tmp_path, state)


def test_a_missing_momentum_key_is_named(tmp_path, original_pretrain):
    state = dict(original_pretrain)
    del state["text_encoder_m.bert.encoder.layer.3.output.dense.weight"]
    with pytest.raises(
        CheckpointError,
        match=r"(?s)momentum.*missing.*text_encoder_m\.bert\.encoder\.layer\.3\.output\.dense\.weight",
    ):
        _convert_modified(tmp_path, state)


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("visual_encoder.head.weight", r"unexpected.*visual_encoder\.head\.weight"),
        ("text_encoder.bert.pooler.dense.weight", r"unexpected.*text_encoder\.bert\.pooler\.dense\.weight"),
        ("fc_head.weight", r"unmapped.*fc_head\.weight"),
    ],
)
def test_an_extra_key_is_named(tmp_path, original_pretrain, key, message):
    with pytest.raises(CheckpointError, match=message):
        _convert_modified(tmp_path, {**original_pretrain, key: torch.zeros(2, 64)})


@pytest.mark.parametrize(
    "key",
    [
        "itm_head.weight",
        "text_encoder.bert.encoder.layer.2.crossattention.self.key.weight",
        "visual_encoder_m.norm.bias",
    ],
)
def test_a_misshaped_key_is_named(tmp_path, original_pretrain, key):
    tensor = original_pretrain[key]
    state = {**original_pretrain, key: torch.zeros(tensor.shape[0] + 1, *tensor.shape[1:])}
    with pytest.raises(CheckpointError, match=rf"misshaped.*{key.replace('.', '[.]')}"):
        _convert_modified(tmp_path, state)


def test_several_problems_are_named_together(tmp_path, original_pretrain):
    state = dict(original_pretrain)
    del state["text_proj.bias"]
    state["itm_head.bias"] = torch.zeros(3)
    state["visual_encoder.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as caught:
        _convert_modified(tmp_path, state)
    for key in ("text_proj.bias", "itm_head.bias", "visual_encoder.extra"):
        assert key in str(caught.value)


def test_tied_copies_and_position_ids_are_checked(tmp_path, original_pretrain):
    decoder = "text_encoder.cls.predictions.decoder.weight"
    with pytest.raises(
        CheckpointError, match="must equal 'text_encoder.bert.embeddings.word_embeddings.weight'"
    ):
        _convert_modified(tmp_path, {**original_pretrain, decoder: original_pretrain[decoder] + 1})
    ids = "text_encoder.bert.embeddings.position_ids"
    with pytest.raises(CheckpointError, match="is not 0..63"):
        _convert_modified(tmp_path, {**original_pretrain, ids: original_pretrain[ids].flip(-1)})
    # Newer checkpoints have no position_ids buffer: nothing is missing then.
    without = {k: v for k, v in original_pretrain.items() if not k.endswith("position_ids")}
    assert len(_convert_modified(tmp_path, without).converted.model) == 131


def test_a_gap_in_the_layers_is_named(tmp_path, original_pretrain):
    state = {k: v for k, v in original_pretrain.items() if not k.startswith("visual_encoder.blocks.0.")}
    with pytest.raises(CheckpointError, match=r"layers \[0\] are missing"):
        _convert_modified(tmp_path, state)


# ----------------------------------------------------------------------------------------------
# Other sizes, built by the test in the original key layout, against an independent reference
# ----------------------------------------------------------------------------------------------

OTHER_VISION = {"hidden_size": 48, "num_hidden_layers": 3, "num_attention_heads": 3, "intermediate_size": 96}
OTHER_TEXT = {
    "vocab_size": 120,
    "hidden_size": 32,
    "num_hidden_layers": 5,
    "num_attention_heads": 2,
    "intermediate_size": 80,
    "fusion_layer": 3,
    "max_position_embeddings": 40,
}
QUEUE_SIZE = 16


def _spread(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if parameter.dim() >= 2:
                parameter.copy_(noise / parameter[0].numel() ** 0.5)
            elif name.endswith("weight"):
                parameter.copy_(1 + 0.2 * noise)
            elif name != "temp":
                parameter.copy_(0.2 * noise)


def _to_original(state: dict[str, torch.Tensor], layout: str, max_positions: int) -> dict[str, torch.Tensor]:
    """albef_hf names -> the original's, written out independently of the converter."""
    text = "text_encoder.bert." if layout == "pretrain" else "text_encoder."
    renames = [
        ("vision_model.", "visual_encoder."),
        ("text_encoder.", text),
        ("mlm_head.", "text_encoder.cls.predictions."),
    ]
    original = {}
    for name, tensor in state.items():
        key = next((new + name[len(old) :] for old, new in renames if name.startswith(old)), name)
        original[key] = tensor.detach().clone()
    original[text + "embeddings.position_ids"] = torch.arange(max_positions)[None]
    if layout == "pretrain":
        original["text_encoder.cls.predictions.decoder.weight"] = original[
            text + "embeddings.word_embeddings.weight"
        ].clone()
        original["text_encoder.cls.predictions.decoder.bias"] = original[
            "text_encoder.cls.predictions.bias"
        ].clone()
    return original


def _momentum_copies(original: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """`*_m` copies that differ from the student (as after training), none for itm_head and temp."""
    generator = torch.Generator().manual_seed(seed)
    copies = {}
    for key, tensor in original.items():
        root, _, rest = key.partition(".")
        if root in ("itm_head", "temp"):
            continue
        moved = (
            tensor
            if not tensor.is_floating_point()
            else tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
        )
        copies[f"{root}_m.{rest}"] = moved
    decoder, words = (
        "text_encoder_m.cls.predictions.decoder.",
        "text_encoder_m.bert.embeddings.word_embeddings.weight",
    )
    if decoder + "weight" in copies:  # the teacher's decoder is tied too
        copies[decoder + "weight"] = copies[words].clone()
        copies[decoder + "bias"] = copies["text_encoder_m.cls.predictions.bias"].clone()
    return copies


@pytest.fixture(scope="module", params=["pretrain", "retrieval"])
def other_sizes(request, tmp_path_factory):
    """An original-layout checkpoint with other widths, depths, fusion layer, vision width != text width, image
    size and patch size; written as the original training scripts save it."""
    layout = request.param
    config = AlbefConfig(
        vision_config=AlbefVisionConfig(**OTHER_VISION, image_size=40, patch_size=8),
        text_config=AlbefTextConfig(**OTHER_TEXT, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
        embed_dim=24,
    )
    source = (AlbefForPreTraining if layout == "pretrain" else AlbefForImageTextRetrieval)(config)
    _spread(source, seed=7)
    original = _to_original(source.state_dict(), layout, OTHER_TEXT["max_position_embeddings"])
    original.update(_momentum_copies(original, seed=8))
    generator = torch.Generator().manual_seed(9)
    original["image_queue"] = F.normalize(torch.randn(24, QUEUE_SIZE, generator=generator), dim=0)
    original["text_queue"] = F.normalize(torch.randn(24, QUEUE_SIZE, generator=generator), dim=0)
    original["queue_ptr"] = torch.tensor([4])
    if layout == "retrieval":
        original["idx_queue"] = torch.arange(QUEUE_SIZE)[None]
    folder = tmp_path_factory.mktemp(f"other_{layout}")
    path = folder / "checkpoint.pth"
    torch.save({"model": original, "epoch": 0}, path)
    bert = folder / "config_bert.json"
    bert.write_text(
        json.dumps(
            {"num_attention_heads": 2, "hidden_size": 32, "vocab_size": 120, "hidden_dropout_prob": 0.0}
        )
    )
    albef = folder / "albef.json"
    albef.write_text(
        json.dumps({"bert_config": "config_bert.json", "vision_config": {"num_attention_heads": 3}})
    )
    return layout, path, albef, original


def test_other_sizes_are_read_from_the_tensors(other_sizes):
    layout, path, albef_config, _ = other_sizes
    config = _convert(path, config=albef_config).config
    vision, text = config.vision_config, config.text_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.intermediate_size) == (48, 3, 96)
    assert (vision.image_size, vision.patch_size, vision.num_attention_heads) == (40, 8, 3)
    assert {key: getattr(text, key) for key in OTHER_TEXT} == OTHER_TEXT
    assert text.encoder_width == 48 and config.embed_dim == 24


def test_other_sizes_reproduce_the_original_computation(other_sizes):
    layout, path, albef_config, original = other_sizes
    model = _convert(path, config=albef_config).model
    prefix = "text_encoder.bert." if layout == "pretrain" else "text_encoder."
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(3, 3, 40, 40, generator=generator)
    input_ids = torch.randint(0, 120, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    with torch.no_grad():
        image = model.encode_image(pixels).last_hidden_state
        text = model.encode_text(input_ids, mask).last_hidden_state
        itm = model.itm_logits(text, mask, image)
        ref_image = reference_vit(original, pixels, heads=3)
        ref_text = reference_bert(original, prefix, 2, range(3), mask, input_ids=input_ids)
        ref_fused = reference_bert(original, prefix, 2, range(3, 5), mask, hidden=ref_text, image=ref_image)
        ref_itm = F.linear(ref_fused[:, 0], original["itm_head.weight"], original["itm_head.bias"])
        torch.testing.assert_close(image, ref_image, atol=1e-5, rtol=0)
        torch.testing.assert_close(text, ref_text, atol=1e-5, rtol=0)
        torch.testing.assert_close(itm, ref_itm, atol=1e-5, rtol=0)
        feat = F.normalize(
            F.linear(ref_image[:, 0], original["vision_proj.weight"], original["vision_proj.bias"]), dim=-1
        )
        torch.testing.assert_close(model.project_image(image), feat, atol=1e-5, rtol=0)
        if layout == "pretrain":
            ref_all = reference_bert(
                original, prefix, 2, range(5), mask, input_ids=input_ids, image=ref_image
            )
            torch.testing.assert_close(
                model.mlm_logits_at(input_ids, mask, image),
                reference_mlm_logits(original, ref_all),
                atol=1e-5,
                rtol=0,
            )


def test_other_sizes_momentum_state_holds_the_momentum_copies_and_queues(other_sizes, tmp_path):
    layout, path, albef_config, original = other_sizes
    result = convert_original_checkpoint(path, tmp_path / "out", config=albef_config)
    state = load_file(tmp_path / "out" / MOMENTUM_STATE_FILE)
    student = result.model.state_dict()
    teacher_names = {name for name in state if name.startswith("teacher.")}
    assert teacher_names == {
        f"teacher.{name}" for name in student if not name.startswith(("itm_head.", "temp"))
    }
    text = "text_encoder_m.bert." if layout == "pretrain" else "text_encoder_m."
    assert torch.equal(
        state["teacher.vision_model.blocks.2.attn.qkv.weight"],
        original["visual_encoder_m.blocks.2.attn.qkv.weight"],
    )
    assert torch.equal(
        state["teacher.text_encoder.encoder.layer.4.crossattention.self.value.bias"],
        original[text + "encoder.layer.4.crossattention.self.value.bias"],
    )
    assert torch.equal(state["teacher.text_proj.weight"], original["text_proj_m.weight"])
    assert torch.equal(state["image_queue"], original["image_queue"].T)
    assert torch.equal(state["text_queue"], original["text_queue"].T)
    assert state["image_queue"].shape == (QUEUE_SIZE, 24)
    assert (
        state["queue_ptr"].shape == ()
        and state["queue_ptr"].dtype == torch.int64
        and int(state["queue_ptr"]) == 4
    )
    if layout == "retrieval":
        assert state["idx_queue"].shape == (QUEUE_SIZE,) and state["idx_queue"].dtype == torch.int64
    else:
        assert "idx_queue" not in state
        assert torch.equal(state["teacher.mlm_head.bias"], original["text_encoder_m.cls.predictions.bias"])
    # The inference weights hold no momentum copy.
    assert not any(
        "_m." in name or name.startswith("teacher.")
        for name in load_file(tmp_path / "out" / "model.safetensors")
    )


def test_head_counts_that_do_not_divide_the_width_ask_for_a_config(other_sizes):
    _, path, _, _ = other_sizes
    with pytest.raises(CheckpointError, match="Head counts are not stored in the tensors"):
        convert_original_checkpoint(path, None)  # ALBEF-base's 12 heads do not divide 48 / 32


def test_a_config_that_contradicts_the_tensors_is_refused(other_sizes, tmp_path):
    _, path, _, _ = other_sizes
    bert = tmp_path / "bert.json"
    bert.write_text(json.dumps({"num_attention_heads": 2, "hidden_size": 768, "vocab_size": 30522}))
    with pytest.raises(CheckpointError, match="hidden_size: 768 in the config, 32 in the tensors"):
        convert_original_checkpoint(path, None, config=bert)
    missing = tmp_path / "albef.yaml"
    missing.write_text("bert_config: configs/nowhere.json\nimage_res: 40\n")
    with pytest.raises(
        CheckpointError, match="names bert_config 'configs/nowhere.json', which was not found"
    ):
        read_original_config(missing)


# ----------------------------------------------------------------------------------------------
# Position embeddings at another image size
# ----------------------------------------------------------------------------------------------


def _original_interpolation(pos_embed: torch.Tensor, new_grid: int) -> torch.Tensor:
    """The original's interpolate_pos_embed, computed directly: class token kept, the patch grid resized
    bicubically (align_corners=False)."""
    old_grid = int((pos_embed.shape[1] - 1) ** 0.5)
    if old_grid == new_grid:
        return pos_embed
    grid = pos_embed[:, 1:].reshape(-1, old_grid, old_grid, pos_embed.shape[-1]).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@pytest.mark.parametrize("new_grid", [2, 3, 4, 6, 24])
def test_interpolate_pos_embed_is_the_original_computation(original_pretrain, new_grid):
    pos_embed = original_pretrain["visual_encoder.pos_embed"]
    assert torch.equal(
        interpolate_pos_embed(pos_embed, new_grid**2), _original_interpolation(pos_embed, new_grid)
    )


@pytest.mark.parametrize("image_size", [96, 48])
def test_converting_at_another_image_size_interpolates_student_and_teacher(
    tmp_path, original_pretrain, image_size
):
    result = convert_original_checkpoint(PRETRAIN, tmp_path, config=TINY_CONFIG, image_size=image_size)
    grid = image_size // 16
    assert result.interpolated and result.config.image_size == image_size
    expected = _original_interpolation(original_pretrain["visual_encoder.pos_embed"], grid)
    assert torch.equal(result.model.vision_model.pos_embed.detach(), expected)
    teacher = load_file(tmp_path / MOMENTUM_STATE_FILE)["teacher.vision_model.pos_embed"]
    assert torch.equal(
        teacher, _original_interpolation(original_pretrain["visual_encoder_m.pos_embed"], grid)
    )
    reloaded = AlbefForPreTraining.from_pretrained(tmp_path)
    assert torch.equal(reloaded.vision_model.pos_embed, expected)
    assert AlbefImageProcessor.from_pretrained(tmp_path).size == {
        "height": image_size,
        "width": image_size,
    }
    features = reloaded.get_image_features(torch.randn(2, 3, image_size, image_size))
    assert features.shape == (2, 32) and torch.isfinite(features).all()


def test_the_config_image_res_is_the_default_target_size(original_pretrain):
    config = read_original_config(TINY_CONFIG)
    config["albef"]["image_res"] = 80
    result = _convert(PRETRAIN, config=config)
    assert result.config.image_size == 80 and result.model.vision_model.pos_embed.shape[1] == 26
    same = _convert(PRETRAIN)
    assert not same.interpolated
    assert torch.equal(
        same.model.vision_model.pos_embed.detach(), original_pretrain["visual_encoder.pos_embed"]
    )


# ----------------------------------------------------------------------------------------------
# The folder: Auto classes, processor, card, momentum state, Hub files
# ----------------------------------------------------------------------------------------------


def test_the_folder_loads_with_the_auto_classes(pretrain_dir, original_pretrain):
    config = AutoConfig.from_pretrained(pretrain_dir)
    assert config.architectures == ["AlbefForPreTraining"]
    assert isinstance(AutoModel.from_pretrained(pretrain_dir), AlbefModel)
    assert isinstance(AutoModelForZeroShotImageClassification.from_pretrained(pretrain_dir), AlbefModel)
    model = AutoModelForPreTraining.from_pretrained(pretrain_dir)
    assert isinstance(model, AlbefForPreTraining)
    assert torch.equal(model.vision_model.pos_embed, original_pretrain["visual_encoder.pos_embed"])
    assert torch.equal(model.mlm_head.bias, original_pretrain["text_encoder.cls.predictions.bias"])


def test_the_processor_tokenises_as_the_original(pretrain_dir, retrieval_dir):
    processor = AutoProcessor.from_pretrained(pretrain_dir)
    assert isinstance(processor, AlbefProcessor)
    assert processor.original_tokenization and processor.max_length == 25
    assert processor.image_processor.size == {"height": 64, "width": 64}
    ids = processor(text=["A dog, left of the cat!"])["input_ids"][0].tolist()
    assert ids[0] == 101 and 102 not in ids  # "[CLS] tokens", no [SEP]
    assert AlbefProcessor.from_pretrained(retrieval_dir).max_length == 30
    config = AutoConfig.from_pretrained(pretrain_dir).text_config
    assert (config.pad_token_id, config.cls_token_id, config.sep_token_id, config.mask_token_id) == (
        0,
        101,
        102,
        103,
    )


def test_the_model_card_names_the_source_checkpoint(pretrain_dir, grounding_dir):
    card = (pretrain_dir / "README.md").read_text()
    sha = load_original_checkpoint(PRETRAIN).sha256
    assert "tiny_pretrain.pth" in card and sha in card and "AlbefForPreTraining" in card
    assert MOMENTUM_STATE_FILE in card
    grounding = (grounding_dir / "README.md").read_text()
    assert "grounding" in grounding and "grounding.pth" in grounding


def test_the_momentum_state_of_the_fixtures(pretrain_dir, retrieval_dir, original_pretrain):
    state = load_file(pretrain_dir / MOMENTUM_STATE_FILE)
    student = AlbefForPreTraining.from_pretrained(pretrain_dir).state_dict()
    assert {n for n in state if n.startswith("teacher.")} == {
        f"teacher.{n}" for n in student if not n.startswith(("itm_head.", "temp"))
    }
    assert state["image_queue"].shape == (64, 32) and torch.equal(
        state["image_queue"], original_pretrain["image_queue"].T
    )
    assert "idx_queue" not in state
    retrieval = load_file(retrieval_dir / MOMENTUM_STATE_FILE)
    student = AlbefForImageTextRetrieval.from_pretrained(retrieval_dir).state_dict()
    assert {n for n in retrieval if n.startswith("teacher.")} == {
        f"teacher.{n}" for n in student if not n.startswith(("itm_head.", "temp"))
    }
    assert retrieval["idx_queue"].shape == (64,) and retrieval["idx_queue"].dtype == torch.int64


def test_push_to_hub_sends_the_converted_files(retrieval_dir):
    """Not a real push (no network here): the exact files that the upload would send."""

    class RecordingApi:
        def __init__(self):
            self.calls = []

        def create_repo(self, repo_id, **kwargs):
            self.calls.append(("create_repo", repo_id, kwargs))

        def upload_folder(self, **kwargs):
            self.calls.append(("upload_folder", kwargs))

    api = RecordingApi()
    url = push_to_hub_folder(retrieval_dir, "someone/albef-retrieval-tiny", api=api)
    assert url.endswith("someone/albef-retrieval-tiny")
    assert api.calls[0][:2] == ("create_repo", "someone/albef-retrieval-tiny")
    upload = api.calls[1][1]
    assert upload["folder_path"] == str(retrieval_dir)
    sent = set(upload["allow_patterns"])
    assert sent == set(files_to_push(retrieval_dir))
    required = {
        "config.json",
        "model.safetensors",
        MOMENTUM_STATE_FILE,
        "README.md",
        "processor_config.json",
        "tokenizer_config.json",
    }
    assert required <= sent
    assert sent == {path.name for path in retrieval_dir.iterdir()}


def test_the_command_line_reports_errors_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "ALBEF.pth"
    bad.write_text("not a checkpoint")
    assert main(["--checkpoint", str(bad), "--output", str(tmp_path / "out")]) == 1
    assert "is not a PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# Downstream layouts: VQA decoder, NLVR2's paired layers, the text-assignment checkpoint
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def downstream_checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("downstream")
    return {task: write_original_checkpoint(task, folder) for task in ("vqa", "nlvr", "ve")}


def test_the_vqa_decoder_sizes_come_from_its_tensors(downstream_checkpoints, converted):
    config = _convert(downstream_checkpoints["vqa"]).config
    decoder = config.decoder_config
    assert (decoder.num_hidden_layers, decoder.fusion_layer, decoder.is_decoder) == (6, 0, True)
    assert decoder.encoder_width == config.text_config.hidden_size == 64
    assert (config.text_config.num_hidden_layers, config.fusion_layer) == (4, 2)
    model = AutoModelForVisualQuestionAnswering.from_pretrained(converted("vqa"))
    assert isinstance(model, AlbefForQuestionAnswering)
    processor = AlbefProcessor.from_pretrained(converted("vqa"))
    assert (processor.text_normalization, processor.max_words) == ("question", 50)


def test_the_vqa_answer_decoder_copy_is_checked(tmp_path, downstream_checkpoints):
    state = load_original_checkpoint(downstream_checkpoints["vqa"]).state_dict
    copy = "text_decoder_m.cls.predictions.decoder.weight"
    with pytest.raises(
        CheckpointError, match=f"'{copy}' must equal 'text_decoder_m.bert.embeddings.word_embeddings"
    ):
        _convert_modified(tmp_path, {**state, copy: state[copy] * 2})


def test_nlvr_paired_layers_are_read_and_their_shared_weights_checked(tmp_path, downstream_checkpoints):
    result = _convert(downstream_checkpoints["nlvr"])
    assert isinstance(result.model, AlbefForVisualReasoning)
    assert (result.config.text_config.num_hidden_layers, result.config.fusion_layer) == (18, 6)
    state = load_original_checkpoint(downstream_checkpoints["nlvr"]).state_dict
    partner = "text_encoder.encoder.layer.9.crossattention.self.value.weight"
    with pytest.raises(CheckpointError, match=f"{partner} != text_encoder.encoder.layer.8.crossattention"):
        _convert_modified(tmp_path, {**state, partner: state[partner] + 1})


def test_the_classifier_heads_tell_nlvr_from_ve(downstream_checkpoints):
    nlvr = load_original_checkpoint(downstream_checkpoints["nlvr"]).state_dict
    ve = load_original_checkpoint(downstream_checkpoints["ve"]).state_dict
    assert (detect_layout(nlvr), detect_layout(ve)) == ("nlvr", "ve")
    assert _convert(downstream_checkpoints["ve"]).model.config.id2label[2] == "entailment"


def test_a_text_assignment_checkpoint_converts(tmp_path):
    """No original fixture exists for the TA step: the test builds one in the original's layout (the TA model
    of models/model_pretrain_nlvr.py: 18-layer text encoder with shared key/value pairs, vision_proj, ta_head,
    and a text_proj and temp that its forward never uses) and checks the logits against the reference forward."""
    vision = AlbefVisionConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=16,
    )
    text = AlbefTextConfig(
        vocab_size=90,
        hidden_size=32,
        num_hidden_layers=6,
        num_attention_heads=2,
        intermediate_size=48,
        fusion_layer=2,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    source = AlbefForTextAssignment(AlbefConfig(vision_config=vision, text_config=text, embed_dim=16))
    _spread(source, seed=11)
    original = _to_original(source.state_dict(), "nlvr_ta", 20)
    original["text_proj.weight"], original["text_proj.bias"] = torch.randn(16, 32), torch.randn(16)
    original["temp"] = torch.tensor(0.07)
    config = tmp_path / "bert.json"
    config.write_text(json.dumps({"num_attention_heads": 2, "hidden_dropout_prob": 0.0}))
    albef = tmp_path / "albef.json"
    albef.write_text(json.dumps({"bert_config": str(config), "vision_config": {"num_attention_heads": 2}}))
    result = _convert(_save(tmp_path, {"model": original}), config=albef)
    assert result.task == "nlvr_ta" and isinstance(result.model, AlbefForTextAssignment)
    assert sorted(result.converted.dropped) == ["temp", "text_proj.bias", "text_proj.weight"]
    assert all(torch.equal(t, source.state_dict()[n]) for n, t in result.model.state_dict().items())

    generator = torch.Generator().manual_seed(5)
    pixels, ids = (
        torch.randn(3, 3, 32, 32, generator=generator),
        torch.randint(0, 90, (3, 7), generator=generator),
    )
    mask = torch.ones(3, 7, dtype=torch.long)
    first, second = torch.tensor([0, 1, 2]), torch.tensor([1, 2, 0])
    with torch.no_grad():
        logits = result.model(
            input_ids=ids, attention_mask=mask, pixel_values=pixels, first_image=first, second_image=second
        ).logits
        image = reference_vit(original, pixels, heads=2)
        fused = reference_bert(
            original, "text_encoder.", 2, range(6), mask, input_ids=ids, image=[image[first], image[second]]
        )
        expected = F.linear(fused[:, 0], original["ta_head.weight"], original["ta_head.bias"])
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
