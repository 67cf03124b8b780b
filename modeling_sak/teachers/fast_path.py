"""The fast path of transformers teachers: the blocks a teacher's levels need, and nothing else, with SDPA attention.

transformers' forward of a frozen teacher does work the distillation targets never read: the blocks after the last
level, SAM's neck, CLIP's and SigLIP's post-layernorm and pooling head, DINOv2's and ViT's final layernorm. Worse,
SAM's vision attention (eager and SDPA alike) builds its decomposed relative-position bias as a full
`(batch_size, num_heads, tokens, tokens)` tensor in every layer: at the native 1024 x 1024 input a global layer of
SAM-B writes and reads 12 x 4096 x 4096 floats (805 MB in float32) for a bias that is only the sum of a row term and
a column term.

[`block_outputs`] runs a teacher's own embedding modules and blocks (their weights and code) up to the last level and
returns the block outputs transformers reports as `hidden_states[i + 1]`. SAM's attention is computed by
[`sam_attention`] without the bias tensor of all heads: either in one SDPA call with no mask, each query carrying its
row and column terms as extra channels and each key the one-hot indicators of its row and column (the dot product of
the extended vectors is `scale * q.k + rel_h[q, key row] + rel_w[q, key column]`, exactly the biased logit); or, where
that extra arithmetic costs more than the memory traffic it saves (float32 on CPU), with one head's bias at a time;
or (bfloat16 on a CPU without AMX) in transformers' own order of operations over slices of heads and query rows small
enough to stay in cache. Training code only, like the teachers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..remote_code.fast_path_sak import chunked_attention, chunked_attention_is_faster


# The families whose transformers models the fast path knows how to run block by block.
FAST_PATH_FAMILIES = ("dinov2", "clip", "siglip", "vit", "sam")
# How `sam_attention` adds SAM's relative-position bias; `default_sam_attention_method` picks one per dtype and device.
# Measured for one global layer of SAM-B at 1024 x 1024 (4096 tokens, 12 heads):
# - float32 on CPU: "bias_by_head" (2 AVX-512 cores, batch 1: 0.96 s augmented, 0.51 s bias by head, 0.74 s a bias of
#   all heads, 0.38 s no bias at all; AMD EPYC, batch 2: 1.87 s augmented, 0.86 s by head, 1.2 s chunked);
# - bfloat16 on a CPU with AMX: "augmented" (Intel Xeon, batch 1: 0.16 s augmented, 0.23 s by head, 0.32 s all heads);
# - bfloat16 on a CPU without AMX: "chunked" (AMD EPYC with AVX-512 bf16, batch 2: 1.85 s augmented, 0.82 s by head,
#   0.58 s chunked, 0.66 s no bias at all; 14 x 14 windows: 0.083 s, 0.081 s and 0.055 s);
# - CUDA: "augmented" (one fused kernel).
SAM_ATTENTION_METHODS = ("augmented", "bias_by_head", "chunked")


def _position_indicators(height: int, width: int, extra: int, dtype: torch.dtype, device: torch.device):
    """`(height * width, height + width + extra)`: token `r * width + c` has a 1 in column `r` and in `height + c`
    (the key side of the relative-position bias), then `extra` zero columns (head-dim padding). Built per call: it
    costs little next to the attention, and a cached copy made under inference_mode could not be reused elsewhere."""
    tokens = torch.arange(height * width, device=device)
    rows = F.one_hot(tokens // width, height)
    columns = F.one_hot(tokens % width, width)
    padding = rows.new_zeros(height * width, extra)
    return torch.cat([rows, columns, padding], dim=1).to(dtype)


def sam_attention(attention: nn.Module, hidden_states: torch.Tensor, method: str | None = None) -> torch.Tensor:
    """What transformers' `SamVisionAttention` (or its SDPA variant) returns as its first output, from its own
    weights, without materialising the relative-position bias.

    Args:
        attention: a transformers `SamVisionAttention` (`qkv`, `proj`, `num_attention_heads`, `scale`,
            `use_rel_pos`, `rel_pos_h`, `rel_pos_w`, `get_rel_pos`).
        hidden_states: `(batch_size, height, width, hidden_size)` tokens of one window or of the whole grid.
        method: one of `SAM_ATTENTION_METHODS`, or None for [`default_sam_attention_method`]'s.

    Returns:
        `(batch_size, height, width, hidden_size)`, equal to transformers' result up to float rounding.

    `"augmented"`: the biased logit `scale * q.k + q.R_h[qr, kr] + q.R_w[qc, kc]` (R_h, R_w: the relative tables
    read by `get_rel_pos`) is the dot product of `[scale * q, q.R_h[qr, :], q.R_w[qc, :]]` with `[k, onehot(kr),
    onehot(kc)]`, so one SDPA call with `scale=1` and no mask computes it; the value is zero-padded to the same head
    dimension (rounded up to a multiple of 8) because fused SDPA kernels need equal query, key and value widths.
    No bias is built, at the price of 2-3x the attention arithmetic. `"bias_by_head"`: the bias of one head at a time,
    written once in the layout SDPA reads (transformers writes all heads' bias, then copies it to that layout).
    `"chunked"`: transformers' eager arithmetic in the same order (logits by matmul, plus `rel_h + rel_w`, softmax,
    times the value) on slices of heads and query rows small enough to stay in cache
    ([`~modeling_sak.remote_code.fast_path_sak.chunked_attention`]); in bfloat16 it differs from transformers' eager
    attention by at most one rounding of the output (its softmax rounds once, not through float32; tested).
    """
    batch_size, height, width, _ = hidden_states.shape
    heads, tokens = attention.num_attention_heads, height * width
    qkv = attention.qkv(hidden_states).reshape(batch_size, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    query, key, value = qkv.unbind(0)  # (batch_size, heads, tokens, head_dim)
    head_dim = query.shape[-1]
    if attention.use_rel_pos:
        table_h = attention.get_rel_pos(height, height, attention.rel_pos_h)  # (height, height, head_dim)
        table_w = attention.get_rel_pos(width, width, attention.rel_pos_w)
        grid_query = query.reshape(batch_size, heads, height, width, head_dim)
        rel_h = torch.einsum("bnhwc,hkc->bnhwk", grid_query, table_h).reshape(batch_size, heads, tokens, height)
        rel_w = torch.einsum("bnhwc,wkc->bnhwk", grid_query, table_w).reshape(batch_size, heads, tokens, width)
        method = method or default_sam_attention_method(query)
        if method not in SAM_ATTENTION_METHODS:
            raise ValueError(f"method={method!r} is not one of {SAM_ATTENTION_METHODS}")
        if method == "augmented":
            extra = -(head_dim + height + width) % 8
            indicators = _position_indicators(height, width, extra, query.dtype, query.device)
            query = torch.cat([query * attention.scale, rel_h, rel_w, query.new_zeros(*rel_w.shape[:-1], extra)], -1)
            key = torch.cat([key, indicators.expand(batch_size, heads, tokens, -1)], dim=-1)
            value = F.pad(value, (0, height + width + extra))
            output = F.scaled_dot_product_attention(query, key, value, scale=1.0)[..., :head_dim]
        elif method == "chunked":
            output = chunked_attention(query, key, value, attention.scale, rel_h, rel_w)
        else:
            output = query.new_empty(batch_size, heads, tokens, head_dim)
            bias = query.new_empty(batch_size, 1, tokens, height, width)
            for head in range(heads):
                one = slice(head, head + 1)
                torch.add(rel_h[:, one, :, :, None], rel_w[:, one, :, None, :], out=bias)
                output[:, one] = F.scaled_dot_product_attention(
                    query[:, one],
                    key[:, one],
                    value[:, one],
                    attn_mask=bias.view(batch_size, 1, tokens, tokens),
                    scale=attention.scale,
                )
    else:
        output = F.scaled_dot_product_attention(query, key, value, scale=attention.scale)
    output = output.reshape(batch_size, heads, height, width, head_dim).permute(0, 2, 3, 1, 4)
    return attention.proj(output.reshape(batch_size, height, width, -1))


def default_sam_attention_method(query: torch.Tensor) -> str:
    """The [`sam_attention`] method that measured fastest for `query`'s dtype and device (see
    `SAM_ATTENTION_METHODS`): "chunked" where `chunked_attention_is_faster` (bfloat16 on a CPU without AMX), else
    "bias_by_head" in float32 on CPU and "augmented" otherwise."""
    if chunked_attention_is_faster(query):
        return "chunked"
    return "bias_by_head" if (query.device.type, query.dtype) == ("cpu", torch.float32) else "augmented"


def sam_layer(layer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """A transformers `SamVisionLayer` forward on `(batch_size, height, width, hidden_size)` tokens, its attention
    computed by [`sam_attention`]; windows are partitioned and merged by the layer's own methods."""
    residual = hidden_states
    hidden_states = layer.layer_norm1(hidden_states)
    if layer.window_size > 0:
        height, width = hidden_states.shape[1], hidden_states.shape[2]
        hidden_states, padded = layer.window_partition(hidden_states, layer.window_size)
    hidden_states = sam_attention(layer.attn, hidden_states)
    if layer.window_size > 0:
        hidden_states = layer.window_unpartition(hidden_states, layer.window_size, padded, (height, width))
    hidden_states = residual + hidden_states
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))


