"""Read the committed reference outputs of the original ALBEF (tests/fixtures/albef_original, see extract.py there).

`rename_original_key` is the whole key mapping from an original checkpoint to these models; everything not
named here keeps its name (`vision_proj`, `text_proj`, `itm_head`, `temp`, `cls_head.{0,2}`, `ta_head`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from albef_hf import AlbefConfig, AlbefTextConfig, AlbefVisionConfig, answer_decoder_config

FIXTURES = Path(__file__).parent / "fixtures" / "albef_original"

# Original prefix -> ours. `text_encoder.bert.` exists in pretraining checkpoints, plain `text_encoder.` in the
# fine-tuned ones; the decoders' output projections (`cls.predictions.decoder.*`) are the tied word embeddings.
RENAMED_PREFIXES = (
    ("visual_encoder.", "vision_model."),
    ("text_encoder.bert.", "text_encoder."),
    ("text_encoder.cls.predictions.", "mlm_head."),
    ("text_decoder.bert.", "text_decoder."),
    ("text_decoder.cls.predictions.", "answer_head."),
)
NOT_MODEL_WEIGHTS = ("image_queue", "text_queue", "idx_queue", "queue_ptr")


def rename_original_key(key: str) -> str | None:
    """Our name of an original checkpoint key, or `None` for what the HF models do not hold.

    Dropped: the momentum copies (`visual_encoder_m.*`, `text_encoder_m.*`, ... every top-level name ending in
    `_m`; the Trainer owns the teacher), the queues, the `embeddings.position_ids` buffers, and the
    `cls.predictions.decoder.*` projections tied to the word embeddings.
    """
    if key.split(".")[0].endswith("_m") or key in NOT_MODEL_WEIGHTS:
        return None
    if key.endswith("embeddings.position_ids") or ".cls.predictions.decoder." in key:
        return None
    for old, new in RENAMED_PREFIXES:
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def load_reference(task: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    """`(original state dict, output tensors, json)` of a task ("vqa", "nlvr", "ve", "grounding")."""
    state = load_file(FIXTURES / f"tiny_{task}.safetensors")
    outputs = load_file(FIXTURES / f"tiny_{task}_outputs.safetensors")
    meta = json.loads((FIXTURES / f"tiny_{task}.json").read_text())
    return state, outputs, meta


def config_from_reference(meta: dict) -> AlbefConfig:
    """The AlbefConfig of a reference model, from the sizes the original was built with."""
    spec, bert, ids = meta["tiny_spec"], meta["bert_config"], meta["tokenizer_ids"]
    vision = AlbefVisionConfig(
        hidden_size=spec["vision_width"],
        num_hidden_layers=spec["vision_depth"],
        num_attention_heads=spec["vision_heads"],
        intermediate_size=spec["vision_width"] * spec["mlp_ratio"],
        image_size=spec["image_res"],
        patch_size=spec["patch_size"],
    )
    # model_nlvr.py forces 18 text layers whatever the BERT config says.
    num_layers = 18 if meta["task"] == "nlvr" else bert["num_hidden_layers"]
    text = AlbefTextConfig(
        vocab_size=bert["vocab_size"],
        hidden_size=bert["hidden_size"],
        num_hidden_layers=num_layers,
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        hidden_dropout_prob=bert["hidden_dropout_prob"],
        attention_probs_dropout_prob=bert["attention_probs_dropout_prob"],
        max_position_embeddings=bert["max_position_embeddings"],
        layer_norm_eps=bert["layer_norm_eps"],
        fusion_layer=bert["fusion_layer"],
        pad_token_id=ids["pad"],
        cls_token_id=ids["cls"],
        sep_token_id=ids["sep"],
        mask_token_id=ids["mask"],
    )
    # model_vqa.py: the same BERT config with 6 layers, all with cross-attention.
    decoder = answer_decoder_config(text, num_layers=6) if meta["task"] == "vqa" else None
    return AlbefConfig(
        vision_config=vision,
        text_config=text,
        decoder_config=decoder,
        embed_dim=spec["embed_dim"],
        temp=spec["temp"],
    )


def load_reference_model(task: str, model_class, attn_implementation: str = "sdpa"):
    """The reference model of `task` as a `model_class`, loaded strictly (every weight mapped, none left over),
    with its output tensors and json."""
    state, outputs, meta = load_reference(task)
    renamed = {new: value for key, value in state.items() if (new := rename_original_key(key)) is not None}
    config = config_from_reference(meta)
    config._attn_implementation = attn_implementation
    model = model_class(config)
    model.load_state_dict(renamed, strict=True)
    return model.eval(), outputs, meta
