"""Tests of albef_hf.data.readers: ALBEF json, Hugging Face datasets, webdataset shards."""

import copy
import io
import json
import logging
import os
import pickle
import tarfile

import datasets
import numpy as np
import pytest
from PIL import Image
from torch.utils.data import DataLoader

from albef_hf.data.readers import (
    AlbefJsonDataset,
    HFImageTextDataset,
    HFStreamingImageTextDataset,
    SkipStats,
    WebDatasetShards,
    build_image_text_dataset,
    expand_shard_pattern,
    read_albef_json,
    read_hf_dataset,
    read_webdataset,
)


def colour(index):
    """A distinct colour per image, so that a sample's image tells which file it came from."""
    return (10 * index % 256, 255 - 10 * index % 256, 77)


def png_bytes(index, fmt="PNG"):
    buffer = io.BytesIO()
    Image.new("RGB", (6, 5), colour(index)).save(buffer, fmt)
    return buffer.getvalue()


def truncated_jpeg():
    """Starts as a valid JPEG, so it opens, but fails when decoded."""
    return png_bytes(99, "JPEG")[:60]


def pixel(sample):
    assert sample["image"].mode == "RGB"
    return sample["image"].getpixel((2, 2))


def collate_list(batch):
    return batch


def everything(dataset):
    """All samples of a map-style dataset through a DataLoader with worker processes, in order."""
    return [
        sample
        for batch in DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_list)
        for sample in batch
    ]


# ---------------------------------------------------------------- ALBEF json


@pytest.fixture
def albef_json(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for index in range(3):
        (root / f"{index}.png").write_bytes(png_bytes(index))
    (root / "corrupt.jpg").write_bytes(b"this is not an image")
    first = [
        {"image": "0.png", "caption": "a red square", "image_id": "coco_7"},
        {"image": "1.png", "caption": ["one", "   ", "two"]},
        {"image": "corrupt.jpg", "caption": "broken file"},
        {"image": "missing.png", "caption": "no file"},
    ]
    second = [
        {"image": "0.png", "caption": "again the first", "image_id": "coco_7", "ref_id": 12},
        {"image": "2.png", "caption": "last"},
    ]
    paths = []
    for name, entries in (("a.json", first), ("b.json", second)):
        (tmp_path / name).write_text(json.dumps(entries))
        paths.append(str(tmp_path / name))
    return paths, str(root)


def test_albef_json_expands_captions_and_skips_bad_samples(albef_json):
    paths, root = albef_json
    dataset = read_albef_json(paths, image_root=root)
    assert isinstance(dataset, AlbefJsonDataset)
    # 7 non-empty captions; the whitespace one is dropped when the dataset is built
    assert len(dataset) == 7
    assert dataset.skip_stats.as_dict()["empty_text"] == 1
    samples = everything(dataset)
    texts = [sample["text"] for sample in samples]
    # the two bad images (indices 3, 4) are replaced by the next readable sample (index 5)
    assert texts == [
        "a red square",
        "one",
        "two",
        "again the first",
        "again the first",
        "again the first",
        "last",
    ]
    counts = dataset.skip_stats.as_dict()  # made in the workers, seen here
    assert counts["missing_image"] == 1 and counts["unreadable_image"] == 1
    ids = [sample["image_id"] for sample in samples]
    assert ids[0] == ids[3]  # same "image_id" in two files: one image
    assert ids[1] == ids[2] != ids[0]  # captions of one entry share the image
    assert pixel(samples[0]) == colour(0) and pixel(samples[1]) == colour(1)
    assert samples[3]["ref_id"] == 12 and "caption" not in samples[3]
    assert dataset[-1]["text"] == "last" and pixel(dataset[-1]) == colour(2)
    with pytest.raises(IndexError):
        dataset[7]


def test_albef_json_errors_name_what_is_missing(albef_json, tmp_path):
    paths, root = albef_json
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_albef_json([paths[0], str(tmp_path / "nope.json")], image_root=root)
    with pytest.raises(FileNotFoundError, match="image root .*no_such_dir"):
        read_albef_json(paths, image_root=str(tmp_path / "no_such_dir"))
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "0.png", "text": "grounding style"}]))
    with pytest.raises(ValueError, match=r"bad.json\[0\].*'caption'.*found \['image', 'text'\]"):
        read_albef_json(str(tmp_path / "bad.json"), image_root=root)
    assert (
        read_albef_json(str(tmp_path / "bad.json"), image_root=root, text_key="text")[0]["text"]
        == "grounding style"
    )


