"""Helpers of the conversion tests: the fixture paths, a bert-base-uncased-shaped tokenizer, and an
independent forward pass of the original ALBEF computation written directly over original checkpoint keys.

The reference forward uses only `torch.nn.functional` on the original tensors (timm ViT and BERT as the
original runs them, with its additive -10000 padding mask), so it shares no code with albef_hf.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import BertTokenizer

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "albef_original"
TINY_CONFIG = FIXTURES / "albef_tiny.yaml"  # the tiny models' ALBEF config, original format
SCRIPT = Path(__file__).resolve().parents[2] / "convert" / "convert_albef_original_to_hf.py"
TOLERANCE = 1e-4  # the bound on the max abs difference, fp32
# The original's retrieval and grounding fixtures hold the same tensors: one file serves both.
_CHECKPOINT_FILE = {"retrieval": "grounding"}


@dataclass
class Reference:
    """What the original recorded for one task: `tensors` (flat names such as `eval.logits`), `values` (the
    non-tensor outputs: `inputs.alpha`, `inputs.k_test`, the drawn hard negatives, ...) and the json `meta`."""

    tensors: dict[str, torch.Tensor]
    values: dict
    meta: dict

    def __getitem__(self, name: str):
        return self.tensors[name] if name in self.tensors else self.values[name]

    def grads(self) -> dict[str, torch.Tensor]:
        """Recorded gradients by original parameter name."""
        return {
            k.removeprefix("train.grads."): v for k, v in self.tensors.items() if k.startswith("train.grads.")
        }


def load_reference(task: str) -> Reference:
    meta = json.loads((FIXTURES / f"tiny_{task}.json").read_text())
    return Reference(load_file(FIXTURES / f"tiny_{task}_outputs.safetensors"), meta.pop("values"), meta)


def write_original_checkpoint(task: str, folder: Path) -> Path:
    """The task's original checkpoint as the original training scripts save it (`{"model": state_dict}`).

    The pretraining file is the original, byte for byte. The others are stored without their momentum copies
    (equal to the student in these fixtures); they are restored here, for exactly the modules and key count the
    original had (original_momentum.json), so the converter reads the faithful layout.
    """
    if task == "pretrain":
        return FIXTURES / "tiny_pretrain.pth"
    state = load_file(FIXTURES / f"tiny_{_CHECKPOINT_FILE.get(task, task)}.safetensors")
    momentum = json.loads((FIXTURES / "original_momentum.json").read_text())[task]
    copies = {}
    for key, tensor in state.items():
        root, _, rest = key.partition(".")
        if f"{root}_m" in momentum["roots"]:
            copies[f"{root}_m.{rest}"] = tensor.clone()
    assert len(copies) == momentum["keys"], (
        f"{task}: restored {len(copies)} momentum keys, the original had {momentum['keys']}"
    )
    path = folder / f"{task}.pth"
    torch.save({"model": {**state, **copies}}, path)
    return path


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    return (actual.detach().double() - expected.double()).abs().max().item()


def assert_parity(
    actual: torch.Tensor, expected: torch.Tensor, what: str, tolerance: float = TOLERANCE
) -> None:
    diff = max_abs_diff(actual, expected)
    assert diff <= tolerance, f"{what}: max abs diff {diff:.3e} > {tolerance:.0e}"


def write_tokenizer(folder: Path, vocab_size: int = 1000) -> Path:
    """A BERT tokenizer with bert-base-uncased's special-token ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103) over a `vocab_size` vocabulary, saved as a tokenizer folder."""
    words = "a an the of and is are dog cat red blue green circle square left right two man woman".split()
    vocab = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    vocab += [f"tok{i}" for i in range(vocab_size - len(vocab))]
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(vocab_file)).save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------
# Reference forward over original keys
# ----------------------------------------------------------------------------------------------


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)


