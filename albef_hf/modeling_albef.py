"""PyTorch ALBEF models: the image encoder, the shared base class and the contrastive models.

Module names map the original checkpoints simply: `visual_encoder.*` -> `vision_model.*` (same timm
names), `text_encoder.bert.*` -> `text_encoder.*`, `text_encoder.cls.predictions.*` -> `mlm_head.*`;
`vision_proj`, `text_proj`, `itm_head` and `temp` keep their names.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from huggingface_hub import HfApi
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig, check_model_source
from .losses import (
    contrastive_targets,
    distilled_targets,
    itc_loss,
    mask_tokens,
    mlm_loss,
    sample_hard_negatives,
)
from .modeling_albef_text import (
    AlbefDropout,
    AlbefMLMHead,
    AlbefTextEncoderOutput,
    AlbefTextModel,
    attention_forward,
    text_lengths,
)

logger = logging.get_logger(__name__)

__all__ = [
    "AlbefForImageTextRetrieval",
    "AlbefForPreTraining",
    "AlbefModel",
    "AlbefOutput",
    "AlbefPreTrainedModel",
    "AlbefPreTrainingOutput",
    "AlbefRankingOutput",
    "AlbefRetrievalOutput",
    "AlbefTeacherOutput",
    "AlbefVisionModel",
    "interpolate_pos_embed",
]


# ----------------------------------------------------------------------------------------------
# Image encoder
# ----------------------------------------------------------------------------------------------


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize ViT position embeddings `(1, 1 + n, dim)` to `num_patches` patch positions.

    The class-token embedding is kept; the patch grid is resized bicubically (align_corners=False), as the
    original ALBEF does when it changes resolution (256 px pretraining -> 384 px fine-tuning).
    """
    old_size = int((pos_embed.shape[1] - 1) ** 0.5)
    new_size = int(num_patches**0.5)
    if old_size**2 != pos_embed.shape[1] - 1 or new_size**2 != num_patches:
        raise ValueError(
            f"position embeddings must cover a square grid, got {pos_embed.shape[1] - 1} -> {num_patches}"
        )
    if old_size == new_size:
        return pos_embed
    cls_pos, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_size, old_size, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new_size, new_size), mode="bicubic", align_corners=False)
    grid = grid.to(pos_embed.dtype).permute(0, 2, 3, 1).flatten(1, 2)
    return torch.cat([cls_pos, grid], dim=1)


