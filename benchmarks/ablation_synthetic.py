#!/usr/bin/env python
"""The paper's ablation of the pretraining objectives, reproduced on the synthetic world.

Every row pretrains the demo's model (`albef_hf.demo.DemoConfig`) from the same seed for the same number of
steps, changing only the objectives or the caption noise, and evaluates it zero-shot on the same held-out
test images:

- `TR@1 / IR@1 (ITM)`: retrieval where every image-text pair is scored by ITM (k = all candidates), so that
  a model without ITC is not handicapped by a meaningless ITC shortlist;
- `TR@1 / IR@1 (ITC)`: retrieval by the contrastive similarity alone (rows trained with ITC);
- `ITM pref.`: how often ITM scores an image's true caption above the same caption with one attribute of one
  object swapped (`noisy_caption` with only swaps): the fine-grained matching hard negatives should teach;
- `ITM acc.`: accuracy of the match probability thresholded at 0.5 on those true and swapped pairs.

    python benchmarks/ablation_synthetic.py                      # all rows, 600 steps each
    python benchmarks/ablation_synthetic.py --steps 300 --rows itc_itm_mlm hard_negatives

Rows (as in the paper's Table 1, plus a noisy-caption pair for momentum distillation):
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from dataclasses import replace

import numpy as np
import torch

from albef_hf.data.synthetic import build_retrieval_eval, caption_sample
from albef_hf.data.synthetic.language import noisy_caption
from albef_hf.demo import DemoConfig
from albef_hf.demo.run import demo_processor, pretrain, world_config
from albef_hf.evaluation import itm_eval

ROWS: dict[str, tuple[str, dict]] = {
    "mlm_itm": ("MLM + ITM (random negatives)", dict(itc_weight=0.0, hard_negatives=False, distill=False)),
    "itc_itm_mlm": ("ITC + MLM + ITM (random negatives)", dict(hard_negatives=False, distill=False)),
    "hard_negatives": ("ITC + MLM + ITM_hard", dict(distill=False)),
    "distill": ("ITC + MLM + ITM_hard + MoD", dict(distill=True)),
    "noisy": ("30% noisy captions, ITC + MLM + ITM_hard", dict(noisy_caption_fraction=0.3, distill=False)),
    "noisy_distill": (
        "30% noisy captions, ITC + MLM + ITM_hard + MoD",
        dict(noisy_caption_fraction=0.3, distill=True),
    ),
}
__doc__ += "\n".join(f"- `{key}`: {label}" for key, (label, _) in ROWS.items())


def swapped_captions(demo: DemoConfig, world, count: int) -> list[str]:
    """For each of the first `count` test scenes, a caption of the same scene with one attribute of one object
    swapped (the images and true captions are the retrieval set's: `build_retrieval_eval` of the same world)."""
    rng = np.random.default_rng(demo.seed + 1)
    scenes = (caption_sample(world, demo.seed, "test", index, noisy=False).scene for index in range(count))
    return [noisy_caption(scene, rng, world, demo.seed)[0] for scene in scenes]


@torch.no_grad()
def evaluate(model, processor, demo: DemoConfig, eval_images: int, itc: bool, bf16: bool) -> dict[str, float]:
    model.eval()
    world = replace(world_config(demo), noisy_caption_fraction=0.0, unrelated_noise_fraction=0.0)
    eval_set = build_retrieval_eval(eval_images, seed=demo.seed, config=world)
    first_caption = [texts[0] for texts in eval_set.img2txt]
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16):
        image_embeds = model.encode_image(processor(images=eval_set.images)["pixel_values"]).last_hidden_state
        texts = processor.tokenize(eval_set.texts, padding="max_length")
        text_embeds = model.encode_text(texts["input_ids"], texts["attention_mask"]).last_hidden_state
        ranking = model.rank(image_embeds, text_embeds, texts["attention_mask"], k=len(eval_set.texts))
        swapped = processor.tokenize(swapped_captions(demo, world, eval_images), padding="max_length")
        swapped_embeds = model.encode_text(swapped["input_ids"], swapped["attention_mask"]).last_hidden_state
        match = [
            model.itm_logits(embeds, mask, image_embeds).float().softmax(dim=-1)[:, 1]
            for embeds, mask in (
                (text_embeds[first_caption], texts["attention_mask"][first_caption]),
                (swapped_embeds, swapped["attention_mask"]),
            )
        ]
    truth = (eval_set.txt2img, eval_set.img2txt)
    by_itm = itm_eval(ranking.scores_i2t.float().numpy(), ranking.scores_t2i.float().numpy(), *truth)
    result = {"tr1_itm": by_itm["txt_r1"], "ir1_itm": by_itm["img_r1"]}
    if itc:
        sims = ranking.sims.float()
        by_itc = itm_eval(sims.numpy(), sims.T.numpy(), *truth)
        result.update(tr1_itc=by_itc["txt_r1"], ir1_itc=by_itc["img_r1"])
    result["itm_preference"] = 100.0 * float((match[0] > match[1]).float().mean())
    result["itm_accuracy"] = 100.0 * float(
        ((match[0] > 0.5).float().mean() + (match[1] <= 0.5).float().mean()) / 2
    )
    return result


def run_row(key: str, steps: int, seed: int, eval_images: int, output_dir: str) -> dict:
    label, overrides = ROWS[key]
    demo = replace(
        DemoConfig(), seed=seed, max_steps=steps, time_budget_minutes=None, output_dir=output_dir, **overrides
    )
    start = time.time()
    world = world_config(demo)
    processor = demo_processor(demo, world)
    trainer = pretrain(demo, world, processor)
    metrics = evaluate(
        trainer.model, processor, demo, eval_images, itc=demo.itc_weight > 0, bf16=trainer.args.bf16
    )
    seconds = round(time.time() - start)
    return {"row": key, "label": label, "steps": trainer.state.global_step, "seconds": seconds, **metrics}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps of every row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=100, help="held-out test images (5 captions each)")
    parser.add_argument("--output", help="also write the rows to this json file")
    args = parser.parse_args()
    rows = []
    for key in args.rows:
        with tempfile.TemporaryDirectory() as output_dir:
            rows.append(run_row(key, args.steps, args.seed, args.eval_images, output_dir))
        print(json.dumps(rows[-1]), flush=True)
    columns = ["tr1_itm", "ir1_itm", "tr1_itc", "ir1_itc", "itm_preference", "itm_accuracy"]
    print(f"\n{args.steps} steps, seed {args.seed}, {args.eval_images} test images x 5 captions\n")
    print("| objectives | TR@1 (ITM) | IR@1 (ITM) | TR@1 (ITC) | IR@1 (ITC) | ITM pref. | ITM acc. |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [f"{row[c]:.1f}" if c in row else "-" for c in columns]
        print(f"| {row['label']} | " + " | ".join(cells) + " |")
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
