"""Configuration classes of the ALBEF model family.

`AlbefConfig()` with no arguments describes ALBEF-base: a ViT-B/16 image encoder at 256 px and a
BERT-base text side split into 6 text-only layers and 6 fusion layers with cross-attention.
"""

from __future__ import annotations

import math
import os
from typing import Any

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers import PreTrainedConfig

__all__ = ["AlbefConfig", "AlbefTextConfig", "AlbefVisionConfig"]


def check_model_source(name: str | os.PathLike) -> None:
    """Refuse a model name that is neither an existing folder (or file) nor a possible Hub id, saying so
    (transformers would otherwise complain about the form of a repo id, such as `outputs/demo/model` before it
    was made)."""
    if os.path.exists(name):
        return
    try:
        validate_repo_id(os.fspath(name))
    except HFValidationError as error:
        raise FileNotFoundError(
            f"no folder {os.fspath(name)!r} (and it is not a Hub id either: {error})"
        ) from error


class AlbefVisionConfig(PreTrainedConfig):
    r"""Configuration of the ALBEF image encoder, a ViT with a class token and a final LayerNorm.

    The defaults are ViT-B/16 at 256 px as used by ALBEF pretraining (LayerNorm eps 1e-6, exact GELU,
    qkv bias, no dropout).

    Args:
        hidden_size: width of the transformer.
        num_hidden_layers: number of transformer blocks.
        num_attention_heads: attention heads per block.
        intermediate_size: hidden width of the MLP.
        hidden_act: MLP activation (a `transformers.activations.ACT2FN` key).
        layer_norm_eps: LayerNorm epsilon.
        image_size: side of the (square) input image in pixels.
        patch_size: side of a patch in pixels; `image_size` must be a multiple of it.
        num_channels: input channels.
        qkv_bias: whether the fused query/key/value projection has a bias.
        hidden_dropout_prob: dropout after attention and MLP outputs.
        attention_probs_dropout_prob: dropout on attention probabilities.
        conv_stem_channels: `None` (the default, ViT and ALBEF): each patch is one strided convolution. A list
            `[c1, ..., cn]` puts a convolutional stem before it, as hybrid ViTs do: n 3x3 convolutions of stride 2
            with c1, ..., cn channels (GroupNorm and GELU after each), then a convolution over the remaining
            `patch_size / 2**n` pixels to the tokens; `patch_size` must be a multiple of `2**n`. Local features
            (edges, corners) then come from convolutions, which learn from few images what a from-scratch ViT
            learns from many; see the README's "Fine-tuning on your own data".
    """

    model_type = "albef_vision_model"
    base_config_key = "vision_config"

    def __init__(
        self,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        layer_norm_eps: float = 1e-6,
        image_size: int = 256,
        patch_size: int = 16,
        num_channels: int = 3,
        qkv_bias: bool = True,
        hidden_dropout_prob: float = 0.0,
        attention_probs_dropout_prob: float = 0.0,
        conv_stem_channels: list[int] | None = None,
        **kwargs: Any,
    ) -> None:
        _check_numbers(
            "vision",
            dict(hidden_size=hidden_size, num_hidden_layers=num_hidden_layers, num_attention_heads=num_attention_heads,
                 intermediate_size=intermediate_size, image_size=image_size, patch_size=patch_size,
                 num_channels=num_channels),
            dict(hidden_dropout_prob=hidden_dropout_prob, attention_probs_dropout_prob=attention_probs_dropout_prob),
            dict(layer_norm_eps=layer_norm_eps),
        )  # fmt: skip
        if conv_stem_channels is not None:
            conv_stem_channels = [int(channels) for channels in conv_stem_channels]
            if not conv_stem_channels or min(conv_stem_channels) < 1:
                raise ValueError(
                    f"conv_stem_channels must be positive channel counts, got {conv_stem_channels}"
                )
            if patch_size % 2 ** len(conv_stem_channels) != 0:
                raise ValueError(
                    f"patch_size ({patch_size}) must be a multiple of 2**len(conv_stem_channels) "
                    f"({2 ** len(conv_stem_channels)}): each stem convolution halves the resolution"
                )
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"vision hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if image_size % patch_size != 0:
            raise ValueError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.layer_norm_eps = layer_norm_eps
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_channels = num_channels
        self.qkv_bias = qkv_bias
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.conv_stem_channels = conv_stem_channels
        super().__init__(**kwargs)

    @property
    def num_patches(self) -> int:
        """Number of patch tokens (the class token not included)."""
        return (self.image_size // self.patch_size) ** 2


class AlbefTextConfig(PreTrainedConfig):
    r"""Configuration of the BERT-style text side of ALBEF: text layers, then fusion layers.

    Layers `0 .. fusion_layer - 1` are text-only; layers `fusion_layer ..` add cross-attention to the image
    tokens after their self-attention. The parameter names follow BERT, so any BERT checkpoint initialises
    the text side. The defaults are bert-base-uncased with `fusion_layer=6`.

    Args:
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, hidden_act,
        hidden_dropout_prob, attention_probs_dropout_prob, max_position_embeddings, type_vocab_size,
        layer_norm_eps: as in `transformers.BertConfig`.
        fusion_layer: index of the first layer with cross-attention (0 makes every layer a fusion layer).
        encoder_width: width of the image tokens the cross-attention reads (its key/value input size);
            `AlbefConfig` always sets it to the vision width.
        is_decoder: causal self-attention (the VQA answer decoder).
        pad_token_id, cls_token_id, sep_token_id, mask_token_id: special token ids of the tokenizer
            (bert-base-uncased: 0, 101, 102, 103); MLM masking never masks [PAD] or [CLS].
    """

    model_type = "albef_text_model"
    base_config_key = "text_config"

    def __init__(
        self,
        vocab_size: int = 30522,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        intermediate_size: int = 3072,
        hidden_act: str = "gelu",
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.1,
        max_position_embeddings: int = 512,
        type_vocab_size: int = 2,
        layer_norm_eps: float = 1e-12,
        fusion_layer: int = 6,
        encoder_width: int | None = None,
        is_decoder: bool = False,
        pad_token_id: int = 0,
        cls_token_id: int = 101,
        sep_token_id: int = 102,
        mask_token_id: int = 103,
        **kwargs: Any,
    ) -> None:
        _check_numbers(
            "text",
            dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                 num_attention_heads=num_attention_heads, intermediate_size=intermediate_size,
                 max_position_embeddings=max_position_embeddings, type_vocab_size=type_vocab_size,
                 fusion_layer=fusion_layer),
            dict(hidden_dropout_prob=hidden_dropout_prob, attention_probs_dropout_prob=attention_probs_dropout_prob),
            dict(layer_norm_eps=layer_norm_eps),
        )  # fmt: skip
        if hidden_size % num_attention_heads != 0:
            raise ValueError(
                f"text hidden_size ({hidden_size}) must be a multiple of num_attention_heads ({num_attention_heads})"
            )
        if not 0 <= fusion_layer <= num_hidden_layers:
            raise ValueError(
                f"fusion_layer ({fusion_layer}) must lie in [0, num_hidden_layers={num_hidden_layers}]"
            )
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.layer_norm_eps = layer_norm_eps
        self.fusion_layer = fusion_layer
        self.encoder_width = encoder_width if encoder_width is not None else hidden_size
        self.is_decoder = is_decoder
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.mask_token_id = mask_token_id
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class AlbefConfig(PreTrainedConfig):
    r"""Configuration of an ALBEF model: an image encoder, a text/fusion encoder and the ALBEF heads.

    Args:
        vision_config: `AlbefVisionConfig` or its dict (default: ViT-B/16 at 256 px).
        text_config: `AlbefTextConfig` or its dict (default: bert-base-uncased, fusion from layer 6).
        decoder_config: `AlbefTextConfig` or its dict of the VQA answer decoder (`AlbefForQuestionAnswering`);
            `None` for every other model. Its self-attention is causal and its cross-attention reads the question
            states, so `is_decoder` and `encoder_width` (the text width) are set here; the original's decoder is
            the text configuration with 6 layers, every one with cross-attention (`fusion_layer=0`).
        embed_dim: size of the projected, L2-normalised features used by the contrastive (ITC) loss.
        temp: initial value of the learnable contrastive temperature.
        temp_min, temp_max: range the temperature is clamped to when it is used (the original clamps
            to [0.001, 0.5]).
        mlm_probability: probability of masking a token for MLM.
        itc_weight, itm_weight, mlm_weight: weights of the three pretraining losses in the total (1 each in
            the original); a weight of 0 turns an objective off (MLM is then not even computed), which is how
            the ablations of the paper are run.
        hard_negatives: draw ITM negatives with probability softmax(similarity) (the original); `False` draws
            them uniformly (the "random negatives" ablation).
        fusion_layer: shortcut that overrides `text_config.fusion_layer`.
        image_size: shortcut that overrides `vision_config.image_size`.
        initializer_range: std of the normal distribution that initialises every weight matrix.
        kwargs: passed to `PreTrainedConfig` (for example `id2label` of a classification head).

    Example:
        >>> from albef_hf import AlbefConfig, AlbefModel
        >>> config = AlbefConfig()  # ALBEF-base
        >>> model = AlbefModel(config)  # random weights
    """

    model_type = "albef"
    sub_configs = {
        "vision_config": AlbefVisionConfig,
        "text_config": AlbefTextConfig,
        "decoder_config": AlbefTextConfig,
    }
    # Set by albef_hf's registration, never where this module serves as remote code: the package's own pipelines
    # then serve the tasks a saved folder declares in `custom_pipelines`, and the declaration is dropped on load
    # (transformers would otherwise ask for trust_remote_code for them).
    pipelines_registered = False

    def __init__(
        self,
        vision_config: AlbefVisionConfig | dict | None = None,
        text_config: AlbefTextConfig | dict | None = None,
        decoder_config: AlbefTextConfig | dict | None = None,
        embed_dim: int = 256,
        temp: float = 0.07,
        temp_min: float = 0.001,
        temp_max: float = 0.5,
        mlm_probability: float = 0.15,
        itc_weight: float = 1.0,
        itm_weight: float = 1.0,
        mlm_weight: float = 1.0,
        hard_negatives: bool = True,
        fusion_layer: int | None = None,
        image_size: int | None = None,
        initializer_range: float = 0.02,
        **kwargs: Any,
    ) -> None:
        _check_numbers(
            "ALBEF",
            dict(embed_dim=embed_dim),
            dict(mlm_probability=mlm_probability),
            dict(temp=temp, temp_min=temp_min, temp_max=temp_max),
        )
        for name, weight in dict(itc_weight=itc_weight, itm_weight=itm_weight, mlm_weight=mlm_weight).items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < math.inf:
                raise ValueError(f"ALBEF {name} must be a finite number >= 0, got {weight!r}")
        vision_config = _as_config(vision_config, AlbefVisionConfig)
        text_config = _as_config(text_config, AlbefTextConfig)
        if image_size is not None:
            vision_config = AlbefVisionConfig(**{**vision_config.to_dict(), "image_size": image_size})
        if fusion_layer is not None:
            text_config = AlbefTextConfig(**{**text_config.to_dict(), "fusion_layer": fusion_layer})
        # The cross-attention reads the image tokens, so its key/value width is the vision width.
        text_config.encoder_width = vision_config.hidden_size
        if decoder_config is not None:
            decoder_config = _as_config(decoder_config, AlbefTextConfig)
            decoder_config.is_decoder = True
            decoder_config.encoder_width = text_config.hidden_size
        self.vision_config = vision_config
        self.text_config = text_config
        self.decoder_config = decoder_config
        self.embed_dim = embed_dim
        self.temp = temp
        self.temp_min = temp_min
        self.temp_max = temp_max
        self.mlm_probability = mlm_probability
        self.itc_weight = itc_weight
        self.itm_weight = itm_weight
        self.mlm_weight = mlm_weight
        self.hard_negatives = hard_negatives
        self.initializer_range = initializer_range
        if type(self).pipelines_registered:
            kwargs.pop("custom_pipelines", None)
        super().__init__(**kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> AlbefConfig:
        """`PreTrainedConfig.from_pretrained`; a name that is neither a folder nor a possible Hub id is a
        `FileNotFoundError` naming it."""
        check_model_source(pretrained_model_name_or_path)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def fusion_layer(self) -> int:
        """Index of the first text layer with cross-attention to the image."""
        return self.text_config.fusion_layer

    @property
    def image_size(self) -> int:
        """Side of the square input image in pixels."""
        return self.vision_config.image_size


def _check_numbers(
    what: str, integers: dict[str, Any], fractions: dict[str, Any], positive: dict[str, Any]
) -> None:
    """Refuse config values that could only fail later, deep inside torch, with an unclear error (a config.json
    edited by hand or damaged): `integers` must be ints >= 1 (layer counts and indices: >= 0), `fractions`
    numbers in [0, 1], `positive` numbers > 0."""
    for name, value in integers.items():
        lowest = 0 if name in ("num_hidden_layers", "fusion_layer") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{what} {name} must be an integer >= {lowest}, got {value!r}")
    for name, value in {**fractions, **positive}.items():
        number = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
        if not number or (value <= 0 if name in positive else not 0 <= value <= 1):
            bound = "> 0" if name in positive else "in [0, 1]"
            raise ValueError(f"{what} {name} must be a finite number {bound}, got {value!r}")


def _as_config(value: PreTrainedConfig | dict | None, cls: type[PreTrainedConfig]) -> PreTrainedConfig:
    if value is None:
        return cls()
    if isinstance(value, dict):
        return cls(**{k: v for k, v in value.items() if k != "model_type"})
    if not isinstance(value, cls):
        raise TypeError(f"expected a {cls.__name__} or a dict, got {type(value).__name__}")
    return value
