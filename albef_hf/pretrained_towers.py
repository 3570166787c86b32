"""Build an ALBEF model from a separately pretrained vision transformer and BERT-like text model.

The vision tower comes from any saved transformers ViT (`ViTModel`, DeiT checkpoints saved as ViT, ...): its
separate query/key/value projections are fused into ALBEF's `attn.qkv`. The text side comes from a BERT
checkpoint: the text layers below `fusion_layer` take the BERT's first layers, the fusion layers take the
following layers' self-attention and feed-forward weights, and their cross-attention starts random, as in
ALBEF's own initialisation from bert-base-uncased. A BERT masked-LM head, when present, initialises the MLM head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.utils import logging

from .configuration_albef import AlbefConfig, AlbefTextConfig, AlbefVisionConfig
from .modeling_albef import interpolate_pos_embed

logger = logging.get_logger(__name__)

__all__ = ["TowerLoadingReport", "build_from_towers"]


@dataclass
class TowerLoadingReport:
    """What `from_vision_text_pretrained` did: the ALBEF keys copied from each tower, and those left new."""

    from_vision: list[str] = field(default_factory=list)
    from_text: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{len(self.from_vision)} tensors from the vision model, {len(self.from_text)} from the text model, "
            f"{len(self.newly_initialized)} newly initialised: {', '.join(_group(self.newly_initialized))}"
        )


def _group(keys: list[str]) -> list[str]:
    """Collapse per-layer keys (`...layer.7.crossattention.self.key.weight`) into readable patterns."""
    return sorted({re.sub(r"\.\d+\.", ".*.", key).rsplit(".", 1)[0] for key in keys})


# In-memory key layouts of transformers' ViTModel: current (`layers.N.attention.q_proj`) and earlier
# (`encoder.layer.N.attention.attention.query`). Both are accepted so that the loader does not depend on
# the installed transformers version.
_VIT_LAYER_PATTERNS = {
    "q": (r"layers\.(\d+)\.attention\.q_proj\.", r"encoder\.layer\.(\d+)\.attention\.attention\.query\."),
    "k": (r"layers\.(\d+)\.attention\.k_proj\.", r"encoder\.layer\.(\d+)\.attention\.attention\.key\."),
    "v": (r"layers\.(\d+)\.attention\.v_proj\.", r"encoder\.layer\.(\d+)\.attention\.attention\.value\."),
    "attn.proj": (
        r"layers\.(\d+)\.attention\.o_proj\.",
        r"encoder\.layer\.(\d+)\.attention\.output\.dense\.",
    ),
    "norm1": (r"layers\.(\d+)\.layernorm_before\.", r"encoder\.layer\.(\d+)\.layernorm_before\."),
    "norm2": (r"layers\.(\d+)\.layernorm_after\.", r"encoder\.layer\.(\d+)\.layernorm_after\."),
    "mlp.fc1": (r"layers\.(\d+)\.mlp\.fc1\.", r"encoder\.layer\.(\d+)\.intermediate\.dense\."),
    "mlp.fc2": (r"layers\.(\d+)\.mlp\.fc2\.", r"encoder\.layer\.(\d+)\.output\.dense\."),
}
_VIT_GLOBAL = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def _vision_config(vit_config: Any, image_size: int | None) -> AlbefVisionConfig:
    if getattr(vit_config, "model_type", None) != "vit":
        raise ValueError(
            f"the vision model must be a transformers ViT (model_type 'vit'; DeiT weights saved as ViT work), "
            f"got {vit_config.model_type!r}"
        )
    patch = vit_config.patch_size if isinstance(vit_config.patch_size, int) else vit_config.patch_size[0]
    size = vit_config.image_size if isinstance(vit_config.image_size, int) else vit_config.image_size[0]
    return AlbefVisionConfig(
        hidden_size=vit_config.hidden_size,
        num_hidden_layers=vit_config.num_hidden_layers,
        num_attention_heads=vit_config.num_attention_heads,
        intermediate_size=vit_config.intermediate_size,
        hidden_act=vit_config.hidden_act,
        layer_norm_eps=vit_config.layer_norm_eps,
        image_size=image_size or size,
        patch_size=patch,
        num_channels=vit_config.num_channels,
        qkv_bias=vit_config.qkv_bias,
    )


def map_vit_state_dict(state: dict[str, torch.Tensor], num_patches: int) -> dict[str, torch.Tensor]:
    """Map a transformers ViT state dict onto `AlbefVisionModel` names (without the `vision_model.` prefix).

    Query, key and value are fused into `attn.qkv`; the pooler is dropped; position embeddings are resized
    to `num_patches` when the image size changes. Raises ValueError on a key it does not know.
    """
    mapped: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        key = key.removeprefix("vit.")
        if key.startswith("pooler."):
            continue
        if key in _VIT_GLOBAL:
            mapped[_VIT_GLOBAL[key]] = tensor
            continue
        for target, patterns in _VIT_LAYER_PATTERNS.items():
            match = next((m for p in patterns if (m := re.match(p + r"(weight|bias)$", key))), None)
            if match is None:
                continue
            layer, kind = int(match.group(1)), match.group(2)
            if target in ("q", "k", "v"):
                qkv.setdefault((layer, kind), {})[target] = tensor
            else:
                mapped[f"blocks.{layer}.{target}.{kind}"] = tensor
            break
        else:
            raise ValueError(f"unexpected key in the vision model: {key!r}")
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"vision layer {layer}: incomplete query/key/value {kind}s ({sorted(parts)})")
        mapped[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if "pos_embed" in mapped:
        mapped["pos_embed"] = interpolate_pos_embed(mapped["pos_embed"], num_patches)
    return mapped


def _require_bert(bert_config: Any) -> None:
    if getattr(bert_config, "model_type", None) != "bert":
        raise ValueError(
            f"the text model must be a BERT model (model_type 'bert'), got {bert_config.model_type!r}; other "
            "families differ in position ids or layer layout"
        )


def _text_config(bert_config: Any, fusion_layer: int | None, special_ids: dict[str, int]) -> AlbefTextConfig:
    num_layers = bert_config.num_hidden_layers
    return AlbefTextConfig(
        vocab_size=bert_config.vocab_size,
        hidden_size=bert_config.hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=bert_config.num_attention_heads,
        intermediate_size=bert_config.intermediate_size,
        hidden_act=bert_config.hidden_act,
        hidden_dropout_prob=bert_config.hidden_dropout_prob,
        attention_probs_dropout_prob=bert_config.attention_probs_dropout_prob,
        max_position_embeddings=bert_config.max_position_embeddings,
        type_vocab_size=bert_config.type_vocab_size,
        layer_norm_eps=bert_config.layer_norm_eps,
        fusion_layer=num_layers // 2 if fusion_layer is None else fusion_layer,
        **special_ids,
    )


def _special_ids(text_path: str, vocab_size: int) -> dict[str, int]:
    # The MLM masker needs [PAD]/[CLS]/[SEP]/[MASK] ids; they live in the tokenizer, not in a BERT config.
    # transformers builds a default 5-token tokenizer for a folder without tokenizer files, so a tokenizer
    # whose size differs from the model's vocabulary is not this model's and is not trusted.
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(text_path)
    except (OSError, ValueError):
        tokenizer = None
    if tokenizer is None or len(tokenizer) != vocab_size:
        logger.warning(
            "no tokenizer of this vocabulary in %s: keeping the bert-base-uncased special ids", text_path
        )
        return {}
    names = ("pad_token_id", "cls_token_id", "sep_token_id", "mask_token_id")
    return {name: getattr(tokenizer, name) for name in names if getattr(tokenizer, name, None) is not None}


def build_from_towers(
    model_class: type,
    vision_path: str,
    text_path: str,
    fusion_layer: int | None = None,
    image_size: int | None = None,
    **config_kwargs: Any,
):
    """Build `model_class` from a saved ViT and a saved BERT; returns `(model, TowerLoadingReport)`."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    # Both configs are checked before any weights are read, so a wrong tower fails with a clear message.
    vision_config = _vision_config(AutoConfig.from_pretrained(vision_path), image_size)
    bert_config = AutoConfig.from_pretrained(text_path)
    _require_bert(bert_config)
    text_config = _text_config(bert_config, fusion_layer, _special_ids(text_path, bert_config.vocab_size))
    vit = AutoModel.from_pretrained(vision_path)
    bert, info = AutoModelForMaskedLM.from_pretrained(text_path, output_loading_info=True)
    config = AlbefConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)
    model = model_class(config)

    vision_state = {
        f"vision_model.{k}": v
        for k, v in map_vit_state_dict(vit.state_dict(), vision_config.num_patches).items()
    }
    text_state = {
        f"text_encoder.{k}": v for k, v in bert.bert.state_dict().items() if not k.startswith("pooler.")
    }
    head_loaded = not any(key.startswith("cls.predictions.transform") for key in info["missing_keys"])
    if head_loaded and hasattr(model, "mlm_head"):
        head = bert.cls.predictions
        text_state["mlm_head.bias"] = head.bias
        text_state.update({f"mlm_head.transform.{k}": v for k, v in head.transform.state_dict().items()})

    model_state = model.state_dict()
    loaded = {**vision_state, **text_state}
    for key, tensor in loaded.items():
        if key not in model_state:
            raise ValueError(f"pretrained tensor {key!r} has no place in {model_class.__name__}")
        if model_state[key].shape != tensor.shape:
            raise ValueError(
                f"{key}: pretrained shape {tuple(tensor.shape)} != model shape {tuple(model_state[key].shape)}"
            )
    model.load_state_dict(loaded, strict=False)
    report = TowerLoadingReport(
        from_vision=sorted(vision_state),
        from_text=sorted(text_state),
        newly_initialized=sorted(set(model_state) - set(loaded)),
    )
    logger.warning("from_vision_text_pretrained: %s", report.summary())
    return model, report
