"""Build an ALBEF model from a separately pretrained vision transformer and/or BERT-like text model.

Either tower may be pretrained or new: a tower without a checkpoint is built from its configuration (its sizes
are the caller's) and starts from a fresh initialisation. The vision tower comes from any saved transformers ViT (`ViTModel`, DeiT checkpoints saved as ViT, ...): its
separate query/key/value projections are fused into ALBEF's `attn.qkv`. The text side comes from a BERT
checkpoint: the text layers below `fusion_layer` take the BERT's first layers, the fusion layers take the
following layers' self-attention and feed-forward weights, and their cross-attention starts random, as in
ALBEF's own initialisation from bert-base-uncased. A BERT masked-LM head, when present, initialises the MLM head.

A plain `BertModel` folder (all-MiniLM-L6-v2, for example) is read as the base model it is, so transformers
prints no warning about a missing head: the report says that the MLM head starts new.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
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
    """What `from_vision_text_pretrained` did: the ALBEF keys copied from each tower, and those left new.

    `vision_source` / `text_source` name the checkpoint of each tower, or are `None` for a tower built new from
    its configuration (all of whose weights are then in `newly_initialized`).
    """

    from_vision: list[str] = field(default_factory=list)
    from_text: list[str] = field(default_factory=list)
    newly_initialized: list[str] = field(default_factory=list)
    vision_source: str | None = None
    text_source: str | None = None

    def summary(self) -> str:
        def tower(name: str, source: str | None, keys: list[str]) -> str:
            return (
                f"{len(keys)} tensors from the {name} model ({source})" if source else f"a new {name} tower"
            )

        return (
            f"{tower('vision', self.vision_source, self.from_vision)}, "
            f"{tower('text', self.text_source, self.from_text)}, "
            f"{len(self.newly_initialized)} newly initialised: {', '.join(_group(self.newly_initialized))}"
        )

    def __str__(self) -> str:
        return "from_vision_text_pretrained: " + self.summary()


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


@contextmanager
def _quiet_transformers():
    """transformers' own loading report (a pooler or head missing or unexpected) would contradict ours, which
    says what ALBEF took from each tower; its warnings are silenced while a tower is read."""
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)


def _load_bert(text_path: str, bert_config: Any) -> tuple[Any, Any]:
    """`(BertModel, BertOnlyMLMHead or None)` of a saved BERT.

    The masked-LM class is used only for a checkpoint saved with a head (its `architectures` say so): reading a
    plain `BertModel` folder through it would make transformers warn about missing and tied head weights.
    """
    from transformers import AutoModel, AutoModelForMaskedLM

    architectures = getattr(bert_config, "architectures", None) or []
    if not any(name.endswith(("ForMaskedLM", "ForPreTraining")) for name in architectures):
        with _quiet_transformers():
            return AutoModel.from_pretrained(text_path), None
    with _quiet_transformers():
        bert, info = AutoModelForMaskedLM.from_pretrained(text_path, output_loading_info=True)
    head_loaded = not any(key.startswith("cls.predictions.transform") for key in info["missing_keys"])
    return bert.bert, bert.cls.predictions if head_loaded else None


def build_from_towers(
    model_class: type,
    vision_path: str | None,
    text_path: str | None,
    fusion_layer: int | None = None,
    image_size: int | None = None,
    vision_config: AlbefVisionConfig | dict | None = None,
    text_config: AlbefTextConfig | dict | None = None,
    **config_kwargs: Any,
):
    """Build `model_class` from a saved ViT and/or a saved BERT; returns `(model, TowerLoadingReport)`.

    A tower whose path is None is built new from `vision_config` / `text_config` (default: ViT-B/16, BERT-base);
    giving a configuration for a tower that comes from a checkpoint is an error, since the checkpoint fixes it.
    """
    from transformers import AutoConfig, AutoModel

    for name, path, given in (("vision", vision_path, vision_config), ("text", text_path, text_config)):
        if path is not None and given is not None:
            raise ValueError(
                f"the {name} tower comes from {path}, whose configuration fixes its sizes: give "
                f"{name}_config only for a {name} tower built new"
            )
    # Both configs are checked before any weights are read, so a wrong tower fails with a clear message.
    if vision_path is not None:
        vision_config = _vision_config(AutoConfig.from_pretrained(vision_path), image_size)
    else:
        vision_config = AlbefConfig(vision_config=vision_config, image_size=image_size).vision_config
    if text_path is not None:
        bert_config = AutoConfig.from_pretrained(text_path)
        _require_bert(bert_config)
        text_config = _text_config(bert_config, fusion_layer, _special_ids(text_path, bert_config.vocab_size))
    else:
        text_config = AlbefConfig(text_config=text_config, fusion_layer=fusion_layer).text_config
    config = AlbefConfig(vision_config=vision_config, text_config=text_config, **config_kwargs)
    model = model_class(config)

    vision_state, text_state = {}, {}
    if vision_path is not None:
        with _quiet_transformers():
            vit = AutoModel.from_pretrained(vision_path)
        vision_state = {
            f"vision_model.{k}": v
            for k, v in map_vit_state_dict(vit.state_dict(), vision_config.num_patches).items()
        }
    if text_path is not None:
        bert, head = _load_bert(text_path, bert_config)
        text_state = {
            f"text_encoder.{k}": v for k, v in bert.state_dict().items() if not k.startswith("pooler.")
        }
        if head is not None and hasattr(model, "mlm_head"):
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
        vision_source=None if vision_path is None else str(vision_path),
        text_source=None if text_path is None else str(text_path),
    )
    # What a task model built from this one (`from_pretrained_albef`) must not report as pretrained, as long as it
    # is untouched: a tensor's version counter moves with every in-place change (an optimizer step, a load).
    state = model.state_dict()
    model.newly_initialized_versions = {key: state[key]._version for key in report.newly_initialized}
    return model, report
