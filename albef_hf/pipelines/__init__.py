"""transformers pipelines for ALBEF: image-text matching, retrieval, feature extraction, visual question
answering and visual grounding, one module per task (as transformers lays out its own), with what they share in
`base`.

Each pipeline reads images as PIL images, numpy arrays, torch tensors, paths, `file://` URLs (these as the
processor reads them), http(s) URLs or base64 strings (transformers' `load_image`), and texts as strings; it takes
one item or a list, batches with `batch_size`, and runs on the `device` / `dtype` given to `pipeline()`. Inputs
are checked before any model call: an empty text, an empty image, a text where an image is expected and the
like raise a `ValueError` that names the item and the problem.

Importing albef_hf registers the tasks with transformers (see `albef_hf/__init__.py`); a saved model folder also
declares them in `config.custom_pipelines` and carries their modules, so that `pipeline(task, model=repo,
trust_remote_code=True)` works where albef_hf is not installed. A folder is flat, so the saved copies import
the package's modules as neighbours (`AlbefPreTrainedModel.save_pretrained` rewrites `from ..x` to `from .x`):
the task modules import only `base` and modules of albef_hf itself, never this package's `__init__`.
"""

from .base import AlbefPipeline, checkpoint_loader, load_image
from .feature_extraction import AlbefFeatureExtractionPipeline, FeatureExtractionDispatch
from .image_text_matching import AlbefImageTextMatchingPipeline
from .image_text_retrieval import AlbefImageTextRetrievalPipeline
from .visual_grounding import AlbefVisualGroundingPipeline, overlay_heatmap
from .visual_question_answering import AlbefVisualQuestionAnsweringPipeline

__all__ = [
    "AlbefFeatureExtractionPipeline",
    "AlbefImageTextMatchingPipeline",
    "AlbefImageTextRetrievalPipeline",
    "AlbefPipeline",
    "AlbefVisualGroundingPipeline",
    "AlbefVisualQuestionAnsweringPipeline",
    "FeatureExtractionDispatch",
    "checkpoint_loader",
    "load_image",
    "overlay_heatmap",
]
