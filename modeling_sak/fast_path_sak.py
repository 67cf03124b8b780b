"""The deployed (inference-only) form of SAK's task heads, made by `SAKForMultiTask.optimize_for_inference()`.

A [`SAKDeployedTaskHead`] computes the function of a `SAKTaskHead` in eval mode in fewer operations: the BatchNorm
folded into the 3x3 conv once, at deployment; the level projections written side by side into one channels-last map
resized once; and, on large enough patch grids, the bilinear x4 resize + 3x3 conv computed on the patch grid by
[`upsampled_conv3x3`] with per-phase kernels derived once from the folded conv.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


# Below this many patch positions per batch the deployed head resizes and convolves as `SAKTaskHead` does. Measured
# end to end for a bfloat16 ViT-B SAK on one AVX-512 core: with the low-resolution conv 4.08 s instead of 4.85 s at
# 448x576 (1008 positions), 1.07 s instead of 1.15 s at 224x288 (252), 0.38 s instead of 0.31 s at 112x144 (63).
LOW_RESOLUTION_CONV_MIN_POSITIONS = 128


@functools.lru_cache(maxsize=16)
def _bilinear_window_coefficients(scale: int) -> tuple[torch.Tensor, tuple[tuple[int, int, int, int], ...]]:
    """What a 3-tap window over an exact x`scale` bilinear upsampling (align_corners=False) reads, per output phase.

    Returns `coefficients` of shape `(scale, 3, 3)` (float64), where `coefficients[q, d, k]` is the weight of the
    low-resolution offset `k - 1` in the upsampled value that window tap `d - 1` reads for an output pixel
    `scale * i + q`, and the phase groups `(q_start, q_stop, k_start, k_stop)`: consecutive phases whose windows read
    the same low-resolution offsets `k_start - 1 .. k_stop - 2` (for scale 4: 2, 3, 3 and 2 offsets).
    """
    n = 5  # the windows around the middle row 2 stay clear of the borders for every phase and scale
    signals = torch.eye(n, dtype=torch.float64).unsqueeze(1)
    upsampling = F.interpolate(signals, size=scale * n, mode="linear", align_corners=False)[:, 0].T  # (scale*n, n)
    middle = n // 2
    coefficients = torch.stack(
        [
            torch.stack([upsampling[scale * middle + q + d - 1, middle - 1 : middle + 2] for d in range(3)])
            for q in range(scale)
        ]
    )
    groups: list[tuple[int, int, int, int]] = []
    for q in range(scale):
        used = coefficients[q].abs().sum(0).nonzero().flatten().tolist()
        reads = (used[0], used[-1] + 1)
        if groups and groups[-1][2:] == reads:
            groups[-1] = (groups[-1][0], q + 1, *reads)
        else:
            groups.append((q, q + 1, *reads))
    return coefficients, tuple(groups)


def upsampled_conv3x3_kernels(weight: torch.Tensor, scale: tuple[int, int]) -> list[tuple[tuple, tuple, torch.Tensor]]:
    """The low-resolution kernels of [`upsampled_conv3x3`] for a `(out_channels, in_channels, 3, 3)` conv weight.

    One entry per (row phase group, column phase group): `((qy0, qy1, ky0, ky1), (qx0, qx1, kx0, kx1), kernel)` with
    `kernel` of shape `(out_channels * (qy1 - qy0) * (qx1 - qx0), in_channels, ky1 - ky0, kx1 - kx0)` (output channels
    ordered (channel, row phase, column phase)), channels-last in memory, in the weight's dtype (float32 weights are
    combined in float32, float64 in float64; under autocast the matmul's dtype). Differentiable in `weight`.
    """
    coefficients_y, groups_y = _bilinear_window_coefficients(scale[0])
    coefficients_x, groups_x = _bilinear_window_coefficients(scale[1])
    out_channels, in_channels = weight.shape[:2]
    # (O, 9, C): the weight with its taps in the middle, so that each kernel comes out channels-last in one matmul.
    taps = weight.permute(0, 2, 3, 1).reshape(out_channels, 9, in_channels)
    kernels = []
    for qy0, qy1, ky0, ky1 in groups_y:
        for qx0, qx1, kx0, kx1 in groups_x:
            # mixing[a, b, k, l, d, e]: weight of tap (d, e) in the kernel of phase (a, b) at low-resolution offset (k, l)
            mixing = torch.einsum(
                "adk,bel->abklde", coefficients_y[qy0:qy1, :, ky0:ky1], coefficients_x[qx0:qx1, :, kx0:kx1]
            )
            phases, rows, columns = (qy1 - qy0) * (qx1 - qx0), ky1 - ky0, kx1 - kx0
            kernel = torch.matmul(mixing.reshape(-1, 9).to(taps), taps)  # (O, phases * rows * columns, C)
            kernel = kernel.view(out_channels * phases, rows, columns, in_channels).permute(0, 3, 1, 2)
            kernels.append(((qy0, qy1, ky0, ky1), (qx0, qx1, kx0, kx1), kernel))
    return kernels


def upsampled_conv3x3(
    features: torch.Tensor,
    weight: torch.Tensor,
    scale: tuple[int, int],
    kernels: list[tuple[tuple, tuple, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """`F.conv2d(F.interpolate(features, scale_factor=scale, mode="bilinear"), weight, padding=1)` (no bias), computed
    on the low-resolution grid without materialising the upsampled map.

    Every output pixel `(scale_y * i + qy, scale_x * j + qx)` of the upsampled conv is a small conv of the
    low-resolution map around `(i, j)` whose kernel depends only on the phase `(qy, qx)`: bilinear weights folded into
    the 3x3 weight. Phases that read the same low-resolution neighbourhood share one conv call. For scale 4 that is
    100 instead of 144 kernel taps per 4x4 output block (31% fewer FLOPs). Mathematically exact, including the
    borders: the low-resolution map is replicate-padded (which reproduces bilinear's edge clamping), and the conv's
    zero padding is restored by subtracting what the 3x3 windows along the image border read from that extension.

    Args:
        features: `(batch_size, in_channels, height, width)`.
        weight: `(out_channels, in_channels, 3, 3)`.
        scale: integer upsampling factors `(scale_y, scale_x)`.
        kernels: precomputed [`upsampled_conv3x3_kernels`] of `weight` (computed here when not given).

    Returns:
        `(batch_size, out_channels, scale_y * height, scale_x * width)`, channels-last in memory.
    """
    if kernels is None:
        kernels = upsampled_conv3x3_kernels(weight, scale)
    batch, _, height, width = features.shape
    out_channels = weight.shape[0]
    padded = F.pad(features, (1, 1, 1, 1), mode="replicate")
    phases = None
    for (qy0, qy1, ky0, ky1), (qx0, qx1, kx0, kx1), kernel in kernels:
        part = F.conv2d(padded[:, :, ky0 : ky1 - 1 + height, kx0 : kx1 - 1 + width], kernel)
        if phases is None:  # (batch, row, row phase, column, column phase, channel): channels-last once viewed
            phases = part.new_empty(batch, height, scale[0], width, scale[1], out_channels)
        part = part.view(batch, out_channels, qy1 - qy0, qx1 - qx0, height, width)
        phases[:, :, qy0:qy1, :, qx0:qx1] = part.permute(0, 4, 2, 5, 3, 1)
    size = (height * scale[0], width * scale[1])
    output = phases.view(batch, *size, out_channels).permute(0, 3, 1, 2)
    # The phase convs read the upsampled map extended by replication where the reference conv reads zeros: subtract
    # what the border windows read from that ring. Bilinear's first/last upsampled row (column) is the upsampled
    # first/last low-resolution row (column); the ring's corners belong to its top and bottom rows.
    first, last = slice(0, 1), slice(-1, None)
    for side, kernel_rows in ((first, slice(0, 1)), (last, slice(2, 3))):
        row = F.interpolate(features[:, :, side], size=(1, size[1]), mode="bilinear", align_corners=False)
        ring = F.conv2d(F.pad(row, (1, 1, 0, 0), mode="replicate"), weight[:, :, kernel_rows])
        output[:, :, side] -= ring.to(output.dtype)
    for side, kernel_columns in ((first, slice(0, 1)), (last, slice(2, 3))):
        column = F.interpolate(features[..., side], size=(size[0], 1), mode="bilinear", align_corners=False)
        ring = F.conv2d(F.pad(column, (0, 0, 1, 1)), weight[..., kernel_columns])
        output[..., side] -= ring.to(output.dtype)
    return output


def low_resolution_scale(patch_size: tuple[int, int]) -> tuple[int, int] | None:
    """The integer factor from the patch grid to the heads' 1/4-resolution grid, `patch_size / 4`, when both sides
    have one above 1 (patch 16: `(4, 4)`); None otherwise (e.g. patch 14), where the resize stays explicit."""
    scale = (patch_size[0] // 4, patch_size[1] // 4)
    exact = all(p % 4 == 0 for p in patch_size) and max(scale) > 1 and min(scale) >= 1
    return scale if exact else None


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
    folded conv (`folded_weight` channels-last, `folded_bias`) and, when `low_resolution_scale` is given, the phase
    kernels of [`upsampled_conv3x3`] (`phase_kernel_{i}`, about 11x the conv weight's memory), all in `dtype` (None:
    the conv's). The folded conv and norm are frozen: gradients still reach the inputs, the projections and the
    classifier, never the fold. Inference only: a forward in training mode raises.
    """

    def __init__(self, head: nn.Module, dtype: torch.dtype | None, low_resolution_scale: tuple[int, int] | None):
        super().__init__()
        self.level_projections = head.level_projections
        self.fuse_conv = head.fuse_conv.requires_grad_(False)
        self.fuse_norm = head.fuse_norm.requires_grad_(False)
        self.activation = head.activation
        self.classifier = head.classifier
        dtype = dtype or self.fuse_conv.weight.dtype
        weight, bias = fold_batch_norm(self.fuse_conv, self.fuse_norm)
        self.register_buffer(
            "folded_weight", weight.to(dtype).contiguous(memory_format=torch.channels_last), persistent=False
        )
        self.register_buffer("folded_bias", bias.to(dtype), persistent=False)
        self.low_resolution_scale = low_resolution_scale
        kernels = upsampled_conv3x3_kernels(weight, low_resolution_scale) if low_resolution_scale else []
        self.phase_groups = tuple((rows, columns) for rows, columns, _ in kernels)
        for index, (*_, kernel) in enumerate(kernels):
            self.register_buffer(f"phase_kernel_{index}", kernel.detach().to(dtype), persistent=False)

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
        projected = projected.view(batch, *grid, -1).permute(0, 3, 1, 2)
        if self._reads_the_patch_grid(batch, grid, quarter):
            kernels = [(*group, getattr(self, f"phase_kernel_{i}")) for i, group in enumerate(self.phase_groups)]
            fused = upsampled_conv3x3(projected, self.folded_weight, self.low_resolution_scale, kernels)
            fused = fused.add_(self.folded_bias.to(fused.dtype)[:, None, None])
        else:
            upsampled = F.interpolate(projected, size=quarter, mode="bilinear", align_corners=False)
            fused = F.conv2d(upsampled, self.folded_weight, self.folded_bias, padding=1)
        logits = self.classifier(self.activation(fused)).contiguous()
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)

    def _reads_the_patch_grid(self, batch: int, grid: tuple[int, int], quarter: tuple[int, int]) -> bool:
        """Whether the low-resolution conv applies: kernels for this scale, an exact integer upsampling, and enough
        positions (on small grids reading the ~11x larger phase kernels costs more than the FLOPs saved)."""
        return (
            self.low_resolution_scale is not None
            and (self.low_resolution_scale[0] * grid[0], self.low_resolution_scale[1] * grid[1]) == quarter
            and batch * grid[0] * grid[1] >= LOW_RESOLUTION_CONV_MIN_POSITIONS
        )


__all__ = ["SAKDeployedTaskHead", "fold_batch_norm", "upsampled_conv3x3", "upsampled_conv3x3_kernels"]
