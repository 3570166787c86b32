"""From scenes to words: noun phrases, referring expressions, captions and noisy captions."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .config import (
    NUMBER_WORDS,
    POSITION_NAMES,
    RELATION_PHRASES,
    SIZE_WORDS,
    SIZES,
    SyntheticWorldConfig,
    plural,
)
from .scene import Scene, SceneObject, replace_attribute, sample_scene, signature_split

__all__ = [
    "ATTRIBUTES",
    "Ref",
    "caption_scene",
    "captions_for_scene",
    "indefinite",
    "matches",
    "noisy_caption",
    "position_name",
    "ref_text",
    "relation_holds",
    "unique_attribute_ref",
    "unique_ref",
]

ATTRIBUTES: tuple[str, str, str] = ("size", "colour", "shape")
_GENERIC_NOUNS = ("object", "shape")
# "a large square with a red circle to its left": the relation of the listed object to the first one.
_PRONOUN_RELATIONS = {
    "left": "to its left",
    "right": "to its right",
    "above": "above it",
    "below": "below it",
}
_OPENERS = ("", "an image of ", "a picture of ", "a scene with ", "there {be} ")
_BACKGROUND_WORDS = {"plain": "plain", "striped": "striped", "checkered": "checkered", "gradient": "gradient"}


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def indefinite(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def position_name(cell: tuple[int, int], grid_size: int) -> str:
    return POSITION_NAMES[grid_size][cell[0]][cell[1]]


def relation_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Whether ``a`` is ``relation`` (left/right/above/below) of ``b``, judged from grid cells."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def true_relations(a: SceneObject, b: SceneObject) -> list[str]:
    return [relation for relation in RELATION_PHRASES if relation_holds(relation, a, b)]


@dataclass(frozen=True)
class Ref:
    """A noun phrase that picks objects: any of the attributes, a grid cell, and a relation to an anchor
    (itself a ``Ref`` that must pick exactly one object). ``None`` fields constrain nothing."""

    size: str | None = None
    colour: str | None = None
    shape: str | None = None
    cell: tuple[int, int] | None = None
    relation: str | None = None
    anchor: Ref | None = None

    @classmethod
    def of(cls, obj: SceneObject, attributes: Sequence[str] = ATTRIBUTES) -> Ref:
        return cls(**{attribute: getattr(obj, attribute) for attribute in attributes})


def matches(scene: Scene, ref: Ref) -> list[int]:
    """Indices of the objects of ``scene`` that ``ref`` describes."""
    found = [
        i
        for i, obj in enumerate(scene.objects)
        if all(getattr(ref, a) in (None, getattr(obj, a)) for a in ATTRIBUTES)
        and ref.cell in (None, obj.cell)
    ]
    if ref.relation is None:
        return found
    anchors = matches(scene, ref.anchor)
    if len(anchors) != 1:
        return []
    anchor = scene.objects[anchors[0]]
    return [i for i in found if i != anchors[0] and relation_holds(ref.relation, scene.objects[i], anchor)]


def noun_phrase(ref: Ref, rng: np.random.Generator, count: int = 1) -> str:
    """``[size] [colour] noun`` of a ref's attributes, plural unless ``count == 1``."""
    noun = ref.shape or _pick(rng, _GENERIC_NOUNS)
    words = [
        _pick(rng, SIZE_WORDS[ref.size]) if ref.size else None,
        ref.colour,
        noun if count == 1 else plural(noun),
    ]
    return " ".join(w for w in words if w)


def ref_text(ref: Ref, rng: np.random.Generator, grid_size: int) -> str:
    """The words of a ref without a determiner, e.g. "red circle to the left of the big square"."""
    text = noun_phrase(ref, rng)
    if ref.cell is not None:
        text += f" at the {position_name(ref.cell, grid_size)}"
    if ref.relation is not None:
        text += f" {RELATION_PHRASES[ref.relation]} the {ref_text(ref.anchor, rng, grid_size)}"
    return text


def _attribute_refs(obj: SceneObject, allowed: Sequence[str], rng: np.random.Generator) -> list[Ref]:
    """Refs built from subsets of ``allowed`` attributes of ``obj``, fewest attributes first."""
    refs = []
    for k in range(len(allowed) + 1):
        subsets = list(itertools.combinations(allowed, k))
        refs.extend(Ref.of(obj, subsets[i]) for i in rng.permutation(len(subsets)))
    return refs


def unique_ref(
    scene: Scene,
    index: int,
    rng: np.random.Generator,
    exclude: str | None = None,
    over_specify_prob: float = 0.0,
) -> Ref | None:
    """A ref that picks exactly object ``index``, not mentioning attribute ``exclude`` (nor its cell
    when ``exclude == "cell"``). Attributes come first; a relation to a uniquely described neighbour
    when attributes cannot single it out; its grid cell as the last resort; ``None`` when nothing
    allowed singles it out. With ``over_specify_prob`` a random unique attribute ref replaces the
    shortest, as people over-specify."""
    obj = scene.objects[index]
    allowed = [a for a in ATTRIBUTES if a != exclude]
    unique = [ref for ref in _attribute_refs(obj, allowed, rng) if matches(scene, ref) == [index]]
    if unique:
        return _pick(rng, unique) if rng.random() < over_specify_prob else unique[0]
    for j in rng.permutation(len(scene.objects)).tolist():
        if j == index:
            continue
        anchor = unique_attribute_ref(scene, j, rng)
        if anchor is None:
            continue
        for relation in true_relations(obj, scene.objects[j]):
            for ref in _attribute_refs(obj, allowed, rng):
                related = Ref(ref.size, ref.colour, ref.shape, relation=relation, anchor=anchor)
                if matches(scene, related) == [index]:
                    return related
    return None if exclude == "cell" else Ref(cell=obj.cell)


