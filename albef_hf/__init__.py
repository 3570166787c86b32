"""ALBEF (Align before Fuse) as a native Hugging Face transformers model family.

Importing the package registers the ALBEF classes with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification`,
`AutoImageProcessor` and `AutoProcessor` load ALBEF folders, and marks them for `register_for_auto_class`
so that a saved folder carries its code and loads with `trust_remote_code=True` where albef_hf is absent.
The VQA model registers with `AutoModelForVisualQuestionAnswering`; the NLVR2, text-assignment and SNLI-VE
models have no fitting Auto class and load with their own classes.

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
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)
from transformers.pipelines import PIPELINE_REGISTRY, REMOVED_TASKS

from . import hub
from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from .grounding import (
    AlbefGradCamOutput,
    box_iou,
    gradcam_itc,
    gradcam_itm,
    grounding_accuracy,
    score_boxes,
    select_box,
    upsample_heatmap,
)
from .image_processing_albef import AlbefImageProcessor
from .losses import mask_tokens, sample_hard_negatives, sample_text_assignment, text_assignment_labels
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
from .modeling_albef_downstream import (
    AlbefAnswerRankingOutput,
    AlbefClassificationOutput,
    AlbefForQuestionAnswering,
    AlbefForTextAssignment,
    AlbefForVisualEntailment,
    AlbefForVisualReasoning,
    AlbefInitReport,
    AlbefQuestionAnsweringOutput,
    AlbefTextAssignmentOutput,
    answer_decoder_config,
)
from .pipelines import (
    AlbefFeatureExtractionPipeline,
    AlbefImageTextMatchingPipeline,
    AlbefImageTextRetrievalPipeline,
    AlbefPipeline,
    AlbefVisualGroundingPipeline,
    AlbefVisualQuestionAnsweringPipeline,
    FeatureExtractionDispatch,
    checkpoint_loader,
)
from .processing_albef import AlbefProcessor, pre_caption, pre_question
from .retrieval_index import AlbefRetrievalIndex, build_retrieval_index

__version__ = "0.1.0"

__all__ = [
    "AlbefAnswerRankingOutput",
    "AlbefClassificationOutput",
    "AlbefConfig",
    "AlbefFeatureExtractionPipeline",
    "AlbefForImageTextRetrieval",
    "AlbefForPreTraining",
    "AlbefForQuestionAnswering",
    "AlbefForTextAssignment",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefGradCamOutput",
    "AlbefImageProcessor",
    "AlbefImageTextMatchingPipeline",
    "AlbefImageTextRetrievalPipeline",
    "AlbefInitReport",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPipeline",
    "AlbefPreTrainedModel",
    "AlbefPreTrainingOutput",
    "AlbefProcessor",
    "AlbefQuestionAnsweringOutput",
    "AlbefRankingOutput",
    "AlbefRetrievalIndex",
    "AlbefRetrievalOutput",
    "AlbefTeacherOutput",
    "AlbefTextAssignmentOutput",
    "AlbefTextConfig",
    "AlbefVisionConfig",
    "AlbefVisualGroundingPipeline",
    "AlbefVisualQuestionAnsweringPipeline",
    "answer_decoder_config",
    "box_iou",
    "build_retrieval_index",
    "gradcam_itc",
    "gradcam_itm",
    "grounding_accuracy",
    "interpolate_pos_embed",
    "mask_tokens",
    "pre_caption",
    "pre_question",
    "sample_hard_negatives",
    "sample_text_assignment",
    "score_boxes",
    "select_box",
    "text_assignment_labels",
    "upsample_heatmap",
]


def _register() -> None:
    AutoConfig.register(AlbefConfig.model_type, AlbefConfig, exist_ok=True)
    AutoModel.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModelForPreTraining.register(AlbefConfig, AlbefForPreTraining, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(AlbefConfig, AlbefModel, exist_ok=True)
    AutoModelForVisualQuestionAnswering.register(AlbefConfig, AlbefForQuestionAnswering, exist_ok=True)
    AutoImageProcessor.register(AlbefConfig, AlbefImageProcessor, exist_ok=True)
    AutoProcessor.register(AlbefConfig, AlbefProcessor, exist_ok=True)

    AlbefConfig.register_for_auto_class()
    AlbefModel.register_for_auto_class("AutoModel")
    AlbefForPreTraining.register_for_auto_class("AutoModelForPreTraining")
    AlbefForQuestionAnswering.register_for_auto_class("AutoModelForVisualQuestionAnswering")
    AlbefImageProcessor.register_for_auto_class("AutoImageProcessor")
    AlbefProcessor.register_for_auto_class("AutoProcessor")
    _register_pipelines()
    hub.extend()


# The tasks albef_hf serves with `pipeline()` and their pipelines; each pipeline names the ALBEF classes whose
# checkpoints serve its task (`checkpoint_classes`).
PIPELINE_TASKS = {
    "image-text-matching": AlbefImageTextMatchingPipeline,
    "image-text-retrieval": AlbefImageTextRetrievalPipeline,
    "visual-grounding": AlbefVisualGroundingPipeline,
    "visual-question-answering": AlbefVisualQuestionAnsweringPipeline,
    "feature-extraction": AlbefFeatureExtractionPipeline,
}


def _register_pipelines() -> None:
    # transformers 5 removed its visual-question-answering pipeline and refuses the name before looking at the
    # registry; the ALBEF pipeline serves ALBEF VQA checkpoints under it (others are refused by its loader).
    REMOVED_TASKS.pop("visual-question-answering", None)
    for task, pipeline_class in PIPELINE_TASKS.items():
        if task == "feature-extraction":
            # The built-in task keeps its entry (default model, AutoModel) and serves every other model as before.
            PIPELINE_REGISTRY.supported_tasks[task]["impl"] = FeatureExtractionDispatch
        else:
            model_classes = [globals()[name] for name in pipeline_class.checkpoint_classes]
            PIPELINE_REGISTRY.register_pipeline(
                task, pipeline_class, pt_model=checkpoint_loader(task, model_classes), type="multimodal"
            )
        AlbefPreTrainedModel.folder_pipelines[task] = pipeline_class
    AlbefConfig.pipelines_registered = True


_register()

# Training and evaluation names load on first use: `import albef_hf` stays free of the Trainer machinery.
_LAZY = {
    "AlbefTrainer": "trainer",
    "AlbefTrainingArguments": "trainer",
    "MomentumTeacher": "momentum",
    "FeatureQueues": "momentum",
    "AlbefPretrainingCollator": "data.collators",
    "AlbefRetrievalCollator": "data.collators",
    "AlbefImageTextCollator": "data.collators",
    "AlbefClassificationCollator": "data.collators",
    "AlbefVqaCollator": "data.collators",
    "RetrievalEvalSet": "evaluation",
    "VqaEvalSet": "evaluation",
    "GroundingEvalSet": "evaluation",
    "evaluate_retrieval": "evaluation",
    "evaluate_vqa": "evaluation",
    "evaluate_grounding": "evaluation",
    "itm_eval": "evaluation",
    "vqa_score": "evaluation",
}
__all__ += sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
