#!/usr/bin/env python
"""Retrieval evaluation (ITC ranking, ITM re-ranking of each query's top k) against the original's way of doing it.

The model is the small configuration of `bench_training.py` (128 px, ViT 256 x 4, BERT 256 x 6 with fusion from
layer 3), random weights, fp32, eager attention, 2 threads. The gallery is the synthetic world's test split:
images with 5 captions each.

- variant `small`: 64 images x 320 texts, k = 16 (6,144 re-ranked pairs);
- variant `large`: 1,000 images x 5,000 texts, k = 128 (768,000 pairs; `--rows` re-ranks only the first
  fraction of the query rows of each direction, as one process of a split evaluation does);
- texts `real30`: 30 random tokens, all real; `natural`: the world's captions tokenized at their own lengths and
  padded to 30, as the original's evaluation pads them.

Each timed run encodes the images and texts and re-ranks, in two ways:

- `reference`: a loop written here that does what the original's `Retrieval.py` evaluation does: texts encoded
  at full padding, then one query at a time, its k pairs through the fusion layers at full padding, each pair with
  its own copy of the image tokens;
- `albef-hf`: `encode_image`, `evaluation.encode_texts_by_length` and `rank` (pairs of both directions scored
  once, each image's cross-attention keys/values projected once, batches of similar length cut to the longest
  text, the first fusion layer's self-attention once per text, [CLS] only in the last layer).

The two run interleaved, `--repeats` times each; the ratio is of their fastest runs (and the median of the
per-round ratios), in wall time and in process CPU time (on a busy machine, CPU time suffers less from other
processes). Both must give the same scores (the largest difference is printed; above 1e-4 it fails).
With `--memory`, the new way and `padded-rank` (texts encoded at full padding, then `rank`) each run once more in
a process of their own, which prints the growth of its peak resident memory over the evaluation; on a checkout
before the faster re-ranking (commit 741cd05, `PYTHONPATH=<that checkout> ... --memory-of padded-rank`),
`padded-rank` is the evaluation as it was. `--memory-of WAY` measures one way alone.

    python benchmarks/bench_retrieval.py                                 # small, both text kinds
    python benchmarks/bench_retrieval.py --variant large --rows 0.1      # 1,000 x 5,000, k 128, a tenth of the rows
    python benchmarks/bench_retrieval.py --texts natural --memory --repeats 0     # peak memory only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
from bench_training import small_config

from albef_hf import AlbefForImageTextRetrieval, AlbefImageProcessor
from albef_hf.data.synthetic import SyntheticWorldConfig, build_retrieval_eval
from albef_hf.demo.data import synthetic_tokenizer

VARIANTS = {"small": (64, 16), "large": (1000, 128)}  # images (5 captions each), k
TEXT_LENGTH, ENCODER_BATCH, ITM_BATCH = 30, 64, 128


def build_inputs(num_images: int, texts: str, vocab_size: int) -> dict[str, torch.Tensor]:
    """Pixel values of the world's first test images, and token ids/masks of their captions."""
    world = build_retrieval_eval(num_images, image_size=128)
    pixels = AlbefImageProcessor(size=128)(images=world.images, return_tensors="pt")["pixel_values"]
    if texts == "natural":
        tokens = synthetic_tokenizer(SyntheticWorldConfig())(
            world.texts, padding="max_length", truncation=True, max_length=TEXT_LENGTH, return_tensors="pt"
        )
        input_ids, attention_mask = tokens["input_ids"], tokens["attention_mask"]
    else:
        generator = torch.Generator().manual_seed(0)
        input_ids = torch.randint(1000, vocab_size, (len(world.texts), TEXT_LENGTH), generator=generator)
        input_ids[:, 0] = 2
        attention_mask = torch.ones_like(input_ids)
    return {"pixel_values": pixels, "input_ids": input_ids, "attention_mask": attention_mask}


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [
            model.encode_image(pixel_values[start : start + ENCODER_BATCH]).last_hidden_state
            for start in range(0, pixel_values.shape[0], ENCODER_BATCH)
        ]
    )