def unique_attribute_ref(scene: Scene, index: int, rng: np.random.Generator) -> Ref | None:
    """The shortest attributes-only ref that picks exactly object ``index``, if any."""
    refs = _attribute_refs(scene.objects[index], ATTRIBUTES, rng)
    return next((ref for ref in refs if matches(scene, ref) == [index]), None)


def _item(attributes: tuple[str, str, str], rng: np.random.Generator, count: int = 1) -> str:
    """An item such as "a small red circle" or "two large blue squares": always all three attributes."""
    size, colour, shape = attributes
    phrase = noun_phrase(Ref(size, colour, shape), rng, count)
    return indefinite(phrase) if count == 1 else f"{NUMBER_WORDS[count]} {phrase}"


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _open(body: str, first_count: int, n_objects: int, rng: np.random.Generator) -> str:
    options = [*_OPENERS, f"{NUMBER_WORDS[n_objects]} {'shape' if n_objects == 1 else 'shapes'}: "]
    opener = _pick(rng, options).replace("{be}", "is" if first_count == 1 else "are")
    return opener + body


def _inventory(scene: Scene, rng: np.random.Generator) -> str:
    groups = list(Counter(obj.attributes for obj in scene.objects).items())
    order = rng.permutation(len(groups)).tolist()
    items = [_item(groups[i][0], rng, groups[i][1]) for i in order]
    return _open(_join(items), groups[order[0]][1], len(scene.objects), rng)


def _positional(scene: Scene, rng: np.random.Generator) -> str:
    objects = [scene.objects[i] for i in rng.permutation(len(scene.objects)).tolist()]
    if rng.random() < 0.5:  # reading order, as people often describe
        objects.sort(key=lambda o: o.cell)
    items = [f"{_item(o.attributes, rng)} at the {position_name(o.cell, scene.grid_size)}" for o in objects]
    return _open(_join(items), 1, len(scene.objects), rng)


def _relational(scene: Scene, rng: np.random.Generator) -> str:
    order = rng.permutation(len(scene.objects)).tolist()
    anchor, others = scene.objects[order[0]], [scene.objects[i] for i in order[1:]]
    if len(others) == 1:
        relation = _pick(rng, true_relations(others[0], anchor))
        return (
            f"{_item(others[0].attributes, rng)} {RELATION_PHRASES[relation]} {_item(anchor.attributes, rng)}"
        )
    items = [
        f"{_item(o.attributes, rng)} {_PRONOUN_RELATIONS[_pick(rng, true_relations(o, anchor))]}"
        for o in others
    ]
    return f"{_item(anchor.attributes, rng)} with {_join(items)}"


def _ordered(scene: Scene, rng: np.random.Generator) -> str | None:
    """A "from left to right: ..." list when every object has its own column (or row, top to bottom)."""
    axes = [
        (axis, words)
        for axis, words in ((1, "from left to right"), (0, "from top to bottom"))
        if len({o.cell[axis] for o in scene.objects}) == len(scene.objects)
    ]
    if not axes:
        return None
    axis, words = _pick(rng, axes)
    objects = sorted(scene.objects, key=lambda o: o.cell[axis])
    return f"{words}: {_join([_item(o.attributes, rng) for o in objects])}"


def caption_scene(scene: Scene, rng: np.random.Generator, background_mention_prob: float) -> str:
    """One true caption naming every object with size, colour and shape, in one of four forms:
    an inventory with counts, positions of each object, relations to one object, or a left-to-right
    (top-to-bottom) order; sometimes followed by the background pattern."""
    forms = [_inventory, _positional]
    if len(scene.objects) > 1:
        forms += [_relational, _ordered]
    text = None
    while text is None:
        text = _pick(rng, forms)(scene, rng)
    if rng.random() < background_mention_prob:
        text += f" on {indefinite(_BACKGROUND_WORDS[scene.background.kind])} background"
    return text


def captions_for_scene(scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig) -> list[str]:
    """``config.captions_per_image`` true captions, distinct where the scene allows."""
    captions: list[str] = []
    for _ in range(20 * config.captions_per_image):
        text = caption_scene(scene, rng, config.background_mention_prob)
        if text not in captions:
            captions.append(text)
        if len(captions) == config.captions_per_image:
            return captions
    while len(captions) < config.captions_per_image:
        captions.append(caption_scene(scene, rng, config.background_mention_prob))
    return captions


def noisy_caption(
    scene: Scene, rng: np.random.Generator, config: SyntheticWorldConfig, seed: int
) -> tuple[str, str]:
    """A false caption for a train scene and its kind: "unrelated" (a caption of another scene) or
    "swapped" (this scene with one attribute of one object changed). Either way the caption's
    ``(size, colour, shape)`` multiset differs from the scene's, so it is wrong whatever its form;
    the scene it describes is a train layout, so noise never leaks test captions into train."""
    if rng.random() < config.unrelated_noise_fraction:
        while True:
            other = sample_scene(rng, config, seed, "train")
            if other.attribute_multiset() != scene.attribute_multiset():
                return caption_scene(other, rng, config.background_mention_prob), "unrelated"
    vocab = {"size": SIZES, "colour": config.colour_names, "shape": config.shapes}
    swaps = [
        (i, attribute, value)
        for i, obj in enumerate(scene.objects)
        for attribute in ATTRIBUTES
        for value in vocab[attribute]
        if value != getattr(obj, attribute)
    ]
    for k in rng.permutation(len(swaps)).tolist():
        wrong = replace_attribute(scene, *swaps[k])
        if signature_split(wrong.signature, seed, config.test_fraction) == "train":
            return caption_scene(wrong, rng, config.background_mention_prob), "swapped"
    raise RuntimeError("every swap of this scene is a test layout")  # only with test_fraction near 1