def reference_vit(
    sd: dict, pixels: torch.Tensor, heads: int, prefix: str = "visual_encoder."
) -> torch.Tensor:
    """timm's VisionTransformer forward (as ALBEF's models/vit.py), over `visual_encoder.*` keys."""

    def w(name):
        return sd[prefix + name]

    patch = w("patch_embed.proj.weight").shape[-1]
    x = F.conv2d(pixels, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([w("cls_token").expand(x.shape[0], -1, -1), x], dim=1) + w("pos_embed")
    width = x.shape[-1]
    block = 0
    while f"{prefix}blocks.{block}.norm1.weight" in sd:
        b = f"blocks.{block}."
        h = F.layer_norm(x, (width,), w(b + "norm1.weight"), w(b + "norm1.bias"), 1e-6)
        qkv = F.linear(h, w(b + "attn.qkv.weight"), w(b + "attn.qkv.bias"))
        q, k, v = (_split_heads(t, heads) for t in qkv.chunk(3, dim=-1))
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        x = x + F.linear(attn.transpose(1, 2).flatten(2), w(b + "attn.proj.weight"), w(b + "attn.proj.bias"))
        h = F.layer_norm(x, (width,), w(b + "norm2.weight"), w(b + "norm2.bias"), 1e-6)
        x = x + F.linear(
            F.gelu(F.linear(h, w(b + "mlp.fc1.weight"), w(b + "mlp.fc1.bias"))),
            w(b + "mlp.fc2.weight"),
            w(b + "mlp.fc2.bias"),
        )
        block += 1
    return F.layer_norm(x, (width,), w("norm.weight"), w("norm.bias"), 1e-6)


def _bert_attention(sd, p, x, context, additive_mask, heads):
    def lin(name, inp):
        return F.linear(inp, sd[p + name + ".weight"], sd[p + name + ".bias"])

    q, k, v = (
        _split_heads(lin(f"self.{n}", inp), heads)
        for n, inp in (("query", x), ("key", context), ("value", context))
    )
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    if additive_mask is not None:
        scores = scores + additive_mask
    out = (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)
    return F.layer_norm(
        lin("output.dense", out) + x,
        (x.shape[-1],),
        sd[p + "output.LayerNorm.weight"],
        sd[p + "output.LayerNorm.bias"],
        1e-12,
    )


def reference_bert(
    sd: dict,
    prefix: str,
    heads: int,
    layers: range,
    attention_mask: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    image: torch.Tensor | list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """ALBEF's xbert BertModel forward over `prefix` keys (`text_encoder.bert.` or `text_encoder.`): embeddings
    (when `input_ids` are given), then `layers`, each with cross-attention to `image` where the checkpoint has it.

    With a list of images (NLVR2), layer L reads image `(L - fusion_layer) % len(images)`, as xbert does."""
    images = image if isinstance(image, list) else [image]
    fusion = min(
        (i for i in range(1000) if f"{prefix}encoder.layer.{i}.crossattention.self.key.weight" in sd),
        default=0,
    )
    if hidden is None:
        e = prefix + "embeddings."
        length = input_ids.shape[1]
        hidden = (
            sd[e + "word_embeddings.weight"][input_ids]
            + sd[e + "position_embeddings.weight"][:length]
            + sd[e + "token_type_embeddings.weight"][0]
        )
        hidden = F.layer_norm(
            hidden, (hidden.shape[-1],), sd[e + "LayerNorm.weight"], sd[e + "LayerNorm.bias"], 1e-12
        )
    additive = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0
    for index in layers:
        p = f"{prefix}encoder.layer.{index}."
        hidden = _bert_attention(sd, p + "attention.", hidden, hidden, additive, heads)
        if p + "crossattention.self.key.weight" in sd:
            context = images[(index - fusion) % len(images)]
            hidden = _bert_attention(sd, p + "crossattention.", hidden, context, None, heads)
        inner = F.gelu(
            F.linear(hidden, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"])
        )
        hidden = F.layer_norm(
            F.linear(inner, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"]) + hidden,
            (hidden.shape[-1],),
            sd[p + "output.LayerNorm.weight"],
            sd[p + "output.LayerNorm.bias"],
            1e-12,
        )
    return hidden


def reference_mlm_logits(
    sd: dict, hidden: torch.Tensor, prefix: str = "text_encoder.cls.predictions."
) -> torch.Tensor:
    """BERT's LM prediction head with its own (tied) decoder copy."""
    h = F.gelu(F.linear(hidden, sd[prefix + "transform.dense.weight"], sd[prefix + "transform.dense.bias"]))
    h = F.layer_norm(
        h,
        (h.shape[-1],),
        sd[prefix + "transform.LayerNorm.weight"],
        sd[prefix + "transform.LayerNorm.bias"],
        1e-12,
    )
    return F.linear(h, sd[prefix + "decoder.weight"], sd[prefix + "decoder.bias"])
