"""The ALBEF pipelines: registration, inputs, batching, device/dtype, bad inputs, and agreement with the models."""

from __future__ import annotations

import base64
import functools
import http.server
import json
import math
import pathlib
import threading
import urllib.parse

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor
from transformers import BertConfig, BertModel, FeatureExtractionPipeline, pipeline

from albef_hf import (
    AlbefConfig,
    AlbefFeatureExtractionPipeline,
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefForQuestionAnswering,
    AlbefImageTextMatchingPipeline,
    AlbefImageTextRetrievalPipeline,
    AlbefModel,
    AlbefRetrievalIndex,
    AlbefVisualGroundingPipeline,
    AlbefVisualQuestionAnsweringPipeline,
    gradcam_itm,
    select_box,
    upsample_heatmap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASKS = {
    "image-text-matching": AlbefImageTextMatchingPipeline,
    "image-text-retrieval": AlbefImageTextRetrievalPipeline,
    "feature-extraction": AlbefFeatureExtractionPipeline,
    "visual-grounding": AlbefVisualGroundingPipeline,
}
ANSWERS = ["red", "blue", "green", "two", "yes", "no"]


def save(model_class, folder: pathlib.Path, seed: int = 0, embed_dim: int | None = None) -> pathlib.Path:
    torch.manual_seed(seed)
    config = tiny_config()
    config.embed_dim = embed_dim or config.embed_dim
    model_class(config).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "pretraining": save(AlbefForPreTraining, root / "pretraining"),
        "retrieval": save(AlbefForImageTextRetrieval, root / "retrieval", seed=1),
        "base": save(AlbefModel, root / "base"),
        "vqa": save(AlbefForQuestionAnswering, root / "vqa", seed=2),
    }


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list[pathlib.Path]:
    root = tmp_path_factory.mktemp("images")
    paths = []
    for index, image in enumerate(random_images(3, seed=7)):
        paths.append(root / f"image {index}.png")  # a space: file:// URLs quote it
        image.save(paths[-1])
    return paths


# ----------------------------------------------------------------------------------------------
# Registration and saved folders
# ----------------------------------------------------------------------------------------------


def test_every_task_resolves_to_its_albef_pipeline(folders):
    for task, pipeline_class in TASKS.items():
        pipe = pipeline(task, model=str(folders["pretraining"]))
        assert type(pipe) is pipeline_class, task
        assert type(pipe.model) is (AlbefModel if task == "feature-extraction" else AlbefForPreTraining)
    vqa = pipeline("visual-question-answering", model=str(folders["vqa"]))
    assert type(vqa) is AlbefVisualQuestionAnsweringPipeline and type(vqa.model) is AlbefForQuestionAnswering
    retrieval = pipeline("image-text-retrieval", model=str(folders["retrieval"]))
    assert type(retrieval.model) is AlbefForImageTextRetrieval  # the checkpoint's own class


def test_feature_extraction_stays_the_builtin_pipeline_for_other_models(tmp_path, folders):
    BertModel(
        BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2)
    ).save_pretrained(tmp_path)
    tiny_processor().tokenizer.save_pretrained(tmp_path)
    pipe = pipeline("feature-extraction", model=str(tmp_path))
    assert type(pipe) is FeatureExtractionPipeline
    assert np.asarray(pipe("a red circle")).shape[-1] == 16


def test_a_checkpoint_without_the_task_head_is_refused(folders):
    with pytest.raises(ValueError, match="image-text-matching pipeline serves .* saved from AlbefModel"):
        pipeline("image-text-matching", model=str(folders["base"]))
    with pytest.raises(
        ValueError, match=r"saved from \['AlbefForQuestionAnswering'\]; .* saved from AlbefForPreTraining"
    ):
        pipeline("visual-question-answering", model=str(folders["pretraining"]))


