"""ALBEF's downstream task models: VQA, NLVR2 (with its text-assignment pretraining) and SNLI-VE.

They live apart from `modeling_albef.py`, which holds the encoders and the contrastive models, because they
add their own machinery (an answer decoder with generation, a doubled fusion encoder with shared weights,
initialisation from a pretrained checkpoint) that the core models do not need. They reuse the core's
encoders, heads and losses, never copies of them.

Every model's `forward` takes one batch as a collator makes it (documented per class); a trainer that keeps a
momentum teacher calls `teacher.compute_teacher_outputs(**batch)` and passes `teacher_outputs=...` and
`alpha=...` to the student, as for pretraining. Every model can be initialised from a pretrained ALBEF with
`from_pretrained_albef`, which reports what it copied, duplicated and newly initialised.

Names of the original checkpoints map simply (besides the core's `visual_encoder.*` -> `vision_model.*`):
`text_decoder.bert.*` -> `text_decoder.*`, `text_decoder.cls.predictions.*` -> `answer_head.*` (VQA; the
decoder weight is tied to the decoder's word embeddings); `cls_head.{0,2}.*` and `ta_head.*` keep their names.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.utils import ModelOutput, logging

from .configuration_albef import AlbefConfig, AlbefTextConfig
from .losses import (
    answer_sequence_loss,
    distilled_cross_entropy,
    sample_text_assignment,
    text_assignment_labels,
)
from .modeling_albef import (
    AlbefPreTrainedModel,
    AlbefTeacherOutput,
    _subclasses,
    _use_return_dict,
    interpolate_pos_embed,
)
from .modeling_albef_text import AlbefMLMHead, AlbefTextEncoderOutput, AlbefTextModel

logger = logging.get_logger(__name__)

__all__ = [
    "AlbefAnswerRankingOutput",
    "AlbefClassificationOutput",
    "AlbefForQuestionAnswering",
    "AlbefForTextAssignment",
    "AlbefForVisualEntailment",
    "AlbefForVisualReasoning",
    "AlbefInitReport",
    "AlbefQuestionAnsweringOutput",
    "AlbefTextAssignmentOutput",
    "answer_decoder_config",
]


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class AlbefQuestionAnsweringOutput(ModelOutput):
    """Output of `AlbefForQuestionAnswering`.

    Args:
        loss: `sum(answer_weights * answer_loss) / num_questions` when `labels` are given (the original's reduction).
        logits: `(num_answers, answer_len, vocab)` decoder scores; position `t` scores token `t + 1`.
        answer_loss: `(num_answers,)` loss of each answer (summed over its tokens, distilled when a teacher is given).
        question_states: `(num_questions, question_len, text_hidden)` multimodal question states.
        question_attention_mask: `(num_questions, question_len)` their padding mask.
        image_embeds: `(num_questions, 1 + num_patches, vision_hidden)` image tokens (when images were encoded).
        cache: the decoder's key/value cache (incremental decoding).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    answer_loss: torch.Tensor | None = None
    question_states: torch.Tensor | None = None
    question_attention_mask: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    cache: Cache | None = None


@dataclass
class AlbefAnswerRankingOutput(ModelOutput):
    """Output of `AlbefForQuestionAnswering.rank_answers`.

    Args:
        answer_ids: `(num_questions, k)` indices into the answer list, best first.
        probs: `(num_questions, k)` their probabilities, renormalised over the k candidates (softmax of the scores).
        scores: `(num_questions, k)` the log-likelihood scores the ranking used.
        first_token_logits: `(num_questions, vocab)` decoder scores of the first answer token.
        question_states: `(num_questions, question_len, text_hidden)` multimodal question states.
    """

    answer_ids: torch.Tensor | None = None
    probs: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    first_token_logits: torch.Tensor | None = None
    question_states: torch.Tensor | None = None


@dataclass
class AlbefClassificationOutput(ModelOutput):
    """Output of `AlbefForVisualReasoning` and `AlbefForVisualEntailment`.

    Args:
        loss: the classification loss when `labels` are given (distilled when `teacher_outputs` and `alpha` are).
        logits: `(batch, num_labels)` scores of the head.
        multimodal_embeds: `(batch, text_hidden)` multimodal [CLS] state the head reads.
        image_embeds: image tokens, `(batch, 1 + num_patches, vision_hidden)`, or `(batch, 2, ...)` for image pairs.
        cross_attentions: when asked, cross-attention maps of every fusion layer.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    multimodal_embeds: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class AlbefTextAssignmentOutput(AlbefClassificationOutput):
    """Output of `AlbefForTextAssignment`: the classification fields plus the pairs that were scored.

    Args:
        labels: `(batch,)` 3-way labels of the pairs (0: the text describes the first image, 1: the second,
            2: neither).
        first_image, second_image: `(batch,)` indices into the batch of the images paired with each text.
    """

    labels: torch.Tensor | None = None
    first_image: torch.Tensor | None = None
    second_image: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Initialisation from a pretrained ALBEF
# ----------------------------------------------------------------------------------------------


@dataclass
class AlbefInitReport:
    """What `from_pretrained_albef` did with every weight of the new model.

    Args:
        source: where the weights came from (class name and path).
        copied: target key -> source key, for source weights used once.
        duplicated: target key -> source key, for source weights copied into several targets (the doubled NLVR2
            fusion layers, the VQA decoder's embeddings and layers).
        interpolated: target key -> source key, for position embeddings resized to another image size.
        initialized: target key -> reason, for weights left at their fresh initialisation.
        unused: source keys that no weight was taken from.
    """

    source: str = ""
    copied: dict[str, str] = field(default_factory=dict)
    duplicated: dict[str, str] = field(default_factory=dict)
    interpolated: dict[str, str] = field(default_factory=dict)
    initialized: dict[str, str] = field(default_factory=dict)
    unused: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line: how many tensors were copied, duplicated, interpolated, and which modules start fresh."""
        fresh = sorted({_weight_group(key) for key in self.initialized})
        return (
            f"from {self.source}: {len(self.copied)} tensors copied, {len(self.duplicated)} duplicated, "
            f"{len(self.interpolated)} interpolated, {len(self.initialized)} newly initialised"
            + (f" ({', '.join(fresh)})" if fresh else "")
            + f", {len(self.unused)} source tensors unused"
        )

    def __str__(self) -> str:
        lines = [f"initialised from {self.source}"]
        for what, mapping in (("copied", self.copied), ("duplicated", self.duplicated)):
            groups = Counter((_weight_group(t), _weight_group(s)) for t, s in mapping.items())
            lines += [f"  {what:<12} {t} <- {s} ({n} tensors)" for (t, s), n in groups.items()]
        lines += [f"  {'interpolated':<12} {t} <- {s}" for t, s in self.interpolated.items()]
        reasons = Counter((_weight_group(t), why) for t, why in self.initialized.items())
        lines += [f"  {'initialized':<12} {t}: {why} ({n} tensors)" for (t, why), n in reasons.items()]
        if self.unused:
            lines.append(f"  {'unused':<12} " + ", ".join(sorted({_weight_group(k) for k in self.unused})))
        return "\n".join(lines)


def _weight_group(key: str) -> str:
    """A readable unit of a weight name: a text layer, an embeddings block, or a top-level module."""
    layer = re.match(r"(.*\.layer\.\d+)\.", key)
    if layer:
        return layer.group(1)
    parts = key.split(".")
    return (
        ".".join(parts[:2]) if parts[0] in ("text_encoder", "text_decoder") and len(parts) > 2 else parts[0]
    )


def _read_source(source: AlbefPreTrainedModel | str | os.PathLike, **load_kwargs) -> AlbefPreTrainedModel:
    if isinstance(source, AlbefPreTrainedModel):
        return source
    config = AlbefConfig.from_pretrained(source, **load_kwargs)
    architecture = (config.architectures or ["AlbefForPreTraining"])[0]
    classes = {cls.__name__: cls for cls in _subclasses(AlbefPreTrainedModel)}
    if architecture not in classes:
        raise ValueError(f"{source} holds a {architecture}, which is not an ALBEF model class")
    return classes[architecture].from_pretrained(source, **load_kwargs)


# What describes the source model rather than the architecture: not carried over to the task model's config.
_SOURCE_ONLY_CONFIG_KEYS = (
    "architectures",
    "auto_map",
    "id2label",
    "label2id",
    "_name_or_path",
    "transformers_version",
)


class AlbefTaskModel(AlbefPreTrainedModel):
    """Base of the task models: initialisation from a pretrained ALBEF, shared by every task.

    A task says how its configuration follows from the source's (`_task_config`) and which source weight
    initialises each of its weights (`_source_key`); the copying and the report are the same for all.
    """

    @classmethod
    def from_pretrained_albef(
        cls,
        source: AlbefPreTrainedModel | str | os.PathLike,
        image_size: int | None = None,
        output_loading_info: bool = False,
        load_kwargs: dict | None = None,
        **config_kwargs,
    ) -> AlbefTaskModel | tuple[AlbefTaskModel, AlbefInitReport]:
        """Build this task model from a pretrained ALBEF (a model, or a folder / Hub id that `from_pretrained` reads).

        Weights are taken as the original fine-tuning scripts take them; the rest are newly initialised.

        Args:
            source: usually an `AlbefForPreTraining` (the pretrained checkpoint); for NLVR2, also the
                `AlbefForTextAssignment` model after text-assignment pretraining.
            image_size: fine-tune at this resolution (the original uses 384); position embeddings are resized
                bicubically, as the original's `interpolate_pos_embed`.
            output_loading_info: also return the `AlbefInitReport`.
            load_kwargs: passed to `from_pretrained` when `source` is a path.
            config_kwargs: configuration overrides, for example `decoder_config=answer_decoder_config(text_config,
                num_layers=4)` for a VQA decoder of another depth.

        Returns:
            The model, or `(model, report)` with `output_loading_info=True`; `print(report)` lists, module by
            module, what was copied, duplicated, interpolated and newly initialised (its summary is logged when
            the report is not returned). Weights that the source model itself started new (see
            `from_vision_text_pretrained`) count as newly initialised, not as copied.
        """
        source_model = _read_source(source, **(load_kwargs or {}))
        config = cls._task_config(source_model, image_size, **config_kwargs)
        model = cls(config)
        report = model._copy_from(source_model)
        report.source = type(source_model).__name__ + (
            "" if isinstance(source, nn.Module) else f" ({source})"
        )
        if output_loading_info:
            return model, report
        logger.warning("%s.from_pretrained_albef %s", cls.__name__, report.summary())
        return model

    @classmethod
    def _task_config(
        cls, source: AlbefPreTrainedModel, image_size: int | None, **config_kwargs
    ) -> AlbefConfig:
        config = {k: v for k, v in source.config.to_dict().items() if k not in _SOURCE_ONLY_CONFIG_KEYS}
        config["decoder_config"] = None
        if image_size is not None:
            config["image_size"] = image_size
        return AlbefConfig.from_dict({**config, **cls._task_config_changes(source), **config_kwargs})

    @classmethod
    def _task_config_changes(cls, source: AlbefPreTrainedModel) -> dict:
        return {}

    def _source_key(self, key: str, source: AlbefPreTrainedModel) -> str:
        """Name of the source weight that initialises weight `key` of this model."""
        return key

    @torch.no_grad()
    def _copy_from(self, source: AlbefPreTrainedModel) -> AlbefInitReport:
        source_state = source.state_dict()
        plan = {key: self._source_key(key, source) for key in self.state_dict()}
        uses = Counter(plan.values())
        report = AlbefInitReport()
        # weights the source itself started fresh and has not changed since (a tower built new by
        # from_vision_text_pretrained, its MLM head when the BERT had none) are not pretrained: they are reported
        # as new, and this model keeps its own
        fresh_versions = getattr(source, "newly_initialized_versions", {})
        source_new = {key for key, version in fresh_versions.items() if source_state[key]._version == version}
        for key, target in self.state_dict(keep_vars=True).items():
            source_key = plan[key]
            value = source_state.get(source_key)
            if value is None:
                report.initialized[key] = "not in the source"
                continue
            if source_key in source_new:
                report.initialized[key] = "newly initialised in the source"
                continue
            kind = report.duplicated if uses[source_key] > 1 else report.copied
            if value.shape != target.shape and key.endswith("vision_model.pos_embed"):
                value, kind = interpolate_pos_embed(value, target.shape[1] - 1), report.interpolated
            if value.shape != target.shape:
                report.initialized[key] = f"shape {tuple(target.shape)} != source {tuple(value.shape)}"
                continue
            target.copy_(value)
            kind[key] = source_key
        used = {*report.copied.values(), *report.duplicated.values(), *report.interpolated.values()}
        report.unused = sorted(set(source_state) - used)
        return report


# ----------------------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------------------


def answer_decoder_config(text_config: AlbefTextConfig, num_layers: int = 6) -> AlbefTextConfig:
    """The original's answer decoder: the text configuration with `num_layers` layers, all with cross-attention.

    Its cross-attention reads the question states, so its key/value width is the text width.
    """
    values = {k: v for k, v in text_config.to_dict().items() if k != "model_type"}
    values.update(num_hidden_layers=num_layers, fusion_layer=0, is_decoder=True)
    values["encoder_width"] = text_config.hidden_size
    return AlbefTextConfig(**values)


class AlbefForQuestionAnswering(AlbefTaskModel, GenerationMixin):
    """ALBEF for visual question answering: the question through the multimodal encoder, an answer decoder on top.

    The question (text and fusion layers, attending to the image) gives the question states; the answer decoder
    (`config.decoder_config`: by default 6 causal BERT layers, every one cross-attending to the question states,
    with its own embeddings and an LM head tied to them) scores answers token by token.

    - Training, `model(**batch)`: several answers per question with weights; the loss of each answer is the sum of
      its token losses (distilled from the teacher's decoder when `teacher_outputs` and `alpha` are given), and
      `loss = sum(weight * answer loss) / num_questions`, as the original.
    - Closed answer list: `rank_answers(...)` ranks as the original (first-token top k, then full likelihood) and
      returns the k best answers with probabilities.
    - Open answers: `generate(pixel_values=..., input_ids=..., attention_mask=...)` through transformers'
      `GenerationMixin` (greedy, beam search, sampling), starting from [CLS] and stopping at [SEP].

    Batch keys: `pixel_values` `(num_questions, 3, H, W)`, `input_ids` / `attention_mask` `(num_questions,
    question_len)` for the questions; for training `answer_input_ids` / `answer_attention_mask` `(num_answers,
    answer_len)` ("[CLS] answer [SEP]", padded), `labels` (the answer ids with -100 at padding: the collator's
    `answer_input_ids.masked_fill(answer_attention_mask == 0, -100)`), `answer_weights` `(num_answers,)` and
    `answers_per_question` `(num_questions,)` (answers of question i follow those of question i - 1).
    """

    main_input_name = "input_ids"

    def __init__(self, config: AlbefConfig) -> None:
        if config.decoder_config is None:
            config.decoder_config = answer_decoder_config(config.text_config)
        super().__init__(config)
        self._build_encoders(config)
        self.text_decoder = AlbefTextModel(config.decoder_config)
        self.answer_head = AlbefMLMHead(config.decoder_config)
        self.post_init()
        decoder = config.decoder_config
        self.generation_config.bos_token_id = decoder.cls_token_id
        self.generation_config.eos_token_id = decoder.sep_token_id
        self.generation_config.pad_token_id = decoder.pad_token_id

    @classmethod
    def _task_config_changes(cls, source: AlbefPreTrainedModel) -> dict:
        return {"decoder_config": answer_decoder_config(source.config.text_config).to_dict()}

    def _source_key(self, key: str, source: AlbefPreTrainedModel) -> str:
        # The original initialises the decoder from the pretrained multimodal layers, embeddings and MLM head.
        layer = re.match(r"text_decoder\.encoder\.layer\.(\d+)\.(.*)", key)
        if layer:
            index = source.config.fusion_layer + int(layer.group(1))
            return f"text_encoder.encoder.layer.{index}.{layer.group(2)}"
        if key.startswith("text_decoder.embeddings."):
            return "text_encoder." + key.removeprefix("text_decoder.")
        if key.startswith("answer_head."):
            return "mlm_head." + key.removeprefix("answer_head.")
        return key

    def encode_question(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(question_states, question_attention_mask, image_embeds)` of questions about images."""
        if pixel_values is None or input_ids is None:
            raise ValueError(
                "questions need `pixel_values` and `input_ids` (or precomputed `question_states`)"
            )
        if pixel_values.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"question i is about image i: got {pixel_values.shape[0]} images and {input_ids.shape[0]} questions"
            )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        image_embeds = image_embeds.last_hidden_state
        states = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            mode="multimodal",
        ).last_hidden_state
        return states, attention_mask, image_embeds

    def decode(
        self,
        answer_input_ids: torch.Tensor,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, AlbefTextEncoderOutput]:
        """Scores `(num_answers, answer_len, vocab)` of answer tokens, answer `i` attending to question states `i`."""
        output = self.text_decoder(
            input_ids=answer_input_ids,
            attention_mask=answer_attention_mask,
            encoder_hidden_states=question_states,
            encoder_attention_mask=question_attention_mask,
            mode="multimodal",
            cache=cache,
        )
        logits = self.answer_head(
            output.last_hidden_state, self.text_decoder.embeddings.word_embeddings.weight
        )
        return logits, output

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        answer_input_ids: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        answer_weights: torch.Tensor | None = None,
        answers_per_question: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        teacher_outputs: AlbefTeacherOutput | None = None,
        alpha: float = 0.0,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefQuestionAnsweringOutput | tuple:
        """Score answers to questions about images; with `labels`, the VQA training loss.

        Args:
            input_ids, attention_mask: `(num_questions, question_len)` questions.
            pixel_values: `(num_questions, channels, height, width)` images, image i for question i.
            answer_input_ids, answer_attention_mask: `(num_answers, answer_len)` answers "[CLS] ... [SEP]".
            labels: `(num_answers, answer_len)` answer ids, -100 where nothing is predicted (padding).
            answer_weights: `(num_answers,)` weights of the answers in the loss (1 by default).
            answers_per_question: `(num_questions,)` number of answers of each question, in order (one each by
                default).
            question_states, question_attention_mask: precomputed question states instead of images and questions
                (one row per answer when `answers_per_question` is not given).
            teacher_outputs: the momentum teacher's answer-token `logits` (from its `compute_teacher_outputs`).
            alpha: distillation weight.
            cache: a `Cache` for incremental decoding (`EncoderDecoderCache` also keeps the question keys/values);
                `use_cache=True` creates one.
            interpolate_pos_encoding: run the image encoder at another resolution.
        """
        if labels is not None and answer_input_ids is None:
            raise ValueError("`labels` score answers: pass the answers as `answer_input_ids` too")
        image_embeds = None
        if question_states is None:
            question_states, question_attention_mask, image_embeds = self.encode_question(
                pixel_values, input_ids, attention_mask, interpolate_pos_encoding
            )
        output = AlbefQuestionAnsweringOutput(
            question_states=question_states,
            question_attention_mask=question_attention_mask,
            image_embeds=image_embeds,
        )
        if answer_input_ids is not None:
            states, mask = _states_per_answer(
                question_states, question_attention_mask, answers_per_question, answer_input_ids.shape[0]
            )
            if use_cache and cache is None:
                cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            logits, _ = self.decode(answer_input_ids, states, mask, answer_attention_mask, cache)
            output.logits, output.cache = logits, cache
            if labels is not None:
                teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
                output.answer_loss = answer_sequence_loss(logits, labels, teacher_logits, alpha)
                weights = (
                    answer_weights if answer_weights is not None else torch.ones_like(output.answer_loss)
                )
                output.loss = (weights * output.answer_loss).sum() / question_states.shape[0]
        return output if _use_return_dict(self, return_dict) else output.to_tuple()

    @torch.no_grad()
    def compute_teacher_outputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        answer_input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        answer_attention_mask: torch.Tensor | None = None,
        answers_per_question: torch.Tensor | None = None,
        **kwargs,
    ) -> AlbefTeacherOutput:
        """Run this model as the momentum teacher: its answer-token scores for the batch, without gradient."""
        output = self(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            answer_input_ids=answer_input_ids,
            answer_attention_mask=answer_attention_mask,
            answers_per_question=answers_per_question,
            return_dict=True,
        )
        return AlbefTeacherOutput(logits=output.logits)

    @torch.no_grad()
    def rank_answers(
        self,
        answer_input_ids: torch.Tensor,
        answer_attention_mask: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        k: int = 128,
    ) -> AlbefAnswerRankingOutput:
        """Rank a closed answer list for each question, exactly as the original evaluation does.

        1. The decoder, started from the answers' first token ([CLS]), scores the first answer token; the k answers
           whose first token is most probable are kept.
        2. Each kept answer is scored by `log p(first token) + sum over its tokens of log p(token | previous)`; the
           original counts the first token in both terms, and so does this.
        3. The k scores are turned into probabilities by a softmax and sorted.

        The scores equal the original's (which decodes every kept answer in full, padding included, with its own
        copy of the question states, and takes a log-softmax over the vocabulary at every position) within float
        rounding, with less work: the kept answers are decoded as a prefix tree continuing step 1's [CLS] step, the
        question states' cross-attention keys/values are projected once per question, and the vocabulary is
        scored once per distinct answer prefix (`answer_token_log_probs`).

        Args:
            answer_input_ids, answer_attention_mask: `(num_answers, answer_len)` the list, each "[CLS] answer [SEP]"
                padded on the right (the original tokenises `answer + " [SEP]"`); without a mask, padding is
                recognised by the decoder's pad id.
            input_ids, pixel_values, attention_mask: the questions and their images, or
            question_states, question_attention_mask: their precomputed states.
            k: candidates re-scored per question (128 in the original; at most the list size).
        """
        if question_states is None:
            question_states, question_attention_mask, _ = self.encode_question(
                pixel_values, input_ids, attention_mask
            )
        num_questions, num_answers = question_states.shape[0], answer_input_ids.shape[0]
        k = min(k, num_answers)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        start = answer_input_ids[:1, :1].expand(num_questions, 1)
        first_logits = self.decode(start, question_states, question_attention_mask, cache=cache)[0][:, 0]
        first_tokens = answer_input_ids[:, 1]
        first_probs = first_logits.softmax(dim=-1).index_select(1, first_tokens)
        top_probs, top_ids = first_probs.topk(k, dim=1)
        first_log_probs = first_logits.float().log_softmax(dim=-1).gather(1, first_tokens[top_ids])

        if answer_attention_mask is None:
            answer_attention_mask = answer_input_ids != self.config.decoder_config.pad_token_id
        later_log_probs = self._later_token_log_probs(
            answer_input_ids,
            answer_attention_mask.bool(),
            top_ids,
            cache,
            question_states,
            question_attention_mask,
        )
        scores = top_probs.log() + first_log_probs + later_log_probs

        probs, order = scores.softmax(dim=-1).topk(k, dim=1)
        return AlbefAnswerRankingOutput(
            answer_ids=top_ids.gather(1, order),
            probs=probs,
            scores=scores.gather(1, order),
            first_token_logits=first_logits,
            question_states=question_states,
        )

    def _later_token_log_probs(
        self,
        answer_input_ids: torch.Tensor,
        answer_valid: torch.Tensor,
        top_ids: torch.Tensor,
        cache: EncoderDecoderCache,
        question_states: torch.Tensor,
        question_attention_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """`(num_questions, k)` sum of `log p(token | previous)` over the tokens after the first of each kept answer.

        The kept answers of a question are decoded as a prefix tree, one token position at a time: position t
        runs the decoder once per distinct (question, answer prefix of t + 1 tokens) that still predicts a token,
        continuing the keys/values of its prefix in `cache` (which starts with each question's [CLS] step), and
        scores the vocabulary once per such prefix. Answers sharing a prefix ("top left", "top right") share its
        work, and padding and final [SEP] tokens are never decoded (they predict nothing).
        """
        num_questions, k = top_ids.shape
        device = answer_input_ids.device
        answers = top_ids.reshape(-1)
        tokens, valid = answer_input_ids[answers], answer_valid[answers]
        total = torch.zeros(num_questions * k, device=device)
        # the row of each candidate's prefix in the cache: its question's [CLS] step to start with
        row = torch.arange(num_questions, device=device).repeat_interleave(k)
        row_question = torch.arange(num_questions, device=device)
        vocab_size = self.config.decoder_config.vocab_size
        for position in range(1, tokens.shape[1] - 1):
            active = valid[:, position + 1].nonzero(as_tuple=True)[0]
            if active.numel() == 0:
                break
            prefixes, prefix_of = torch.unique(
                row[active] * vocab_size + tokens[active, position], return_inverse=True
            )
            parent = prefixes // vocab_size
            cache.self_attention_cache.batch_select_indices(parent)
            row_question = row_question[parent]
            hidden = self.text_decoder(
                input_ids=(prefixes % vocab_size)[:, None],
                encoder_hidden_states=question_states,
                encoder_attention_mask=question_attention_mask,
                encoder_index=row_question,
                mode="multimodal",
                cache=cache,
            ).last_hidden_state[:, 0]
            total[active] += self.answer_token_log_probs(hidden, prefix_of, tokens[active, position + 1])
            row[active] = prefix_of  # answers that ended keep a stale row: they are never active again
        return total.view(num_questions, k)

    def answer_token_log_probs(
        self, hidden_states: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor, chunk_size: int = 256
    ) -> torch.Tensor:
        """`log p(tokens[i])` at decoder state `hidden_states[rows[i]]` under the answer head, `(len(tokens),)`, fp32.

        Each state is scored over the vocabulary once, however many tokens are read from it, `chunk_size` states
        at a time to bound memory. A row-wise `log_softmax` and a gather, because on a CPU torch's `logsumexp`
        over the vocabulary costs 3-4x the projection itself and `log_softmax` about as much as it.
        """
        transformed = self.answer_head.transform(hidden_states)
        weight = self.text_decoder.embeddings.word_embeddings.weight
        log_probs = torch.empty(tokens.shape[0], device=tokens.device)
        for begin in range(0, transformed.shape[0], chunk_size):
            chunk = F.linear(transformed[begin : begin + chunk_size], weight, self.answer_head.bias)
            chunk = chunk.float().log_softmax(dim=-1)
            wanted = ((rows >= begin) & (rows < begin + chunk_size)).nonzero(as_tuple=True)[0]
            log_probs[wanted] = chunk[rows[wanted] - begin, tokens[wanted]]
        return log_probs

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        **generate_kwargs,
    ):
        """Generate open answers with transformers' `GenerationMixin.generate`.

        The question is encoded once; decoding starts from `generation_config.bos_token_id` ([CLS]) and stops at
        `eos_token_id` ([SEP]); finished sequences are padded with [PAD]. Every `generate` argument works
        (`max_new_tokens`, `num_beams`, `do_sample`, `use_cache`, `return_dict_in_generate`, ...). With the cache on
        (the default) the decoder keeps the keys/values of its answer tokens and of the question states.

        Args:
            input_ids, pixel_values, attention_mask: the questions and their images, or
            question_states, question_attention_mask: precomputed question states.

        Returns:
            `(num_questions * num_return_sequences, length)` token ids starting with [CLS] (or the
            `GenerateOutput` of `return_dict_in_generate=True`); decode with `skip_special_tokens=True`.
        """
        if question_states is None:
            question_states, question_attention_mask, _ = self.encode_question(
                pixel_values, input_ids, attention_mask
            )
        if question_attention_mask is None:
            question_attention_mask = torch.ones(
                question_states.shape[:2], dtype=torch.long, device=question_states.device
            )
        generation_config = generate_kwargs.get("generation_config") or self.generation_config
        use_cache = generate_kwargs.get("use_cache", generation_config.use_cache)
        # transformers would size its default cache for the encoder's layers; this one grows with the decoder's.
        if use_cache is not False and generate_kwargs.get("cache") is None:
            generate_kwargs["cache"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
        bos = next(
            token
            for token in (
                generate_kwargs.get("bos_token_id"),
                generation_config.bos_token_id,
                self.config.decoder_config.cls_token_id,
            )
            if token is not None
        )
        start = torch.full(
            (question_states.shape[0], 1), bos, dtype=torch.long, device=question_states.device
        )
        return super().generate(
            input_ids=start,
            question_states=question_states,
            question_attention_mask=question_attention_mask,
            **generate_kwargs,
        )

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        next_sequence_length: int | None = None,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        question_states: torch.Tensor | None = None,
        question_attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> dict:
        """The generated tokens are the decoder's answer; the question states stay fixed."""
        if next_sequence_length is not None:
            input_ids = input_ids[:, -next_sequence_length:]
        return {
            "answer_input_ids": input_ids,
            "answer_attention_mask": attention_mask,
            "question_states": question_states,
            "question_attention_mask": question_attention_mask,
            "cache": cache if use_cache else None,
            "use_cache": use_cache,
        }


def _states_per_answer(
    states: torch.Tensor,
    mask: torch.Tensor | None,
    answers_per_question: torch.Tensor | None,
    num_answers: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if answers_per_question is None:
        if states.shape[0] != num_answers:
            raise ValueError(
                f"got {num_answers} answers for {states.shape[0]} questions: pass `answers_per_question`"
            )
        return states, mask
    counts = torch.as_tensor(answers_per_question, device=states.device)
    if int(counts.sum()) != num_answers:
        raise ValueError(
            f"answers_per_question sums to {int(counts.sum())} but {num_answers} answers were given"
        )
    return states.repeat_interleave(counts, dim=0), (
        mask.repeat_interleave(counts, dim=0) if mask is not None else None
    )


# ----------------------------------------------------------------------------------------------
# Classifiers: NLVR2, its text-assignment pretraining, SNLI-VE
# ----------------------------------------------------------------------------------------------


def _set_label_names(config: AlbefConfig, names: tuple[str, ...]) -> None:
    config.id2label = dict(enumerate(names))
    config.label2id = {name: index for index, name in enumerate(names)}


class AlbefClassifierMixin:
    """The MLP head on the multimodal [CLS] (`cls_head`: Linear -> ReLU -> Linear) and its distilled loss."""

    label_names: tuple[str, ...] = ()

    def _build_classifier(self, config: AlbefConfig) -> None:
        _set_label_names(config, self.label_names)
        hidden = config.text_config.hidden_size
        self.cls_head = nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, len(self.label_names))
        )

    def _classify(
        self,
        multimodal: AlbefTextEncoderOutput,
        image_embeds: torch.Tensor,
        labels: torch.Tensor | None,
        teacher_outputs: AlbefTeacherOutput | None,
        alpha: float,
        return_dict: bool | None,
    ) -> AlbefClassificationOutput | tuple:
        cls_state = multimodal.last_hidden_state[:, 0, :]
        logits = self.cls_head(cls_state)
        loss = None
        if labels is not None:
            teacher_logits = teacher_outputs.logits if teacher_outputs is not None else None
            loss = distilled_cross_entropy(logits, labels, teacher_logits, alpha)
        output = AlbefClassificationOutput(
            loss=loss,
            logits=logits,
            multimodal_embeds=cls_state,
            image_embeds=image_embeds,
            cross_attentions=multimodal.cross_attentions,
        )
        return output if _use_return_dict(self, return_dict) else output.to_tuple()

    @torch.no_grad()
    def compute_teacher_outputs(self, **batch) -> AlbefTeacherOutput:
        """Run this model as the momentum teacher: its head's logits for the batch, without gradient."""
        batch = {
            k: v for k, v in batch.items() if k not in ("labels", "teacher_outputs", "alpha", "return_dict")
        }
        return AlbefTeacherOutput(logits=self(**batch, return_dict=True).logits)


class AlbefPairedImagesMixin:
    """The NLVR2 text encoder: every original fusion layer doubled, one copy per image.

    With `fusion_layer = f` and `N = f + 2 * M` layers, layers `f + 2j` and `f + 2j + 1` are the two copies of
    fusion layer `j`: the first cross-attends to the first image, the second to the second image, and they share
    the key and value projections of their cross-attention (the same modules, as in the original). The saved
    weights hold the shared projections once, under the first layer of each pair; `state_dict()` names them under
    both layers, as the original checkpoints do.
    """

    def _pair_fusion_layers(self) -> None:
        text_config = self.config.text_config
        first, count = text_config.fusion_layer, text_config.num_hidden_layers
        if (count - first) % 2:
            raise ValueError(
                f"a two-image encoder needs an even number of fusion layers, got {count - first} "
                f"(layers {first}..{count - 1}); build the config with `from_pretrained_albef`"
            )
        layers = self.text_encoder.encoder.layer
        tied = {}
        for index in range(first, count, 2):
            owner, partner = layers[index].crossattention.self, layers[index + 1].crossattention.self
            for name in ("key", "value"):
                setattr(partner, name, getattr(owner, name))
                for param in ("weight", "bias"):
                    prefix = f"text_encoder.encoder.layer.{{}}.crossattention.self.{name}.{param}"
                    tied[prefix.format(index + 1)] = prefix.format(index)
        self._tied_weights_keys = tied

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # The sharing is part of the architecture, not an option of the config (`tie_word_embeddings`).
        return dict(self._tied_weights_keys)

    @classmethod
    def _task_config_changes(cls, source: AlbefPreTrainedModel) -> dict:
        if isinstance(source, AlbefPairedImagesMixin):
            return {}
        text_config = source.config.text_config.to_dict()
        fusion = text_config["fusion_layer"]
        text_config["num_hidden_layers"] = fusion + 2 * (text_config["num_hidden_layers"] - fusion)
        return {"text_config": text_config}

    def _source_key(self, key: str, source: AlbefPreTrainedModel) -> str:
        if isinstance(source, AlbefPairedImagesMixin):
            return key
        # The original duplicates each pretrained fusion layer into both layers of its pair.
        layer = re.match(r"text_encoder\.encoder\.layer\.(\d+)\.(.*)", key)
        fusion = self.config.fusion_layer
        if layer and int(layer.group(1)) >= fusion:
            index = fusion + (int(layer.group(1)) - fusion) // 2
            return f"text_encoder.encoder.layer.{index}.{layer.group(2)}"
        return key

    def encode_image_pairs(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """Image tokens `(batch, 2, 1 + num_patches, vision_hidden)` of `(batch, 2, channels, height, width)` pairs."""
        if pixel_values is None or pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            shape = None if pixel_values is None else tuple(pixel_values.shape)
            raise ValueError(
                f"pixel_values must be image pairs (batch, 2, channels, height, width), got {shape}"
            )
        # All first images, then all second images: the original's batch order.
        images = pixel_values.transpose(0, 1).flatten(0, 1)
        embeds = self.encode_image(
            images, interpolate_pos_encoding=interpolate_pos_encoding
        ).last_hidden_state
        return embeds.unflatten(0, (2, pixel_values.shape[0])).transpose(0, 1)

    def fuse_pair(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        first_image: torch.Tensor,
        second_image: torch.Tensor,
        output_attentions: bool = False,
    ) -> AlbefTextEncoderOutput:
        """Text and fusion layers on a text with two images (tokens `(batch, 1 + num_patches, vision_hidden)` each)."""
        return self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=[first_image, second_image],
            mode="multimodal",
            output_attentions=output_attentions,
        )


class AlbefForVisualReasoning(AlbefClassifierMixin, AlbefPairedImagesMixin, AlbefTaskModel):
    """ALBEF for NLVR2: is a statement true of a pair of images?

    The text encoder runs every fusion layer twice, once per image (see `AlbefPairedImagesMixin`); the MLP head
    on the multimodal [CLS] gives 2 logits (0: False, 1: True). The loss is `(1 - alpha) CE + alpha soft-CE`
    from the teacher's logits, as the original. Initialise it with `from_pretrained_albef` from a pretrained ALBEF
    (each fusion layer duplicated) or, as the original, from the `AlbefForTextAssignment` model.

    Batch keys: `pixel_values` `(batch, 2, 3, H, W)` image pairs, `input_ids` / `attention_mask`
    `(batch, text_len)` statements, `labels` `(batch,)` in {0, 1}.
    """

    label_names = ("False", "True")

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        self._build_encoders(config)
        self._pair_fusion_layers()
        self._build_classifier(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_outputs: AlbefTeacherOutput | None = None,
        alpha: float = 0.0,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefClassificationOutput | tuple:
        """Classify statements about image pairs; with `labels`, the (distilled) cross-entropy loss.

        Args:
            input_ids, attention_mask: `(batch, text_len)` statements.
            pixel_values: `(batch, 2, channels, height, width)` image pairs.
            labels: `(batch,)` 1 if the statement is true of the pair, else 0.
            teacher_outputs: the momentum teacher's `logits`; alpha: distillation weight.
            output_attentions: return the cross-attention maps (eager attention).
        """
        image_embeds = self.encode_image_pairs(pixel_values, interpolate_pos_encoding)
        multimodal = self.fuse_pair(
            input_ids, attention_mask, image_embeds[:, 0], image_embeds[:, 1], bool(output_attentions)
        )
        return self._classify(multimodal, image_embeds, labels, teacher_outputs, alpha, return_dict)


class AlbefForTextAssignment(AlbefPairedImagesMixin, AlbefTaskModel):
    """NLVR2's text-assignment (TA) pretraining: which of two images does a caption describe, if any?

    From a batch of image-caption pairs, each caption gets an image pair drawn as the original draws it (its own
    image with a similar one, either order, or two similar other images; see `losses.sample_text_assignment`);
    the two-image encoder and a 3-way head (`ta_head`) predict 0 (first image), 1 (second) or 2 (neither), with
    a plain cross-entropy: the original runs this step without momentum distillation, so this model has no
    teacher. `vision_proj` (from the pretrained ALBEF) gives the image similarities of the draw. After this step,
    `AlbefForVisualReasoning.from_pretrained_albef(ta_model)` starts NLVR2 fine-tuning.

    Batch keys: `pixel_values` `(batch, 3, H, W)` and `input_ids` / `attention_mask` `(batch, text_len)` captions
    (caption i describes image i; at least 3 pairs per batch); optionally pre-drawn `first_image` /
    `second_image` `(batch,)` indices.
    """

    label_names = ("first image", "second image", "neither")

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        _set_label_names(config, self.label_names)
        self._build_encoders(config)
        self._pair_fusion_layers()
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.ta_head = nn.Linear(config.text_config.hidden_size, len(self.label_names))
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        first_image: torch.Tensor | None = None,
        second_image: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefTextAssignmentOutput | tuple:
        """Draw image pairs for the captions (unless given) and compute the TA loss.

        Args:
            input_ids, attention_mask: `(batch, text_len)` captions; caption i describes image i.
            pixel_values: `(batch, channels, height, width)` images.
            first_image, second_image: `(batch,)` pre-drawn image indices for each caption (replay); the labels
                follow from them.
            generator: `torch.Generator` for the draw.
        """
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        image_embeds = image_embeds.last_hidden_state
        if first_image is None or second_image is None:
            image_feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)
            first_image, second_image = sample_text_assignment(image_feat, generator=generator)
        first_image, second_image = first_image.to(image_embeds.device), second_image.to(image_embeds.device)
        labels = text_assignment_labels(first_image, second_image)
        multimodal = self.fuse_pair(
            input_ids, attention_mask, image_embeds[first_image], image_embeds[second_image]
        )
        cls_state = multimodal.last_hidden_state[:, 0, :]
        logits = self.ta_head(cls_state)
        output = AlbefTextAssignmentOutput(
            loss=F.cross_entropy(logits, labels),
            logits=logits,
            multimodal_embeds=cls_state,
            image_embeds=image_embeds,
            labels=labels,
            first_image=first_image,
            second_image=second_image,
        )
        return output if _use_return_dict(self, return_dict) else output.to_tuple()


class AlbefForVisualEntailment(AlbefClassifierMixin, AlbefTaskModel):
    """ALBEF for SNLI-VE: does an image entail, contradict or say nothing about a hypothesis?

    The MLP head on the multimodal [CLS] gives 3 logits (0: contradiction, 1: neutral, 2: entailment); the loss is
    `(1 - alpha) CE + alpha soft-CE` from the teacher's logits, as the original.

    Batch keys: `pixel_values` `(batch, 3, H, W)`, `input_ids` / `attention_mask` `(batch, text_len)` hypotheses,
    `labels` `(batch,)` in {0, 1, 2}.
    """

    label_names = ("contradiction", "neutral", "entailment")

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        self._build_encoders(config)
        self._build_classifier(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        teacher_outputs: AlbefTeacherOutput | None = None,
        alpha: float = 0.0,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefClassificationOutput | tuple:
        """Classify image-hypothesis pairs; with `labels`, the (distilled) cross-entropy loss.

        Args:
            input_ids, attention_mask: `(batch, text_len)` hypotheses.
            pixel_values: `(batch, channels, height, width)` images, image i with hypothesis i.
            labels: `(batch,)` 0 contradiction, 1 neutral, 2 entailment.
            teacher_outputs: the momentum teacher's `logits`; alpha: distillation weight.
            output_attentions: return the cross-attention maps (eager attention).
        """
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        image_embeds = image_embeds.last_hidden_state
        multimodal = self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            mode="multimodal",
            output_attentions=bool(output_attentions),
        )
        return self._classify(multimodal, image_embeds, labels, teacher_outputs, alpha, return_dict)
