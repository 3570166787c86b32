#!/usr/bin/env python
"""Question-only baselines of the synthetic world's VQA, per question type: what a model that ignores the image
can score on the items that `examples/run_vqa.py --dataset_name synthetic` trains and evaluates on.

Two baselines, both fitted on the training questions and scored on the held-out ones (each synthetic question
has one answer, so the VQA score is the accuracy):

- *type prior*: the most frequent training answer of the question's type;
- *question prior*: the most frequent training answer of the same question string, else the type prior (the
  best a model can do from the text alone, up to ties: it knows the type and every word of the question).

With `--metrics path/to/eval_results.json` (what `run_vqa.py --do_eval` writes) the model's per-type scores are
printed beside them. No image is rendered, so this takes seconds.

    python benchmarks/vqa_baselines.py --train-items 8000 --eval-items 500 --seed 0 --metrics out/vqa/eval_results.json
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

from albef_hf.data.synthetic import SyntheticWorldConfig, vqa_sample


def most_frequent(counter: Counter) -> str:
    return counter.most_common(1)[0][0]


def baselines(train_items: int, eval_items: int, seed: int) -> dict[str, dict[str, float]]:
    """`{type: {"count", "type_prior", "question_prior"}}` in percent, plus an `"overall"` row."""
    config = SyntheticWorldConfig()
    by_type: dict[str, Counter] = defaultdict(Counter)
    by_question: dict[str, Counter] = defaultdict(Counter)
    for index in range(train_items):
        sample = vqa_sample(config, seed, "train", index)
        by_type[sample.question_type][sample.answers[0]] += 1
        by_question[sample.question][sample.answers[0]] += 1
    hits: dict[str, list[tuple[bool, bool]]] = defaultdict(list)
    for index in range(eval_items):
        sample = vqa_sample(config, seed, "test", index)
        answer, kind = sample.answers[0], sample.question_type
        type_guess = most_frequent(by_type[kind]) if by_type[kind] else ""
        question_guess = (
            most_frequent(by_question[sample.question]) if sample.question in by_question else type_guess
        )
        hits[kind].append((type_guess == answer, question_guess == answer))
    hits["overall"] = [hit for kind in list(hits) for hit in hits[kind]]
    return {
        kind: {
            "count": len(rows),
            "type_prior": 100 * sum(row[0] for row in rows) / len(rows),
            "question_prior": 100 * sum(row[1] for row in rows) / len(rows),
        }
        for kind, rows in sorted(hits.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-items", type=int, default=8000)
    parser.add_argument("--eval-items", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="the world's seed (run_vqa.py's --seed)")
    parser.add_argument("--metrics", nargs="*", default=[], help="eval_results.json files of run_vqa.py")
    args = parser.parse_args()
    table = baselines(args.train_items, args.eval_items, args.seed)
    runs = []
    for path in args.metrics:
        with open(path) as handle:
            runs.append(json.load(handle))
    header = ["type", "items", "type prior", "question prior", *[f"model {i + 1}" for i in range(len(runs))]]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for kind, row in table.items():
        cells = [kind, str(row["count"]), f"{row['type_prior']:.1f}", f"{row['question_prior']:.1f}"]
        for metrics in runs:
            key = "eval_vqa_score" if kind == "overall" else f"eval_vqa_score_{kind}"
            cells.append(f"{metrics[key]:.1f}" if key in metrics else "-")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