def vision_tower(model: nn.Module) -> nn.Module:
    """The vision tower of a full CLIP/SigLIP model (`vision_model`), or the model itself."""
    return getattr(model, "vision_model", model)


def transformer_blocks(model: nn.Module, family: str) -> nn.ModuleList:
    """The blocks of a teacher, in order: `encoder.layer` (DINOv2), `encoder.layers` (CLIP, SigLIP), `layers` (ViT in
    transformers 5) or `vision_encoder.layers` (SAM)."""
    tower = vision_tower(model)
    owner = tower.vision_encoder if family == "sam" else getattr(tower, "encoder", tower)
    for name in ("layer", "layers"):
        blocks = getattr(owner, name, None)
        if isinstance(blocks, nn.ModuleList):
            return blocks
    raise ValueError(
        f"cannot find the blocks of {type(model).__name__} (family {family!r}); run it with fast_path=False"
    )


def block_outputs(
    model: nn.Module, family: str, pixel_values: torch.Tensor, indices: Sequence[int], **embedding_kwargs
) -> list[torch.Tensor]:
    """The outputs of blocks `indices` (0-based) of a transformers teacher, computed up to the last of them only.

    Args:
        model: a transformers DINOv2 (with or without registers), CLIP, SigLIP, ViT or SAM vision model (or a full
            CLIP / SigLIP model: its vision tower runs).
        family: the model's family, one of `FAST_PATH_FAMILIES`.
        pixel_values: `(batch_size, num_channels, height, width)` in the model's dtype (SAM: its native size).
        indices: the blocks to return, in the order to return them.
        embedding_kwargs: passed to the embeddings module (e.g. `interpolate_pos_encoding=True`).

    Returns:
        One tensor per index: what transformers' forward reports as `hidden_states[index + 1]`, i.e. `(batch_size,
        tokens, hidden_size)` (prefix tokens included) or SAM's `(batch_size, height, width, hidden_size)`.
    """
    if family not in FAST_PATH_FAMILIES:
        raise ValueError(f"the fast path runs families {FAST_PATH_FAMILIES}, not {family!r}")
    tower = vision_tower(model)
    blocks = transformer_blocks(model, family)
    if family == "sam":
        encoder = tower.vision_encoder
        hidden_states = encoder.patch_embed(pixel_values)
        if encoder.pos_embed is not None:
            hidden_states = hidden_states + encoder.pos_embed
    else:
        hidden_states = tower.embeddings(pixel_values, **embedding_kwargs)
    # SAM's and SigLIP's patch embeddings are a channels-first convolution's output seen as tokens (a permuted view),
    # and every residual add keeps that layout: each layernorm would copy it and each add would read strided memory
    # (about half of this path's SAM-B bfloat16 time before this copy). One copy to the row-major layout gives the
    # same values; tensors already row-major (the families that prepend a class token) are not copied.
    hidden_states = hidden_states.contiguous()
    if family == "clip":
        hidden_states = tower.pre_layrnorm(hidden_states)
    wanted, outputs = set(indices), {}
    for index, block in enumerate(blocks[: max(indices) + 1]):
        # No attention mask: transformers' own forward passes None for image inputs too.
        hidden_states = sam_layer(block, hidden_states) if family == "sam" else block(hidden_states, None)
        if index in wanted:
            outputs[index] = hidden_states
    return [outputs[index] for index in indices]


__all__ = [
    "FAST_PATH_FAMILIES",
    "SAM_ATTENTION_METHODS",
    "block_outputs",
    "default_sam_attention_method",
    "sam_attention",
    "sam_layer",
    "transformer_blocks",
    "vision_tower",
]
