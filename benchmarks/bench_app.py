#!/usr/bin/env python
"""Request latency of the interactive page (`python -m albef_hf.app`) on the demo model.

The app is served on 127.0.0.1 (on `--threads` torch threads) and each kind of request is sent through
`gradio_client`, as a browser's would arrive: upload, queue, the pipelines, the answer. Each row gives the
median and the slowest of `--repeats` requests (after one warm-up), and the median of the same call made on the
service directly, without the server, in the same run (their ratio is what the page adds). Indexing the gallery
is timed once, on its own.

    python benchmarks/bench_app.py --model outputs/demo/model     # `make demo` first
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import torch
from gradio_client import Client, handle_file

from albef_hf.app import AlbefAppService, Gallery
from albef_hf.app.ui import launch
from albef_hf.data.synthetic import SyntheticWorldConfig, build_retrieval_eval


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed(call, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls, after one warm-up call."""
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo/model", help="the demo's saved model (make demo)")
    parser.add_argument("--gallery-size", type=int, default=100, help="held-out synthetic scenes to search")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the target: 2 CPU cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    service = AlbefAppService.from_pretrained(args.model)
    size = service.model.config.vision_config.image_size
    service.gallery = Gallery.synthetic(args.gallery_size, size)
    # queries: held-out scenes of another seed, and their first captions
    queries = build_retrieval_eval(1, seed=1, config=SyntheticWorldConfig(image_size=size))
    image, caption = queries.images[0], queries.texts[0]
    folder = tempfile.mkdtemp()
    image_path = os.path.join(folder, "query.png")
    image.save(image_path)

    start = time.perf_counter()
    service.index()
    index_seconds = time.perf_counter() - start

    blocks = launch(service, port=free_port(), block=False)
    client = Client(blocks.local_url, verbose=False)
    itc_mode, itm_mode = "ITC, early ViT block (localises in small models)", "ITM, fusion layer (the paper's)"
    requests = {
        "match (ITC Grad-CAM)": (
            lambda: client.predict(handle_file(image_path), caption, itc_mode, api_name="/match"),
            lambda: service.match(image, caption, "itc"),
        ),
        "match (ITM Grad-CAM)": (
            lambda: client.predict(handle_file(image_path), caption, itm_mode, api_name="/match"),
            lambda: service.match(image, caption, "itm"),
        ),
        "search images by text": (
            lambda: client.predict(caption, api_name="/search_images"),
            lambda: service.search_images(caption),
        ),
        "search captions by image": (
            lambda: client.predict(handle_file(image_path), api_name="/search_captions"),
            lambda: service.search_captions(image),
        ),
        "zero-shot, 6 labels": (
            lambda: client.predict(
                handle_file(image_path),
                "circle, square, triangle, diamond, cross, star",
                "a picture of a {}",
                api_name="/zero_shot",
            ),
            lambda: service.zero_shot(image, "circle, square, triangle, diamond, cross, star"),
        ),
    }
    print(
        f"model {args.model} ({service.saved_as}, {size} px), {args.threads} torch threads, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    print(
        f"indexing {args.gallery_size} images and {len(service.gallery.captions)} captions: {index_seconds:.2f} s"
    )
    print(f"{'request':<26} {'median s':>9} {'slowest s':>10} {'service s':>10} {'page / service':>15}")
    try:
        for name, (through_page, direct) in requests.items():
            page = timed(through_page, args.repeats)
            bare = timed(direct, args.repeats)
            ratio = statistics.median(page) / statistics.median(bare)
            print(
                f"{name:<26} {statistics.median(page):9.3f} {max(page):10.3f} {statistics.median(bare):10.3f} "
                f"{ratio:15.2f}"
            )
    finally:
        client.close()
        blocks.close()


if __name__ == "__main__":
    main()
