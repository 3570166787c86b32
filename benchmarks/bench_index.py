#!/usr/bin/env python
"""The retrieval index at scale: (a) the ITC stage on FAISS over many random features, (b) a gallery of synthetic
scenes through a trained model, end to end.

    python benchmarks/bench_index.py features --count 1000000        # (a) no model
    python benchmarks/bench_index.py scenes --model outputs/demo/model --count 10000   # (b)

(a) `count` clustered random features (unit vectors around `count / cluster_size` random centres, 256-d), added to an
`AlbefRetrievalIndex` in chunks of 100,000 as a build would. For each index type: build time (adds, plus training
for IVF), the resident memory the process gained, ITC top-128 latency of single queries (FAISS plus the exact
re-scoring of the shortlist from the stored features; p50 / p95 over `--queries` queries drawn like the items),
and recall@128 against the exact (flat) index, with the approximate types' latency as a ratio of the exact one
measured in the same run. IVF is measured at several `nprobe`.

(b) `count` test scenes of the synthetic world rendered to PNG files, indexed by the retrieval pipeline into a
folder (fp16 tokens, memory-mapped), an fp32 one, and one without tokens (`store_tokens=False`); the build rate
(images/s), the disk per image, and the latency of a text query through the pipeline (ITC shortlist of 16
re-ranked by ITM; `--queries` captions, each sent to the three indexes in turn, on `--query-threads`), with how
far their ITM scores are from the fp32 store's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import psutil
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from albef_hf import AlbefRetrievalIndex  # noqa: E402


def rss_gib() -> float:
    return psutil.Process().memory_info().rss / 2**30


def percentiles(seconds: list[float]) -> dict[str, float]:
    ms = sorted(1000 * s for s in seconds)
    return {"p50_ms": round(statistics.median(ms), 2), "p95_ms": round(ms[int(0.95 * (len(ms) - 1))], 2)}


def clustered(count: int, dim: int, seed: int, centres: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    points = centres[torch.randint(0, len(centres), (count,), generator=generator)]
    points = points + 0.05 * torch.randn(count, dim, generator=generator)
    return torch.nn.functional.normalize(points, dim=-1)


def bench_features(args: argparse.Namespace) -> dict:
    import faiss

    faiss.omp_set_num_threads(args.build_threads)
    dim, chunk = 256, 100_000
    centres = torch.nn.functional.normalize(
        torch.randn(max(1, args.count // args.cluster_size), dim, generator=torch.Generator().manual_seed(0)),
        dim=-1,
    )
    queries = clustered(args.queries, dim, 1, centres)
    results, exact = {}, None
    for index_type in args.types:
        before = rss_gib()
        index = AlbefRetrievalIndex("image", dim, 1, index_type=index_type, store_tokens=False)
        start = time.perf_counter()
        for offset in range(0, args.count, chunk):
            size = min(chunk, args.count - offset)
            index.add(clustered(size, dim, 2 + offset, centres), sources=[""] * size)
        index._itc_index()  # train (IVF) and add to FAISS
        build_s = time.perf_counter() - start
        faiss.omp_set_num_threads(args.query_threads)
        sweep = args.nprobe if index_type in ("ivf", "ivfpq") else [None]
        for nprobe in sweep:
            index.nprobe = nprobe
            index.search(queries[:2], 128)  # warm up
            times, found = [], []
            for query in queries.split(1):
                tick = time.perf_counter()
                found.append(index.search(query, 128)[1])
                times.append(time.perf_counter() - tick)
            found = torch.cat(found)
            name = index_type if nprobe is None else f"{index_type} nprobe={nprobe}"
            row = {
                "build_s": round(build_s, 1),
                "memory_gib": round(rss_gib() - before, 2),
                **percentiles(times),
            }
            if index_type == "flat":
                exact = found
            elif exact is not None:
                hits = sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist(), strict=True))
                row["recall@128"] = round(hits / exact.numel(), 4)
                row["p50_vs_flat"] = round(row["p50_ms"] / results["flat"]["p50_ms"], 3)
            if index_type in ("ivf", "ivfpq"):
                row["nlist"] = index.search_parameters(128)["nlist"]
            results[name] = row
            print(name, json.dumps(row), flush=True)
        faiss.omp_set_num_threads(args.build_threads)
        del index
    return {"count": args.count, "dim": dim, "queries": args.queries, "results": results}


def bench_scenes(args: argparse.Namespace) -> dict:
    from transformers import pipeline

    from albef_hf.data.synthetic import SyntheticWorldConfig, build_retrieval_eval

    torch.set_num_threads(args.build_threads)
    retriever = pipeline("image-text-retrieval", model=args.model)
    retriever.model.set_attn_implementation("eager")
    world = SyntheticWorldConfig(image_size=retriever.model.config.vision_config.image_size)
    tick = time.perf_counter()
    scenes = build_retrieval_eval(args.count, seed=1, config=world)
    root = tempfile.mkdtemp(prefix="bench_index_")
    paths = []
    for i, image in enumerate(scenes.images):
        paths.append(os.path.join(root, "images", f"{i:06d}.png"))
        os.makedirs(os.path.dirname(paths[-1]), exist_ok=True)
        image.save(paths[-1])
    print(f"rendered {args.count} scenes in {time.perf_counter() - tick:.0f} s", flush=True)
    queries = scenes.texts[:: max(1, len(scenes.texts) // args.queries)][: args.queries]

    variants = {
        "fp32 tokens": {"token_dtype": torch.float32},
        "fp16 tokens": {},
        "no tokens (re-encode)": {"store_tokens": False},
    }
    results, indexes = {}, {}
    for name, options in variants.items():
        folder = os.path.join(root, name.split()[0])
        tick = time.perf_counter()
        indexes[name] = retriever.build_index(
            images=paths, directory=folder, batch_size=64, chunk_size=2048, **options
        )
        build_s = time.perf_counter() - tick
        disk = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        results[name] = {
            "build_images_per_s": round(len(paths) / build_s, 1),
            "disk_kib_per_image": round(disk / len(paths) / 1024, 2),
        }
        print(name, json.dumps(results[name]), flush=True)

    # queries on one thread, each query on every index in turn (a busy machine slows them alike)
    torch.set_num_threads(args.query_threads)
    times = {name: [] for name in variants}
    scores = {name: [] for name in variants}
    for query in [queries[0], *queries]:  # the first round warms up
        for name, index in indexes.items():
            tick = time.perf_counter()
            result = retriever(query, index=index, k=16, top_k=16)
            times[name].append(time.perf_counter() - tick)
            scores[name].append({r["index"]: r["score"] for r in result})
    reference = scores["fp32 tokens"][1:]
    for name in variants:
        row = results[name]
        row.update(percentiles(times[name][1:]))
        row["p50_vs_fp32_tokens"] = round(row["p50_ms"] / results["fp32 tokens"]["p50_ms"], 2)
        ours = scores[name][1:]
        row["same_top16"] = all(a.keys() == b.keys() for a, b in zip(ours, reference, strict=True))
        row["max_abs_itm_diff"] = max(
            abs(a[i] - b[i]) for a, b in zip(ours, reference, strict=True) for i in a.keys() & b.keys()
        )
        print(name, json.dumps(row), flush=True)
    return {"count": args.count, "queries": len(queries), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("part", choices=["features", "scenes"])
    parser.add_argument("--count", type=int, default=None, help="items (features: 1,000,000; scenes: 10,000)")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--types", nargs="+", default=["flat", "ivf", "ivfpq"], help="(a) index types")
    parser.add_argument("--cluster-size", type=int, default=500, help="(a) items per cluster, on average")
    parser.add_argument("--nprobe", nargs="+", type=int, default=[32, 64, 128, 256], help="(a) IVF probes")
    parser.add_argument("--model", default="outputs/demo/model", help="(b) a trained retrieval model folder")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--query-threads", type=int, default=1)
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    args.count = args.count or (1_000_000 if args.part == "features" else 10_000)
    figures = bench_features(args) if args.part == "features" else bench_scenes(args)
    print(json.dumps(figures, indent=2))
    if args.output:
        with open(args.output, "w", encoding="utf-8") as file:
            json.dump(figures, file, indent=2)


if __name__ == "__main__":
    main()