def test_map_style_reader_without_any_readable_image_raises_clearly(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x.png", "caption": "c"}]))
    with pytest.raises(ValueError, match="no sample .* readable image"):
        read_albef_json(str(tmp_path / "a.json"), image_root=str(tmp_path))[0]


# ---------------------------------------------------------------- Hugging Face datasets


@pytest.fixture
def imagefolder(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    rows = [("0.png", "red"), ("1.png", "green"), ("2.png", "  "), ("bad.png", "bad"), ("3.png", "blue")]
    for index, (name, _) in enumerate(rows):
        (folder / name).write_bytes(b"corrupt" if name == "bad.png" else png_bytes(index))
    with open(folder / "metadata.jsonl", "w") as file:
        for name, text in rows:
            file.write(json.dumps({"file_name": name, "text": text, "source": "test"}) + "\n")
    return str(folder)


def test_imagefolder_with_metadata_map_style(imagefolder, tmp_path):
    loaded = datasets.load_dataset(
        "imagefolder", data_dir=imagefolder, split="train", cache_dir=str(tmp_path / "cache")
    )
    dataset = read_hf_dataset(loaded)
    assert isinstance(dataset, HFImageTextDataset)
    assert len(dataset) == 4 and dataset.skip_stats.as_dict()["empty_text"] == 1
    samples = everything(dataset)
    assert [s["text"] for s in samples] == ["red", "green", "blue", "blue"]  # "bad" replaced by its successor
    assert [pixel(s) for s in samples[:3]] == [colour(0), colour(1), colour(4)]
    assert dataset.skip_stats.as_dict()["unreadable_image"] == 1
    assert samples[0]["source"] == "test" and samples[0]["image_id"] != samples[1]["image_id"]


def test_an_image_folder_with_a_malformed_metadata_file_is_refused(imagefolder, tmp_path):
    """pyarrow's JSON reader, which datasets uses, kills the process on a metadata.jsonl holding `null`."""
    metadata = os.path.join(imagefolder, "metadata.jsonl")
    for content, message in [("null", "line 1: expected a JSON object, got NoneType"), ("{}\n[1]", "line 2"),
                             ("{not json", "line 1: not valid JSON")]:  # fmt: skip
        with open(metadata, "w") as file:
            file.write(content)
        with pytest.raises(ValueError, match=message):
            build_image_text_dataset(imagefolder)
        with pytest.raises(ValueError, match=message):
            build_image_text_dataset("imagefolder", load_kwargs={"data_dir": imagefolder})


def test_imagefolder_streaming(imagefolder):
    loaded = datasets.load_dataset("imagefolder", data_dir=imagefolder, split="train", streaming=True)
    dataset = read_hf_dataset(loaded)
    assert isinstance(dataset, HFStreamingImageTextDataset)
    samples = list(dataset)
    assert [s["text"] for s in samples] == ["red", "green", "blue"]
    assert [pixel(s) for s in samples] == [colour(0), colour(1), colour(4)]
    assert dataset.skip_stats.as_dict() == {
        "missing_image": 0,
        "unreadable_image": 1,
        "empty_text": 1,
        "unreadable_shard": 0,
    }
    assert len({s["image_id"] for s in samples}) == 3
    # ids identify images by path, the same in every process and run
    assert [s["image_id"] for s in read_hf_dataset(loaded)] == [s["image_id"] for s in samples]


def test_hf_dataset_with_caption_lists_paths_and_ids(tmp_path):
    for index in range(2):
        (tmp_path / f"{index}.png").write_bytes(png_bytes(index))
    table = datasets.Dataset.from_dict(
        {
            "file": ["0.png", "1.png", "0.png"],
            "captions": [["a", "b"], [], ["c", None, ""]],
            "cocoid": ["17", "18", "17"],
        }
    )
    dataset = read_hf_dataset(table, "file", "captions", image_root=str(tmp_path), id_column="cocoid")
    samples = [dataset[i] for i in range(len(dataset))]
    assert [(s["text"], s["image_id"]) for s in samples] == [("a", 17), ("b", 17), ("c", 17)]
    assert dataset.skip_stats.as_dict()["empty_text"] == 3  # the empty row, None and ""
    # a selection (indices mapping) is respected
    assert [read_hf_dataset(table.select([2]), "file", "captions", image_root=str(tmp_path))[0]["text"]] == [
        "c"
    ]


def test_hf_dataset_errors_name_the_problem(tmp_path):
    table = datasets.Dataset.from_dict({"img": ["0.png"], "caption": ["x"], "n": [1]})
    with pytest.raises(
        ValueError,
        match=r"text column 'text' not in the dataset; available columns: \['img', 'caption', 'n'\]",
    ):
        read_hf_dataset(table, image_column="img")
    with pytest.raises(ValueError, match="image column 'image'"):
        read_hf_dataset(table, text_column="caption")
    with pytest.raises(ValueError, match="must hold str or list of str"):
        read_hf_dataset(table, "img", "n")
    with pytest.raises(FileNotFoundError, match="image root"):
        read_hf_dataset(table, "img", "caption", image_root=str(tmp_path / "absent"))
    with pytest.raises(ValueError, match="pick a split"):
        read_hf_dataset(datasets.DatasetDict({"train": table}), "img", "caption")
    with pytest.raises(ValueError, match="id column 'idx'"):
        read_hf_dataset(table.to_iterable_dataset(), "img", "caption", id_column="idx")


def test_hf_streaming_split_by_rank_partitions(tmp_path):
    for index in range(8):
        (tmp_path / f"{index}.png").write_bytes(png_bytes(index))
    table = datasets.Dataset.from_dict(
        {"image": [f"{i}.png" for i in range(8)], "text": [f"t{i}" for i in range(8)]}
    )
    for num_shards in (2, 3):  # shards dealt out, or every world_size-th record
        stream = table.to_iterable_dataset(num_shards=num_shards)
        parts = [
            {s["text"] for s in read_hf_dataset(stream, image_root=str(tmp_path), rank=rank, world_size=2)}
            for rank in (0, 1)
        ]
        assert parts[0] and parts[1] and not parts[0] & parts[1]
        assert parts[0] | parts[1] == {f"t{i}" for i in range(8)}
    with pytest.raises(ValueError, match="rank"):
        read_hf_dataset(table.to_iterable_dataset(), image_root=str(tmp_path), rank=2, world_size=2)


# ---------------------------------------------------------------- webdataset shards


def write_shard(path, samples):
    """samples: (key, {extension: bytes}) in order, as img2dataset writes them."""
    with tarfile.open(path, "w") as archive:
        for key, fields in samples:
            for extension, data in fields.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))