def query_rows(count: int, fraction: float) -> slice:
    return slice(0, max(1, round(count * fraction)))


@torch.no_grad()
def reference_evaluation(model, inputs, k: int, rows: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The original's evaluation loop: one query at a time, its k pairs at full padding."""
    image_embeds = encode_images(model, inputs["pixel_values"])
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text_embeds = torch.cat(
        [
            model.encode_text(
                input_ids[start : start + ENCODER_BATCH], mask[start : start + ENCODER_BATCH]
            ).last_hidden_state
            for start in range(0, input_ids.shape[0], ENCODER_BATCH)
        ]
    )
    sims = model.project_image(image_embeds) @ model.project_text(text_embeds).T
    num_images, num_texts = sims.shape
    scores_i2t = sims.new_full((num_images, num_texts), -100.0)
    scores_t2i = sims.new_full((num_texts, num_images), -100.0)
    for image in range(query_rows(num_images, rows).stop):
        top = sims[image].topk(min(k, num_texts)).indices
        repeated = image_embeds[image].repeat(top.numel(), 1, 1)
        fused = model.fuse(text_embeds[top], mask[top], repeated).last_hidden_state
        scores_i2t[image, top] = model.itm_head(fused[:, 0, :])[:, 1]
    for text in range(query_rows(num_texts, rows).stop):
        top = sims[:, text].topk(min(k, num_images)).indices
        repeated, repeated_mask = (
            text_embeds[text].repeat(top.numel(), 1, 1),
            mask[text].repeat(top.numel(), 1),
        )
        fused = model.fuse(repeated, repeated_mask, image_embeds[top]).last_hidden_state
        scores_t2i[text, top] = model.itm_head(fused[:, 0, :])[:, 1]
    return scores_i2t, scores_t2i


def rank_scores(
    model, image_embeds, text_embeds, mask, k: int, rows: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`model.rank` of the encoded images and texts, re-ranking the first `rows` of the queries:
    `(scores_i2t, scores_t2i)`."""
    ranking = model.rank(
        image_embeds,
        text_embeds,
        mask,
        k=k,
        batch_size=ITM_BATCH,
        image_rows=query_rows(image_embeds.shape[0], rows),
        text_rows=query_rows(text_embeds.shape[0], rows),
    )
    return ranking.scores_i2t, ranking.scores_t2i


@torch.no_grad()
def albef_hf_evaluation(model, inputs, k: int, rows: float) -> tuple[torch.Tensor, torch.Tensor]:
    """This package's evaluation: `encode_image`, `encode_texts_by_length`, `rank`."""
    from albef_hf.evaluation import encode_texts_by_length

    image_embeds = encode_images(model, inputs["pixel_values"])
    text_embeds, mask = encode_texts_by_length(
        model, inputs["input_ids"], inputs["attention_mask"], ENCODER_BATCH
    )
    return rank_scores(model, image_embeds, text_embeds, mask, k, rows)


@torch.no_grad()
def padded_rank_evaluation(model, inputs, k: int, rows: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts encoded at full padding, then `rank`: on a checkout before the faster re-ranking (commit 741cd05),
    the evaluation as it was (for the memory comparison)."""
    image_embeds = encode_images(model, inputs["pixel_values"])
    input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
    text_embeds = torch.cat(
        [
            model.encode_text(
                input_ids[start : start + ENCODER_BATCH], mask[start : start + ENCODER_BATCH]
            ).last_hidden_state
            for start in range(0, input_ids.shape[0], ENCODER_BATCH)
        ]
    )
    return rank_scores(model, image_embeds, text_embeds, mask, k, rows)


WAYS = {"reference": reference_evaluation, "albef-hf": albef_hf_evaluation}
MEMORY_WAYS = {**WAYS, "padded-rank": padded_rank_evaluation}


def build_model(attn: str) -> AlbefForImageTextRetrieval:
    torch.manual_seed(0)
    return AlbefForImageTextRetrieval._from_config(small_config(), attn_implementation=attn).eval()


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_memory(way: str, variant: str, texts: str, rows: float, attn: str) -> dict:
    """Peak resident memory of one evaluation in this process, and its growth over the memory before it."""
    num_images, k = VARIANTS[variant]
    model = build_model(attn)
    inputs = build_inputs(num_images, texts, model.config.text_config.vocab_size)
    try:  # reset the peak to the current resident size, so that building the inputs does not count
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
    except OSError:
        pass
    before = _rss_mib("VmRSS")
    MEMORY_WAYS[way](model, inputs, k, rows)
    peak = _rss_mib("VmHWM")
    return {
        "way": way,
        "peak_rss_mib": round(peak, 1),
        "growth_mib": round(peak - before, 1),
        "max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def compare(variant: str, texts: str, rows: float, repeats: int, attn: str) -> dict:
    num_images, k = VARIANTS[variant]
    model = build_model(attn)
    inputs = build_inputs(num_images, texts, model.config.text_config.vocab_size)
    lengths = inputs["attention_mask"].sum(dim=1).float()
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    cpu_times: dict[str, list[float]] = {way: [] for way in WAYS}
    scores = {}
    for _ in range(repeats):
        for way, evaluate in WAYS.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            scores[way] = evaluate(model, inputs, k, rows)
            times[way].append(time.perf_counter() - start)
            cpu_times[way].append(time.process_time() - cpu_start)
    difference = max((scores["reference"][i] - scores["albef-hf"][i]).abs().max().item() for i in range(2))
    if difference > 1e-4:
        raise AssertionError(f"albef-hf and the reference loop disagree: largest difference {difference:.2e}")
    ratios = [r / n for r, n in zip(times["reference"], times["albef-hf"], strict=True)]
    return {
        "variant": variant,
        "texts": texts,
        "images": num_images,
        "num_texts": int(lengths.numel()),
        "k": k,
        "query_rows": rows,
        "mean_text_tokens": round(lengths.mean().item(), 1),
        "reference_s": [round(t, 2) for t in times["reference"]],
        "albef_hf_s": [round(t, 2) for t in times["albef-hf"]],
        "speedup_of_fastest": round(min(times["reference"]) / min(times["albef-hf"]), 2),
        "speedup_median_round": round(statistics.median(ratios), 2),
        "reference_cpu_s": [round(t, 2) for t in cpu_times["reference"]],
        "albef_hf_cpu_s": [round(t, 2) for t in cpu_times["albef-hf"]],
        "cpu_time_speedup": round(min(cpu_times["reference"]) / min(cpu_times["albef-hf"]), 2),
        "max_score_difference": float(f"{difference:.2e}"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", nargs="+", default=["small"], choices=sorted(VARIANTS))
    parser.add_argument("--texts", nargs="+", default=["real30", "natural"], choices=["real30", "natural"])
    parser.add_argument("--rows", type=float, default=1.0, help="fraction of the query rows re-ranked")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each way (0: no timing)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--attn", default="eager", choices=["eager", "sdpa"])
    parser.add_argument("--memory", action="store_true", help="also the peak memory of each way")
    parser.add_argument("--memory-of", choices=sorted(MEMORY_WAYS), help="only the peak memory of this way")
    args = parser.parse_args()
    if not 0 < args.rows <= 1:
        parser.error("--rows is a fraction in (0, 1]")
    torch.set_num_threads(args.threads)
    if args.memory_of:
        result = measure_memory(args.memory_of, args.variant[0], args.texts[0], args.rows, args.attn)
        print(json.dumps(result))
        return
    for variant in args.variant:
        for texts in args.texts:
            if args.repeats > 0:
                print(json.dumps(compare(variant, texts, args.rows, args.repeats, args.attn)), flush=True)
            if not args.memory:
                continue
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            for way in ("albef-hf", "padded-rank"):
                command = [sys.executable, os.path.abspath(__file__), "--memory-of", way]
                command += ["--variant", variant, "--texts", texts, "--rows", str(args.rows)]
                command += ["--threads", str(args.threads), "--attn", args.attn]
                output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
                print(output.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
