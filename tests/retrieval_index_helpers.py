"""A gallery build across processes, for tests/test_retrieval_index.py.

`torchrun --nproc_per_node 2 tests/retrieval_index_helpers.py MODEL_FOLDER INDEX_FOLDER` builds the index of
`gallery()` with the retrieval pipeline of the model in MODEL_FOLDER, each rank encoding its chunks (gloo), and
writes what each rank got back to INDEX_FOLDER/rank{r}.json.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from conftest import random_images
from transformers import pipeline

import albef_hf  # noqa: F401  (registers the pipelines)

CHUNK_SIZE = 5


def gallery() -> list:
    """13 images: three chunks of 5, 5 and 3."""
    return random_images(13, seed=11, size=(16, 16))


def build(model_folder: str, index_folder: str, **options):
    retriever = pipeline("image-text-retrieval", model=model_folder)
    return retriever.build_index(
        images=gallery(),
        directory=index_folder,
        chunk_size=CHUNK_SIZE,
        batch_size=2,
        progress=False,
        **options,
    )


def main(model_folder: str, index_folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    index = build(model_folder, index_folder, token_dtype=torch.float32)
    with open(os.path.join(index_folder, f"rank{rank}.json"), "w", encoding="utf-8") as file:
        json.dump(
            {"world_size": torch.distributed.get_world_size(), "count": len(index), "ids": index.ids}, file
        )
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