def img2dataset_sample(shard, index, image=None, caption=None):
    key = f"{shard:05d}{index:04d}"
    caption = f"caption {shard}-{index}" if caption is None else caption
    metadata = {"key": key, "caption": caption, "url": f"http://x/{key}.jpg", "status": "success"}
    fields = {"jpg": png_bytes(10 * shard + index, "JPEG") if image is None else image}
    fields |= {"txt": caption.encode(), "json": json.dumps(metadata).encode()}
    return key, fields


@pytest.fixture
def shards(tmp_path):
    """Two shards of 4 samples; a truncated jpg in the first, a whitespace caption in the second."""
    directory = tmp_path / "shards"
    directory.mkdir()
    bad = {(0, 1): {"image": truncated_jpeg()}, (1, 2): {"caption": " \n"}}
    for shard in range(2):
        samples = [img2dataset_sample(shard, index, **bad.get((shard, index), {})) for index in range(4)]
        write_shard(directory / f"{shard:05d}.tar", samples)
    return str(directory)


GOOD_KEYS = {"000000000", "000000002", "000000003", "000010000", "000010001", "000010003"}


def test_webdataset_reads_samples_and_skips_bad_ones(shards):
    dataset = read_webdataset(os.path.join(shards, "{00000..00001}.tar"))
    assert isinstance(dataset, WebDatasetShards)
    samples = list(dataset)
    assert [s["key"] for s in samples] == sorted(GOOD_KEYS)
    first = samples[0]
    assert first["text"] == "caption 0-0" and first["image_id"] == 0 and first["image"].size == (6, 5)
    assert first["metadata"]["url"] == "http://x/000000000.jpg"
    assert samples[3]["image_id"] == 10000
    assert dataset.skip_stats.as_dict() == {
        "missing_image": 0,
        "unreadable_image": 1,
        "empty_text": 1,
        "unreadable_shard": 0,
    }