class AlbefConvStemLayer(nn.Module):
    """A 3x3 convolution of stride 2, GroupNorm (one group: no batch statistics to keep) and GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = nn.GroupNorm(1, out_channels)
        self.activation = nn.GELU()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(pixels)))


class AlbefPatchEmbed(nn.Module):
    """Non-overlapping patches projected by a strided convolution, after an optional convolutional stem.

    Without `config.conv_stem_channels` this is ViT's patch embedding (`proj`, the only parameters). With it,
    `stem` halves the resolution per layer and `proj` covers the remaining `patch_size / 2**n` pixels, so the
    tokens are the same grid as without a stem.
    """

    def __init__(self, config: AlbefVisionConfig) -> None:
        super().__init__()
        channels = [config.num_channels, *(config.conv_stem_channels or [])]
        if config.conv_stem_channels:
            self.stem = nn.Sequential(
                *(AlbefConvStemLayer(a, b) for a, b in zip(channels[:-1], channels[1:], strict=True))
            )
        stride = config.patch_size // 2 ** (len(channels) - 1)
        self.proj = nn.Conv2d(channels[-1], config.hidden_size, kernel_size=stride, stride=stride)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "stem"):
            pixel_values = self.stem(pixel_values)
        return self.proj(pixel_values).flatten(2).transpose(1, 2)


class AlbefVisionAttention(nn.Module):
    """Multi-head self-attention with a fused query/key/value projection (timm's `attn.qkv`)."""

    def __init__(self, config: AlbefVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.qkv_bias)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch, length, _ = hidden_states.shape
        qkv = (
            self.qkv(hidden_states)
            .view(batch, length, 3, self.num_heads, self.head_dim)
            .permute(2, 0, 3, 1, 4)
        )
        output, probs = attention_forward(
            self,
            self.config._attn_implementation,
            qkv[0],
            qkv[1],
            qkv[2],
            None,
            self.scaling,
            self.dropout_prob if self.training else 0.0,
            output_attentions,
        )
        return self.proj(output.reshape(batch, length, -1)), probs


class AlbefVisionMlp(nn.Module):
    def __init__(self, config: AlbefVisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class AlbefVisionBlock(GradientCheckpointingLayer):
    """Pre-norm transformer block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, config: AlbefVisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = AlbefVisionAttention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = AlbefVisionMlp(config)
        self.dropout = AlbefDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        attended, probs = self.attn(self.norm1(hidden_states), output_attentions)
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(self.mlp(self.norm2(hidden_states)))
        return hidden_states, probs


@dataclass
class AlbefVisionOutput(ModelOutput):
    """Output of `AlbefVisionModel`.

    Args:
        last_hidden_state: `(batch, 1 + num_patches, hidden)` tokens after the final LayerNorm, [CLS] first.
        hidden_states: when asked, the input of every block plus the final output (before the LayerNorm).
        attentions: when asked, `(batch, heads, 1 + num_patches, 1 + num_patches)` probabilities per block.
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


class AlbefVisionModel(nn.Module):
    """ViT image encoder with a class token, learned position embeddings and a final LayerNorm."""

    def __init__(self, config: AlbefVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = AlbefPatchEmbed(config)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, config.hidden_size))
        self.pos_drop = AlbefDropout(config.hidden_dropout_prob)
        self.blocks = nn.ModuleList([AlbefVisionBlock(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> AlbefVisionOutput:
        """Encode `(batch, channels, height, width)` images.

        `interpolate_pos_encoding=True` runs the model at another square resolution by resizing the
        position embeddings on the fly (bicubic, as the original's `interpolate_pos_embed`).
        """
        _check_pixel_values(pixel_values, self.config, interpolate_pos_encoding)
        pixel_values = pixel_values.to(self.patch_embed.proj.weight.dtype)
        patches = self.patch_embed(pixel_values)
        pos_embed = self.pos_embed
        if interpolate_pos_encoding:
            pos_embed = interpolate_pos_embed(pos_embed, patches.shape[1])
        hidden_states = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        hidden_states = self.pos_drop(hidden_states + pos_embed)

        all_hidden = [] if output_hidden_states else None
        all_attentions = [] if output_attentions else None
        for block in self.blocks:
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, probs = block(hidden_states, output_attentions=output_attentions)
            if output_attentions:
                all_attentions.append(probs)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        return AlbefVisionOutput(
            last_hidden_state=self.norm(hidden_states),
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attentions) if output_attentions else None,
        )


def _check_pixel_values(pixel_values: torch.Tensor, config: AlbefVisionConfig, interpolate: bool) -> None:
    if pixel_values.dim() != 4 or pixel_values.shape[1] != config.num_channels:
        raise ValueError(
            f"pixel_values must be (batch, {config.num_channels}, height, width), got {tuple(pixel_values.shape)}"
        )
    height, width = pixel_values.shape[-2:]
    if interpolate:
        if height != width or height % config.patch_size:
            raise ValueError(
                f"interpolate_pos_encoding needs a square image whose side is a multiple of the patch size "
                f"{config.patch_size}, got {height}x{width}"
            )
    elif height != config.image_size or width != config.image_size:
        raise ValueError(
            f"input image size {height}x{width} does not match the model ({config.image_size}x{config.image_size}); "
            "resize it with the processor or pass interpolate_pos_encoding=True"
        )


# ----------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------


@dataclass
class AlbefOutput(ModelOutput):
    """Output of `AlbefModel`.

    Args:
        loss: in-batch ITC loss, when `return_loss=True`.
        logits_per_image: `(num_images, num_texts)` ITC similarities divided by the temperature.
        logits_per_text: `(num_texts, num_images)`, the transpose.
        image_feat: `(num_images, embed_dim)` projected, L2-normalised image [CLS] features.
        text_feat: `(num_texts, embed_dim)` projected, L2-normalised text [CLS] features.
        image_embeds: `(num_images, 1 + num_patches, vision_hidden)` image tokens.
        text_embeds: `(num_texts, seq_len, text_hidden)` unimodal text tokens.
        vision_attentions, text_attentions: attention maps when asked.
    """

    loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_feat: torch.Tensor | None = None
    text_feat: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    vision_attentions: tuple[torch.Tensor, ...] | None = None
    text_attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class AlbefTeacherOutput(ModelOutput):
    """What the momentum teacher contributes to a student's loss (computed without gradient).

    Args:
        image_feat: `(batch, embed_dim)` teacher image features of the batch.
        text_feat: `(batch, embed_dim)` teacher text features of the batch.
        mlm_logits: `(num_masked, vocab)` teacher MLM scores at the masked positions (pretraining only).
        logits: the task head's scores of the downstream models: `(batch, num_labels)` for NLVR2 and SNLI-VE,
            `(num_answers, answer_len, vocab)` answer-token scores of the VQA decoder.
    """

    image_feat: torch.Tensor | None = None
    text_feat: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    logits: torch.Tensor | None = None


@dataclass
class AlbefRetrievalOutput(ModelOutput):
    """Output of `AlbefForImageTextRetrieval` (and the ITC/ITM part of `AlbefForPreTraining`).

    Args:
        loss: `loss_itc + loss_itm` (weighted by the config) when losses are computed.
        loss_itc, loss_itm: the two objectives.
        itm_logits: without loss, `(batch, 2)` ITM logits of the given pairs; with loss, `(3 * batch, 2)` logits
            of `[positives; (negative image, text); (image, negative text)]`.
        itm_labels: `(3 * batch,)` labels of those pairs when losses are computed (1 = match).
        logits_per_image: `(batch, num_candidates)` image->text similarities over the temperature, against the
            batch's texts (teacher features when a teacher is given) followed by the queue.
        logits_per_text: `(batch, num_candidates)` text->image similarities, likewise.
        image_feat, text_feat: `(batch, embed_dim)` projected, normalised student features.
        image_embeds: `(batch, 1 + num_patches, vision_hidden)` image tokens.
        text_embeds: `(batch, seq_len, text_hidden)` unimodal text tokens.
        negative_images, negative_texts: `(batch,)` indices of the sampled negatives.
    """

    loss: torch.Tensor | None = None
    loss_itc: torch.Tensor | None = None
    loss_itm: torch.Tensor | None = None
    itm_logits: torch.Tensor | None = None
    itm_labels: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_feat: torch.Tensor | None = None
    text_feat: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    negative_images: torch.Tensor | None = None
    negative_texts: torch.Tensor | None = None


@dataclass
class AlbefRankingOutput(ModelOutput):
    """Output of `rank` (`AlbefForImageTextRetrieval`, `AlbefForPreTraining`).

    Args:
        sims: `(num_images, num_texts)` ITC cosine similarities.
        scores_i2t: `(num_images, num_texts)` ITM "match" logits of each image's top-k texts, -100 elsewhere.
        scores_t2i: `(num_texts, num_images)` ITM "match" logits of each text's top-k images, -100 elsewhere.
    """

    sims: torch.Tensor | None = None
    scores_i2t: torch.Tensor | None = None
    scores_t2i: torch.Tensor | None = None


@dataclass
class AlbefPreTrainingOutput(AlbefRetrievalOutput):
    """Output of `AlbefForPreTraining`: the fields of `AlbefRetrievalOutput` plus MLM.

    Args:
        loss: `loss_itc + loss_itm + loss_mlm` (weighted by the config).
        loss_mlm: the masked-language-modelling loss.
        mlm_logits: `(num_masked, vocab)` scores at the masked positions (row-major order of
            `mlm_labels != -100`).
        mlm_input_ids, mlm_labels: `(batch, seq_len)` masked ids and labels that were used (drawn by the model
            when not given).
    """

    loss_mlm: torch.Tensor | None = None
    mlm_logits: torch.Tensor | None = None
    mlm_input_ids: torch.Tensor | None = None
    mlm_labels: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# Base classes
# ----------------------------------------------------------------------------------------------


def _check_model_folder(folder: str, needs_config: bool = True) -> None:
    """Refuse a saved-model folder that cannot load, saying why (transformers would raise OSError, or the
    safetensors reader its own error type). `needs_config`: no config object was passed to `from_pretrained`."""
    config = os.path.join(folder, "config.json")
    if needs_config and not os.path.isfile(config):
        raise FileNotFoundError(f"{folder!r} has no config.json: not a saved model folder")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as file:
                settings = json.load(file)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"{config!r} is not valid JSON: {error}") from error
        if not isinstance(settings, dict):
            raise ValueError(f"{config!r} must hold a JSON object, got {type(settings).__name__}")
    names = os.listdir(folder)
    weights = [name for name in names if name.endswith(".safetensors")]
    if not weights and not any(name.endswith((".bin", ".index.json")) for name in names):
        raise FileNotFoundError(f"{folder!r} has no weights file (model.safetensors)")
    for name in weights:
        try:
            with safe_open(os.path.join(folder, name), framework="pt"):
                pass  # opening reads and checks the header against the file's size
        except SafetensorError as error:
            raise ValueError(f"{os.path.join(folder, name)!r} is damaged or truncated: {error}") from error


class AlbefPreTrainedModel(PreTrainedModel):
    """Weight initialisation, attention back-ends and the encoders shared by every ALBEF model."""

    config_class = AlbefConfig
    base_model_prefix = "albef"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = False
    _no_split_modules = ["AlbefVisionBlock", "AlbefTextLayer"]

    def __init__(self, config: AlbefConfig, *inputs, **kwargs) -> None:
        super().__init__(config, *inputs, **kwargs)
        # transformers resolves the attention implementation (SDPA by default) on the top-level config only, but the
        # encoders read it from their sub-configs: hand it down, or they would silently run eager.
        self.config._attn_implementation = self.config._attn_implementation

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """`PreTrainedModel.from_pretrained`, with clear errors for a damaged local folder.

        Raises:
            FileNotFoundError: the folder has no config.json or no weights file, or a name that cannot be a
                Hub id names no folder.
            ValueError: config.json is not a JSON object, a safetensors file is truncated or damaged, or the
                weights do not have the shapes the config describes.
        """
        folder = pretrained_model_name_or_path
        if isinstance(folder, (str, os.PathLike)):
            check_model_source(folder)
            if os.path.isdir(folder):
                subfolder = kwargs.get("subfolder")
                _check_model_folder(
                    os.path.join(folder, subfolder) if subfolder else os.fspath(folder),
                    needs_config=kwargs.get("config") is None,
                )
        try:
            return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"the weights in {os.fspath(folder)!r} do not have the shapes its config describes (an edited or "
                "damaged config.json?); the report above lists them"
            ) from error

    def set_attn_implementation(self, attn_implementation: str | dict) -> None:
        """Run every attention of the model with `"eager"` or `"sdpa"` (`"flash_attention_*"` where installed).

        transformers' own method would warn, once per sub-config, that it cannot check the sub-models ("You may
        encounter undefined behavior"): ALBEF's encoders are plain modules reading their sub-configs, and every
        one of them supports both implementations, so the implementation is set on the configs directly.
        """
        if isinstance(attn_implementation, dict) or attn_implementation not in (
            "eager",
            *ALL_ATTENTION_FUNCTIONS.valid_keys(),
        ):
            raise ValueError(
                f"attn_implementation must be 'eager' or one of {sorted(ALL_ATTENTION_FUNCTIONS.valid_keys())} "
                f"(one for every encoder), got {attn_implementation!r}"
            )
        self.config._attn_implementation = attn_implementation

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, AlbefVisionModel):
            init.trunc_normal_(module.cls_token, std=std)
            init.trunc_normal_(module.pos_embed, std=std)
        elif isinstance(module, AlbefMLMHead):
            init.zeros_(module.bias)
        if isinstance(getattr(module, "temp", None), nn.Parameter):
            init.constant_(module.temp, self.config.temp)

    # Pipelines, by task, that a saved folder declares in `config.custom_pipelines` and carries the code of, so
    # that `pipeline(task, model=folder, trust_remote_code=True)` serves them where albef_hf is not installed.
    # albef_hf's registration fills it (the models do not import the pipelines); a pipeline class names the
    # model classes whose checkpoints serve its task in `checkpoint_classes`.
    folder_pipelines: dict[str, type] = {}

    def save_pretrained(
        self, save_directory, is_main_process: bool = True, *args, push_to_hub: bool = False, **kwargs
    ):
        """`PreTrainedModel.save_pretrained`, plus what lets the folder travel without this package.

        - every ALBEF Auto class of this module goes in `auto_map` (transformers records only the saved model's
          own), so that a folder written by one ALBEF model loads as any other with `trust_remote_code`;
        - the pipelines this model serves go in `config.custom_pipelines` (loading the folder with this model's
          own Auto class) and their code is copied next to the model's (flattened: see `_save_flat_code`).

        With `push_to_hub=True` the folder is uploaded once it is complete (`repo_id`, `commit_message`,
        `private`, `token`, `revision`, `create_pr` as in `push_to_hub`).
        """
        hub_kwargs = {
            key: kwargs.pop(key)
            for key in ("repo_id", "commit_message", "private", "token", "revision", "create_pr")
            if key in kwargs
        }
        pipelines = self._folder_pipelines() if self._auto_class is not None else {}
        if self._auto_class is not None:
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                **_module_auto_map(type(self)),
            }
            self.config.custom_pipelines = {
                task: {"impl": f"{cls.__module__.split('.')[-1]}.{cls.__name__}", "pt": [self._auto_class]}
                for task, cls in pipelines.items()
            }
        try:
            super().save_pretrained(save_directory, is_main_process, *args, **kwargs)
        finally:
            # the declaration is for the folder; in memory this package's registry serves the tasks
            self.config.__dict__.pop("custom_pipelines", None)
        if is_main_process:
            _save_flat_code(
                [sys.modules[cls.__module__].__file__ for cls in pipelines.values()], save_directory
            )
        if push_to_hub and is_main_process:
            repo_id = hub_kwargs.pop("repo_id", os.path.basename(os.path.abspath(save_directory)))
            upload_folder(save_directory, repo_id, **hub_kwargs)

    def _folder_pipelines(self) -> dict[str, type]:
        name = type(self).__name__
        return {
            task: cls
            for task, cls in AlbefPreTrainedModel.folder_pipelines.items()
            if name in getattr(cls, "checkpoint_classes", ())
        }

    @classmethod
    def from_vision_text_pretrained(
        cls,
        vision_path: str | os.PathLike | None = None,
        text_path: str | os.PathLike | None = None,
        fusion_layer: int | None = None,
        image_size: int | None = None,
        output_loading_info: bool = False,
        vision_config: AlbefVisionConfig | dict | None = None,
        text_config: AlbefTextConfig | dict | None = None,
        **config_kwargs,
    ):
        """Build this ALBEF model from a saved transformers ViT and/or a saved BERT (folders or Hub ids).

        The BERT's first `fusion_layer` layers (default: half of them) become the text encoder; the following
        layers' self-attention and feed-forward become the fusion layers, whose cross-attention is new; a
        masked-LM head initialises `mlm_head` when the BERT checkpoint has one. Position embeddings are resized
        when `image_size` differs from the ViT's. `config_kwargs` go to `AlbefConfig` (e.g. `embed_dim`).

        Either tower may be left out (`None`): it is then built new from `vision_config` / `text_config` (its
        sizes; default ViT-B/16 / BERT-base), as when a pretrained BERT meets a vision tower trained from scratch.
        A configuration for a tower that comes from a checkpoint is refused: the checkpoint fixes it.

        Returns:
            The model, or `(model, TowerLoadingReport)` with `output_loading_info=True`; the report lists the
            tensors copied from each tower and those newly initialised (its summary is logged when the report is
            not returned). A task model built from this one by `from_pretrained_albef` reports the weights that
            started new here, and have not changed since (by training or loading), as newly initialised.
        """
        from .pretrained_towers import build_from_towers

        model, report = build_from_towers(
            cls,
            vision_path,
            text_path,
            fusion_layer,
            image_size,
            vision_config=vision_config,
            text_config=text_config,
            **config_kwargs,
        )
        if output_loading_info:
            return model, report
        logger.warning("%s", report)
        return model

    def _build_encoders(self, config: AlbefConfig) -> None:
        self.vision_model = AlbefVisionModel(config.vision_config)
        self.text_encoder = AlbefTextModel(config.text_config)

    def encode_image(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        interpolate_pos_encoding: bool = False,
    ) -> AlbefVisionOutput:
        """Image tokens `(batch, 1 + num_patches, vision_hidden)` (in `.last_hidden_state`)."""
        return self.vision_model(
            pixel_values,
            output_attentions=output_attentions,
            interpolate_pos_encoding=interpolate_pos_encoding,
        )

    def encode_text(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> AlbefTextEncoderOutput:
        """Unimodal text tokens `(batch, seq_len, text_hidden)`: the text-only layers."""
        return self.text_encoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            mode="text",
            output_attentions=output_attentions,
        )

    def fuse(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        output_attentions: bool = False,
        image_index: torch.Tensor | None = None,
        image_key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        first_token_only: bool = False,
        text_self_attended: bool = False,
        needed_tokens: torch.Tensor | None = None,
    ) -> AlbefTextEncoderOutput:
        """Multimodal tokens: the fusion layers on unimodal text tokens, attending to the image tokens.

        Text row i reads image row i, or image row `image_index[i]` when an index is given (several texts
        sharing an image then share its cross-attention keys and values). `image_key_values`
        (`text_encoder.project_cross_key_values(image_embeds)`) replace `image_embeds` when the same images
        serve several calls; `first_token_only` computes only the [CLS] state in the last layer, and
        `needed_tokens` (`(batch, seq_len)`, nonzero where the caller reads) only the states it marks, the
        others left zero; `text_self_attended` says that `text_embeds` come from
        `text_encoder.fusion_self_attention`.
        """
        return self.text_encoder(
            hidden_states=text_embeds,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            encoder_index=image_index,
            encoder_key_values=image_key_values,
            mode="fusion",
            output_attentions=output_attentions,
            first_token_only=first_token_only,
            text_self_attended=text_self_attended,
            needed_tokens=needed_tokens,
        )


