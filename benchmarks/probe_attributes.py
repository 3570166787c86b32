#!/usr/bin/env python
"""What a pretrained synthetic-world model sees: colour, shape, size and position, probed one at a time.

For held-out scenes with a single object, the model scores the caption "a {size} {colour} {shape} at the
{position}" against the same caption with one attribute replaced by each other value (8 colours, 6 shapes,
2 sizes, 9 positions) and we count how often the true caption wins, by ITC similarity and by the ITM match
logit; for the one-word attributes (colour, shape, size) also by MLM: the attribute's word masked in the true
caption, the value with the highest MLM score at the mask (the fusion layers reading the image). Chance is
1 / (number of values). Retrieval can be good while one attribute is hardly seen (captions differ in many ways
at once); this shows which.

    python benchmarks/probe_attributes.py --model outputs/demo/model
    python benchmarks/probe_attributes.py --model outputs/demo/model --scenes 400 --seed 0

`--seed` must be the world seed the model was pretrained on (the demo's `--seed`), so that the scenes are
held-out layouts.
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np
import torch
from probe_vision_supervised import single_object_samples
from transformers import PreTrainedTokenizerBase

from albef_hf import AlbefForPreTraining, AlbefProcessor
from albef_hf.data.synthetic import SyntheticWorldConfig, render_scene
from albef_hf.data.synthetic.config import POSITION_NAMES, SIZES
from albef_hf.data.synthetic.language import position_name


def attribute_values(config: SyntheticWorldConfig) -> dict[str, list[str]]:
    """Every value each probed attribute takes in the world."""
    return {
        "colour": list(config.colour_names),
        "shape": list(config.shapes),
        "size": list(SIZES),
        "position": [name for row in POSITION_NAMES[config.grid_size] for name in row],
    }


def variants(
    obj, config: SyntheticWorldConfig, values: dict[str, list[str]]
) -> dict[str, tuple[list[str], int]]:
    """Per attribute: the captions with each of its `values` (the true one among them), and the true one's
    index."""
    position = position_name(obj.cell, config.grid_size)
    truth = {"colour": obj.colour, "shape": obj.shape, "size": obj.size, "position": position}
    probes = {}
    for attribute, options in values.items():
        captions = []
        for option in options:
            words = {**truth, attribute: option}
            captions.append(
                f"a {words['size']} {words['colour']} {words['shape']} at the {words['position']}"
            )
        probes[attribute] = (captions, options.index(truth[attribute]))
    return probes


# the word of each single-word attribute in "a {size} {colour} {shape} at the {position}"
MLM_WORD = {"size": 1, "colour": 2, "shape": 3}


def mlm_scores(
    model: AlbefForPreTraining,
    tokenizer: PreTrainedTokenizerBase,
    caption: str,
    word: int,
    image: torch.Tensor,
) -> torch.Tensor:
    """MLM scores `(vocab,)` of `caption` with its `word`-th word masked, read with `image`."""
    words = caption.split()
    words[word] = tokenizer.mask_token
    text = tokenizer(" ".join(words), return_tensors="pt")
    logits = model.mlm_logits_at(text["input_ids"], text["attention_mask"], image)[0]
    return logits[int((text["input_ids"][0] == tokenizer.mask_token_id).nonzero()[0, 0])]


@torch.no_grad()
def probe(model: AlbefForPreTraining, processor: AlbefProcessor, scenes: int, seed: int) -> dict[str, float]:
    config = SyntheticWorldConfig(image_size=model.config.image_size)
    values = attribute_values(config)
    mlm_options = {name: processor.tokenizer.convert_tokens_to_ids(values[name]) for name in MLM_WORD}
    hits: dict[str, list[bool]] = {}
    for sample in itertools.islice(single_object_samples(config, "test", seed), scenes):
        pixels = processor(images=render_scene(sample.scene), return_tensors="pt")["pixel_values"]
        image = model.encode_image(pixels).last_hidden_state
        image_feature = model.project_image(image)
        for attribute, (captions, truth) in variants(sample.scene.objects[0], config, values).items():
            text = processor(text=captions, return_tensors="pt", padding=True)
            tokens = model.encode_text(text["input_ids"], text["attention_mask"]).last_hidden_state
            itc = (image_feature @ model.project_text(tokens).T)[0]
            itm = model.rank(image, tokens, text["attention_mask"], k=len(captions)).scores_i2t[0]
            hits.setdefault(f"{attribute}_itc", []).append(int(itc.argmax()) == truth)
            hits.setdefault(f"{attribute}_itm", []).append(int(itm.argmax()) == truth)
            if attribute in MLM_WORD:
                scores = mlm_scores(model, processor.tokenizer, captions[truth], MLM_WORD[attribute], image)
                picked = int(scores[mlm_options[attribute]].argmax())
                hits.setdefault(f"{attribute}_mlm", []).append(picked == truth)
    return {name: round(100 * float(np.mean(values)), 1) for name, values in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", required=True, help="a saved AlbefForPreTraining folder (the demo's model)"
    )
    parser.add_argument("--scenes", type=int, default=200, help="held-out single-object scenes")
    parser.add_argument("--seed", type=int, default=0, help="the world seed the model was pretrained on")
    args = parser.parse_args()
    model = AlbefForPreTraining.from_pretrained(args.model).eval()
    processor = AlbefProcessor.from_pretrained(args.model)
    result = probe(model, processor, args.scenes, args.seed)
    chance = {name: 100 / len(values) for name, values in attribute_values(SyntheticWorldConfig()).items()}
    print(
        f"{'attribute':<10} {'ITC':>6} {'ITM':>6} {'MLM':>6} {'chance':>7}   ({args.scenes} held-out "
        "single-object scenes)"
    )
    for attribute, level in chance.items():
        mlm = result.get(attribute + "_mlm", "-")
        print(
            f"{attribute:<10} {result[attribute + '_itc']:>6} {result[attribute + '_itm']:>6} {mlm:>6} "
            f"{level:>7.1f}"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
