"""ALBEF (Align before Fuse) as a native Hugging Face transformers model family.

Importing the package registers the ALBEF classes with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification`,
`AutoImageProcessor` and `AutoProcessor` load ALBEF folders, and marks them for `register_for_auto_class`
so that a saved folder carries its code and loads with `trust_remote_code=True` where albef_hf is absent.

It also registers the ALBEF pipelines with transformers' `pipeline()`: `image-text-matching`,
`image-text-retrieval`, and `feature-extraction` for ALBEF models (other models keep the built-in pipeline);
`zero-shot-image-classification` is the built-in pipeline through `AlbefModel`. A saved folder declares the
pipelines its model serves in `config.custom_pipelines` and carries their code, for `trust_remote_code=True`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForPreTraining,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY

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
from .pipelines_albef import (
    AlbefFeatureExtractionPipeline,
    AlbefImageTextMatchingPipeline,
    AlbefImageTextRetrievalPipeline,
    AlbefPipeline,
    FeatureExtractionDispatch,
    checkpoint_loader,
)
from .processing_albef import AlbefProcessor, pre_caption, pre_question
from .retrieval_index import AlbefRetrievalIndex

__version__ = "0.1.0"

__all__ = [
    "AlbefConfig",
    "AlbefFeatureExtractionPipeline",
    "AlbefForImageTextRetrieval",
    "AlbefForPreTraining",
    "AlbefImageProcessor",
    "AlbefImageTextMatchingPipeline",
    "AlbefImageTextRetrievalPipeline",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPipeline",
    "AlbefPreTrainedModel",
    "AlbefPreTrainingOutput",
    "AlbefProcessor",
    "AlbefRankingOutput",
    "AlbefRetrievalIndex",
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
    _register_pipelines()


def _register_pipelines() -> None:
    matching_models = (AlbefForPreTraining, AlbefForImageTextRetrieval)
    for task, pipeline_class in (
        ("image-text-matching", AlbefImageTextMatchingPipeline),
        ("image-text-retrieval", AlbefImageTextRetrievalPipeline),
    ):
        PIPELINE_REGISTRY.register_pipeline(
            task, pipeline_class, pt_model=checkpoint_loader(task, matching_models), type="multimodal"
        )
    # The built-in task keeps its entry (default model, AutoModel) and serves every other model as before.
    PIPELINE_REGISTRY.supported_tasks["feature-extraction"]["impl"] = FeatureExtractionDispatch

    AlbefPreTrainedModel.folder_pipelines.update(
        {
            "image-text-matching": AlbefImageTextMatchingPipeline,
            "image-text-retrieval": AlbefImageTextRetrievalPipeline,
            "feature-extraction": AlbefFeatureExtractionPipeline,
        }
    )
    AlbefConfig.pipelines_registered = True


_register()