class AlbefContrastiveMixin:
    """Projections, temperature and ITC helpers of the models that align images and texts."""

    def _build_projections(self, config: AlbefConfig) -> None:
        self.vision_proj = nn.Linear(config.vision_config.hidden_size, config.embed_dim)
        self.text_proj = nn.Linear(config.text_config.hidden_size, config.embed_dim)
        self.temp = nn.Parameter(torch.tensor(config.temp))

    def clamped_temp(self) -> torch.Tensor:
        """The temperature clamped to `[config.temp_min, config.temp_max]`, as the original uses it."""
        return self.temp.clamp(self.config.temp_min, self.config.temp_max)

    def project_image(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised `(batch, embed_dim)` features of image tokens' [CLS]."""
        return F.normalize(self.vision_proj(image_embeds[:, 0, :]), dim=-1)

    def project_text(self, text_embeds: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised `(batch, embed_dim)` features of text tokens' [CLS]."""
        return F.normalize(self.text_proj(text_embeds[:, 0, :]), dim=-1)

    def get_image_features(
        self, pixel_values: torch.Tensor, interpolate_pos_encoding: bool = False
    ) -> torch.Tensor:
        """Projected, L2-normalised image features `(batch, embed_dim)`."""
        image_embeds = self.encode_image(pixel_values, interpolate_pos_encoding=interpolate_pos_encoding)
        return self.project_image(image_embeds.last_hidden_state)

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Projected, L2-normalised text features `(batch, embed_dim)`."""
        return self.project_text(self.encode_text(input_ids, attention_mask).last_hidden_state)

    def get_multimodal_features(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Multimodal [CLS] features `(batch, text_hidden)` of image-text pairs (the ITM head's input)."""
        image_embeds = self.encode_image(pixel_values).last_hidden_state
        text_embeds = self.encode_text(input_ids, attention_mask).last_hidden_state
        return self.fuse(text_embeds, attention_mask, image_embeds).last_hidden_state[:, 0, :]


class AlbefMatchingMixin(AlbefContrastiveMixin):
    """ITC + hard-negative ITM, shared by pretraining and retrieval fine-tuning.

    The momentum teacher and the queues are not part of the model: a trainer passes them in.
    """

    def _build_itm_head(self, config: AlbefConfig) -> None:
        self.itm_head = nn.Linear(config.text_config.hidden_size, 2)

    def itm_logits(self, text_embeds, attention_mask, image_embeds) -> torch.Tensor:
        """ITM logits `(batch, 2)` of aligned (image, text) token pairs; column 1 is "match"."""
        return self.itm_head(self.fuse(text_embeds, attention_mask, image_embeds).last_hidden_state[:, 0, :])

    def _itc_and_itm(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        idx: torch.Tensor | None,
        teacher_outputs: AlbefTeacherOutput | None,
        image_queue: torch.Tensor | None,
        text_queue: torch.Tensor | None,
        idx_queue: torch.Tensor | None,
        alpha: float,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None,
        generator: torch.Generator | None,
        extra_positive_texts: torch.Tensor | None = None,
        extra_needed_tokens: torch.Tensor | None = None,
    ) -> tuple[AlbefRetrievalOutput, torch.Tensor | None]:
        """ITC and ITM losses of a batch of pairs (image i, text i).

        `extra_positive_texts` `(batch, seq_len, hidden)` are more text states (with the same attention mask) to
        fuse with their own images in the same fusion pass as the ITM pairs; their fused states are returned
        alongside (pretraining puts its MLM rows there), computed only where `extra_needed_tokens` is nonzero
        when it is given (and zero elsewhere). Of the ITM rows, the last fusion layer computes the [CLS] state
        alone: the head reads nothing else.
        """
        batch_size = image_embeds.shape[0]
        image_feat = self.project_image(image_embeds)
        text_feat = self.project_text(text_embeds)
        temp = self.clamped_temp()

        if teacher_outputs is None:
            if image_queue is not None or text_queue is not None:
                raise ValueError(
                    "feature queues hold momentum features: pass `teacher_outputs` with the queues"
                )
            image_candidates, text_candidates = image_feat, text_feat
        else:
            image_candidates = _cat_queue(teacher_outputs.image_feat, image_queue)
            text_candidates = _cat_queue(teacher_outputs.text_feat, text_queue)
        sim_i2t = image_feat @ text_candidates.T / temp
        sim_t2i = text_feat @ image_candidates.T / temp

        idx_candidates = None
        if idx is not None:
            idx_candidates = idx if idx_queue is None else torch.cat([idx.view(-1), idx_queue.view(-1)])
        targets = contrastive_targets(
            batch_size, sim_i2t.shape[1], idx, idx_candidates, device=sim_i2t.device
        )
        targets_i2t = targets_t2i = targets
        if teacher_outputs is not None and alpha > 0:
            with torch.no_grad():
                teacher_temp = temp.detach()
                teacher_i2t = teacher_outputs.image_feat @ text_candidates.T / teacher_temp
                teacher_t2i = teacher_outputs.text_feat @ image_candidates.T / teacher_temp
                targets_i2t = distilled_targets(targets, teacher_i2t, alpha)
                targets_t2i = distilled_targets(targets, teacher_t2i, alpha)
        loss_itc = itc_loss(sim_i2t, sim_t2i, targets_i2t, targets_t2i)

        if hard_negatives is None:
            hard_negatives = sample_hard_negatives(
                sim_i2t, sim_t2i, idx=idx, hard=self.config.hard_negatives, generator=generator
            )
        negative_images, negative_texts = (t.to(image_embeds.device) for t in hard_negatives)
        # One fusion pass over [positives; (negative image, text); (image, negative text); extra rows], each
        # row reading its image through an index, so every image's keys and values are projected once.
        own = torch.arange(batch_size, device=image_embeds.device)
        texts = [text_embeds, text_embeds, text_embeds[negative_texts]]
        masks = [attention_mask, attention_mask, attention_mask[negative_texts]]
        images = [own, negative_images, own]
        itm_reads = attention_mask.new_zeros(3 * batch_size, attention_mask.shape[1], dtype=torch.bool)
        itm_reads[:, 0] = True  # the ITM head reads [CLS] alone
        needed = [itm_reads]
        if extra_positive_texts is not None:
            texts.append(extra_positive_texts)
            masks.append(attention_mask)
            images.append(own)
            needed.append(
                torch.ones_like(attention_mask, dtype=torch.bool)
                if extra_needed_tokens is None
                else extra_needed_tokens.bool()
            )
        fused = self.fuse(
            torch.cat(texts),
            torch.cat(masks),
            image_embeds,
            image_index=torch.cat(images),
            needed_tokens=torch.cat(needed),
        ).last_hidden_state
        itm_logits = self.itm_head(fused[: 3 * batch_size, 0, :])
        itm_labels = torch.cat(
            [
                torch.ones(batch_size, dtype=torch.long, device=itm_logits.device),
                torch.zeros(2 * batch_size, dtype=torch.long, device=itm_logits.device),
            ]
        )
        loss_itm = F.cross_entropy(itm_logits, itm_labels)

        output = AlbefRetrievalOutput(
            loss=self.config.itc_weight * loss_itc + self.config.itm_weight * loss_itm,
            loss_itc=loss_itc,
            loss_itm=loss_itm,
            itm_logits=itm_logits,
            itm_labels=itm_labels,
            logits_per_image=sim_i2t,
            logits_per_text=sim_t2i,
            image_feat=image_feat,
            text_feat=text_feat,
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            negative_images=negative_images,
            negative_texts=negative_texts,
        )
        return output, (fused[3 * batch_size :] if extra_positive_texts is not None else None)

    @torch.no_grad()
    def itm_pair_logits(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: torch.Tensor,
        image_index: torch.Tensor,
        text_index: torch.Tensor,
        batch_size: int = 128,
    ) -> torch.Tensor:
        """ITM logits `(num_pairs, 2)` of the pairs (image `image_index[p]`, text `text_index[p]`).

        The logits `itm_logits` gives each pair, with less work when pairs share images or texts (re-ranking):
        a pair listed twice is scored once; each image's cross-attention keys and values are projected once
        per fusion layer for all of its pairs (images go in chunks, and every pair of a chunk's images reads the
        chunk's projected keys/values); the pairs of a chunk go through the fusion layers `batch_size` at a
        time, sorted by text length and each batch cut to its longest text; the self-attention of the first fusion
        layer, which reads no image, runs once per text; the last fusion layer computes only the [CLS] state that
        the ITM head reads.

        Args:
            image_embeds: `(num_images, image_len, vision_hidden)` image tokens.
            text_embeds: `(num_texts, seq_len, text_hidden)` unimodal text tokens.
            text_attention_mask: `(num_texts, seq_len)` their padding mask.
            image_index, text_index: `(num_pairs,)` rows of the two.
            batch_size: pairs per fusion forward.
        """
        if image_index.shape != text_index.shape or image_index.dim() != 1:
            raise ValueError(
                f"image_index and text_index must be 1-D and of one length, got {tuple(image_index.shape)} "
                f"and {tuple(text_index.shape)}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if image_index.numel() == 0:
            return self.itm_head.weight.new_empty(0, 2)
        num_texts = text_embeds.shape[0]
        pairs, inverse = torch.unique(image_index * num_texts + text_index, return_inverse=True)
        images, texts = pairs // num_texts, pairs % num_texts
        lengths = text_lengths(text_attention_mask)
        # A chunk's keys/values take about what the image tokens of one batch of pairs took when every pair
        # carried its own copy, so memory stays where it was.
        fusion_layers = self.config.text_config.num_hidden_layers - self.config.text_config.fusion_layer
        chunk = max(1, batch_size // (2 * fusion_layers))
        order = torch.argsort((images // chunk) * (text_embeds.shape[1] + 1) + lengths[texts], stable=True)
        images, texts = images[order], texts[order]
        attended = self._fusion_self_attention(text_embeds, text_attention_mask, lengths, texts, batch_size)
        logits, start = [], 0
        for count in torch.unique_consecutive(images // chunk, return_counts=True)[1].tolist():
            chunk_images, chunk_texts = images[start : start + count], texts[start : start + count]
            start += count
            present, local_index = torch.unique(chunk_images, return_inverse=True)
            key_values = self.text_encoder.project_cross_key_values(image_embeds[present])
            for first in range(0, count, batch_size):
                rows = chunk_texts[first : first + batch_size]
                length = int(lengths[rows].max())
                fused = self.fuse(
                    attended[rows, :length],
                    text_attention_mask[rows, :length],
                    None,
                    image_index=local_index[first : first + batch_size],
                    image_key_values=key_values,
                    first_token_only=True,
                    text_self_attended=True,
                ).last_hidden_state
                logits.append(self.itm_head(fused[:, 0, :]))
        sorted_logits = torch.cat(logits)
        unique_logits = torch.empty_like(sorted_logits)
        unique_logits[order] = sorted_logits
        return unique_logits[inverse]

    def _fusion_self_attention(
        self,
        text_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        lengths: torch.Tensor,
        texts: torch.Tensor,
        batch_size: int,
    ) -> torch.Tensor:
        """The first fusion layer's self-attention of the `texts` rows (zeros elsewhere), which reads no image:
        computed once per text rather than once per pair, in batches of similar length."""
        used = torch.unique(texts)
        used = used[torch.argsort(lengths[used], stable=True)]
        attended = torch.zeros_like(text_embeds)
        for first in range(0, used.numel(), batch_size):
            rows = used[first : first + batch_size]
            length = int(lengths[rows].max())
            attended[rows, :length] = self.text_encoder.fusion_self_attention(
                text_embeds[rows, :length], attention_mask[rows, :length]
            )
        return attended

    @torch.no_grad()
    def itm_rerank(
        self,
        query_sims: torch.Tensor,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: torch.Tensor,
        k: int,
        batch_size: int,
        image_queries: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each query's `k` best candidates by ITC, and the ITM logits of those pairs (`itm_pair_logits`).

        Args:
            query_sims: `(num_queries, num_candidates)` ITC similarities.
            image_embeds, text_embeds, text_attention_mask: the image and text tokens, queries on one side
                (images when `image_queries`, else texts) and candidates on the other, indexed as `query_sims`.
            k, batch_size: candidates per query, and pairs per ITM forward.

        Returns:
            `(similarities, candidates, itm_logits)`: `(num_queries, k)`, `(num_queries, k)`, `(num_queries, k, 2)`.
        """
        similarities, candidates = query_sims.topk(min(k, query_sims.shape[1]), dim=1)
        image_index, text_index = _shortlist_pairs(candidates, 0, image_queries)
        logits = self.itm_pair_logits(
            image_embeds, text_embeds, text_attention_mask, image_index, text_index, batch_size
        )
        return similarities, candidates, logits.reshape(*candidates.shape, 2)

    @torch.no_grad()
    def rank(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_attention_mask: torch.Tensor | None = None,
        k: int = 128,
        batch_size: int = 128,
        image_rows: slice | None = None,
        text_rows: slice | None = None,
    ) -> AlbefRankingOutput:
        """Retrieval scores as the original evaluation defines them: rank by ITC, re-rank the top k with ITM.

        For each image (row of `scores_i2t`), the `k` texts with the highest ITC similarity get the ITM
        "match" logit as score and every other text -100; `scores_t2i` does the same for each text. The pairs
        of both directions are scored together (`itm_pair_logits`), a pair on both shortlists once.

        Args:
            image_embeds: `(num_images, 1 + num_patches, vision_hidden)` from `encode_image`.
            text_embeds: `(num_texts, seq_len, text_hidden)` from `encode_text`.
            text_attention_mask: `(num_texts, seq_len)` padding mask of the texts.
            k: candidates re-ranked per query (the original uses 256 on COCO, 128 on Flickr30K).
            batch_size: image-text pairs per ITM forward.
            image_rows, text_rows: only score these query rows (to split the work across processes); the other
                rows stay -100.
        """
        num_images, num_texts = image_embeds.shape[0], text_embeds.shape[0]
        text_attention_mask = _ones_if_none(text_attention_mask, text_embeds)
        sims = self.project_image(image_embeds) @ self.project_text(text_embeds).T
        scores_i2t = sims.new_full((num_images, num_texts), -100.0)
        scores_t2i = sims.new_full((num_texts, num_images), -100.0)
        shortlists, image_index, text_index = [], [], []
        for scores, query_sims, rows, image_queries in (
            (scores_i2t, sims, image_rows, True),
            (scores_t2i, sims.T, text_rows, False),
        ):
            start, stop, _ = (rows or slice(None)).indices(query_sims.shape[0])
            stop = max(start, stop)
            candidates = query_sims[start:stop].topk(min(k, query_sims.shape[1]), dim=1).indices
            images, texts = _shortlist_pairs(candidates, start, image_queries)
            shortlists.append((scores[start:stop], candidates))
            image_index.append(images)
            text_index.append(texts)
        logits = self.itm_pair_logits(
            image_embeds,
            text_embeds,
            text_attention_mask,
            torch.cat(image_index),
            torch.cat(text_index),
            batch_size,
        )[:, 1].to(sims.dtype)
        sizes = [index.numel() for index in image_index]
        for (scores, candidates), part in zip(shortlists, logits.split(sizes), strict=True):
            scores.scatter_(1, candidates, part.reshape(candidates.shape))
        return AlbefRankingOutput(sims=sims, scores_i2t=scores_i2t, scores_t2i=scores_t2i)

    @torch.no_grad()
    def compute_teacher_outputs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> AlbefTeacherOutput:
        """Run this model as the momentum teacher of a student: features (and MLM scores) without gradient."""
        image_embeds = self.encode_image(pixel_values).last_hidden_state
        text_embeds = self.encode_text(input_ids, attention_mask).last_hidden_state
        return AlbefTeacherOutput(
            image_feat=self.project_image(image_embeds), text_feat=self.project_text(text_embeds)
        )


def _shortlist_pairs(
    candidates: torch.Tensor, first_query: int, image_queries: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(image_index, text_index)` of the pairs of a `(num_queries, k)` shortlist whose queries are rows
    `first_query, first_query + 1, ...` (images when `image_queries`, else texts)."""
    queries = torch.arange(
        first_query, first_query + candidates.shape[0], device=candidates.device
    ).repeat_interleave(candidates.shape[1])
    items = candidates.reshape(-1)
    return (queries, items) if image_queries else (items, queries)


def _cat_queue(batch_feat: torch.Tensor, queue: torch.Tensor | None) -> torch.Tensor:
    return batch_feat if queue is None else torch.cat([batch_feat, queue.to(batch_feat.dtype)])


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------


class AlbefModel(AlbefContrastiveMixin, AlbefPreTrainedModel):
    """ALBEF's unimodal encoders, projections and fusion encoder, with CLIP-style contrastive logits.

    `forward` returns `logits_per_image` / `logits_per_text` (ITC similarities over the temperature), so the
    model serves `AutoModelForZeroShotImageClassification` and the zero-shot-image-classification pipeline.

    Example:
        >>> model = AlbefModel.from_pretrained(path)
        >>> out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask)
        >>> probs = out.logits_per_image.softmax(dim=-1)
    """

    main_input_name = "input_ids"

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        self._build_encoders(config)
        self._build_projections(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        return_loss: bool | None = None,
        output_attentions: bool | None = None,
        interpolate_pos_encoding: bool = False,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefOutput | tuple:
        """ITC similarities of every image against every text.

        Args:
            input_ids: `(num_texts, seq_len)` token ids.
            pixel_values: `(num_images, channels, height, width)` processed images.
            attention_mask: `(num_texts, seq_len)` padding mask.
            return_loss: also return the symmetric in-batch ITC loss (needs num_images == num_texts).
            output_attentions: return attention maps of both encoders (eager attention).
            interpolate_pos_encoding: run at another resolution by resizing the position embeddings.
        """
        if input_ids is None or pixel_values is None:
            raise ValueError("AlbefModel needs both `input_ids` and `pixel_values`")
        output_attentions = bool(output_attentions)
        vision = self.encode_image(pixel_values, output_attentions, interpolate_pos_encoding)
        text = self.encode_text(input_ids, attention_mask, output_attentions)
        image_feat = self.project_image(vision.last_hidden_state)
        text_feat = self.project_text(text.last_hidden_state)
        logits_per_image = image_feat @ text_feat.T / self.clamped_temp()
        loss = None
        if return_loss:
            if logits_per_image.shape[0] != logits_per_image.shape[1]:
                raise ValueError("return_loss needs as many images as texts (pair i is image i with text i)")
            targets = torch.eye(logits_per_image.shape[0], device=logits_per_image.device)
            loss = itc_loss(logits_per_image, logits_per_image.T, targets, targets)
        output = AlbefOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.T,
            image_feat=image_feat,
            text_feat=text_feat,
            image_embeds=vision.last_hidden_state,
            text_embeds=text.last_hidden_state,
            vision_attentions=vision.attentions,
            text_attentions=text.attentions,
        )
        return output if _use_return_dict(self, return_dict) else output.to_tuple()


class AlbefForImageTextRetrieval(AlbefMatchingMixin, AlbefPreTrainedModel):
    """ALBEF for image-text retrieval and matching: ITC scores, ITM scores, and ITC+ITM fine-tuning.

    Without `return_loss`, `forward` scores the given (image i, text i) pairs with the ITM head and returns the
    ITC similarity matrix of the batch. With `return_loss=True` it computes the retrieval fine-tuning losses:
    ITC (targets from the image ids `idx` when given, distilled from a momentum teacher when `teacher_outputs`
    and `alpha` are given, against the feature queues when given) and ITM with hard negatives.
    `rank` implements the original evaluation: rank by ITC, re-rank the top k with ITM.
    """

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        self._build_encoders(config)
        self._build_projections(config)
        self._build_itm_head(config)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        return_loss: bool | None = None,
        teacher_outputs: AlbefTeacherOutput | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        idx_queue: torch.Tensor | None = None,
        alpha: float = 0.0,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefRetrievalOutput | tuple:
        """Score pairs, or compute the ITC + ITM fine-tuning losses.

        Args:
            pixel_values: `(batch, channels, height, width)` images; image i pairs with text i.
            input_ids, attention_mask: `(batch, seq_len)` texts.
            idx: `(batch,)` image ids; texts of the same image are all positives in ITC and never negatives in ITM.
            return_loss: compute the losses (default: when `idx` is given).
            teacher_outputs: momentum features of this batch (`compute_teacher_outputs` of the teacher).
            image_queue, text_queue: `(queue_size, embed_dim)` momentum features of earlier batches.
            idx_queue: `(queue_size,)` image ids of the queued features (-100 for empty slots... any id that
                never occurs).
            alpha: distillation weight of the teacher's similarity distribution (0 = hard targets).
            hard_negatives: `(negative image per text, negative text per image)` to use instead of drawing them.
            generator: `torch.Generator` for the negative draw.
        """
        _check_pair_batch(pixel_values, input_ids)
        image_embeds = self.encode_image(pixel_values).last_hidden_state
        text_embeds = self.encode_text(input_ids, attention_mask).last_hidden_state
        return_loss = idx is not None if return_loss is None else return_loss
        if return_loss:
            output, _ = self._itc_and_itm(
                image_embeds,
                text_embeds,
                _ones_if_none(attention_mask, text_embeds),
                idx,
                teacher_outputs,
                image_queue,
                text_queue,
                idx_queue,
                alpha,
                hard_negatives,
                generator,
            )
        else:
            image_feat, text_feat = self.project_image(image_embeds), self.project_text(text_embeds)
            logits_per_image = image_feat @ text_feat.T / self.clamped_temp()
            output = AlbefRetrievalOutput(
                itm_logits=self.itm_logits(text_embeds, attention_mask, image_embeds),
                logits_per_image=logits_per_image,
                logits_per_text=logits_per_image.T,
                image_feat=image_feat,
                text_feat=text_feat,
                image_embeds=image_embeds,
                text_embeds=text_embeds,
            )
        return output if _use_return_dict(self, return_dict) else output.to_tuple()


class AlbefForPreTraining(AlbefMatchingMixin, AlbefPreTrainedModel):
    """ALBEF with its three pretraining objectives: ITC, ITM with hard negatives, and MLM.

    `model(pixel_values, input_ids, attention_mask, return_loss=True)` computes the losses with in-batch
    contrast and hard labels. A trainer that keeps a momentum teacher and feature queues passes
    `teacher_outputs` (from the teacher's `compute_teacher_outputs`), `image_queue`/`text_queue` and `alpha`
    to get momentum distillation exactly as in the original (see `AlbefTrainer`). MLM masking is drawn here
    unless `mlm_input_ids`/`mlm_labels` are given (the data collator normally draws them).
    """

    def __init__(self, config: AlbefConfig) -> None:
        super().__init__(config)
        self._build_encoders(config)
        self._build_projections(config)
        self._build_itm_head(config)
        self.mlm_head = AlbefMLMHead(config.text_config)
        self.post_init()

    def draw_mlm_masks(
        self, input_ids: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked ids and labels for MLM (never [PAD] or [CLS], as in the original)."""
        text_config = self.config.text_config
        return mask_tokens(
            input_ids,
            text_config.vocab_size,
            text_config.mask_token_id,
            (text_config.pad_token_id, text_config.cls_token_id),
            self.config.mlm_probability,
            generator=generator,
        )

    def mlm_logits_at(
        self, mlm_input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        """MLM scores `(batch, seq_len, vocab)` of (masked) texts read with their images, at every position."""
        states = self.text_encoder(
            input_ids=mlm_input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            mode="multimodal",
        ).last_hidden_state
        return self.mlm_head(states, self.text_encoder.embeddings.word_embeddings.weight)

    def _text_and_mlm_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, mlm_input_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Unimodal states of the texts and, in the same pass of the text layers, of their masked copies."""
        if mlm_input_ids is None:
            return self.encode_text(input_ids, attention_mask).last_hidden_state, None
        states = self.encode_text(torch.cat([input_ids, mlm_input_ids]), torch.cat([attention_mask] * 2))
        return states.last_hidden_state.split(input_ids.shape[0])

    def _mlm_scores(self, fused_states: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """MLM scores of the `masked` positions (`(batch, seq_len)` bool) of `fused_states`."""
        return self.mlm_head(fused_states[masked], self.text_encoder.embeddings.word_embeddings.weight)

    @torch.no_grad()
    def compute_teacher_outputs(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        **kwargs,
    ) -> AlbefTeacherOutput:
        """Momentum-teacher outputs: image/text features and, with MLM inputs, MLM scores at masked positions."""
        attention_mask = _ones_if_none(attention_mask, input_ids)
        use_mlm = mlm_input_ids is not None and self.config.mlm_weight > 0
        if use_mlm and mlm_labels is None:
            raise ValueError(
                "the teacher needs `mlm_labels` with `mlm_input_ids` (they say which tokens to score)"
            )
        image_embeds = self.encode_image(pixel_values).last_hidden_state
        text_embeds, mlm_states = self._text_and_mlm_states(
            input_ids, attention_mask, mlm_input_ids if use_mlm else None
        )
        mlm_scores = None
        if use_mlm:
            masked = mlm_labels != -100
            fused = self.fuse(
                mlm_states, attention_mask, image_embeds, needed_tokens=masked
            ).last_hidden_state
            mlm_scores = self._mlm_scores(fused, masked)
        return AlbefTeacherOutput(
            image_feat=self.project_image(image_embeds),
            text_feat=self.project_text(text_embeds),
            mlm_logits=mlm_scores,
        )

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        mlm_input_ids: torch.Tensor | None = None,
        mlm_labels: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        return_loss: bool | None = True,
        teacher_outputs: AlbefTeacherOutput | None = None,
        image_queue: torch.Tensor | None = None,
        text_queue: torch.Tensor | None = None,
        idx_queue: torch.Tensor | None = None,
        alpha: float = 0.0,
        hard_negatives: tuple[torch.Tensor, torch.Tensor] | None = None,
        generator: torch.Generator | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> AlbefPreTrainingOutput | tuple:
        """Compute the pretraining losses (ITC + ITM + MLM) of a batch of image-text pairs.

        The texts and their masked copies share one pass of the text layers, and the ITM pairs and the MLM rows
        share one pass of the fusion layers; the losses are those of separate passes.

        Args:
            pixel_values: `(batch, channels, height, width)` images; image i pairs with text i.
            input_ids, attention_mask: `(batch, seq_len)` texts.
            mlm_input_ids, mlm_labels: `(batch, seq_len)` masked ids and labels (-100 = not masked); drawn with
                `generator` when absent.
            idx: optional `(batch,)` image ids (texts of one image are all positives).
            return_loss: must be true; the losses are what this model computes (use `AlbefModel` or
                `AlbefForImageTextRetrieval` for inference).
            teacher_outputs: the momentum teacher's outputs for this batch (with MLM scores at the same masks).
            image_queue, text_queue, idx_queue: feature queues `(queue_size, embed_dim)` / ids `(queue_size,)`.
            alpha: distillation weight (0 = no distillation).
            hard_negatives: pre-drawn `(negative image per text, negative text per image)`.
            generator: `torch.Generator` for the hard-negative and MLM draws.
        """
        if return_loss is False:
            raise ValueError(
                "AlbefForPreTraining computes the pretraining losses; use AlbefModel for inference"
            )
        _check_pair_batch(pixel_values, input_ids)
        attention_mask = _ones_if_none(attention_mask, input_ids)
        use_mlm = self.config.mlm_weight > 0
        if use_mlm:
            if mlm_input_ids is None:
                mlm_input_ids, mlm_labels = self.draw_mlm_masks(input_ids, generator)
            elif mlm_labels is None:
                raise ValueError("`mlm_labels` must be given with `mlm_input_ids`")
        masked = mlm_labels != -100 if use_mlm else None
        image_embeds = self.encode_image(pixel_values).last_hidden_state
        text_embeds, mlm_states = self._text_and_mlm_states(
            input_ids, attention_mask, mlm_input_ids if use_mlm else None
        )
        matching, mlm_fused = self._itc_and_itm(
            image_embeds,
            text_embeds,
            attention_mask,
            idx,
            teacher_outputs,
            image_queue,
            text_queue,
            idx_queue,
            alpha,
            hard_negatives,
            generator,
            extra_positive_texts=mlm_states,
            extra_needed_tokens=masked,
        )
        output = AlbefPreTrainingOutput(**matching)
        if use_mlm:
            scores = self._mlm_scores(mlm_fused, masked)
            teacher_scores = teacher_outputs.mlm_logits if teacher_outputs is not None else None
            if masked.any():
                output.loss_mlm = mlm_loss(scores, mlm_labels[masked], teacher_scores, alpha)
            else:  # nothing masked in this batch: a zero that keeps the graph
                output.loss_mlm = scores.sum() * 0.0
            output.mlm_logits = scores
            output.mlm_input_ids, output.mlm_labels = mlm_input_ids, mlm_labels
            output.loss = output.loss + self.config.mlm_weight * output.loss_mlm
        return output if _use_return_dict(self, return_dict) else output.to_tuple()


def upload_folder(
    folder: str | os.PathLike,
    repo_id: str,
    commit_message: str | None = None,
    commit_description: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    api: HfApi | None = None,
):
    """Upload every file of `folder` to `repo_id` (created when missing; `revision` is a branch, created when
    missing) in one commit; returns the `CommitInfo`. `save_pretrained(push_to_hub=True)` uploads with it, and
    the Hub layer (`albef_hf.hub`) too."""
    api = api or HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=os.fspath(folder),
        commit_message=commit_message or "Upload with albef-hf",
        commit_description=commit_description,
        revision=revision,
        create_pr=create_pr,
    )


def _module_auto_map(model_class: type) -> dict[str, str]:
    module = model_class.__module__
    auto_map = {"AutoConfig": f"{AlbefConfig.__module__.split('.')[-1]}.{AlbefConfig.__name__}"}
    for cls in _subclasses(AlbefPreTrainedModel):
        if cls.__module__ == module and cls._auto_class is not None:
            auto_map[cls._auto_class] = f"{module.split('.')[-1]}.{cls.__name__}"
    if "AutoModel" in auto_map:  # the base model also serves zero-shot image classification
        auto_map["AutoModelForZeroShotImageClassification"] = auto_map["AutoModel"]
    return auto_map


# `from .name import` and `from ..name import` statements (at any indentation), as transformers finds relative imports
_RELATIVE_IMPORT = re.compile(r"^([ \t]*)from\s+(\.{1,2})(\w+)\s+import", flags=re.MULTILINE)


def _save_flat_code(module_files: list[str], folder: str | os.PathLike) -> None:
    """Copy `module_files` and every module they import relatively (recursively) into `folder`, flat.

    A folder's remote code is one flat directory (transformers resolves `module.Class` references and single-dot
    imports there), while the pipelines sit in a subpackage that imports albef_hf's modules as `from ..name`:
    the copies import them as neighbours, `from .name`.

    Raises:
        ValueError: when two modules would land on one file name.
    """
    sources: dict[str, Path] = {}
    pending = [Path(file) for file in module_files]
    while pending:
        path = pending.pop()
        if sources.setdefault(path.name, path) != path:
            raise ValueError(f"{path} and {sources[path.name]} would both be saved as {path.name}")
        for _, dots, name in _RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")):
            imported = (path.parent if dots == "." else path.parent.parent) / f"{name}.py"
            if imported not in sources.values() and imported not in pending:
                pending.append(imported)
    for name, path in sources.items():
        code = _RELATIVE_IMPORT.sub(r"\1from .\3 import", path.read_text(encoding="utf-8"))
        Path(folder, name).write_text(code, encoding="utf-8")


def _subclasses(cls: type) -> list[type]:
    return [sub for direct in cls.__subclasses__() for sub in (direct, *_subclasses(direct))]


def _ones_if_none(attention_mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    if attention_mask is not None:
        return attention_mask
    return torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)


def _check_pair_batch(pixel_values: torch.Tensor | None, input_ids: torch.Tensor | None) -> None:
    if pixel_values is None or input_ids is None:
        raise ValueError("image-text pairs need both `pixel_values` and `input_ids`")
    if pixel_values.shape[0] != input_ids.shape[0]:
        raise ValueError(
            f"image i pairs with text i: got {pixel_values.shape[0]} images and {input_ids.shape[0]} texts"
        )


def _use_return_dict(model: PreTrainedModel, return_dict: bool | None) -> bool:
    return return_dict if return_dict is not None else model.config.return_dict
