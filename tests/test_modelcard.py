"""The model card: Hub metadata (validated with huggingface_hub's card data), training summary, metrics, usage."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from albef_hf.modelcard import (
    AlbefCardInfo,
    build_model_card,
    has_remote_code,
    save_model_card,
    served_pipelines,
    task_for_model_class,
)

INFO = AlbefCardInfo(
    model_name="albef-tiny-synthetic",
    task="retrieval",
    model_class="AlbefForPreTraining",
    source="fine-tuned from org/albef-tiny-pretrained",
    training={"trainer": "albef_hf.AlbefTrainer", "optimizer steps": 120, "precision": "bf16"},
    metrics={"txt_r1": 41.5, "img_r1": 38.25},
    dataset_name="synthetic-world",
    dataset_split="test",
    repo_id="org/albef-tiny-synthetic",
    datasets=["org/synthetic-world"],
    base_model="org/albef-tiny-pretrained",
)


def test_the_card_renders_training_and_metrics_and_its_metadata_validates(tmp_path):
    loaded = ModelCard.load(save_model_card(build_model_card(INFO), tmp_path))
    data = loaded.data
    assert (data.license, data.library_name, data.pipeline_tag) == (
        "bsd-3-clause",
        "transformers",
        "zero-shot-image-classification",
    )
    assert {"albef", "retrieval", "image-text-retrieval", "image-text-matching", "visual-grounding"} <= set(
        data.tags
    )
    assert (data.datasets, data.base_model, data.language) == (
        ["org/synthetic-world"],
        "org/albef-tiny-pretrained",
        "en",
    )
    # Hub card metadata: it round-trips through ModelCardData, and its model-index parses back to the metrics
    assert ModelCardData(**data.to_dict()).to_dict() == data.to_dict()
    name, results = model_index_to_eval_results(data.to_dict()["model-index"])
    assert name == "albef-tiny-synthetic"
    assert {(r.metric_type, r.metric_value, r.dataset_name, r.dataset_split) for r in results} == {
        ("txt_r1", 41.5, "synthetic-world", "test"),
        ("img_r1", 38.25, "synthetic-world", "test"),
    }
    text = loaded.text
    for line in (
        "| optimizer steps | 120 |",
        "| precision | bf16 |",
        "| txt_r1 | 41.50 |",
        "| img_r1 | 38.25 |",
    ):
        assert line in text
    assert "## Results on synthetic-world test" in text and "@inproceedings{li2021align" in text
    assert 'AlbefForPreTraining.from_pretrained("org/albef-tiny-synthetic")' in text
    assert 'pipeline("image-text-matching", model="org/albef-tiny-synthetic", trust_remote_code=True)' in text


def test_the_card_offers_remote_code_only_for_classes_whose_folders_carry_it():
    import albef_hf

    registered = {
        name
        for name in albef_hf.__all__
        if name.startswith("AlbefFor") or name == "AlbefModel"
        if getattr(getattr(albef_hf, name), "_auto_class", None) is not None
    }
    assert {name for name in albef_hf.__all__ if has_remote_code(name)} == registered
    # as docs/pipelines.md says: the retrieval, NLVR2 and SNLI-VE classes have no Auto class yet
    assert registered == {"AlbefModel", "AlbefForPreTraining", "AlbefForQuestionAnswering"}
    text = build_model_card(
        AlbefCardInfo(model_name="albef", task="retrieval", model_class="AlbefForImageTextRetrieval")
    ).text
    assert "trust_remote_code" not in text and "import albef_hf\nfrom transformers import pipeline" in text


def test_a_minimal_card_has_no_results_and_an_unknown_task_is_refused():
    card = build_model_card(
        AlbefCardInfo(model_name="albef", task="vqa", model_class="AlbefForQuestionAnswering")
    )
    assert card.data.eval_results is None and "## Results" not in card.text and "## Training" not in card.text
    assert (
        card.data.pipeline_tag == "visual-question-answering"
        and "visual-question-answering" in card.data.tags
    )
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        build_model_card(AlbefCardInfo(model_name="albef", task="captioning"))


def test_the_card_task_follows_the_model_class():
    assert task_for_model_class("AlbefForPreTraining") == "pretraining"
    assert task_for_model_class("AlbefForImageTextRetrieval") == "retrieval"
    assert task_for_model_class("AlbefForQuestionAnswering") == "vqa"
    assert task_for_model_class("AlbefForVisualEntailment") == "ve"


def test_the_card_offers_only_the_pipelines_its_checkpoint_serves():
    import albef_hf

    card = build_model_card(AlbefCardInfo(model_name="albef", task="pretraining", model_class="AlbefModel"))
    for task in ("image-text-matching", "image-text-retrieval", "visual-grounding"):
        assert task not in card.data.tags and f"`{task}`" not in card.text
    assert {"feature-extraction", "zero-shot-image-classification"} <= set(card.data.tags)
    assert 'pipeline("feature-extraction", model="path/or/repo", trust_remote_code=True)' in card.text
    # each pipeline it offers names the class among those its loader accepts
    for name in (
        "AlbefModel",
        "AlbefForPreTraining",
        "AlbefForImageTextRetrieval",
        "AlbefForQuestionAnswering",
    ):
        for task in served_pipelines(name):
            if task != "zero-shot-image-classification":
                assert name in albef_hf.AlbefPreTrainedModel.folder_pipelines[task].checkpoint_classes
    assert served_pipelines("AlbefForVisualEntailment") == ()
    assert served_pipelines("AlbefForPreTraining")[0] == "image-text-matching"
    assert served_pipelines("AlbefForImageTextRetrieval", "grounding")[0] == "visual-grounding"
