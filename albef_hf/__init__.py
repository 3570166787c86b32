"""ALBEF (Align before Fuse) as a native Hugging Face transformers model family.

Importing the package registers the ALBEF classes with the transformers Auto classes, so that
`AutoConfig`, `AutoModel`, `AutoModelForPreTraining`, `AutoModelForZeroShotImageClassification`,
`AutoImageProcessor` and `AutoProcessor` load ALBEF folders, and marks them for `register_for_auto_class`
so that a saved folder carries its code and loads with `trust_remote_code=True` where albef_hf is absent.
The VQA model registers with `AutoModelForVisualQuestionAnswering`; the NLVR2, text-assignment and SNLI-VE
models have no fitting Auto class and load with their own classes.
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
from .processing_albef import AlbefProcessor, pre_caption, pre_question

__version__ = "0.1.0"

__all__ = [
    "AlbefAnswerRankingOutput",
    "AlbefClassificationOutput",
    "AlbefConfig",
    "AlbefForImageTextRetrieval",
    "AlbefForPreTraining",
    "AlbefForQuestionAnswering",
    "AlbefForTextAssignment",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefGradCamOutput",
    "AlbefImageProcessor",
    "AlbefInitReport",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPreTrainedModel",
    "AlbefPreTrainingOutput",
    "AlbefProcessor",
    "AlbefQuestionAnsweringOutput",
    "AlbefRankingOutput",
    "AlbefRetrievalOutput",
    "AlbefTeacherOutput",
    "AlbefTextAssignmentOutput",
    "AlbefTextConfig",
    "AlbefVisionConfig",
    "answer_decoder_config",
    "box_iou",
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


_register()
