"""The BERT-style text side of ALBEF: text layers, fusion layers with cross-attention, and the MLM head.

Parameter names follow BERT (`embeddings.*`, `encoder.layer.N.attention.self.query`, ...), so a BERT
checkpoint initialises the text layers, and the original ALBEF `text_encoder.bert.*` keys map onto
`text_encoder.*` one to one. Layers from `config.fusion_layer` on carry a `crossattention` block that
reads the image tokens (key/value width `config.encoder_width`).

With `config.is_decoder` the self-attention is causal and the model can run incrementally with a
`transformers` `Cache` (the VQA answer decoder under `generate()`): a `DynamicCache` keeps the
self-attention keys/values, an `EncoderDecoderCache` also keeps the cross-attention keys/values of the
states it attends to, which do not change while decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, EncoderDecoderCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput

from .configuration_albef import AlbefTextConfig

__all__ = [
    "AlbefDropout",
    "AlbefMLMHead",
    "AlbefTextEncoderOutput",
    "AlbefTextModel",
    "TokenPacking",
    "apply_dropout",
    "attention_forward",
    "padding_mask",
    "text_lengths",
]

TextMode = str  # "text" | "fusion" | "multimodal"


def padding_mask(attention_mask: torch.Tensor | None, causal: bool = False, query_length: int | None = None):
    """Turn a `(batch, key_len)` 0/1 padding mask into a boolean `(batch, 1, q_len or 1, key_len)` mask.

    `True` means "may attend". With `causal=True` each query position also only sees keys at or before it
    (the keys are assumed to end with the queries, as in cached decoding).
    Returns `None` when nothing is masked, which lets SDPA pick its fastest kernel.
    """
    if attention_mask is None and not causal:
        return None
    mask = None
    if attention_mask is not None:
        mask = attention_mask[:, None, None, :].bool()
        if not causal and bool(mask.all()):
            return None
    if causal:
        key_length = attention_mask.shape[-1] if attention_mask is not None else query_length
        query_length = query_length if query_length is not None else key_length
        offset = key_length - query_length
        device = attention_mask.device if attention_mask is not None else None
        rows = torch.arange(query_length, device=device)[:, None] + offset
        causal_mask = rows >= torch.arange(key_length, device=device)[None, :]
        mask = causal_mask[None, None] if mask is None else mask & causal_mask[None, None]
    return mask


def text_lengths(attention_mask: torch.Tensor) -> torch.Tensor:
    """`(batch,)` tokens of each row up to its last unmasked one (at least 1, the [CLS]): what a row can be
    cut to without changing what its tokens attend to."""
    positions = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    return (attention_mask.bool() * positions).amax(dim=1).clamp(min=1)


@dataclass
class TokenPacking:
    """The real (non-padding) tokens of a padded `(batch, seq_len)` text batch, packed into one row each.

    In training, the linear layers of the text and fusion layers run on the packed `(num_tokens, hidden)` states,
    so padding costs almost no compute (captions of a batch differ in length: the synthetic world's average 60% of
    the longest); attention unpacks its queries, keys and values to `(batch, seq_len)` with zeros at the padding,
    which the attention mask hides. Real tokens get the same states as in a padded pass.

    The packed rows are the real tokens plus the first padding positions needed to make their count a multiple of
    `row_multiple` (or all positions). Without that, nearly every batch has a row count of its own, and the CPU
    kernels built and cached per shape (oneDNN's) made the bf16 demo's steps 15% slower by its 300th step and its
    process 1.2 GB larger (`benchmarks/bench_demo.py --steps 400`); with multiples of 64 its steps stay at their
    first speed (fp32: +2% FLOPs, no slower).
    """

    index: torch.Tensor
    batch_size: int
    seq_len: int
    row_multiple: ClassVar[int] = 64

    @classmethod
    def of(cls, attention_mask: torch.Tensor | None) -> TokenPacking | None:
        """The packing of `attention_mask` (1 = token), or None when there is no padding to skip."""
        if attention_mask is None or attention_mask.dim() != 2 or bool(attention_mask.all()):
            return None
        flat = attention_mask.flatten()
        rows = min(flat.numel(), -(-int(flat.count_nonzero()) // cls.row_multiple) * cls.row_multiple)
        # the tokens first, then the padding, each in order (a stable sort): the first `rows` are the packing
        index = flat.argsort(descending=True, stable=True)[:rows].sort().values
        return cls(index, attention_mask.shape[0], attention_mask.shape[1])

    def pack(self, states: torch.Tensor) -> torch.Tensor:
        """`(batch, seq_len, width)` -> `(num_tokens, width)`."""
        return states.flatten(0, 1).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """`(num_tokens, width)` -> `(batch, seq_len, width)`, zeros at the padding."""
        full = packed.new_zeros(self.batch_size * self.seq_len, packed.shape[-1])
        return full.index_copy(0, self.index, packed).view(self.batch_size, self.seq_len, -1)


def apply_dropout(hidden: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """`F.dropout` (inverted: kept values scaled by `1 / (1 - p)`), about 3x faster on a CPU.

    On a CPU, drawing one random number per element dominates dropout (`bernoulli_` took ~15% of a bf16
    pretraining step). Here each 64-bit draw gives the keep/drop decisions of four elements (16 random bits
    each, so `p` is honoured to 1/65536). Seeded by torch's default generator, so runs stay reproducible and
    resumable. Other devices use `F.dropout` (its fused kernels are faster there).
    """
    if not training or p == 0.0:
        return hidden
    if hidden.device.type != "cpu" or not 0.0 < p < 1.0:
        return F.dropout(hidden, p, training)
    count = hidden.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    keep = words.view(torch.int16)[:count].view(hidden.shape) >= round(p * 65536) - 32768
    return hidden * keep.to(hidden.dtype).mul_(1.0 / (1.0 - p))


class AlbefDropout(nn.Dropout):
    """`nn.Dropout` through `apply_dropout` (faster on a CPU)."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return apply_dropout(hidden, self.p, self.training)


def _eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
    # in float32 whatever the scores' precision, as transformers' eager attention does: the same values as bf16's
    # softmax (it computes in float32 inside), and on a CPU 2-4x faster over these short rows, forward and backward
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(value.dtype)
    output = torch.matmul(apply_dropout(probs, dropout, module.training), value)
    return output.transpose(1, 2), probs


def attention_forward(
    module: nn.Module,
    implementation: str | None,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float,
    output_attentions: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Multi-head attention through the transformers attention interface.

    `query/key/value` are `(batch, heads, len, head_dim)`; the output is `(batch, q_len, heads, head_dim)`
    and the attention probabilities `(batch, heads, q_len, k_len)` when they are asked for. Maps need the
    eager path (SDPA never materialises them), so asking for them switches this call to eager.
    """
    if output_attentions or implementation in (None, "eager"):
        return _eager_attention(module, query, key, value, attention_mask, scaling, dropout)
    interface = ALL_ATTENTION_FUNCTIONS[implementation]
    output, _ = interface(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=False
    )
    return output, None


class AlbefTextEmbeddings(nn.Module):
    """Word + position + token-type embeddings, LayerNorm and dropout, as in BERT."""

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = AlbefDropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        past_length: int = 0,
    ) -> torch.Tensor:
        seq_length = input_ids.shape[1]
        positions = torch.arange(past_length, past_length + seq_length, device=input_ids.device)
        embeddings = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        if token_type_ids is None:
            embeddings = embeddings + self.token_type_embeddings.weight[0]
        else:
            embeddings = embeddings + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(embeddings))


class AlbefTextSelfAttention(nn.Module):
    """Query/key/value projections of a self- or cross-attention block (BERT names)."""

    def __init__(
        self, config: AlbefTextConfig, is_cross_attention: bool, layer_idx: int | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False  # masks are always explicit
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def _heads(self, states: torch.Tensor) -> torch.Tensor:
        return states.view(*states.shape[:-1], self.num_heads, self.head_dim).transpose(1, 2)

    def project_key_value(self, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value heads `(batch, heads, len, head_dim)` of `states`."""
        return self._heads(self.key(states)), self._heads(self.value(states))

    def _cached_key_value(
        self, states: torch.Tensor, cache: Cache | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Key/value heads of `states`, read from or appended to `cache` when one is given."""
        if cache is None:
            return self.project_key_value(states)
        if not self.is_cross_attention:
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            return self_cache.update(*self.project_key_value(states), self.layer_idx)
        if not isinstance(cache, EncoderDecoderCache):  # only self-attention is cached
            return self.project_key_value(states)
        if cache.is_updated.get(self.layer_idx):
            layer = cache.cross_attention_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        key, value = cache.cross_attention_cache.update(*self.project_key_value(states), self.layer_idx)
        cache.is_updated[self.layer_idx] = True
        return key, value

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        cache: Cache | None = None,
        key_value_index: torch.Tensor | None = None,
        projected_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        packing: TokenPacking | None = None,
        key_value_packing: TokenPacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of `hidden_states` (packed by `packing` when given) to themselves, or to `key_value_states`
        (packed by `key_value_packing` when given: the self-attention of a subset of a text's tokens)."""
        unpack = packing.unpack if packing is not None else (lambda states: states)
        query = self._heads(unpack(self.query(hidden_states)))
        if key_value_states is None:
            key_value_states, key_value_packing = hidden_states, packing
        if projected_key_value is not None:  # projected beforehand by `project_key_value`
            key, value = projected_key_value
        elif key_value_packing is not None:
            key, value = (
                self._heads(key_value_packing.unpack(self.key(key_value_states))),
                self._heads(key_value_packing.unpack(self.value(key_value_states))),
            )
        else:
            key, value = self._cached_key_value(key_value_states, cache)
        group = _group_size(key_value_index, key.shape[0]) if key_value_index is not None else None
        if group is not None and query.shape[2] == 1 and packing is None and not output_attentions:
            # one-token rows, `group` consecutive ones per key row (VQA candidates of one question): they attend as
            # the `group` queries of one sequence, without a copy of the keys/values per row
            return self._attend_grouped(query, key, value, attention_mask, group), None
        if key_value_index is not None:
            # keys/values were projected once per distinct image; each text row picks its image's (index_select:
            # its backward adds rows, cheaper than advanced indexing's accumulating index_put on a CPU)
            key, value = key.index_select(0, key_value_index), value.index_select(0, key_value_index)
        output, probs = attention_forward(
            self,
            self.config._attn_implementation,
            query,
            key,
            value,
            attention_mask,
            self.scaling,
            self.dropout_prob if self.training else 0.0,
            output_attentions,
        )
        output = output.reshape(*output.shape[:2], -1)
        return (output if packing is None else packing.pack(output)), probs

    def _attend_grouped(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        group: int,
    ) -> torch.Tensor:
        """Attention of `(groups * group, heads, 1, head_dim)` queries, rows `g * group ...` reading key row `g`."""
        rows, heads, _, head_dim = query.shape
        grouped = query.view(rows // group, group, heads, head_dim).transpose(1, 2)
        if attention_mask is not None:  # the rows of a group share their key row's mask
            attention_mask = attention_mask[::group]
        output, _ = attention_forward(
            self,
            self.config._attn_implementation,
            grouped,
            key,
            value,
            attention_mask,
            self.scaling,
            self.dropout_prob if self.training else 0.0,
            False,
        )
        return output.reshape(rows, 1, heads * head_dim)


def _group_size(index: torch.Tensor, num_keys: int) -> int | None:
    """`n` when `index` is `[0] * n + [1] * n + ... + [num_keys - 1] * n`, else None."""
    if index.dim() != 1 or index.shape[0] % num_keys:
        return None
    group = index.shape[0] // num_keys
    expected = torch.arange(num_keys, device=index.device).repeat_interleave(group)
    return group if torch.equal(index, expected) else None


class AlbefTextResidualOutput(nn.Module):
    """Projection back to the hidden size, dropout, residual and LayerNorm (post-norm, as in BERT)."""

    def __init__(self, config: AlbefTextConfig, input_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(input_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = AlbefDropout(config.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + residual)


class AlbefTextAttention(nn.Module):
    """A self- or cross-attention block: `self` (projections) and `output` (dense + LayerNorm)."""

    def __init__(
        self, config: AlbefTextConfig, is_cross_attention: bool = False, layer_idx: int | None = None
    ) -> None:
        super().__init__()
        self.self = AlbefTextSelfAttention(config, is_cross_attention, layer_idx)
        self.output = AlbefTextResidualOutput(config, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        key_value_states: torch.Tensor | None = None,
        output_attentions: bool = False,
        cache: Cache | None = None,
        key_value_index: torch.Tensor | None = None,
        projected_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        packing: TokenPacking | None = None,
        key_value_packing: TokenPacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, probs = self.self(
            hidden_states,
            attention_mask,
            key_value_states,
            output_attentions,
            cache,
            key_value_index,
            projected_key_value,
            packing,
            key_value_packing,
        )
        return self.output(attended, hidden_states), probs


class AlbefTextIntermediate(nn.Module):
    """First half of the feed-forward block: dense + activation."""

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(hidden_states))


class AlbefTextLayer(GradientCheckpointingLayer):
    """A BERT layer; from `config.fusion_layer` on, cross-attention to the image follows the self-attention."""

    def __init__(self, config: AlbefTextConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = AlbefTextAttention(config, layer_idx=layer_idx)
        self.has_cross_attention = layer_idx >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = AlbefTextAttention(config, is_cross_attention=True, layer_idx=layer_idx)
        self.intermediate = AlbefTextIntermediate(config)
        self.output = AlbefTextResidualOutput(config, config.intermediate_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
        cache: Cache | None = None,
        encoder_index: torch.Tensor | None = None,
        encoder_key_value: tuple[torch.Tensor, torch.Tensor] | None = None,
        first_token_only: bool = False,
        self_attended: bool = False,
        packing: TokenPacking | None = None,
        query_packing: TokenPacking | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One layer; with `first_token_only`, only the first token's state is computed (the others still serve
        as keys and values of the self-attention), which is all a head on [CLS] reads of the last layer; with
        `query_packing`, only the states of its tokens are computed, and returned packed by it; with
        `self_attended`, `hidden_states` have been through this layer's self-attention already."""
        all_tokens, all_packing = hidden_states, packing
        if query_packing is not None:  # the queries: a subset of the tokens, which all stay keys and values
            hidden_states = query_packing.pack(
                hidden_states if packing is None else packing.unpack(hidden_states)
            )
            packing = query_packing
        if self_attended:
            self_probs = None
            if first_token_only:
                hidden_states = hidden_states[:, :1]
        elif first_token_only:
            hidden_states, self_probs = self.attention(
                hidden_states[:, :1], attention_mask, hidden_states, output_attentions, cache=cache
            )
        else:
            hidden_states, self_probs = self.attention(
                hidden_states,
                attention_mask,
                None if query_packing is None else all_tokens,
                output_attentions,
                cache=cache,
                packing=packing,
                key_value_packing=all_packing,
            )
        cross_probs = None
        if self.has_cross_attention:
            if encoder_hidden_states is None and encoder_key_value is None:
                raise ValueError(
                    f"text layer {self.layer_idx} is a fusion layer and needs the image embeddings"
                )
            hidden_states, cross_probs = self.crossattention(
                hidden_states,
                encoder_attention_mask,
                encoder_hidden_states,
                output_attentions,
                cache=cache,
                key_value_index=encoder_index,
                projected_key_value=encoder_key_value,
                packing=packing,
            )
        return self.output(self.intermediate(hidden_states), hidden_states), self_probs, cross_probs


@dataclass
class AlbefTextEncoderOutput(ModelOutput):
    """Output of `AlbefTextModel`.

    Args:
        last_hidden_state: `(batch, seq_len, hidden)` states after the last layer that ran.
        hidden_states: when asked, the input of every layer that ran plus the final output.
        attentions: when asked, self-attention probabilities `(batch, heads, seq_len, seq_len)` per layer.
        cross_attentions: when asked, cross-attention probabilities `(batch, heads, seq_len, image_len)` per
            fusion layer that ran.
        cache: the `Cache` that was passed in, now holding this call's keys/values too (decoder only).
    """

    last_hidden_state: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    cross_attentions: tuple[torch.Tensor, ...] | None = None
    cache: Cache | None = None


class AlbefTextEncoder(nn.Module):
    """The stack of text and fusion layers (`encoder.layer.N`, as in BERT)."""

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([AlbefTextLayer(config, i) for i in range(config.num_hidden_layers)])


class AlbefTextModel(nn.Module):
    """BERT embeddings and layers, run in one of the three modes of ALBEF.

    - `"text"`: embeddings and the text-only layers `[0, fusion_layer)`: the unimodal text encoder;
    - `"fusion"`: the fusion layers `[fusion_layer, N)` on given text states (`hidden_states`) with
      cross-attention to `encoder_hidden_states`: the multimodal encoder;
    - `"multimodal"`: both in sequence, from token ids (MLM, VQA).
    """

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = AlbefTextEmbeddings(config)
        self.encoder = AlbefTextEncoder(config)

    def project_cross_key_values(
        self, encoder_hidden_states: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The cross-attention `(key, value)` heads `(batch, heads, image_len, head_dim)` of image tokens
        `(batch, image_len, encoder_width)` at every fusion layer, for `forward(encoder_key_values=...)`."""
        return tuple(
            self.encoder.layer[index].crossattention.self.project_key_value(encoder_hidden_states)
            for index in self._layer_range("fusion")
        )

    def fusion_self_attention(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The first fusion layer's self-attention block on unimodal text states `(batch, seq_len, hidden)`.

        It reads no image, so scoring a text against many images can run it once per text and pass the result to
        `forward(mode="fusion", text_self_attended=True)`.
        """
        layer = self.encoder.layer[self.config.fusion_layer]
        return layer.attention(hidden_states, padding_mask(attention_mask))[0]

    def _layer_range(self, mode: TextMode) -> range:
        fusion_layer, num_layers = self.config.fusion_layer, self.config.num_hidden_layers
        ranges = {
            "text": range(fusion_layer),
            "fusion": range(fusion_layer, num_layers),
            "multimodal": range(num_layers),
        }
        if mode not in ranges:
            raise ValueError(f"mode must be one of {sorted(ranges)}, got {mode!r}")
        return ranges[mode]

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        hidden_states: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | Sequence[torch.Tensor] | None = None,
        encoder_attention_mask: torch.Tensor | Sequence[torch.Tensor | None] | None = None,
        encoder_index: torch.Tensor | None = None,
        mode: TextMode = "multimodal",
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        cache: Cache | None = None,
        encoder_key_values: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
        first_token_only: bool = False,
        text_self_attended: bool = False,
        needed_tokens: torch.Tensor | None = None,
    ) -> AlbefTextEncoderOutput:
        """Run the layers of `mode`.

        Args:
            input_ids: `(batch, seq_len)` token ids; needed unless `mode="fusion"`.
            attention_mask: `(batch, seq_len)` 1 for tokens, 0 for padding.
            token_type_ids: optional `(batch, seq_len)` segment ids (zeros by default).
            hidden_states: `(batch, seq_len, hidden)` text states to fuse; only with `mode="fusion"`.
            encoder_hidden_states: image tokens `(batch, image_len, encoder_width)` read by the cross-attention;
                a list of several images makes fusion layer `i` read image `(i - fusion_layer) % len(list)`
                (the NLVR2 model).
            encoder_attention_mask: `(batch, image_len)` mask of the image tokens (all valid by default), or one
                per image when a list of images is given.
            encoder_index: `(batch,)` row of `encoder_hidden_states` that each text reads, when the images are given
                once per distinct image (`(num_images, image_len, encoder_width)`): the cross-attention keys and
                values are then projected once per image instead of once per text (ITM pairs share images).
            mode: `"text"`, `"fusion"` or `"multimodal"` (see the class docstring).
            output_attentions: return attention probabilities (runs the eager attention path).
            output_hidden_states: return the input of every layer that ran and the final output.
            cache: incremental decoding (`config.is_decoder` only): `input_ids` are the tokens after the cached ones;
                `attention_mask`, when given, covers the cached and the new tokens.
            encoder_key_values: instead of `encoder_hidden_states`, their cross-attention keys and values from
                `project_cross_key_values` (one `(key, value)` per fusion layer), projected once and reused by
                several calls (ITM re-ranking scores many texts against each image); read through
                `encoder_index` like the image tokens.
            first_token_only: the last layer computes the first token's state only (`last_hidden_state` is then
                `(batch, 1, hidden)`): what a head on [CLS] (ITM) reads, for about a third less work per layer.
            text_self_attended: with `mode="fusion"`, `hidden_states` come from `fusion_self_attention` (the first
                fusion layer's self-attention, which reads no image), and that layer starts at its cross-attention.
            needed_tokens: `(batch, seq_len)`, nonzero at the only positions of `last_hidden_state` that the caller
                reads (the [CLS] of ITM rows, the masked tokens of MLM rows): the last layer computes those states
                (and a few more, up to a multiple of 64), the others are zero. Every token still serves as a key
                and value of that layer's self-attention, so the needed states equal a full pass's.

        In training mode (without a cache, attention maps, hidden states or `first_token_only` asked for), the layers
        compute only the real tokens (`TokenPacking`): the output is zero at padding positions, and equal elsewhere.
        """
        layers = self._layer_range(mode)
        past_length = 0
        if cache is not None:
            if not self.config.is_decoder:
                raise ValueError("a key/value cache is only used by a decoder (`config.is_decoder=True`)")
            past_length = cache.get_seq_length()
        if mode == "fusion":
            if hidden_states is None:
                raise ValueError('mode="fusion" needs `hidden_states` (the output of mode="text")')
        else:
            if input_ids is None:
                raise ValueError(f"mode={mode!r} needs `input_ids`")
            hidden_states = self.embeddings(input_ids, token_type_ids, past_length=past_length)
        if attention_mask is None and past_length:
            attention_mask = torch.ones(
                hidden_states.shape[0], past_length + hidden_states.shape[1], device=hidden_states.device
            )
        self_mask = padding_mask(
            attention_mask, causal=self.config.is_decoder, query_length=hidden_states.shape[1]
        )

        if text_self_attended and mode != "fusion":
            raise ValueError('text_self_attended applies to mode="fusion" only')
        if first_token_only and self.config.is_decoder:
            raise ValueError("first_token_only is for encoders: a decoder predicts at every position")
        query_packing = None
        if needed_tokens is not None:
            if first_token_only or output_attentions or output_hidden_states or cache is not None:
                raise ValueError(
                    "needed_tokens leaves the other states uncomputed: it does not combine with first_token_only, "
                    "output_attentions, output_hidden_states or a cache"
                )
            if needed_tokens.shape != hidden_states.shape[:2]:
                raise ValueError(
                    f"needed_tokens has shape {tuple(needed_tokens.shape)}; the texts are "
                    f"{tuple(hidden_states.shape[:2])}"
                )
            query_packing = TokenPacking.of(needed_tokens)
        if encoder_key_values is not None:
            if encoder_hidden_states is not None:
                raise ValueError("give the image tokens or their projected keys/values, not both")
            if len(encoder_key_values) != self.config.num_hidden_layers - self.config.fusion_layer:
                raise ValueError(
                    f"encoder_key_values holds {len(encoder_key_values)} layers; there are "
                    f"{self.config.num_hidden_layers - self.config.fusion_layer} fusion layers"
                )
        images, image_masks = _as_image_list(encoder_hidden_states, encoder_attention_mask)
        if encoder_key_values is not None:
            image_masks = [encoder_attention_mask]
        if encoder_index is not None:
            image_masks = [mask if mask is None else mask[encoder_index] for mask in image_masks]
        image_masks = [padding_mask(mask) for mask in image_masks]

        # in training, skip the padding (nothing reads its states: attention masks it, no loss looks at it)
        packing = None
        if (
            self.training
            and cache is None
            and not (output_attentions or output_hidden_states or first_token_only)
        ):
            packing = TokenPacking.of(attention_mask)
        if packing is not None:
            hidden_states = packing.pack(hidden_states)

        all_hidden = [] if output_hidden_states else None
        all_self, all_cross = ([], []) if output_attentions else (None, None)
        for index in layers:
            layer = self.encoder.layer[index]
            image = image_mask = key_value = None
            if layer.has_cross_attention and encoder_key_values is not None:
                key_value, image_mask = encoder_key_values[index - self.config.fusion_layer], image_masks[0]
            elif layer.has_cross_attention and images:
                which = (index - self.config.fusion_layer) % len(images)
                image, image_mask = images[which], image_masks[which]
            if output_hidden_states:
                all_hidden.append(hidden_states)
            hidden_states, self_probs, cross_probs = layer(
                hidden_states,
                self_mask,
                image,
                image_mask,
                output_attentions=output_attentions,
                cache=cache,
                encoder_index=encoder_index,
                encoder_key_value=key_value,
                first_token_only=first_token_only and index == layers[-1],
                self_attended=text_self_attended and index == layers[0],
                packing=packing,
                query_packing=query_packing if index == layers[-1] else None,
            )
            if output_attentions:
                all_self.append(self_probs)
                if cross_probs is not None:
                    all_cross.append(cross_probs)
        if output_hidden_states:
            all_hidden.append(hidden_states)
        if query_packing is not None:
            hidden_states = query_packing.unpack(hidden_states)
        elif packing is not None:
            hidden_states = packing.unpack(hidden_states)
        return AlbefTextEncoderOutput(
            last_hidden_state=hidden_states,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_self) if output_attentions else None,
            cross_attentions=tuple(all_cross) if output_attentions else None,
            cache=cache,
        )


def _as_image_list(
    images: torch.Tensor | Sequence[torch.Tensor] | None,
    masks: torch.Tensor | Sequence[torch.Tensor | None] | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    if images is None:
        return [], []
    if isinstance(images, torch.Tensor):
        return [images], [masks]
    images = list(images)
    masks = [None] * len(images) if masks is None else list(masks)
    if len(masks) != len(images):
        raise ValueError(f"got {len(images)} images but {len(masks)} image attention masks")
    return images, masks


class AlbefPredictionHeadTransform(nn.Module):
    """Dense + activation + LayerNorm before the vocabulary projection (BERT's `transform`)."""

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.activation(self.dense(hidden_states)))


class AlbefMLMHead(nn.Module):
    """BERT's masked-language-modelling head whose output projection is the word-embedding matrix.

    The decoder weight is not a parameter of its own: the head multiplies by the embedding matrix it is
    given, so the two stay tied through saving, loading and conversion without any tying machinery.
    """

    def __init__(self, config: AlbefTextConfig) -> None:
        super().__init__()
        self.transform = AlbefPredictionHeadTransform(config)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden_states: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits `(..., vocab)` for `hidden_states` `(..., hidden)`."""
        return F.linear(self.transform(hidden_states), word_embeddings, self.bias)