def test_webdataset_skip_warnings_carry_the_running_count(shards, caplog):
    with caplog.at_level(logging.WARNING, logger="albef_hf.data.readers"):
        list(read_webdataset(os.path.join(shards, "*.tar")))
    messages = [record.getMessage() for record in caplog.records]
    assert any("unreadable_image" in m and "000000001.jpg" in m and "1 skipped" in m for m in messages)
    assert any("empty_text" in m and "000010002" in m for m in messages)


@pytest.mark.parametrize("world_size", [2, 3])  # 2: whole shards per rank; 3: more readers than shards
@pytest.mark.parametrize("shuffle", [False, True])
def test_webdataset_ranks_partition_the_stream(shards, world_size, shuffle):
    pattern = os.path.join(shards, "*.tar")
    parts = []
    for rank in range(world_size):
        dataset = read_webdataset(pattern, rank=rank, world_size=world_size, shuffle_shards=shuffle, seed=3)
        dataset.set_epoch(1)
        parts.append([s["key"] for s in dataset])
    keys = [key for part in parts for key in part]
    assert len(keys) == len(set(keys)) and set(keys) == GOOD_KEYS
    assert all(parts)


def test_webdataset_dataloader_workers_partition_and_report_skips(shards):
    dataset = read_webdataset(os.path.join(shards, "*.tar"))
    keys = [
        s["key"]
        for batch in DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=collate_list)
        for s in batch
    ]
    assert sorted(keys) == sorted(GOOD_KEYS)
    # the skips happened in the workers; the counters are shared with this process
    assert dataset.skip_stats.as_dict()["unreadable_image"] == 1 and dataset.skip_stats.total == 2


def test_webdataset_shuffle_buffer_reorders_the_same_samples(shards):
    pattern = os.path.join(shards, "*.tar")
    plain = [s["key"] for s in read_webdataset(pattern)]
    shuffled = [s["key"] for s in read_webdataset(pattern, shuffle_buffer=4, seed=1)]
    assert sorted(shuffled) == plain and shuffled != plain
    assert shuffled == [s["key"] for s in read_webdataset(pattern, shuffle_buffer=4, seed=1)]


