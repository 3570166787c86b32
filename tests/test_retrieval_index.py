"""The FAISS retrieval index: equal to dense ranking, folders, incremental adds, token stores, resumable and
two-process builds, approximate searches."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CAPTIONS, random_images, tiny_config, tiny_processor
from retrieval_index_helpers import CHUNK_SIZE, build, gallery
from transformers import pipeline

from albef_hf import AlbefForImageTextRetrieval, AlbefRetrievalIndex

pytest.importorskip("faiss")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HERE = os.path.dirname(os.path.abspath(__file__))
QUERIES = [*CAPTIONS, "a small yellow square", "three cats"]
TEXTS = [
    f"{a} {b} {c}" for a in ("a", "two", "three big") for b in ("red", "blue") for c in ("dogs", "cats above")
]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(1)
    AlbefForImageTextRetrieval(tiny_config()).save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def retriever(model_folder):
    return pipeline("image-text-retrieval", model=model_folder)


@pytest.fixture(scope="module")
def images():
    return random_images(40, seed=3, size=(16, 16))


def dense_gallery(retriever, items, modality, batch_size):
    """What the dense index held: every gallery item's fp32 features and tokens in memory, texts padded to the
    longest (the gallery encoded in the same batches as the build)."""
    features, embeds, masks = [], [], []
    for start in range(0, len(items), batch_size):
        f, e, m = retriever._encode_gallery(items[start : start + batch_size], start, modality)
        features.append(f)
        embeds.append(e)
        masks.append(m)
    if modality == "image":
        return torch.cat(features), torch.cat(embeds), None
    length = max(e.shape[1] for e in embeds)
    embeds = [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e in embeds]
    masks = [torch.nn.functional.pad(m, (0, length - m.shape[1])) for m in masks]
    return torch.cat(features), torch.cat(embeds), torch.cat(masks)


def dense_reference(retriever, gallery, queries, k):
    """What the dense index answered: ITC by one matmul over all items, `itm_rerank` over all of them."""
    features, embeds, masks = gallery
    with torch.no_grad():
        if masks is None:
            tokens = retriever.processor(text=queries)
            query_embeds, query_feat = retriever.encode_texts(tokens["input_ids"], tokens["attention_mask"])
            return retriever.model.itm_rerank(
                query_feat @ features.T, embeds, query_embeds, tokens["attention_mask"], k, 7, False
            )
        pixel_values = retriever.processor(images=queries)["pixel_values"]
        query_embeds, query_feat = retriever.encode_images(pixel_values)
        return retriever.model.itm_rerank(query_feat @ features.T, query_embeds, embeds, masks, k, 7, True)


def query_index(retriever, index, queries, k):
    """The index's answer to a batch of queries, as the pipeline's forward computes it."""
    with torch.no_grad():
        if index.query_modality == "text":
            tokens = retriever.processor(text=queries)
            embeds, feat = retriever.encode_texts(tokens["input_ids"], tokens["attention_mask"])
            mask = tokens["attention_mask"]
        else:
            embeds, feat = retriever.encode_images(retriever.processor(images=queries)["pixel_values"])
            mask = None
        return index.rerank(retriever.model, embeds, feat, mask, k, 7, encode=retriever._encode_gallery)


def assert_same(ours, theirs):
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# The exact index equals the dense ranking
# ----------------------------------------------------------------------------------------------


def test_exact_index_of_images_equals_the_dense_ranking(retriever, images):
    index = retriever.build_index(images=images, batch_size=8, progress=False)  # the defaults
    assert index.index_type == "flat" and index.token_dtype == torch.float32 and len(index) == 40
    dense = dense_gallery(retriever, images, "image", 8)
    assert_same(query_index(retriever, index, QUERIES, 12), dense_reference(retriever, dense, QUERIES, 12))
    # through the pipeline, one query at a time: the same items, scores and similarities
    results = retriever(QUERIES, top_k=12, k=12, itm_batch_size=7)
    for query, result in zip(QUERIES, results, strict=True):
        itc, candidates, itm = (t[0] for t in dense_reference(retriever, dense, [query], 12))
        order = itm[:, 1].argsort(descending=True, stable=True)
        assert [r["index"] for r in result] == candidates[order].tolist()
        assert [r["score"] for r in result] == itm[order, 1].tolist()
        assert [r["itc_similarity"] for r in result] == itc[order].tolist()


def test_exact_index_of_texts_equals_the_dense_ranking(retriever):
    queries = random_images(3, seed=5)
    index = retriever.build_index(texts=TEXTS, batch_size=4, progress=False)
    assert index.texts == TEXTS
    dense = dense_gallery(retriever, TEXTS, "text", 4)
    assert_same(query_index(retriever, index, queries, 8), dense_reference(retriever, dense, queries, 8))


def test_a_float16_token_store_stays_close_to_the_float32_one(retriever, images):
    half = retriever.build_index(images=images, batch_size=8, token_dtype=torch.float16, progress=False)
    assert half.token_dtype == torch.float16 and half.item_tokens(torch.arange(2))[0].dtype == torch.float16
    itc, candidates, itm = query_index(retriever, half, QUERIES, 12)
    dense = dense_gallery(retriever, images, "image", 8)
    itc32, candidates32, itm32 = dense_reference(retriever, dense, QUERIES, 12)
    assert torch.equal(itc, itc32) and torch.equal(
        candidates, candidates32
    )  # the ITC stage is fp32 either way
    assert (itm - itm32).abs().max() < 1e-2 and not torch.equal(itm, itm32)


# ----------------------------------------------------------------------------------------------
# Folders and token stores
# ----------------------------------------------------------------------------------------------


def test_a_folder_index_memory_maps_its_tokens_and_rescores_as_in_memory(retriever, images, tmp_path):
    memory = retriever.build_index(images=images, batch_size=8, token_dtype=torch.float16, progress=False)
    folder = retriever.build_index(images=images, batch_size=8, directory=tmp_path / "index", progress=False)
    assert folder.directory == str(tmp_path / "index") and folder.token_dtype == torch.float16
    assert folder._tokens.path == str(tmp_path / "index" / "tokens.bin")
    size = os.path.getsize(tmp_path / "index" / "tokens.bin")
    assert size == 40 * (1 + 16) * 32 * 2  # fp16: [CLS] and 16 patches of 32 per image
    assert_same(query_index(retriever, folder, QUERIES, 12), query_index(retriever, memory, QUERIES, 12))
    assert not os.path.exists(tmp_path / "index" / "chunks")  # merged and removed
    # float32 in a folder: the in-memory default's scores
    exact = retriever.build_index(
        images=images, batch_size=8, directory=tmp_path / "fp32", token_dtype=torch.float32, progress=False
    )
    memory = retriever.build_index(images=images, batch_size=8, progress=False)
    assert_same(query_index(retriever, exact, QUERIES, 12), query_index(retriever, memory, QUERIES, 12))


def test_save_load_round_trip_and_incremental_adds(retriever, images, tmp_path):
    index = retriever.build_index(images=images[:30], ids=[f"img{i}" for i in range(30)], progress=False)
    expected = query_index(retriever, index, QUERIES, 10)
    index.save(tmp_path / "saved")
    loaded = AlbefRetrievalIndex.load(tmp_path / "saved")
    everything = torch.arange(30)
    assert loaded.ids == index.ids and torch.equal(loaded.features, index.features)
    assert torch.equal(loaded.item_tokens(everything)[0], index.item_tokens(everything)[0])
    assert loaded._itc.ntotal == 30  # the FAISS index was saved, not rebuilt
    assert_same(query_index(retriever, loaded, QUERIES, 10), expected)

    # add the other 10 to the loaded folder index and to the in-memory one: both equal one built from all 40
    for target in (loaded, index):
        features, embeds, _ = retriever._encode_gallery(images[30:], 30, "image")
        target.add(features, embeds, ids=[f"img{i}" for i in range(30, 40)])
    loaded.save()
    reloaded = AlbefRetrievalIndex.load(tmp_path / "saved")
    whole = retriever.build_index(images=images, ids=[f"img{i}" for i in range(40)], progress=False)
    assert reloaded.ids == whole.ids and reloaded._itc.ntotal == 40
    for other in (index, reloaded):
        assert_same(query_index(retriever, other, QUERIES, 12), query_index(retriever, whole, QUERIES, 12))
    # the pipeline takes the folder
    fresh = pipeline("image-text-retrieval", model=retriever.model, processor=retriever.processor)
    assert fresh(QUERIES[0], index=str(tmp_path / "saved"), top_k=3)[0]["id"].startswith("img")


def test_an_index_without_tokens_encodes_its_shortlist_again(retriever, images, tmp_path):
    paths = []
    for i, image in enumerate(images[:20]):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    stored = retriever.build_index(images=paths, progress=False)
    index = retriever.build_index(images=paths, store_tokens=False, directory=tmp_path / "i", progress=False)
    assert not os.path.exists(tmp_path / "i" / "tokens.bin") and index.sources == paths
    itc, candidates, itm = query_index(retriever, index, QUERIES, 8)
    itc32, candidates32, itm32 = query_index(retriever, stored, QUERIES, 8)
    assert torch.equal(itc, itc32) and torch.equal(candidates, candidates32)
    assert torch.allclose(itm, itm32, rtol=0, atol=1e-5)  # images encoded in other batches
    with pytest.raises(ValueError, match="keeps its images' paths or URLs"):
        retriever.build_index(images=images[:2], store_tokens=False)


# ----------------------------------------------------------------------------------------------
# Building: resumable, across processes
# ----------------------------------------------------------------------------------------------


def test_an_interrupted_build_resumes_after_its_finished_chunks(
    retriever, model_folder, tmp_path, monkeypatch
):
    calls = []
    encode_image = retriever.model.encode_image

    def failing(pixel_values, *args, **kwargs):
        calls.append(len(pixel_values))
        if len(calls) == 7:  # in the third chunk (chunks of 5 items, batches of 2)
            raise RuntimeError("interrupted")
        return encode_image(pixel_values, *args, **kwargs)

    monkeypatch.setattr(retriever.model, "encode_image", failing)
    options = {"directory": tmp_path / "index", "chunk_size": CHUNK_SIZE, "batch_size": 2, "progress": False}
    with pytest.raises(RuntimeError, match="interrupted"):
        retriever.build_index(images=gallery(), **options)
    assert sorted(os.listdir(tmp_path / "index" / "chunks")) == [
        "build.json",
        "chunk-000000.safetensors",
        "chunk-000001.safetensors",
    ]
    with pytest.raises(ValueError, match="unfinished build of another gallery"):
        retriever.build_index(images=gallery()[:12], **options)

    calls.clear()
    index = retriever.build_index(images=gallery(), **options)
    assert calls == [2, 1]  # only the third chunk
    fresh = build(model_folder, str(tmp_path / "fresh"))
    assert len(index) == 13 and torch.equal(index.features, fresh.features)
    everything = torch.arange(13)
    assert torch.equal(index.item_tokens(everything)[0], fresh.item_tokens(everything)[0])
    # a finished build run again returns its index; another gallery in the folder is refused
    calls.clear()
    assert retriever.build_index(images=gallery(), **options).ids == index.ids and calls == []
    with pytest.raises(ValueError, match="already holds another retrieval index"):
        retriever.build_index(images=gallery()[:4], **options)


def test_a_two_process_build_equals_the_single_process_one(model_folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), HERE]), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        os.path.join(HERE, "retrieval_index_helpers.py"), model_folder, str(tmp_path / "two"),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and ranks[0] == ranks[1]
    two = AlbefRetrievalIndex.load(tmp_path / "two")
    one = build(model_folder, str(tmp_path / "one"), token_dtype=torch.float32)
    assert two.ids == one.ids == list(range(13))
    assert torch.equal(two.features, one.features)
    everything = torch.arange(13)
    assert torch.equal(two.item_tokens(everything)[0], one.item_tokens(everything)[0])
    for name in ("features.bin", "tokens.bin", "lengths.bin"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name


def test_several_processes_without_a_process_group_are_refused(retriever, monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="no process group is initialised"):
        retriever.build_index(texts=TEXTS, directory=tmp_path, progress=False)


# ----------------------------------------------------------------------------------------------
# Approximate searches
# ----------------------------------------------------------------------------------------------


def clustered_index(index_type: str, count: int = 3000, **options) -> AlbefRetrievalIndex:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(30, 16, generator=generator)
    features = centres[torch.randint(0, 30, (count,), generator=generator)] + 0.3 * torch.randn(
        count, 16, generator=generator
    )
    index = AlbefRetrievalIndex("image", 16, 8, index_type=index_type, store_tokens=False, **options)
    for start in range(0, count, 1000):  # incremental adds
        chunk = torch.nn.functional.normalize(features[start : start + 1000], dim=-1)
        index.add(chunk, sources=[f"{i}.png" for i in range(start, start + len(chunk))])
    return index


def test_approximate_indexes_find_the_exact_shortlist(tmp_path):
    queries = torch.nn.functional.normalize(
        torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    exact_sims, exact = clustered_index("flat").search(queries, 32)
    # IVF probing every list is exhaustive: the exact result
    ivf = clustered_index("ivf", nprobe=10_000)
    assert ivf.search_parameters(32)["nlist"] == 76  # 4 sqrt(3000) ~ 219 -> 256, capped at 3000 / 39 = 76
    assert_same(ivf.search(queries, 32), (exact_sims, exact))
    # the defaults find nearly all of it
    for index_type in ("ivf", "hnsw"):
        index = clustered_index(index_type)
        _, found = index.search(queries, 32)
        recall = (
            sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True))
            / exact.numel()
        )
        assert recall >= 0.95, (index_type, recall)
        index.save(tmp_path / index_type)
        assert torch.equal(AlbefRetrievalIndex.load(tmp_path / index_type).search(queries, 32)[1], found)
    with pytest.raises(ValueError, match="needs at least 9984 items"):
        clustered_index("ivfpq").search(queries, 32)


def test_adds_of_the_wrong_shape_are_refused():
    index = AlbefRetrievalIndex("image", 16, 8)
    with pytest.raises(ValueError, match=r"features must be \(n, 16\), got \(2, 8\)"):
        index.add(torch.randn(2, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="stores tokens of size 8, got 4"):
        index.add(torch.randn(2, 16), torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="needs the token embeddings"):
        index.add(torch.randn(2, 16))
    assert len(index) == 0


def test_a_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ImportError, match=r"pip install albef-hf\[faiss\]"):
        clustered_index("flat", count=10).search(torch.randn(1, 16), 2)
