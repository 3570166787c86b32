"""ALBEF (Align before Fuse) as a native Hugging Face transformers model family.

Importing the package registers the ALBEF classes with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification`,
`AutoImageProcessor` and `AutoProcessor` load ALBEF folders, and marks them for `register_for_auto_class`
so that a saved folder carries its code and loads with `trust_remote_code=True` where albef_hf is absent.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from .image_processing_albef import AlbefImageProcessor
from .losses import mask_tokens, sample_hard_negatives
from .modeling_albef import (
    AlbefForImageTextRetrieval,
    AlbefForPreTraining,
    AlbefModel,
    AlbefOutput,
    AlbefPreTrainedModel,
    AlbefPreTrainingOutput,
    AlbefRankingOutput,
    AlbefRetrievalOutput,
    AlbefTeacherOutput,
    interpolate_pos_embed,
)
from .processing_albef import AlbefProcessor, pre_caption, pre_question

__version__ = "0.1.0"

__all__ = [
    "AlbefConfig",
    "AlbefForImageTextRetrieval",
    "AlbefForPreTraining",
    "AlbefImageProcessor",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPreTrainedModel",
    "AlbefPreTrainingOutput",
    "AlbefProcessor",
    "AlbefRankingOutput",
    "AlbefRetrievalOutput",
    "AlbefTeacherOutput",
    "AlbefTextConfig",
    "AlbefVisionConfig",
    "interpolate_pos_embed",
    "mask_tokens",
    "pre_caption",
    "pre_question",
    "sample_hard_negatives",
]


def _register() -> None:
    AutoConfig.register(AlbefConfig.model_type, AlbefConfig, exist_ok=True)
    AutoModel.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModelForPreTraining.register(AlbefConfig, AlbefForPreTraining, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoImageProcessor.register(AlbefConfig, AlbefImageProcessor, exist_ok=True)
    AutoProcessor.register(AlbefConfig, AlbefProcessor, exist_ok=True)

    AlbefConfig.register_for_auto_class()
    AlbefModel.register_for_auto_class("AutoModel")
    AlbefForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    AlbefImageProcessor.register_for_auto_class("AutoImageProcessor")
    AlbefProcessor.register_for_auto_class("AutoProcessor")


_register()

# Training and evaluation names load on first use: `import albef_hf` stays free of the Trainer machinery.
_LAZY = {
    "AlbefTrainer": "trainer",
    "AlbefTrainingArguments": "trainer",
    "MomentumTeacher": "momentum",
    "FeatureQueues": "momentum",
    "AlbefPretrainingCollator": "data.collators",
    "AlbefRetrievalCollator": "data.collators",
    "RetrievalEvalSet": "evaluation",
    "evaluate_retrieval": "evaluation",
    "itm_eval": "evaluation",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
