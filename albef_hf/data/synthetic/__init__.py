"""A synthetic vision-language world: coloured shapes on a grid, with captions, questions, statement
pairs, hypotheses and referring expressions that are true (or deliberately false) of each image.

It is small enough for a CPU to learn in minutes and compositional enough to test what ALBEF learns:
by default scenes hold 1-4 objects (6 shapes, 8 saturated colours, 2 sizes) in distinct cells of a
3x3 grid, on plain or textured muted backgrounds with pixel noise. Everything is a pure function of
``(seed, split, task, index)``: any item can be generated alone, in any order, in any process.

Layers (each module imports only the ones above it):
    config   ``SyntheticWorldConfig`` (every knob) and the vocabulary
    scene    ``Scene`` / ``SceneObject`` dataclasses, sampling, the held-out rule, rendering
    language referring expressions (``Ref``), captions, noisy captions
    tasks    per-item samples of each task, ``VQA_ANSWER_LIST``, ``VE_LABELS``
    export   ``SyntheticDataset`` (lazy), ``build_*`` (``datasets.Dataset``), ``build_retrieval_eval``

Held-out rule (train and test never share a scene layout):
    A scene's *signature* is the sorted tuple of ``(size, colour, shape, row, col)`` of its objects.
    ``blake2b(repr((seed, signature)))`` maps it to [0, 1); below ``config.test_fraction`` (0.25) it is
    a test layout, otherwise a train layout. Each split draws layouts from its own random stream and
    redraws until the layout is its own, so no test layout is ever a train image. Captions that give
    every object's position (one caption form of four) determine the signature, so they are never
    train captions; the other forms describe a test image fully too (every object's size, colour,
    shape and its relations), but the same words may describe some train layout with other
    positions, as in real data. Wrong captions in train are captions of train layouts as well.
    Retrieval stays learnable because every colour, shape, size and cell is seen in train, only not
    these combinations of them.

Captions name every object with size, colour and shape, in one of four forms (inventory with counts,
positions, relations to one object, left-to-right order), optionally with the background; counts are
exact ("two red circles" means exactly two). Spatial relations come from grid cells, so they also
hold for the pixel boxes. In train, ``noisy_caption_fraction`` of the captions are replaced by a
caption of another scene or of this scene with one attribute swapped; test data is never noisy.

Run ``python -m albef_hf.data.synthetic`` to measure generation speed on this machine.
"""

from .config import SyntheticWorldConfig
from .export import (
    RetrievalEval,
    SyntheticDataset,
    benchmark_render,
    build_caption_dataset,
    build_grounding_dataset,
    build_nlvr2_dataset,
    build_retrieval_eval,
    build_ve_dataset,
    build_vqa_dataset,
)
from .scene import Scene, SceneObject, render_scene, signature_split
from .tasks import (
    VE_LABELS,
    VQA_ANSWER_LIST,
    caption_sample,
    grounding_sample,
    nlvr_sample,
    ve_sample,
    vqa_answer_list,
    vqa_sample,
)

__all__ = [
    "VE_LABELS",
    "VQA_ANSWER_LIST",
    "RetrievalEval",
    "Scene",
    "SceneObject",
    "SyntheticDataset",
    "SyntheticWorldConfig",
    "benchmark_render",
    "build_caption_dataset",
    "build_grounding_dataset",
    "build_nlvr2_dataset",
    "build_retrieval_eval",
    "build_ve_dataset",
    "build_vqa_dataset",
    "caption_sample",
    "grounding_sample",
    "nlvr_sample",
    "render_scene",
    "signature_split",
    "ve_sample",
    "vqa_answer_list",
    "vqa_sample",
]