def test_webdataset_survives_a_broken_shard(shards):
    good, broken = os.path.join(shards, "00001.tar"), os.path.join(shards, "broken.tar")
    with open(good, "rb") as source, open(broken, "wb") as target:
        data = source.read()
        target.write(data[: len(data) // 2])  # cut in the middle of a member
    dataset = read_webdataset([broken, good])
    keys = [s["key"] for s in dataset]
    assert keys[-3:] == ["000010000", "000010001", "000010003"]  # the next shard is still read
    assert set(keys[:-3]) <= {"000010000", "000010001"}  # what the broken half still held
    assert dataset.skip_stats.as_dict()["unreadable_shard"] == 1


def test_webdataset_sample_without_image_or_caption_is_skipped(tmp_path):
    write_shard(
        tmp_path / "a.tar",
        [
            ("k1", {"txt": b"only text"}),
            ("k2", {"png": png_bytes(1)}),
            ("k3", {"png": png_bytes(3), "txt": b"ok"}),
        ],
    )
    dataset = read_webdataset(str(tmp_path / "a.tar"))
    samples = list(dataset)
    assert [s["text"] for s in samples] == ["ok"] and "metadata" not in samples[0]
    assert samples[0]["image_id"] != samples[0]["key"] and isinstance(samples[0]["image_id"], int)
    assert (
        dataset.skip_stats.as_dict()["missing_image"] == 1 and dataset.skip_stats.as_dict()["empty_text"] == 1
    )


def test_shard_patterns(shards):
    assert [
        os.path.basename(p) for p in expand_shard_pattern(os.path.join(shards, "{00000..00001}.tar"))
    ] == ["00000.tar", "00001.tar"]
    assert len(expand_shard_pattern([os.path.join(shards, "{00001,00000}.tar")])) == 2
    with pytest.raises(FileNotFoundError, match=r"00002.tar.*tar files in .*\['00000.tar', '00001.tar'\]"):
        expand_shard_pattern(os.path.join(shards, "{00000..00002}.tar"))
    with pytest.raises(FileNotFoundError, match="match no file"):
        read_webdataset(os.path.join(shards, "*.tgz"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_webdataset("/no/such/dir/{0..3}.tar")


# ---------------------------------------------------------------- factory and skip statistics


def test_build_image_text_dataset_picks_the_reader(albef_json, imagefolder, shards, tmp_path):
    paths, root = albef_json
    assert isinstance(build_image_text_dataset(paths, image_root=root), AlbefJsonDataset)
    assert isinstance(build_image_text_dataset(os.path.join(shards, "{00000..00001}.tar")), WebDatasetShards)
    cache = {"cache_dir": str(tmp_path / "cache")}
    by_builder = build_image_text_dataset("imagefolder", load_kwargs={"data_dir": imagefolder, **cache})
    by_folder = build_image_text_dataset(imagefolder, load_kwargs=cache)
    assert isinstance(by_builder, HFImageTextDataset) and len(by_builder) == len(by_folder) == 4
    streamed = build_image_text_dataset(imagefolder, streaming=True)
    assert isinstance(streamed, HFStreamingImageTextDataset)
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"picture": ["0.png"], "caption": ["x"]}).save_to_disk(saved)
    from_disk = build_image_text_dataset(
        saved, image_column="picture", text_column="caption", image_root=root
    )
    assert from_disk[0]["text"] == "x" and pixel(from_disk[0]) == colour(0)
    with pytest.raises(ValueError, match="expected json files, tar shards or one"):
        build_image_text_dataset([paths[0], imagefolder])


def test_skip_stats_copies_carry_a_snapshot():
    stats = SkipStats("s")
    stats.record("empty_text", "x")
    stats.record("empty_text", "y")
    clone = pickle.loads(pickle.dumps(stats))
    deep = copy.deepcopy(stats)
    stats.record("missing_image", "z")
    assert clone.as_dict()["empty_text"] == 2 and clone.total == 2
    assert deep.total == 2 and stats.total == 3
    with pytest.raises(ValueError):
        stats.record("no_such_reason", "")


def test_every_sample_is_a_plain_image_text_id_dict(albef_json, shards):
    paths, root = albef_json
    for sample in (
        read_albef_json(paths, image_root=root)[0],
        next(iter(read_webdataset(os.path.join(shards, "*.tar")))),
    ):
        assert isinstance(sample["image"], Image.Image) and sample["image"].mode == "RGB"
        assert isinstance(sample["text"], str) and isinstance(sample["image_id"], int)
        assert np.asarray(sample["image"]).shape == (5, 6, 3)
