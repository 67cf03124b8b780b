"""Fast arithmetic of SAK: the bilinear resize + 3x3 conv computed on the patch grid ([`resized_conv3x3`], used by
`SAKTaskHead` in training and at inference), the deployed (inference-only) head made by
`SAKForMultiTask.optimize_for_inference()` ([`SAKDeployedTaskHead`]: BatchNorm folded into the conv), and attention
by cache-sized slices ([`chunked_attention`], used by the stem and by the SAM teacher on CPUs where it beats
SDPA).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


def bilinear_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """`(out_size, in_size)` float64 matrix of the bilinear resize along one axis, as `F.interpolate(...,
    size=..., mode="bilinear", align_corners=False)` computes it (edge clamping included): row `y` holds the weights
    of the inputs of output `y`. Cached per size pair; under `torch.export` (symbolic sizes) built in the graph, in
    float32 (ONNX Runtime's Resize has no float64 kernel)."""
    if torch.compiler.is_exporting():
        return _bilinear_resize_matrix(in_size, out_size, torch.float32)
    return _cached_bilinear_resize_matrix(in_size, out_size)


def _bilinear_resize_matrix(in_size: int, out_size: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    # Made as a normal tensor even under inference mode: the cached one may be saved by autograd in a later step.
    with torch.inference_mode(False), torch.no_grad():
        identity = torch.eye(in_size, dtype=dtype).view(in_size, 1, in_size, 1)
        return F.interpolate(identity, size=(out_size, 1), mode="bilinear", align_corners=False)[:, 0, :, 0].T


def _tap_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    """`[A_0 | A_1 | A_2]` of shape `(out_size, 3 * in_size)` (float64) for one axis.

    `A_d[y, i]` is the weight of input position `i` in the value that a 3-tap window (zero padding 1) reads at tap
    `d` for output position `y`: the bilinear resize ([`bilinear_resize_matrix`]) read at `y + d - 1`, and 0 where
    that falls outside `[0, out_size)` (the conv's zero padding). Cached and exported like
    [`bilinear_resize_matrix`].
    """
    if torch.compiler.is_exporting():
        return _build_tap_resize_matrix(in_size, out_size)
    return _cached_tap_resize_matrix(in_size, out_size)


def _build_tap_resize_matrix(in_size: int, out_size: int) -> torch.Tensor:
    with torch.inference_mode(False), torch.no_grad():
        padded = F.pad(bilinear_resize_matrix(in_size, out_size), (0, 0, 1, 1))  # rows -1 and out_size read zeros
        return torch.cat([padded[d : d + out_size] for d in range(3)], dim=1)


_cached_bilinear_resize_matrix = functools.lru_cache(maxsize=64)(_bilinear_resize_matrix)
_cached_tap_resize_matrix = functools.lru_cache(maxsize=64)(_build_tap_resize_matrix)


def resized_conv3x3(
    tokens: torch.Tensor,
    grid: tuple[int, int],
    weight: torch.Tensor,
    size: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=False), weight, bias, padding=1)` for the
    map `x` whose pixels are `tokens`, computed without the conv at the resized resolution.

    The resize acts on each channel and the conv mixes channels per tap, so with `A_d` the resize matrices of
    [`_tap_resize_matrix`] along rows (`d = dy`) and columns (`d = dx`)

        conv3x3(resize(x), W)[o] = sum over (dy, dx) of A_dy @ (W[:, :, dy, dx] @ x)[o] @ A_dx^T

    i.e. one matmul with `9 * out_channels` outputs on the patch grid, then one matmul per axis with the stacked
    `A_d` (the first one adds `bias`, on the centre tap: no pass of its own). Exact for any `grid` and `size` (borders,
    non-integer and down-scaling included); for a x4 resize it does about 1/11 of the conv's FLOPs at ViT-B width.
    Differentiable in `tokens`, `weight` and `bias`; runs in their dtype (the matmul dtype under autocast).

    Args:
        tokens: `(batch_size, h * w, in_channels)`, the map's pixels row by row (a channels-last map).
        grid: `(h, w)`.
        weight: `(out_channels, in_channels, 3, 3)`.
        size: `(height, width)` of the resized map and of the output.
        bias: `(out_channels,)` or None.

    Returns:
        `(batch_size, height, width, out_channels)` (channels-last; `.permute(0, 3, 1, 2)` gives the NCHW view).
    """
    batch, positions, in_channels = tokens.shape
    (h, w), (height, width), out_channels = grid, size, weight.shape[0]
    if positions != h * w or weight.shape[1:] != (in_channels, 3, 3):
        raise ValueError(
            f"resized_conv3x3: tokens {tuple(tokens.shape)} and weight {tuple(weight.shape)} do not fit grid {grid}; "
            "expected tokens (batch, h * w, in_channels) and weight (out_channels, in_channels, 3, 3)"
        )
    device = tokens.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    if autocast:  # cast once, before the transpose (else autocast casts the transposed copy)
        weight = weight.to(torch.get_autocast_dtype(device))
    # Rows (o, dy, dx): per output channel a (C, 9) -> (9, C) transpose, cache-friendly (moving O innermost instead,
    # a transpose of the whole (O, 9 C) matrix, took 24x longer on CPU).
    taps = weight.view(out_channels, in_channels, 9).transpose(1, 2).reshape(9 * out_channels, in_channels)
    # The bias rides on the centre tap (dy = dx = 1), whose resize matrices are the plain bilinear ones: their rows sum
    # to 1, so a constant added on the patch grid comes out unchanged at every output pixel, and the first matmul
    # adds it as it accumulates.
    if bias is not None:
        bias = F.pad(bias.to(taps.dtype)[:, None], (4, 4)).reshape(9 * out_channels)
    per_tap = F.linear(tokens, taps, bias).view(batch, h, w, out_channels, 3, 3)  # (B, i, j, o, dy, dx)
    per_tap = per_tap.permute(0, 4, 1, 2, 5, 3)  # (B, dy, i, j, dx, o)
    rows = _tap_resize_matrix(h, height).to(per_tap.device, per_tap.dtype)  # columns (dy, i)
    resized_rows = torch.matmul(rows, per_tap.reshape(batch, 3 * h, w * 3 * out_channels))  # (B, height, j dx o)
    columns = _tap_resize_matrix(w, width).view(width, 3, w).transpose(1, 2).reshape(width, 3 * w)  # columns (j, dx)
    columns = columns.to(resized_rows.device, resized_rows.dtype)
    output = torch.matmul(columns, resized_rows.view(batch * height, w * 3, out_channels))  # (B * height, width, O)
    return output.view(batch, height, width, out_channels)


# The most logits one slice of [`chunked_attention`] holds: 2 ** 21 (4 MiB in bfloat16), so that a slice and its bias
# stay in cache.
CHUNKED_LOGITS = 1 << 21


def chunked_attention_is_faster(query: torch.Tensor) -> bool:
    """Whether [`chunked_attention`] measured faster than torch's SDPA for `query`: bfloat16 on a CPU without AMX tiles
    (an AMD EPYC with AVX-512 bf16, 2 threads: 18 against 29 ms for a ViT-B layer at 1009 tokens; 0.58 s with SAM's
    bias against 0.66 s for SDPA with no bias at all, a global layer of SAM-B at 4096 tokens). Not under
    `torch.compile` or `torch.export`, whose graphs take SDPA."""
    if query.device.type != "cpu" or query.dtype != torch.bfloat16:
        return False
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return not _cpu_has_amx()


@functools.cache
def _cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles (asked once: every attention layer of every forward asks)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def chunked_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    rel_h: torch.Tensor | None = None,
    rel_w: torch.Tensor | None = None,
    max_logits: int = CHUNKED_LOGITS,
) -> torch.Tensor:
    """`softmax((scale * q) @ k^T + bias) @ v` in eager order of operations, by slices of at most `max_logits` logits.

    The `batch_size * heads` attention problems are taken in groups and their queries in row blocks, so that no
    `(tokens, tokens)` tensor of all heads is built and, on CPU, a slice stays in cache. With `rel_h` and `rel_w` the
    bias is SAM's decomposed relative-position bias, `bias[(r, c), (kr, kc)] = rel_h[(r, c), kr] + rel_w[(r, c), kc]`,
    added as transformers' eager `SamVisionAttention` adds it; without them there is no bias. The softmax runs in the
    input dtype (torch's CPU softmax accumulates reduced precision in float32), which is the one difference from an
    eager softmax in float32: at most one rounding of the output.

    Args:
        query, key, value: `(batch_size, heads, tokens, head_dim)`.
        scale: the logit scale (`head_dim ** -0.5`).
        rel_h: `(batch_size, heads, tokens, height)` with `tokens = height * width`, or None.
        rel_w: `(batch_size, heads, tokens, width)`, or None (both or neither).
        max_logits: the most logits per slice.

    Returns:
        `(batch_size, heads, tokens, head_dim)` in `query`'s dtype. Differentiable.
    """
    batch_size, heads, tokens, head_dim = query.shape
    if (rel_h is None) != (rel_w is None):
        raise ValueError("chunked_attention: give both rel_h and rel_w (SAM's decomposed bias) or neither")
    problems = batch_size * heads
    query = (query * scale).reshape(problems, tokens, head_dim)
    # Transposed once (matmul would copy a transposed view for every row block).
    key_transposed = key.reshape(problems, tokens, head_dim).transpose(1, 2).contiguous()
    value = value.reshape(problems, tokens, head_dim)
    if rel_h is not None:
        rel_h, rel_w = rel_h.reshape(problems, tokens, -1), rel_w.reshape(problems, tokens, -1)
    rows = min(tokens, max(1, max_logits // tokens))
    group = max(1, max_logits // (rows * tokens))
    outputs = []
    for start in range(0, problems, group):
        problem = slice(start, start + group)
        blocks = []
        for row in range(0, tokens, rows):
            block = slice(row, row + rows)
            logits = torch.matmul(query[problem, block], key_transposed[problem])
            if rel_h is not None:
                bias = rel_h[problem, block, :, None] + rel_w[problem, block, None, :]
                logits = logits + bias.view(logits.shape)
            blocks.append(torch.matmul(logits.softmax(dim=-1), value[problem]))
        outputs.append(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0])
    output = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return output.view(batch_size, heads, tokens, head_dim)


def fold_batch_norm(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval-mode `norm(conv(x))` as one conv: its float32 `(weight, bias)`."""
    if not norm.track_running_stats or norm.running_var is None:
        raise ValueError(
            "cannot fold a BatchNorm without running statistics into its conv; optimize_for_inference needs "
            "BatchNorm2d(track_running_stats=True), as SAKTaskHead builds it"
        )
    with torch.no_grad():
        factor = norm.weight.float() * torch.rsqrt(norm.running_var.float() + norm.eps)
        weight = conv.weight.float() * factor[:, None, None, None]
        bias = (conv.bias.float() - norm.running_mean.float()) * factor + norm.bias.float()
    return weight, bias


class SAKDeployedTaskHead(nn.Module):
    """A `SAKTaskHead` deployed for inference: the same function as the head in eval mode, in fewer operations.

    It keeps the head's modules (so the state dict keeps its keys and values) and adds, outside the state dict, the
    folded conv (`folded_weight`, `folded_bias`) in `dtype` (None: the conv's). With `low_resolution_conv` the resize
    + conv run as [`resized_conv3x3`], else as resize then conv. The folded conv and norm are frozen: gradients still
    reach the inputs, the projections and the classifier, never the fold. Inference only: a forward in training mode
    raises.
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype | None, low_resolution_conv: bool = True):
        super().__init__()
        self.level_projections = head.level_projections
        self.fuse_conv = head.fuse_conv.requires_grad_(False)
        self.fuse_norm = head.fuse_norm.requires_grad_(False)
        self.activation = head.activation
        self.classifier = head.classifier
        self.low_resolution_conv = low_resolution_conv
        dtype = dtype or self.fuse_conv.weight.dtype
        weight, bias = fold_batch_norm(self.fuse_conv, self.fuse_norm)
        self.register_buffer("folded_weight", weight.to(dtype), persistent=False)
        self.register_buffer("folded_bias", bias.to(dtype), persistent=False)

    def forward(
        self, level_features: list[torch.Tensor], grid: tuple[int, int], output_size: tuple[int, int]
    ) -> torch.Tensor:
        if self.training:
            raise RuntimeError(
                "this task head was deployed for inference by optimize_for_inference() and cannot train; load the "
                "model again (from_pretrained) to train it"
            )
        batch = level_features[0].shape[0]
        quarter = (output_size[0] // 4, output_size[1] // 4)
        # (B, h * w, C) tokens side by side are a (B, C, h, w) map in channels-last memory: one copy, no transposes.
        projected = torch.cat([projection(f) for projection, f in zip(self.level_projections, level_features)], dim=-1)
        if self.low_resolution_conv:
            fused = resized_conv3x3(projected, grid, self.folded_weight, quarter, self.folded_bias).permute(0, 3, 1, 2)
        else:
            projected = projected.view(batch, *grid, -1).permute(0, 3, 1, 2)
            upsampled = F.interpolate(projected, size=quarter, mode="bilinear", align_corners=False)
            fused = F.conv2d(upsampled, self.folded_weight, self.folded_bias, padding=1)
        logits = self.classifier(self.activation(fused)).contiguous()
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


__all__ = [
    "CHUNKED_LOGITS",
    "SAKDeployedTaskHead",
    "bilinear_resize_matrix",
    "chunked_attention",
    "chunked_attention_is_faster",
    "fold_batch_norm",
    "resized_conv3x3",
]
