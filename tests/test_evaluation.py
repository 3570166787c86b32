"""Tests of albef_hf.evaluation: the retrieval metric and the ITC + ITM scoring split across processes."""

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_config

from albef_hf import AlbefForImageTextRetrieval
from albef_hf.evaluation import (
    RetrievalEvalSet,
    compute_retrieval_scores,
    evaluate_retrieval,
    itm_eval,
    retrieval_eval_set_from_samples,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def brute_force_recalls(scores_i2t, scores_t2i, txt2img, img2txt):
    """Recall by counting, per query, the candidates that score strictly higher than its best positive."""

    def recall(ranks, k):
        return 100.0 * np.mean([rank < k for rank in ranks])

    text_ranks = [min(int((row > row[t]).sum()) for t in img2txt[i]) for i, row in enumerate(scores_i2t)]
    image_ranks = [int((row > row[txt2img[t]]).sum()) for t, row in enumerate(scores_t2i)]
    out = {f"txt_r{k}": recall(text_ranks, k) for k in (1, 5, 10)}
    out.update({f"img_r{k}": recall(image_ranks, k) for k in (1, 5, 10)})
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_itm_eval_matches_brute_force_with_several_captions_per_image(seed):
    rng = np.random.default_rng(seed)
    num_images = 23
    captions = rng.integers(1, 6, num_images)  # 1 to 5 captions per image
    txt2img = np.repeat(np.arange(num_images), captions)
    img2txt = [list(np.flatnonzero(txt2img == i)) for i in range(num_images)]
    order = rng.permutation(len(txt2img))  # texts not grouped by image
    txt2img = txt2img[order]
    img2txt = [sorted(int(np.flatnonzero(order == t)[0]) for t in texts) for texts in img2txt]
    scores_i2t = rng.normal(size=(num_images, len(txt2img)))
    scores_t2i = rng.normal(size=(len(txt2img), num_images))
    # make retrieval neither trivial nor hopeless
    scores_i2t[txt2img, np.arange(len(txt2img))] += 1.5
    scores_t2i[np.arange(len(txt2img)), txt2img] += 1.5

    metrics = itm_eval(scores_i2t, scores_t2i, list(txt2img), img2txt)
    expected = brute_force_recalls(scores_i2t, scores_t2i, txt2img, img2txt)
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value), name
    assert 0 < metrics["txt_r1"] < 100 and 0 < metrics["img_r5"] < 100
    assert metrics["txt_r_mean"] == pytest.approx(np.mean([expected[f"txt_r{k}"] for k in (1, 5, 10)]))
    assert metrics["r_mean"] == pytest.approx((metrics["txt_r_mean"] + metrics["img_r_mean"]) / 2)


def test_itm_eval_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        itm_eval(np.zeros((2, 3)), np.zeros((3, 3)), [0, 1, 1], [[0], [1, 2]])


def test_eval_set_from_reader_samples_groups_by_image_id():
    images = random_images(3)
    samples = [
        {"image": images[0], "text": "a", "image_id": 7},
        {"image": images[1], "text": "b", "image_id": 3},
        {"image": images[0], "text": "c", "image_id": 7},
        {"image": images[2], "text": "d", "image_id": 9},
    ]
    eval_set = retrieval_eval_set_from_samples(samples)
    assert eval_set.images == images and eval_set.texts == ["a", "b", "c", "d"]
    assert eval_set.txt2img == [0, 1, 0, 2] and eval_set.img2txt == [[0, 2], [1], [3]]
    with pytest.raises(ValueError, match="image_id"):
        retrieval_eval_set_from_samples([{"image": images[0], "text": "a"}])


def test_scores_split_across_processes_equal_one_process(processor):
    """Each 'process' re-ranks its block of rows; summing the blocks gives the single-process scores."""
    torch.manual_seed(0)
    model = AlbefForImageTextRetrieval(tiny_config()).eval()
    texts = CAPTIONS + ["a yellow circle", "two cats", "one man", "a green square"]
    eval_set = RetrievalEvalSet(
        random_images(5), texts, [0, 1, 2, 3, 4, 0, 1, 2], [[0, 5], [1, 6], [2, 7], [3], [4]]
    )
    single = compute_retrieval_scores(model, processor, eval_set, k=3, batch_size=4)
    parts = [
        compute_retrieval_scores(
            model, processor, eval_set, k=3, batch_size=4, rank=r, world_size=3, reduce=lambda t: t
        )
        for r in range(3)
    ]
    for index in range(2):
        combined = sum(part[index] for part in parts)
        assert torch.allclose(combined, single[index], atol=1e-5)
        # exactly k re-ranked candidates per query, -100 elsewhere
        assert ((single[index] != -100).sum(dim=1) == 3).all()
    metrics = evaluate_retrieval(model, processor, eval_set, k=3, batch_size=4)
    assert set(metrics) >= {"txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r_mean", "r_mean"}
