"""Task samples drawn from scenes: captions, VQA, NLVR2-style pairs, visual entailment, grounding.

Each ``*_sample(config, seed, split, index)`` is a pure function of its arguments: it draws from its
own random stream (``item_rng``), so items come out the same in any order and in any worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .config import NUMBER_WORDS, RELATION_PHRASES, SIZE_WORDS, SIZES, SyntheticWorldConfig
from .language import (
    ATTRIBUTES,
    Ref,
    captions_for_scene,
    indefinite,
    matches,
    noisy_caption,
    noun_phrase,
    position_name,
    ref_text,
    relation_holds,
    unique_attribute_ref,
    unique_ref,
)
from .scene import Scene, item_rng, sample_scene

__all__ = [
    "NEUTRAL_EVENTS",
    "NEUTRAL_MATERIALS",
    "NEUTRAL_OWNERS",
    "NEUTRAL_PROPERTIES",
    "VE_LABELS",
    "VQA_ANSWER_LIST",
    "VQA_QUESTION_TYPES",
    "CaptionSample",
    "GroundingSample",
    "NlvrSample",
    "VeSample",
    "VqaSample",
    "caption_sample",
    "grounding_sample",
    "nlvr_sample",
    "ve_sample",
    "vqa_answer_list",
    "vqa_sample",
]

VQA_QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "size", "position", "count", "exist", "relation")
# SNLI-VE label ids.
VE_LABELS: dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}
# Neutral hypotheses speak of what a drawing cannot show; their vocabulary shares no word with colours,
# sizes, shapes or positions, so a model can learn that such claims are undecidable from the image.
NEUTRAL_MATERIALS: tuple[str, ...] = ("wood", "metal", "plastic", "glass", "paper", "stone")
NEUTRAL_PROPERTIES: tuple[str, ...] = ("heavy", "fragile", "expensive", "warm", "cold", "soft", "sticky")
NEUTRAL_OWNERS: tuple[str, ...] = ("a child", "the teacher", "my neighbour", "an artist", "nobody")
NEUTRAL_EVENTS: tuple[str, ...] = (
    "is about to fall",
    "will be moved later",
    "was painted yesterday",
    "is going to be thrown away",
    "was bought last week",
)
_ATTRIBUTE_QUESTION_WORDS = {"colour": "colour", "shape": "shape", "size": "size"}
# Attribute combinations used for counting and existence claims; size alone is too vague to be useful.
_CLAIM_ATTRIBUTES: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def vqa_answer_list(config: SyntheticWorldConfig) -> list[str]:
    """The closed answer list of a world: yes/no, colours, shapes, sizes, counts 0..max, positions."""
    answers = [
        "yes",
        "no",
        *config.colour_names,
        *config.shapes,
        *SIZES,
        *(str(n) for n in range(config.max_objects + 1)),
        *(name for row in config.position_names for name in row),
    ]
    return list(dict.fromkeys(answers))


VQA_ANSWER_LIST: list[str] = vqa_answer_list(SyntheticWorldConfig())


def _claim_ref(scenes: tuple[Scene, ...], rng: np.random.Generator, config: SyntheticWorldConfig) -> Ref:
    """Attributes for a count or existence claim: mostly those of an object present in one of
    ``scenes`` (so claims are about what is there), sometimes random ones (so absence gets asked)."""
    attributes = _pick(rng, _CLAIM_ATTRIBUTES)
    objects = [obj for scene in scenes for obj in scene.objects]
    if rng.random() < 0.7:
        return Ref.of(_pick(rng, objects), attributes)
    vocab = {"size": SIZES, "colour": config.colour_names, "shape": config.shapes}
    return Ref(**{a: _pick(rng, vocab[a]) for a in attributes})


def _count_phrase(n: int, ref: Ref, rng: np.random.Generator) -> str:
    """The phrase "no circles", "exactly one red circle" or "exactly two red circles"."""
    if n == 0:
        return f"no {noun_phrase(ref, rng, count=0)}"
    return f"exactly {NUMBER_WORDS[n]} {noun_phrase(ref, rng, count=n)}"


def _near_count(actual: int, rng: np.random.Generator) -> int:
    """The true count half the time, else one off: claims whose truth is a coin flip."""
    return actual if rng.random() < 0.5 else max(0, actual + _pick(rng, (-1, 1)))


# ----------------------------------------------------------------------------------------- captions
@dataclass(frozen=True)
class CaptionSample:
    """An image with ``config.captions_per_image`` captions; ``noise[k]`` is "" for a true caption,
    "swapped" or "unrelated" for a wrong one (train split only)."""

    scene: Scene
    captions: tuple[str, ...]
    noise: tuple[str, ...]

    @property
    def noisy(self) -> tuple[bool, ...]:
        return tuple(bool(kind) for kind in self.noise)


def caption_sample(
    config: SyntheticWorldConfig, seed: int, split: str, index: int, noisy: bool = True
) -> CaptionSample:
    """Image ``index`` of ``split`` with its captions; ``noisy=False`` turns caption noise off."""
    rng = item_rng(seed, split, "caption", index)
    scene = sample_scene(rng, config, seed, split)
    captions = captions_for_scene(scene, rng, config)
    noise = [""] * len(captions)
    if noisy and split == "train":
        for k in range(len(captions)):
            if rng.random() < config.noisy_caption_fraction:
                captions[k], noise[k] = noisy_caption(scene, rng, config, seed)
    return CaptionSample(scene, tuple(captions), tuple(noise))


# ---------------------------------------------------------------------------------------------- VQA
@dataclass(frozen=True)
class VqaSample:
    """A question about ``scene`` with answers from ``vqa_answer_list`` and weights summing to 1."""

    scene: Scene
    question: str
    answers: tuple[str, ...]
    weights: tuple[float, ...]
    question_type: str


def _ask_attribute(scene: Scene, rng: np.random.Generator, attribute: str) -> tuple[str, str] | None:
    index = int(rng.integers(len(scene.objects)))
    ref = unique_ref(scene, index, rng, exclude=attribute)
    question = f"what {_ATTRIBUTE_QUESTION_WORDS[attribute]} is the {ref_text(ref, rng, scene.grid_size)}?"
    return question, getattr(scene.objects[index], attribute)


def _ask_position(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    index = int(rng.integers(len(scene.objects)))
    ref = unique_ref(scene, index, rng, exclude="cell")
    if ref is None:
        return None
    answer = position_name(scene.objects[index].cell, scene.grid_size)
    return f"where is the {ref_text(ref, rng, scene.grid_size)}?", answer


def _ask_count(scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig) -> tuple[str, str]:
    ref = Ref() if rng.random() < 0.15 else _claim_ref((scene,), rng, config)
    return f"how many {noun_phrase(ref, rng, count=2)} are there?", str(len(matches(scene, ref)))


def _ask_exist(
    scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig
) -> tuple[str, str] | None:
    want_yes = rng.random() < 0.5
    for _ in range(20):
        ref = _claim_ref((scene,), rng, config)
        if bool(matches(scene, ref)) == want_yes:
            return f"is there {indefinite(noun_phrase(ref, rng))}?", "yes" if want_yes else "no"
    return None


def _related_pair(scene: Scene, rng: np.random.Generator) -> tuple[Ref, Ref, int, int] | None:
    """Two distinct objects, each singled out by its attributes alone, with their refs."""
    if len(scene.objects) < 2:
        return None
    i, j = rng.permutation(len(scene.objects))[:2].tolist()
    ref_i, ref_j = unique_attribute_ref(scene, i, rng), unique_attribute_ref(scene, j, rng)
    return None if ref_i is None or ref_j is None else (ref_i, ref_j, i, j)


def _ask_relation(scene: Scene, rng: np.random.Generator) -> tuple[str, str] | None:
    pair = _related_pair(scene, rng)
    if pair is None:
        return None
    ref_i, ref_j, i, j = pair
    want_yes = rng.random() < 0.5
    relations = [
        r for r in RELATION_PHRASES if relation_holds(r, scene.objects[i], scene.objects[j]) == want_yes
    ]
    relation = _pick(rng, relations)
    text_i, text_j = ref_text(ref_i, rng, scene.grid_size), ref_text(ref_j, rng, scene.grid_size)
    return f"is the {text_i} {RELATION_PHRASES[relation]} the {text_j}?", "yes" if want_yes else "no"


def _ask(
    question_type: str, scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig
) -> tuple[str, str] | None:
    if question_type in _ATTRIBUTE_QUESTION_WORDS:
        return _ask_attribute(scene, rng, question_type)
    if question_type == "position":
        return _ask_position(scene, rng)
    if question_type == "count":
        return _ask_count(scene, rng, config)
    if question_type == "exist":
        return _ask_exist(scene, rng, config)
    return _ask_relation(scene, rng)


def vqa_sample(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> VqaSample:
    """Question ``index`` of ``split``, of a type drawn uniformly from ``VQA_QUESTION_TYPES`` (another
    type is drawn when the scene cannot support it, e.g. relations with one object); yes/no
    questions are balanced."""
    rng = item_rng(seed, split, "vqa", index)
    scene = sample_scene(rng, config, seed, split)
    while True:
        question_type = _pick(rng, VQA_QUESTION_TYPES)
        asked = _ask(question_type, scene, rng, config)
        if asked is not None:
            return VqaSample(scene, asked[0], (asked[1],), (1.0,), question_type)


# -------------------------------------------------------------------------------------------- NLVR2
@dataclass(frozen=True)
class NlvrSample:
    """A statement about a (left, right) pair of scenes; ``label`` 1 when it is true, else 0."""

    scenes: tuple[Scene, Scene]
    sentence: str
    label: int


_SIDES = ("left", "right")


def _exists_related(scene: Scene, ref_a: Ref, ref_b: Ref, relation: str) -> bool:
    return any(
        relation_holds(relation, scene.objects[i], scene.objects[j])
        for i in matches(scene, ref_a)
        for j in matches(scene, ref_b)
        if i != j
    )


def _nlvr_statement(
    scenes: tuple[Scene, Scene], rng: np.random.Generator, config: SyntheticWorldConfig
) -> tuple[str, bool]:
    kind = _pick(rng, ("count", "both", "neither", "one", "more", "total", "relation"))
    side = int(rng.integers(2))
    ref = Ref() if kind == "more" and rng.random() < 0.25 else _claim_ref(scenes, rng, config)
    counts = [len(matches(scene, ref)) for scene in scenes]
    a_phrase = indefinite(noun_phrase(ref, rng))
    if kind == "count":
        n = _near_count(counts[side], rng)
        return f"the {_SIDES[side]} image contains {_count_phrase(n, ref, rng)}", counts[side] == n
    if kind == "both":
        return f"both images contain {a_phrase}", min(counts) > 0
    if kind == "neither":
        return f"neither image contains {a_phrase}", max(counts) == 0
    if kind == "one":
        return f"exactly one image contains {a_phrase}", (counts[0] > 0) != (counts[1] > 0)
    if kind == "more":
        sentence = (
            f"there are more {noun_phrase(ref, rng, count=2)} in the {_SIDES[side]} image "
            f"than in the {_SIDES[1 - side]} image"
        )
        return sentence, counts[side] > counts[1 - side]
    if kind == "total":
        n = _near_count(sum(counts), rng)
        return f"there {'is' if n == 1 else 'are'} {_count_phrase(n, ref, rng)} in total", sum(counts) == n
    other = _claim_ref(scenes, rng, config)
    relation = _pick(rng, tuple(RELATION_PHRASES))
    sentence = (
        f"the {_SIDES[side]} image contains {a_phrase} {RELATION_PHRASES[relation]} "
        f"{indefinite(noun_phrase(other, rng))}"
    )
    return sentence, _exists_related(scenes[side], ref, other, relation)


def nlvr_sample(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> NlvrSample:
    """Pair ``index`` of ``split``; labels are drawn first (balanced), statements until one fits."""
    rng = item_rng(seed, split, "nlvr2", index)
    label = int(rng.integers(2))
    while True:
        scenes = (sample_scene(rng, config, seed, split), sample_scene(rng, config, seed, split))
        for _ in range(50):
            sentence, truth = _nlvr_statement(scenes, rng, config)
            if truth == bool(label):
                return NlvrSample(scenes, sentence, label)


# --------------------------------------------------------------------------------------------- SNLI-VE
@dataclass(frozen=True)
class VeSample:
    """A hypothesis about ``scene`` with its SNLI-VE label (``VE_LABELS``)."""

    scene: Scene
    hypothesis: str
    label: int


def _neutral_hypothesis(scene: Scene, rng: np.random.Generator) -> str:
    index = int(rng.integers(len(scene.objects)))
    subject = f"the {ref_text(unique_ref(scene, index, rng), rng, scene.grid_size)}"
    templates: tuple[Callable[[], str], ...] = (
        lambda: f"{subject} is made of {_pick(rng, NEUTRAL_MATERIALS)}",
        lambda: f"{subject} is {_pick(rng, NEUTRAL_PROPERTIES)}",
        lambda: f"{subject} belongs to {_pick(rng, NEUTRAL_OWNERS)}",
        lambda: f"{subject} {_pick(rng, NEUTRAL_EVENTS)}",
    )
    return _pick(rng, templates)()


def _claim_attribute(
    scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig
) -> tuple[str, bool]:
    index = int(rng.integers(len(scene.objects)))
    attribute = _pick(rng, ATTRIBUTES)
    subject = ref_text(unique_ref(scene, index, rng, exclude=attribute), rng, scene.grid_size)
    value = _pick(rng, {"size": SIZES, "colour": config.colour_names, "shape": config.shapes}[attribute])
    words = _pick(rng, SIZE_WORDS[value]) if attribute == "size" else value
    words = indefinite(words) if attribute == "shape" else words
    return f"the {subject} is {words}", getattr(scene.objects[index], attribute) == value


def _claim_position(scene: Scene, rng: np.random.Generator) -> tuple[str, bool] | None:
    index = int(rng.integers(len(scene.objects)))
    ref = unique_ref(scene, index, rng, exclude="cell")
    if ref is None:
        return None
    cell = divmod(int(rng.integers(scene.grid_size**2)), scene.grid_size)
    if rng.random() < 0.5:
        cell = scene.objects[index].cell
    sentence = f"the {ref_text(ref, rng, scene.grid_size)} is at the {position_name(cell, scene.grid_size)}"
    return sentence, scene.objects[index].cell == cell


def _claim_relation(scene: Scene, rng: np.random.Generator) -> tuple[str, bool] | None:
    pair = _related_pair(scene, rng)
    if pair is None:
        return None
    ref_i, ref_j, i, j = pair
    relation = _pick(rng, tuple(RELATION_PHRASES))
    text_i, text_j = ref_text(ref_i, rng, scene.grid_size), ref_text(ref_j, rng, scene.grid_size)
    sentence = f"the {text_i} is {RELATION_PHRASES[relation]} the {text_j}"
    return sentence, relation_holds(relation, scene.objects[i], scene.objects[j])


def _visual_claim(
    scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig
) -> tuple[str, bool] | None:
    kind = _pick(rng, ("exist", "count", "attribute", "position", "relation"))
    if kind == "exist":
        ref = _claim_ref((scene,), rng, config)
        return f"there is {indefinite(noun_phrase(ref, rng))}", bool(matches(scene, ref))
    if kind == "count":
        ref = Ref() if rng.random() < 0.2 else _claim_ref((scene,), rng, config)
        actual = len(matches(scene, ref))
        n = _near_count(actual, rng)
        return f"there {'is' if n == 1 else 'are'} {_count_phrase(n, ref, rng)}", n == actual
    if kind == "attribute":
        return _claim_attribute(scene, rng, config)
    if kind == "position":
        return _claim_position(scene, rng)
    return _claim_relation(scene, rng)


def ve_sample(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> VeSample:
    """Hypothesis ``index`` of ``split``: labels drawn uniformly first. Entailment is a true claim
    about what is drawn (existence, count, attribute, position, relation), contradiction a false one
    of the same kinds, neutral a claim about an object of the scene that no image can show
    (material, physical property, owner, past or future event)."""
    rng = item_rng(seed, split, "ve", index)
    label = int(rng.integers(3))
    scene = sample_scene(rng, config, seed, split)
    if label == VE_LABELS["neutral"]:
        return VeSample(scene, _neutral_hypothesis(scene, rng), label)
    while True:
        claim = _visual_claim(scene, rng, config)
        if claim is not None and claim[1] == (label == VE_LABELS["entailment"]):
            return VeSample(scene, claim[0], label)


# ----------------------------------------------------------------------------------------- grounding
@dataclass(frozen=True)
class GroundingSample:
    """A referring expression that picks exactly ``scene.objects[target]`` (scenes of 2+ objects)."""

    scene: Scene
    text: str
    target: int


def grounding_sample(config: SyntheticWorldConfig, seed: int, split: str, index: int) -> GroundingSample:
    """Expression ``index`` of ``split``: the fewest attributes that single the target out (sometimes
    more, see ``config.over_specify_prob``), else a relation to a neighbour, else its position."""
    if config.max_objects < 2:
        raise ValueError("grounding needs scenes of two or more objects: set max_objects >= 2")
    rng = item_rng(seed, split, "grounding", index)
    scene = sample_scene(rng, config, seed, split, min_objects=2)
    target = int(rng.integers(len(scene.objects)))
    ref = unique_ref(scene, target, rng, over_specify_prob=config.over_specify_prob)
    return GroundingSample(scene, f"the {ref_text(ref, rng, scene.grid_size)}", target)