def test_saved_folders_declare_the_pipelines_their_model_serves(folders):
    declared = {
        name: json.loads((folder / "config.json").read_text()).get("custom_pipelines", {})
        for name, folder in folders.items()
    }
    assert set(declared["pretraining"]) == set(TASKS)
    assert all(entry["pt"] == ["AutoModelForPreTraining"] for entry in declared["pretraining"].values())
    assert declared["base"] == {
        "feature-extraction": {
            "impl": "feature_extraction.AlbefFeatureExtractionPipeline",
            "pt": ["AutoModel"],
        }
    }
    assert declared["vqa"] == {
        "visual-question-answering": {
            "impl": "visual_question_answering.AlbefVisualQuestionAnsweringPipeline",
            "pt": ["AutoModelForVisualQuestionAnswering"],
        }
    }
    # a retrieval model has no Auto class, so its folder carries no code and declares nothing
    assert declared["retrieval"] == {}
    # each task's module and what it imports, flat: a folder's remote code is one directory
    carried = {
        "pretraining": {
            "image_text_matching.py",
            "image_text_retrieval.py",
            "retrieval_index.py",
            "grounding.py",
        },
        "vqa": {"visual_question_answering.py"},
    }
    for name, modules in carried.items():
        files = {path.name for path in folders[name].iterdir()}
        assert modules | {"base.py", "processing_albef.py", "image_processing_albef.py"} <= files
        assert "from .." not in "".join((folders[name] / module).read_text() for module in modules)
    # where albef_hf is imported its registry serves the tasks: the loaded config does not ask for remote code
    assert not hasattr(AlbefConfig.from_pretrained(folders["pretraining"]), "custom_pipelines")


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def matcher(folders):
    return pipeline("image-text-matching", model=str(folders["pretraining"]))


def test_matching_scores_are_the_model_itm_probability_and_itc_similarity(matcher):
    image = random_images(1)[0]
    result = matcher(image, CAPTIONS[0])
    assert set(result) == {"text", "itm_probability", "itc_similarity"} and result["text"] == CAPTIONS[0]
    inputs = matcher.processor(images=[image], text=[CAPTIONS[0]], pairs=True)
    model = matcher.model
    with torch.no_grad():
        image_embeds = model.encode_image(inputs["pixel_values"]).last_hidden_state
        text_embeds = model.encode_text(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
        itm = model.itm_logits(text_embeds, inputs["attention_mask"], image_embeds).softmax(-1)[0, 1]
        itc = (model.project_image(image_embeds) * model.project_text(text_embeds)).sum()
    assert math.isclose(result["itm_probability"], itm.item(), rel_tol=1e-5)
    assert math.isclose(result["itc_similarity"], itc.item(), rel_tol=1e-5, abs_tol=1e-6)


def test_matching_single_lists_broadcast_dicts_and_batches_agree(matcher):
    images = random_images(4)
    singles = [matcher(image, text) for image, text in zip(images, CAPTIONS, strict=True)]
    for batch_size in (1, 3):
        batched = matcher(images, CAPTIONS, batch_size=batch_size)
        assert [r["text"] for r in batched] == CAPTIONS
        for one, other in zip(singles, batched, strict=True):
            assert one["itm_probability"] == pytest.approx(other["itm_probability"], abs=1e-5)
            assert one["itc_similarity"] == pytest.approx(other["itc_similarity"], abs=1e-5)
    dicts = matcher([{"image": image, "text": text} for image, text in zip(images, CAPTIONS, strict=True)])
    assert [r["itm_probability"] for r in dicts] == pytest.approx(
        [r["itm_probability"] for r in singles], abs=1e-5
    )
    one_image = matcher(images[0], CAPTIONS)
    assert len(one_image) == 4 and one_image[0]["itm_probability"] == pytest.approx(
        singles[0]["itm_probability"]
    )
    one_text = matcher(images, CAPTIONS[0])
    assert [r["text"] for r in one_text] == [CAPTIONS[0]] * 4


@pytest.fixture(scope="module")
def image_server(image_files):
    """The image folder over http on 127.0.0.1 (no other network in the tests)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(image_files[0].parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


def test_every_image_form_gives_the_same_result(matcher, image_files, image_server):
    path = image_files[0]
    pil = PIL.Image.open(path).convert("RGB")
    array = np.array(pil)
    forms = {
        "PIL": pil,
        "path": str(path),
        "Path": path,
        "file URL": path.as_uri(),
        "http URL": f"{image_server}/{urllib.parse.quote(path.name)}",
        "base64": "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode(),
        "uint8 array": array,
        "float array": array.astype(np.float32) / 255.0,
        "CHW tensor": torch.from_numpy(array).permute(2, 0, 1),
    }
    expected = matcher(pil, CAPTIONS[1])["itm_probability"]
    for name, image in forms.items():
        assert matcher(image, CAPTIONS[1])["itm_probability"] == pytest.approx(expected, abs=1e-6), name


def test_a_jpeg_file_gives_the_pixels_of_the_pil_image_opened_from_it_whatever_its_exif(tmp_path):
    from albef_hf.image_processing_albef import to_pil_rgb
    from albef_hf.pipelines import load_image

    path = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    random_images(1)[0].resize((40, 24)).save(path, exif=exif)
    expected = np.array(to_pil_rgb(PIL.Image.open(path)))
    assert expected.shape == (24, 40, 3)  # the processor and the readers apply no EXIF transpose
    for image in (str(path), path, path.as_uri(), PIL.Image.open(path)):
        assert np.array_equal(np.array(load_image(image)), expected), image


BAD_PAIRS = [
    ((random_images(1)[0], ""), "text 0: got an empty text"),
    ((random_images(1)[0], "   "), "text 0: got an empty text"),
    ((random_images(1)[0], 7), "text 0: expected a string, got int"),
    ((PIL.Image.new("RGB", (0, 5)), "a dog"), "image 0: got an empty image of size 0x5"),
    ((np.zeros((0, 4, 3), dtype=np.uint8), "a dog"), r"image 0: got an image array of shape \(0, 4, 3\)"),
    ((["a dog", "a cat"], "two dogs"), "image 0: 'a dog' is neither an existing image file nor a URL"),
    (("/no/such/image.png", "a dog"), "is neither an existing image file nor a URL"),
    ((random_images(2), CAPTIONS[:3]), "image i pairs with text i, but got 2 images and 3 texts"),
    (([], "a dog"), "empty list of images"),
    ((random_images(1)[0], None), "got no text for the images"),
    (
        (np.full((8, 8, 3), np.nan, np.float32), "a dog"),
        "the image array holds 192 NaN and 0 infinite",
    ),
    ((torch.full((3, 8, 8), float("inf")), "a dog"), "the image array holds 0 NaN and 192 infinite"),
    (
        (3.5, "a dog"),
        "image 0: expected a PIL image, a numpy array, a torch tensor, a path or a URL, got float",
    ),
]


@pytest.mark.parametrize(
    ("task", "args", "message"),
    [
        (task, args, message)
        for task in ("image-text-matching", "visual-grounding", "feature-extraction")
        for args, message in BAD_PAIRS
        if not (task == "feature-extraction" and args[1] is None)  # an image alone is a valid input there
    ],
)
def test_bad_pairs_raise_a_value_error_naming_the_problem(folders, task, args, message):
    pipe = pipeline(task, model=str(folders["pretraining"]))
    images, text = args
    with pytest.raises(ValueError, match=message):
        pipe(images, text)


def test_matching_runs_on_the_requested_device_and_dtype(folders, matcher):
    image = random_images(1)[0]
    low = pipeline(
        "image-text-matching", model=str(folders["pretraining"]), device="cpu", dtype=torch.bfloat16
    )
    assert low.model.dtype == torch.bfloat16 and low.device == torch.device("cpu")
    result, reference = low(image, CAPTIONS[0]), matcher(image, CAPTIONS[0])
    assert result["itm_probability"] == pytest.approx(reference["itm_probability"], abs=0.02)
    assert result["itc_similarity"] == pytest.approx(reference["itc_similarity"], abs=0.05)
    explicit = pipeline("image-text-matching", model=str(folders["pretraining"]), device=-1)
    assert explicit.device == torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def retriever(folders):
    return pipeline("image-text-retrieval", model=str(folders["retrieval"]))


def test_retrieval_over_1000_images_ranks_as_the_model_and_builds_in_batches(retriever, monkeypatch):
    model = retriever.model
    gallery = random_images(1000, seed=3, size=(16, 16))
    batches = []
    encode_image = model.encode_image
    monkeypatch.setattr(
        model,
        "encode_image",
        lambda pixels, *a, **kw: batches.append(len(pixels)) or encode_image(pixels, *a, **kw),
    )
    index = retriever.build_index(images=gallery, batch_size=256)
    assert batches == [256, 256, 256, 232]
    assert len(index) == 1000 and index.ids == list(range(1000))

    queries = CAPTIONS + ["a small yellow square", "three cats", "a man above a dog", "the blue circle"]
    results = retriever(queries, top_k=16, k=16, batch_size=3)
    assert len(results) == len(queries) and all(len(r) == 16 for r in results)

    with torch.no_grad():
        image_embeds = encode_image(retriever.processor(images=gallery)["pixel_values"]).last_hidden_state
        tokens = retriever.processor(text=queries)
        text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).last_hidden_state
        ranking = model.rank(
            image_embeds, text_embeds, tokens["attention_mask"], k=16, image_rows=slice(0, 0)
        )
    for row, result in enumerate(results):
        scores, order = ranking.scores_t2i[row].topk(16)
        assert [r["index"] for r in result] == order.tolist()
        assert [r["score"] for r in result] == pytest.approx(scores.tolist(), abs=1e-4)
        assert [r["itc_similarity"] for r in result] == pytest.approx(
            ranking.sims[order, row].tolist(), abs=1e-4
        )


def test_text_gallery_queried_with_images_ranks_as_the_model(retriever):
    model = retriever.model
    texts = [
        f"{a} {b} {c}"
        for a in ("a", "two", "three")
        for b in ("red", "blue", "green")
        for c in ("dogs", "cats")
    ]
    images = random_images(3, seed=5)
    retriever.build_index(texts=texts, batch_size=4)  # batches pad to different lengths
    results = retriever(images, top_k=5, k=8, itm_batch_size=7, batch_size=2)
    assert results[0][0]["text"] in texts
    with torch.no_grad():
        image_embeds = model.encode_image(
            retriever.processor(images=images)["pixel_values"]
        ).last_hidden_state
        tokens = retriever.processor(text=texts)
        text_embeds = model.encode_text(tokens["input_ids"], tokens["attention_mask"]).last_hidden_state
        ranking = model.rank(image_embeds, text_embeds, tokens["attention_mask"], k=8, text_rows=slice(0, 0))
    for row, result in enumerate(results):
        assert [r["index"] for r in result] == ranking.scores_i2t[row].topk(5).indices.tolist()
        assert [r["text"] for r in result] == [texts[r["index"]] for r in result]


def test_an_index_saves_loads_and_is_checked(retriever, folders, image_files, tmp_path):
    index = retriever.build_index(images=[str(path) for path in image_files])
    assert index.ids == [str(path) for path in image_files]
    expected = retriever("a red circle", top_k=3)
    assert len(expected) == 3 and expected[0]["id"] in index.ids
    index.save(tmp_path / "index")
    loaded = AlbefRetrievalIndex.load(tmp_path / "index")
    everything = torch.arange(len(index))
    assert loaded.ids == index.ids and torch.equal(loaded.features, index.features)
    assert torch.equal(loaded.item_tokens(everything)[0], index.item_tokens(everything)[0])
    fresh = pipeline("image-text-retrieval", model=str(folders["retrieval"]), index=str(tmp_path / "index"))
    assert fresh("a red circle", top_k=3) == expected
    assert retriever("a red circle", index=loaded, top_k=3) == expected

    other = pipeline(
        "image-text-retrieval", model=str(save(AlbefForPreTraining, tmp_path / "wide", embed_dim=8))
    )
    with pytest.raises(ValueError, match="built with another model"):
        other("a red circle", index=loaded)
    with pytest.raises(ValueError, match="holds no retrieval index"):
        AlbefRetrievalIndex.load(tmp_path)


def test_retrieval_bad_inputs(retriever):
    retriever.build_index(images=random_images(3))
    with pytest.raises(ValueError, match="text 1: got an empty text"):
        retriever(["a dog", ""])
    with pytest.raises(ValueError, match="text 0: expected a string, got Image"):
        retriever(random_images(1))  # an image index is queried with texts
    with pytest.raises(ValueError, match="one of them"):
        retriever.build_index()
    with pytest.raises(ValueError, match="image 1: got an empty image"):
        retriever.build_index(images=[random_images(1)[0], PIL.Image.new("RGB", (4, 0))])
    with pytest.raises(ValueError, match="got 1 ids for 2 gallery items"):
        retriever.build_index(texts=["a dog", "a cat"], ids=["x"])
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        retriever("a dog", top_k=0)
    retriever.build_index(texts=["a dog", "a cat"])
    with pytest.raises(ValueError, match="image 0: 'two dogs' is neither an existing image file nor a URL"):
        retriever("two dogs")  # a text index is queried with images


# ----------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------


def test_features_are_the_model_features_for_images_texts_and_pairs(folders):
    extractor = pipeline("feature-extraction", model=str(folders["pretraining"]))
    model, processor = extractor.model, extractor.processor
    images = random_images(2)
    texts = ["a red circle", "two dogs running left of the green triangle"]
    batch = processor(images=images, text=texts, pairs=True)
    with torch.no_grad():
        image_features = model.get_image_features(batch["pixel_values"])
        text_features = model.get_text_features(batch["input_ids"], batch["attention_mask"])
        multimodal = model.get_multimodal_features(
            batch["pixel_values"], batch["input_ids"], batch["attention_mask"]
        )

    image_only = extractor(images[0])
    assert set(image_only) == {"image_embeds", "image_features"} and image_only["image_embeds"].shape == (
        17,
        32,
    )
    np.testing.assert_allclose(image_only["image_features"], image_features[0].numpy(), atol=1e-5)
    text_only = extractor(text=texts[0])
    assert set(text_only) == {"text_embeds", "text_features"} and text_only["text_embeds"].shape[0] == 5
    np.testing.assert_allclose(text_only["text_features"], text_features[0].numpy(), atol=1e-5)
    for batch_size in (1, 2):
        pairs = extractor(images, text=texts, batch_size=batch_size)
        for row, result in enumerate(pairs):
            length = int(batch["attention_mask"][row].sum())
            assert result["multimodal_embeds"].shape == (length, 32) and result["text_embeds"].shape == (
                length,
                32,
            )
            np.testing.assert_allclose(result["multimodal_features"], multimodal[row].numpy(), atol=1e-5)
            np.testing.assert_allclose(result["text_features"], text_features[row].numpy(), atol=1e-5)
    tensors = extractor(text=texts, return_tensors=True)
    assert isinstance(tensors[1]["text_features"], torch.Tensor)
    with pytest.raises(ValueError, match="needs images, text=..., or both"):
        extractor()
    with pytest.raises(ValueError, match="text 1: got an empty text"):
        extractor(text=["a dog", ""])


# ----------------------------------------------------------------------------------------------
# Visual question answering
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vqa(folders):
    return pipeline("visual-question-answering", model=str(folders["vqa"]))


def test_vqa_ranks_an_answer_list_as_the_model(vqa):
    images, questions = (
        random_images(3, seed=9),
        ["what colour is the circle?", "how many dogs?", "is it red?"],
    )
    results = vqa(images, questions, candidate_answers=ANSWERS, top_k=3, batch_size=2)
    inputs = vqa.processor(images=images, text=questions, text_normalization="question", pairs=True)
    answers = vqa.processor.tokenizer(
        ANSWERS, padding="longest", return_token_type_ids=False, return_tensors="pt"
    )
    ranking = vqa.model.rank_answers(answers["input_ids"], answers["attention_mask"], k=128, **inputs)
    for row, result in enumerate(results):
        assert [r["answer"] for r in result] == [ANSWERS[i] for i in ranking.answer_ids[row, :3]]
        assert [r["score"] for r in result] == pytest.approx(ranking.probs[row, :3].tolist(), abs=1e-5)
    single = vqa({"image": images[0], "question": questions[0]}, candidate_answers=ANSWERS, top_k=3)
    assert [r["answer"] for r in single] == [r["answer"] for r in results[0]]
    assert [r["score"] for r in single] == pytest.approx([r["score"] for r in results[0]], abs=1e-5)
    # a top_k (and k) beyond the list gives every answer, ranked as the model ranks them
    every = vqa(images[0], questions[0], candidate_answers=ANSWERS, top_k=50, k=2)
    assert [r["answer"] for r in every] == [ANSWERS[i] for i in ranking.answer_ids[0, : len(ANSWERS)]]


def test_vqa_generates_free_answers(vqa):
    image, question = random_images(1, seed=9)[0], "what colour is the circle?"
    (answer,) = vqa(image, question, max_new_tokens=4)
    inputs = vqa.processor(images=[image], text=[question], text_normalization="question")
    generated = vqa.model.generate(**inputs, max_new_tokens=4)
    assert answer["answer"] == vqa.processor.batch_decode(generated, skip_special_tokens=True)[0].strip()
    beams = vqa([image, image], question, top_k=2, max_new_tokens=3, batch_size=2)
    assert [len(result) for result in beams] == [2, 2] and beams[0] == beams[1]


def test_vqa_bad_inputs(vqa):
    image = random_images(1)[0]
    with pytest.raises(ValueError, match="text 0: got an empty text"):
        vqa(image, "")
    with pytest.raises(ValueError, match="text 1: got an empty text"):
        vqa(image, "what colour?", candidate_answers=["red", ""])
    with pytest.raises(ValueError, match="got no question for the images"):
        vqa([{"image": image, "text": "what colour?"}])
    with pytest.raises(ValueError, match="image 0: 'what colour' is neither"):
        vqa(["what colour"], "what colour?")


# ----------------------------------------------------------------------------------------------
# Visual grounding
# ----------------------------------------------------------------------------------------------


def test_grounding_heatmap_overlay_and_box_choice(folders):
    grounder = pipeline("visual-grounding", model=str(folders["pretraining"]))
    image = random_images(1, seed=4)[0]  # 48 x 40
    boxes = [[0, 0, 16, 16], [20, 10, 24, 24], [5, 20, 40, 18]]
    result = grounder(image, "the red circle", boxes=boxes)
    assert result["heatmap"].shape == (40, 48) and result["heatmap"].dtype == np.float32
    assert isinstance(result["overlay"], PIL.Image.Image) and result["overlay"].size == image.size

    inputs = grounder.processor(images=[image], text=["the red circle"], pairs=True)
    cam = gradcam_itm(grounder.model, **inputs)
    heatmap = upsample_heatmap(cam.gradcam, (40, 48))[0]
    np.testing.assert_allclose(result["heatmap"], heatmap.numpy(), atol=1e-6)
    assert result["score"] == pytest.approx(cam.scores[0].item(), abs=1e-5)
    assert result["box_index"] == select_box(heatmap, boxes) and result["box"] == boxes[result["box_index"]]
    assert len(result["box_scores"]) == 3

    per_image = grounder(
        [{"image": image, "text": "the red circle", "boxes": boxes}, {"image": image, "text": "two dogs"}],
        batch_size=2,
    )
    assert per_image[0]["box_index"] == result["box_index"] and "box" not in per_image[1]
    np.testing.assert_allclose(per_image[0]["heatmap"], result["heatmap"], atol=1e-5)
    with pytest.raises(ValueError, match=r"box 1: width and height must be positive"):
        grounder(image, "the red circle", boxes=[[0, 0, 4, 4], [1, 1, 0, 3]])
    with pytest.raises(ValueError, match="mode must be 'itm' or 'itc'"):
        grounder(image, "the red circle", mode="gradient")
