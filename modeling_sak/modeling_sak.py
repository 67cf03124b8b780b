"""PyTorch SAK: a multi-task student distilled from a committee of vision foundation models (ICLR 2025)."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput, logging

from .configuration_sak import SAKConfig
from .losses import distillation_loss, task_loss


logger = logging.get_logger(__name__)


@dataclass
class SAKMultiTaskOutput(ModelOutput):
    r"""
    Output of [`SAKForMultiTask`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Weighted sum of the task losses plus `distill_alpha` times the distillation total; returned when `labels`
            and/or `teacher_features` are given.
        task_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Unweighted loss of each task that had labels.
        distill_losses (`dict[str, torch.FloatTensor]`, *optional*):
            Distillation loss per teacher and level, keyed `"{teacher}_level{k}"` (k = 1..num_levels).
        task_outputs (`dict[str, torch.FloatTensor]`):
            Raw head output per task, `(batch_size, num_outputs, height, width)` at the size of `pixel_values`
            (logits for semseg/edge, unnormalised normals, depth in metres).
        router_weights (`dict[str, torch.FloatTensor]`, *optional*):
            Softmax weights of the MoR routers per task, `(batch_size, num_levels, num_experts)`; experts are the stem
            first, then the teachers in config order. `None` with `router_type="none"` or without teachers.
        student_features (`dict[str, tuple[torch.FloatTensor]]`, *optional*):
            Per teacher, one `(batch_size, teacher_hidden_size, grid_height, grid_width)` map per level: the
            normalised teacher-path feature after the aligner when there is one, i.e. what the distillation loss
            compares with the teacher. Returned with `teacher_features` or `output_student_features=True`.
        hidden_states (`tuple[torch.FloatTensor]`, *optional*):
            Stem embeddings and the output of every stem block, `(batch_size, num_tokens, hidden_size)` each;
            returned with `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    task_losses: dict[str, torch.FloatTensor] | None = None
    distill_losses: dict[str, torch.FloatTensor] | None = None
    task_outputs: dict[str, torch.FloatTensor] | None = None
    router_weights: dict[str, torch.FloatTensor] | None = None
    student_features: dict[str, tuple[torch.FloatTensor, ...]] | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def resize_position_embeddings(
    position_embeddings: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int], num_prefix: int = 1
) -> torch.Tensor:
    """Bicubically resample the patch part of a `(1, num_prefix + h * w, C)` absolute position embedding.

    Prefix (class) positions are kept; `old_grid` may be non-square (e.g. 28 x 36 for 448 x 576 inputs).
    """
    if tuple(old_grid) == tuple(new_grid):
        return position_embeddings
    prefix, patches = position_embeddings[:, :num_prefix], position_embeddings[:, num_prefix:]
    dim = patches.shape[-1]
    if patches.shape[1] != old_grid[0] * old_grid[1]:
        raise ValueError(
            f"position embedding holds {patches.shape[1]} patch positions, which is not a {old_grid[0]}x{old_grid[1]} "
            "grid; check image_size and patch_size"
        )
    grid = patches.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.to(patches.dtype).permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)
    return torch.cat([prefix, grid], dim=1)


class SAKPatchEmbeddings(nn.Module):
    """Non-overlapping patch projection: `(B, C_in, H, W)` -> `(B, h * w, C)`."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        stem = config.stem_config
        self.num_channels = stem.num_channels
        self.projection = nn.Conv2d(stem.num_channels, stem.hidden_size, config.patch_size, stride=config.patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class SAKEmbeddings(nn.Module):
    """Class token (+ register tokens) and patch tokens with a learned absolute position embedding.

    The position embedding is sized to `config.image_size` and interpolated for other input sizes.
    """

    def __init__(self, config: SAKConfig):
        super().__init__()
        width = config.hidden_size
        self.grid_size = config.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        num_registers = config.num_prefix_tokens - 1
        self.register_tokens = nn.Parameter(torch.zeros(1, num_registers, width)) if num_registers else None
        self.position_embeddings = nn.Parameter(torch.zeros(1, 1 + self.grid_size[0] * self.grid_size[1], width))
        self.patch_embeddings = SAKPatchEmbeddings(config)
        self.patch_size = config.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        grid = (pixel_values.shape[-2] // self.patch_size[0], pixel_values.shape[-1] // self.patch_size[1])
        patches = self.patch_embeddings(pixel_values.to(self.patch_embeddings.projection.weight.dtype))
        position = resize_position_embeddings(self.position_embeddings, self.grid_size, grid)
        cls = (self.cls_token + position[:, :1]).expand(patches.shape[0], -1, -1)
        tokens = [cls]
        if self.register_tokens is not None:
            tokens.append(self.register_tokens.expand(patches.shape[0], -1, -1))
        tokens.append(patches + position[:, 1:])
        return torch.cat(tokens, dim=1)


class SAKSelfAttention(nn.Module):
    """Multi-head self attention with a fused qkv projection (rows ordered q, k, v)."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        stem = config.stem_config
        self.config = config
        self.num_heads = stem.num_attention_heads
        self.head_dim = stem.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        self.attention_dropout = stem.attention_probs_dropout_prob
        self.qkv = nn.Linear(stem.hidden_size, 3 * stem.hidden_size, bias=stem.qkv_bias)
        self.proj = nn.Linear(stem.hidden_size, stem.hidden_size)
        self.proj_dropout = nn.Dropout(stem.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        dropout = self.attention_dropout if self.training else 0.0
        if self.config._attn_implementation == "eager":
            scores = (query * self.scale) @ key.transpose(-2, -1)
            probs = F.dropout(scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype), dropout, self.training)
            context = probs @ value
        else:
            context = F.scaled_dot_product_attention(query, key, value, dropout_p=dropout)
        context = context.transpose(1, 2).reshape(batch, tokens, width)
        return self.proj_dropout(self.proj(context))


class SAKMLP(nn.Module):
    """Two-layer feed-forward block of a stem layer."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        stem = config.stem_config
        hidden = getattr(stem, "intermediate_size", None) or int(stem.hidden_size * stem.mlp_ratio)
        self.fc1 = nn.Linear(stem.hidden_size, hidden)
        self.activation = ACT2FN[stem.hidden_act]
        self.fc2 = nn.Linear(hidden, stem.hidden_size)
        self.dropout = nn.Dropout(stem.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.activation(self.fc1(hidden_states))))


class SAKLayerScale(nn.Module):
    """Per-channel scale of a residual branch (DINOv2 stems)."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.full((config.hidden_size,), float(config.stem_config.layerscale_value)))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.lambda1


class SAKStemLayer(GradientCheckpointingLayer):
    """Pre-norm transformer block of the Teacher-Agnostic Stem."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        eps = config.stem_config.layer_norm_eps
        use_layer_scale = config.stem_config.model_type.startswith("dinov2")
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.attention = SAKSelfAttention(config)
        self.layer_scale1 = SAKLayerScale(config) if use_layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = SAKMLP(config)
        self.layer_scale2 = SAKLayerScale(config) if use_layer_scale else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.layer_scale1(self.attention(self.norm1(hidden_states)))
        return hidden_states + self.layer_scale2(self.mlp(self.norm2(hidden_states)))


class SAKStem(nn.Module):
    """Teacher-Agnostic Stem: a plain ViT (no final norm) returning its embeddings and every block's output."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        self.embeddings = SAKEmbeddings(config)
        self.layers = nn.ModuleList(SAKStemLayer(config) for _ in range(config.stem_config.num_hidden_layers))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = [self.embeddings(pixel_values)]
        for layer in self.layers:
            hidden_states.append(layer(hidden_states[-1]))
        return tuple(hidden_states)


class SAKAdapter(nn.Module):
    """Bottleneck adapter `A(z) = z + s * W_up(GELU(W_down z))` with a learnable scalar `s` (initialised to 1)."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        self.down = nn.Linear(config.hidden_size, config.hidden_size // config.down_ratio)
        self.activation = nn.GELU()
        self.up = nn.Linear(config.hidden_size // config.down_ratio, config.hidden_size)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.up(self.activation(self.down(hidden_states))) * self.scale


class SAKTeacherPath(nn.Module):
    """Teacher-Specific Adapter Path: `r^0 = A^0(x_0)`, `r^i = A^i(r^{i-1} + x_i)`; at each output level the patch
    tokens of `r^i` pass through a LayerNorm of their own."""

    def __init__(self, config: SAKConfig):
        super().__init__()
        self.out_indices = list(config.out_indices)
        self.num_prefix_tokens = config.num_prefix_tokens
        self.adapters = nn.ModuleList(SAKAdapter(config) for _ in range(config.stem_config.num_hidden_layers + 1))
        self.output_norms = nn.ModuleList(nn.LayerNorm(config.hidden_size) for _ in self.out_indices)

    def forward(self, stem_hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        """`stem_hidden_states` = (x_0, ..., x_L); returns one `(B, h * w, C)` feature per output level."""
        residual = self.adapters[0](stem_hidden_states[0])
        features, next_block = [], 0
        # Adapters past the last output level cannot change any output, so they are not run.
        for block, norm in zip(self.out_indices, self.output_norms):
            for i in range(next_block, block + 1):
                residual = self.adapters[i + 1](residual + stem_hidden_states[i + 1])
            next_block = block + 1
            features.append(norm(residual[:, self.num_prefix_tokens :]))
        return tuple(features)


def mix_experts(features: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """`sum_e weights[:, e] * features[e]` for `(B, N, C)` features and `(B, E)` weights, accumulated in place into one
    buffer (one multiply, then one fused multiply-add per further expert): no stacked `(B, E, N, C)` tensor and no
    temporaries. Autograd-safe. Equal to the left-to-right sum up to the rounding of the fused multiply-add."""
    dtype = features[0].dtype
    mixed = features[0] * weights[:, 0, None, None].to(dtype)
    for index, feature in enumerate(features[1:], start=1):
        mixed.addcmul_(feature, weights[:, index, None, None].to(dtype))
    return mixed


class SAKRouter(nn.Module):
    """Mixture-of-Representations router of one (level, task).

    Per-token gate `Linear(C, C/2) -> LayerNorm -> GELU -> Linear(C/2, E')`, averaged over tokens into per-image logits.
    With noisy gating `E' = 2E` holds (clean, raw noise); in training the logits are `clean + eps * (softplus(raw) +
    0.01)`, in eval `clean`. The output mixes the stem feature and the teacher-path features with the softmax weights
    (with `fast_path`: in one buffer, [`mix_experts`]).
    """

    fast_path: bool = False

    def __init__(self, config: SAKConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.noisy_gating = config.noisy_gating
        width = config.hidden_size
        self.gate = nn.Sequential(
            nn.Linear(width, width // 2),
            nn.LayerNorm(width // 2),
            nn.GELU(),
            nn.Linear(width // 2, self.num_experts * (2 if self.noisy_gating else 1)),
        )

    def forward(
        self, stem_features: torch.Tensor, expert_features: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.gate(stem_features).mean(dim=1)
        if self.noisy_gating:
            clean, raw_noise = logits.chunk(2, dim=-1)
            logits = clean + torch.randn_like(clean) * (F.softplus(raw_noise) + 1e-2) if self.training else clean
        weights = logits.float().softmax(dim=-1)
        if self.fast_path:
            return mix_experts([stem_features, *expert_features], weights), weights
        mixed = stem_features * weights[:, 0, None, None].to(stem_features.dtype)
        for index, feature in enumerate(expert_features, start=1):
            mixed = mixed + feature * weights[:, index, None, None].to(feature.dtype)
        return mixed, weights


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


# Below this many patch positions per batch the fast head resizes and convolves as the default path does. Measured
# end to end for a bfloat16 ViT-B SAK on one AVX-512 core: with the low-resolution conv 4.08 s instead of 4.85 s at
# 448x576 (1008 positions), 1.07 s instead of 1.15 s at 224x288 (252), 0.38 s instead of 0.31 s at 112x144 (63).
LOW_RESOLUTION_CONV_MIN_POSITIONS = 128


class SAKTaskHead(nn.Module):
    """Light decoder of one task over the level features.

    Per level `Linear(C, C/4)` on tokens, bilinear resize to 1/4 of the input size, concatenation, then
    `Conv3x3 -> BatchNorm -> GELU -> Conv1x1(num_outputs)` and a bilinear resize to the input size.

    With `fast_path` (set by `SAKForMultiTask.optimize_for_training` / `optimize_for_inference`) the same function is
    computed in fewer operations: the projections are written side by side into one channels-last map that is resized
    once; in eval mode the BatchNorm is folded into the conv (cached until a parameter changes) and, with
    `low_resolution_conv`, the resize + 3x3 conv run on the patch grid ([`upsampled_conv3x3`], when 1/4 of the input
    is an integer multiple of the patch grid).
    """

    fast_path: bool = False
    low_resolution_conv: bool = True

    def __init__(self, config: SAKConfig, num_outputs: int):
        super().__init__()
        width = config.hidden_size
        self.level_projections = nn.ModuleList(nn.Linear(width, width // 4) for _ in config.out_indices)
        fused = len(config.out_indices) * (width // 4)
        self.fuse_conv = nn.Conv2d(fused, width, kernel_size=3, padding=1)
        self.fuse_norm = nn.BatchNorm2d(width)
        self.activation = nn.GELU()
        self.classifier = nn.Conv2d(width, num_outputs, kernel_size=1)

    def forward(
        self, level_features: list[torch.Tensor], grid: tuple[int, int], output_size: tuple[int, int]
    ) -> torch.Tensor:
        quarter = (output_size[0] // 4, output_size[1] // 4)
        if self.fast_path:
            return self._fast_forward(level_features, grid, quarter, output_size)
        maps = []
        for projection, feature in zip(self.level_projections, level_features):
            projected = projection(feature).transpose(1, 2).reshape(feature.shape[0], -1, *grid)
            maps.append(F.interpolate(projected, size=quarter, mode="bilinear", align_corners=False))
        fused = self.activation(self.fuse_norm(self.fuse_conv(torch.cat(maps, dim=1))))
        return F.interpolate(self.classifier(fused), size=output_size, mode="bilinear", align_corners=False)

    def train(self, mode: bool = True) -> SAKTaskHead:
        if mode:  # the first optimizer step makes a folded conv stale: free it (and its kernels) for training
            self.__dict__.pop("_folded", None)
        return super().train(mode)

    def _fast_forward(
        self,
        level_features: list[torch.Tensor],
        grid: tuple[int, int],
        quarter: tuple[int, int],
        output_size: tuple[int, int],
    ) -> torch.Tensor:
        batch = level_features[0].shape[0]
        # (B, h * w, C) tokens side by side are a (B, C, h, w) map in channels-last memory: one copy, no transposes.
        projected = torch.cat([projection(f) for projection, f in zip(self.level_projections, level_features)], dim=-1)
        projected = projected.view(batch, *grid, -1).permute(0, 3, 1, 2)
        # Eval mode without gradients for the head's conv and norm: BatchNorm folded into the conv (when it tracks
        # statistics), cached. Eval mode with those gradients (e.g. fine-tuning with frozen statistics) keeps both.
        conv, norm = self.fuse_conv, self.fuse_norm
        parameter_grads = torch.is_grad_enabled() and any(
            p.requires_grad for p in (conv.weight, conv.bias, norm.weight, norm.bias) if p is not None
        )
        folded = not self.training and not parameter_grads and norm.track_running_stats
        scale = (quarter[0] // grid[0], quarter[1] // grid[1])
        # Only with the folded conv: in training the backward through the ~11x larger phase kernels costs more than
        # the FLOPs saved; on small grids so does reading them.
        exact_scale = (
            folded
            and self.low_resolution_conv
            and scale[0] * grid[0] == quarter[0]
            and scale[1] * grid[1] == quarter[1]
            and max(scale) > 1
            and batch * grid[0] * grid[1] >= LOW_RESOLUTION_CONV_MIN_POSITIONS
        )
        if folded:
            weight, bias, kernels = self.folded_conv(scale if exact_scale else None)
        else:
            weight, bias, kernels = conv.weight, conv.bias, None
        if exact_scale:
            fused = upsampled_conv3x3(projected, weight, scale, kernels)
            fused = fused.add_(bias.to(fused.dtype)[:, None, None])
        else:
            upsampled = F.interpolate(projected, size=quarter, mode="bilinear", align_corners=False)
            fused = F.conv2d(upsampled, weight, bias, padding=1)
        if not folded:
            fused = self.fuse_norm(fused)
        logits = self.classifier(self.activation(fused)).contiguous()
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)

    def _folded_key(self) -> tuple:
        tensors = (self.fuse_conv.weight, self.fuse_conv.bias, self.fuse_norm.weight, self.fuse_norm.bias,
                   self.fuse_norm.running_mean, self.fuse_norm.running_var)  # fmt: skip
        key = []
        for tensor in tensors:
            try:
                version = tensor._version
            except RuntimeError:  # inference tensors have no version counter
                version = -1
            key.append((tensor.data_ptr(), version, tensor.dtype, tensor.device))
        return tuple(key)

    @torch.no_grad()
    def fold_batch_norm(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The eval-mode `fuse_norm(fuse_conv(x))` as one conv: its float32 `(weight, bias)`."""
        conv, norm = self.fuse_conv, self.fuse_norm
        factor = norm.weight.float() * torch.rsqrt(norm.running_var.float() + norm.eps)
        weight = conv.weight.float() * factor[:, None, None, None]
        bias = (conv.bias.float() - norm.running_mean.float()) * factor + norm.bias.float()
        return weight, bias

    @torch.inference_mode(False)  # ordinary tensors even when first called in inference mode
    @torch.no_grad()
    def cache_folded_conv(self, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
        """Cache the folded conv (default: [`fold_batch_norm`] now) in the conv's dtype. The float32 fold is kept to
        derive the low-resolution kernels from when first needed. Valid until a parameter or running statistic
        changes (in place, in dtype or in device); `folded_conv` then refolds."""
        if weight is None or bias is None:
            weight, bias = self.fold_batch_norm()
        dtype = self.fuse_conv.weight.dtype
        self.__dict__["_folded"] = {
            "key": self._folded_key(),
            "weight": weight.to(dtype).contiguous(memory_format=torch.channels_last),
            "bias": bias.to(dtype),
            "float32_weight": weight,
            "kernels": {},
        }

    @torch.inference_mode(False)
    @torch.no_grad()
    def folded_conv(self, scale: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, list | None]:
        """The cached eval-mode conv `(weight, bias, low-resolution kernels for scale or None)`, refolded when stale."""
        cached = self.__dict__.get("_folded")
        if cached is None or cached["key"] != self._folded_key():
            self.cache_folded_conv()
            cached = self.__dict__["_folded"]
        if scale is not None and scale not in cached["kernels"]:
            dtype = cached["weight"].dtype
            kernels = upsampled_conv3x3_kernels(cached["float32_weight"], scale)
            cached["kernels"][scale] = [(rows, columns, kernel.to(dtype)) for rows, columns, kernel in kernels]
        return cached["weight"], cached["bias"], cached["kernels"].get(scale)


class SAKPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by SAK models."""

    config_class = SAKConfig
    base_model_prefix = "sak"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SAKStemLayer", "SAKEmbeddings"]
    _supports_sdpa = True
    _keys_to_ignore_on_load_missing = [r"^aligners\."]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, SAKTaskHead):
            # The reference heads keep PyTorch's default initialisation.
            for layer in [*module.level_projections, module.fuse_conv, module.classifier]:
                init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
                fan_in = layer.weight[0].numel()
                init.uniform_(layer.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, nn.Linear | nn.Conv2d):
            # Head layers get this too, then their head (visited after its children) re-initialises them.
            init.trunc_normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, SAKEmbeddings):
            init.trunc_normal_(module.cls_token, mean=0.0, std=std)
            init.trunc_normal_(module.position_embeddings, mean=0.0, std=std)
            if module.register_tokens is not None:
                init.trunc_normal_(module.register_tokens, mean=0.0, std=std)
        elif isinstance(module, SAKAdapter):
            init.ones_(module.scale)
        elif isinstance(module, SAKLayerScale):
            init.constant_(module.lambda1, float(self.config.stem_config.layerscale_value))


class SAKForMultiTask(SAKPreTrainedModel):
    """SAK student: Teacher-Agnostic Stem, Teacher-Specific Adapter Paths, MoR routers and one head per task.

    At inference it needs no teacher: `forward(pixel_values)` returns one dense prediction per task. In training,
    `labels` add the task losses and `teacher_features` (from a frozen committee, see `modeling_sak.teachers`) add the
    distillation loss.
    """

    def __init__(self, config: SAKConfig):
        super().__init__(config)
        self.stem = SAKStem(config)
        self.teacher_paths = nn.ModuleDict({name: SAKTeacherPath(config) for name in config.teachers})
        self.aligners = (
            nn.ModuleDict(
                {
                    name: nn.ModuleList(nn.Linear(config.hidden_size, spec["hidden_size"]) for _ in config.out_indices)
                    for name, spec in config.teachers.items()
                }
            )
            if config.use_aligners and config.teachers
            else None
        )
        self.routers = (
            nn.ModuleDict(
                {task: nn.ModuleList(SAKRouter(config) for _ in config.out_indices) for task in config.tasks}
            )
            if config.router_type == "mor" and config.teachers
            else None
        )
        self.heads = nn.ModuleDict({task: SAKTaskHead(config, channels) for task, channels in config.tasks.items()})
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem.embeddings.patch_embeddings

    @property
    def fast_path(self) -> bool:
        """Whether the fast path of [`optimize_for_training`] / [`optimize_for_inference`] is on."""
        return self.__dict__.get("_fast_path", False)

    def optimize_for_training(self, enabled: bool = True) -> SAKForMultiTask:
        """Switch the fast path on (or off with `enabled=False`) and return the model.

        The fast path computes the same function in fewer operations and works with autograd. Outputs and gradients
        equal the default path's up to float rounding (float32: about 1e-6 relative), not bit for bit:

        - task heads: the per-level projections are written side by side into one channels-last map, resized once
          and convolved channels-last; in eval mode the BatchNorm is folded into the conv and, with
          `low_resolution_conv` (see [`optimize_for_inference`]), the resize + 3x3 conv run on the patch grid;
        - MoR routers: the experts are mixed into one buffer ([`mix_experts`]);
        - each stem level is copied out of the token sequence once, not once per router and head.

        Parameters, buffers, dtypes and state-dict keys are untouched. Mixed precision is the trainer's (e.g.
        accelerate's `mixed_precision="bf16"`); run the teachers in bfloat16 (`load_teachers(dtype=torch.bfloat16)`),
        which is where most of a stage-2 step's time goes (bench/speed.py).
        """
        self.__dict__["_fast_path"] = enabled
        for module in self.modules():
            if isinstance(module, SAKTaskHead | SAKRouter):
                module.fast_path = enabled
        return self

    def optimize_for_inference(
        self, dtype: torch.dtype | None = torch.bfloat16, low_resolution_conv: bool = True, compile: bool = False
    ) -> SAKForMultiTask:
        """Prepare the model for fast inference, in place, and return it.

            model = SAKForMultiTask.from_pretrained(path).optimize_for_inference()   # bfloat16
            with torch.inference_mode():
                outputs = model(pixel_values)

        - switches the fast path on ([`optimize_for_training`]) and eval mode;
        - with `low_resolution_conv`, each head's bilinear resize + 3x3 conv runs on the patch grid
          ([`upsampled_conv3x3`]: no 16x larger upsampled map, 31% fewer conv FLOPs for patch size 16) when the batch
          holds at least `LOW_RESOLUTION_CONV_MIN_POSITIONS` patch positions; its kernels take about 11x (100/9) the
          memory of the 3x3 conv weight (ViT-B, 4 heads: +470 MB in bfloat16);
        - folds each head's BatchNorm into its 3x3 conv in float32 and caches the folded conv in `dtype` (the
          low-resolution kernels are derived from the float32 fold on first use), outside the state dict; the cache
          is refolded by itself when a weight or running statistic changes (an optimizer step, `load_state_dict`,
          `.to()`), and is not used in train mode;
        - casts parameters and buffers to `dtype` (`None` keeps them), as `from_pretrained(..., dtype=dtype)` does;
        - with `compile=True`, compiles the stem, adapter paths and routers in place with `nn.Module.compile`
          (module names and state-dict keys unchanged; the first call per input shape compiles, which takes tens of
          seconds). The heads stay eager: their time is in oneDNN convolutions. On a 2-core AVX-512 CPU this gained
          nothing over eager bfloat16 (bench/speed.py); it is there for machines where the elementwise work matters.

        The state dict keeps its keys and unfolded values (in `dtype`), so `save_pretrained` afterwards writes an
        ordinary checkpoint that `from_pretrained` loads (in `dtype`); the fast path itself is not saved: call this
        again after loading. Outputs are in `dtype`; in bfloat16 expect relative errors of about 1e-2 against float32
        (see bench/speed.py for ViT-B numbers).
        """
        self.optimize_for_training(True)
        for head in self.heads.values():
            head.low_resolution_conv = low_resolution_conv
        self.eval()
        folded = {task: head.fold_batch_norm() for task, head in self.heads.items()}
        if dtype is not None:
            self.to(dtype)
        for task, head in self.heads.items():
            head.cache_folded_conv(*folded[task])
        if compile:
            routers = [router for level_routers in (self.routers or {}).values() for router in level_routers]
            for module in [self.stem, *self.teacher_paths.values(), *routers]:
                module.compile()
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: dict[str, torch.Tensor | None] | None = None,
        teacher_features: dict[str, list[torch.Tensor] | tuple[torch.Tensor, ...]] | None = None,
        output_hidden_states: bool | None = None,
        output_student_features: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SAKMultiTaskOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images (see [`SAKImageProcessor`]). Any size works: the position embedding is
                interpolated, and sizes that are not a multiple of the patch size are padded right/bottom and the
                predictions cropped back.
            labels (`dict[str, torch.Tensor]`, *optional*):
                One label per task at the input size: semseg / human_parts / sal `(batch_size, height, width)` class
                ids, normals `(batch_size, 3, height, width)`, depth and edge `(batch_size, 1, height, width)`;
                `semantic_loss_ignore_index` (255) marks ignored pixels. Every task needs an entry; `None` skips one.
            teacher_features (`dict[str, list[torch.Tensor]]`, *optional*):
                Per teacher of the config, one `(batch_size, teacher_hidden_size, grid_height, grid_width)` map per
                output level. Adds the distillation loss. In training mode with teachers attached
                (`load_teachers`) and no `teacher_features`, the attached committee computes them.
            output_hidden_states (`bool`, *optional*):
                Return the stem's embeddings and block outputs.
            output_student_features (`bool`, *optional*):
                Return the student features compared with the teachers (default: when `teacher_features` is given).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_pixel_values(pixel_values)
        teachers = self.__dict__.get("_teachers")
        if teacher_features is None and teachers is not None and self.training and self.config.teachers:
            teacher_features = teachers(pixel_values)
        height, width = pixel_values.shape[-2:]
        patch_h, patch_w = self.config.patch_size
        pad_h, pad_w = (-height) % patch_h, (-width) % patch_w
        if pad_h or pad_w:
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))
        padded_size = (height + pad_h, width + pad_w)
        grid = (padded_size[0] // patch_h, padded_size[1] // patch_w)

        hidden_states = self.stem(pixel_values)
        path_features = {name: path(hidden_states) for name, path in self.teacher_paths.items()}
        prefix = self.config.num_prefix_tokens
        stem_levels = [hidden_states[block + 1][:, prefix:] for block in self.config.out_indices]
        if self.fast_path:  # every router and head of a level reads it: copy the strided slice once, not per reader
            stem_levels = [level.contiguous() for level in stem_levels]
        task_features, router_weights = self._mix_representations(stem_levels, path_features)
        task_outputs = {
            task: head(task_features[task], grid, padded_size)[..., :height, :width]
            for task, head in self.heads.items()
        }

        student_features = None
        if teacher_features is not None or output_student_features:
            student_features = self._student_features(path_features, grid)

        loss = task_losses = distill_losses = None
        if labels is not None:
            task_losses = self._task_losses(task_outputs, labels)
            loss = sum(self.config.task_loss_weights[task] * value for task, value in task_losses.items())
        if teacher_features is not None:
            distill_losses = self._distill_losses(student_features, teacher_features, pixel_values.shape[0])
            distill_total = sum(distill_losses.values())
            distill_total = self.config.distill_alpha * distill_total
            loss = distill_total if loss is None else loss + distill_total

        output = SAKMultiTaskOutput(
            loss=loss,
            task_losses=task_losses,
            distill_losses=distill_losses,
            task_outputs=task_outputs,
            router_weights=router_weights,
            student_features=student_features,
            hidden_states=hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(
                f"pixel_values must be a 4D tensor (batch_size, num_channels, height, width), got {shape}; "
                "add a batch dimension with pixel_values[None] or use SAKImageProcessor"
            )
        channels = self.config.stem_config.num_channels
        if pixel_values.shape[1] != channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels but the stem expects {channels}; "
                "give (batch_size, num_channels, height, width) RGB images (convert grayscale/RGBA to RGB)"
            )
        if pixel_values.shape[-2] < 1 or pixel_values.shape[-1] < 1:
            raise ValueError(f"pixel_values has an empty spatial size {tuple(pixel_values.shape[-2:])}")

    def _mix_representations(
        self, stem_levels: list[torch.Tensor], path_features: dict[str, tuple[torch.Tensor, ...]]
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor] | None]:
        """Per task and level: the MoR mixture, the plain sum (router "none"), or the stem feature (no teachers)."""
        if not path_features:
            return {task: stem_levels for task in self.heads}, None
        if self.routers is None:
            summed = [
                level + sum(features[i] for features in path_features.values()) for i, level in enumerate(stem_levels)
            ]
            return {task: summed for task in self.heads}, None
        task_features, router_weights = {}, {}
        for task, routers in self.routers.items():
            mixed, weights = [], []
            for i, (router, level) in enumerate(zip(routers, stem_levels)):
                feature, weight = router(level, [features[i] for features in path_features.values()])
                mixed.append(feature)
                weights.append(weight)
            task_features[task] = mixed
            router_weights[task] = torch.stack(weights, dim=1)
        return task_features, router_weights

    def _student_features(
        self, path_features: dict[str, tuple[torch.Tensor, ...]], grid: tuple[int, int]
    ) -> dict[str, tuple[torch.Tensor, ...]]:
        student = {}
        for name, levels in path_features.items():
            if self.aligners is not None:
                levels = [aligner(level) for aligner, level in zip(self.aligners[name], levels)]
            student[name] = tuple(level.transpose(1, 2).reshape(level.shape[0], -1, *grid) for level in levels)
        return student

    def _task_losses(
        self, task_outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor | None]
    ) -> dict[str, torch.Tensor]:
        if not isinstance(labels, dict):
            raise ValueError(f"labels must be a dict task -> tensor, got {type(labels).__name__}")
        unknown = sorted(set(labels) - set(task_outputs))
        if unknown:
            raise ValueError(f"labels name unknown tasks {unknown}; the model's tasks are {list(task_outputs)}")
        missing = [task for task in task_outputs if task not in labels]
        if missing:
            raise ValueError(
                f"labels lack the tasks {missing}; give a label for every task of the model "
                f"({list(task_outputs)}), or pass labels[task]=None to skip one"
            )
        config = self.config
        return {
            task: task_loss(
                config.task_loss_types[task],
                task_outputs[task],
                label.to(task_outputs[task].device),
                task,
                ignore_index=config.semantic_loss_ignore_index,
                pos_weight=config.edge_pos_weight,
            )
            for task, label in labels.items()
            if label is not None
        }

    def _distill_losses(
        self,
        student_features: dict[str, tuple[torch.Tensor, ...]],
        teacher_features: dict[str, list[torch.Tensor]],
        batch_size: int,
    ) -> dict[str, torch.Tensor]:
        if not isinstance(teacher_features, dict):
            raise ValueError(f"teacher_features must be a dict teacher -> list of maps, got {type(teacher_features)}")
        expected = list(self.config.teachers)
        if set(teacher_features) != set(expected):
            raise ValueError(
                f"teacher_features has teachers {sorted(teacher_features)} but the model distils {expected}; "
                "give one entry per teacher of the config"
            )
        num_levels = len(self.config.out_indices)
        losses = {}
        for name in expected:
            maps, width = teacher_features[name], self.config.teachers[name]["hidden_size"]
            if not isinstance(maps, list | tuple) or len(maps) != num_levels:
                count = len(maps) if isinstance(maps, list | tuple) else type(maps).__name__
                raise ValueError(
                    f"teacher_features['{name}'] must hold {num_levels} maps (one per output level), got {count}"
                )
            for level, (student, teacher) in enumerate(zip(student_features[name], maps), start=1):
                if teacher.dim() != 4 or teacher.shape[0] != batch_size or teacher.shape[1] != width:
                    raise ValueError(
                        f"teacher_features['{name}'][{level - 1}] must be (batch_size={batch_size}, {width}, h, w), "
                        f"got {tuple(teacher.shape)}"
                    )
                losses[f"{name}_level{level}"] = distillation_loss(
                    student, teacher.to(student.device), self.config.distill_loss_type
                )
        return losses

    def load_teachers(self, teachers=None, dtype: torch.dtype | None = None, renormalize: bool = False, **hub_kwargs):
        """Attach the frozen teacher committee the config names (or a given `SAKTeachers`) and return it.

        Attached teachers are kept outside the module tree: they are not parameters, not in the state dict, not
        saved and not needed for inference. In training mode, `forward` without `teacher_features` runs them.
        """
        from .teachers import SAKTeachers

        if teachers is None:
            teachers = SAKTeachers.from_config(self.config, dtype=dtype, renormalize=renormalize, **hub_kwargs)
        if list(teachers.teachers) != list(self.config.teachers):
            raise ValueError(
                f"the committee has teachers {list(teachers.teachers)} but the model distils {list(self.config.teachers)}"
            )
        self.__dict__["_teachers"] = teachers
        return teachers

    @property
    def teachers(self):
        """The attached `SAKTeachers`, or None."""
        return self.__dict__.get("_teachers")

    def save_pretrained(self, save_directory, *args, include_aligners: bool = False, **kwargs) -> None:
        """Save as a `from_pretrained`-loadable folder. Aligners are training-only and left out unless
        `include_aligners=True` (e.g. to continue distillation from a stage-1 model)."""
        if self.aligners is not None and not include_aligners and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not k.startswith("aligners.")}
        super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_stem_pretrained(
        cls, stem_name_or_path: str, config: SAKConfig | None = None, **config_kwargs
    ) -> SAKForMultiTask:
        """Build a NEW SAK whose stem starts from a transformers ViT or DINOv2 checkpoint (Hub id or local path).

        Everything except the stem is freshly initialised; the stem's position embedding is resampled to
        `config.image_size`. `config_kwargs` build the `SAKConfig` when `config` is not given, e.g.
        `SAKForMultiTask.from_stem_pretrained("google/vit-base-patch16-384", teachers={...}, tasks="nyud_v2")`.
        """
        from transformers import AutoConfig, AutoModel

        hub_kwargs = {k: config_kwargs.pop(k) for k in ("revision", "cache_dir", "token") if k in config_kwargs}
        stem_config = AutoConfig.from_pretrained(stem_name_or_path, **hub_kwargs)
        if config is None:
            config = SAKConfig(stem_config=stem_config.to_dict(), **config_kwargs)
        model = cls(config)
        extra = {"add_pooling_layer": False} if stem_config.model_type == "vit" else {}
        source = AutoModel.from_pretrained(stem_name_or_path, **hub_kwargs, **extra)
        stem_state = stem_state_dict_from_transformers(source.state_dict(), source.config, config)
        missing, unexpected = model.stem.load_state_dict(stem_state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"stem checkpoint {stem_name_or_path!r} ({stem_config.model_type}) does not fit the SAK stem: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}; check that stem_config matches the checkpoint"
            )
        logger.info(f"SAK stem initialised from {stem_name_or_path}; adapters, routers and heads are new")
        return model

    @classmethod
    def from_stem_and_teachers(
        cls, stem_name_or_path: str, teachers: dict[str, str], load_teachers: bool = False, **config_kwargs
    ) -> SAKForMultiTask:
        """Build a NEW SAK from a stem checkpoint and teacher ids, e.g.
        `from_stem_and_teachers("google/vit-base-patch16-384", {"dinov2": "facebook/dinov2-base", ...})`.

        Teacher widths come from the teachers' configs (no weights are downloaded unless `load_teachers=True`);
        aligners are switched on when a width differs from the stem's.
        """
        from transformers import AutoConfig

        from .teachers import teacher_widths

        hub_kwargs = {k: config_kwargs[k] for k in ("revision", "cache_dir", "token") if k in config_kwargs}
        specs = teacher_widths(teachers, **hub_kwargs)
        stem_width = AutoConfig.from_pretrained(stem_name_or_path, **hub_kwargs).hidden_size
        wider = [name for name, spec in specs.items() if spec["hidden_size"] != stem_width]
        if wider and not config_kwargs.get("use_aligners", False):
            logger.info(f"teachers {wider} are not {stem_width} wide like the stem: switching aligners on")
            config_kwargs["use_aligners"] = True
        # keeps each teacher's options (out_indices, position_interpolation, config_overrides) in the config
        teacher_specs = {name: {k: v for k, v in s.items() if k != "num_hidden_layers"} for name, s in specs.items()}
        model = cls.from_stem_pretrained(stem_name_or_path, teachers=teacher_specs, **config_kwargs)
        if load_teachers:
            model.load_teachers(**hub_kwargs)
        return model


_STEM_KEY_RULES = [
    # (pattern over transformers ViT / DINOv2 names in 4.x and 5.x, SAK stem name)
    (r"^embeddings\.(cls_token|register_tokens|position_embeddings)$", r"embeddings.\1"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_before|norm1)\.(weight|bias)$", r"layers.\1.norm1.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_after|norm2)\.(weight|bias)$", r"layers.\1.norm2.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.query|q_proj)\.(weight|bias)$", r"layers.\1.q.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.key|k_proj)\.(weight|bias)$", r"layers.\1.k.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.value|v_proj)\.(weight|bias)$", r"layers.\1.v.\2"),
    (
        r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)$",
        r"layers.\1.attention.proj.\2",
    ),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)$", r"layers.\1.mlp.fc1.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.(weight|bias)$", r"layers.\1.mlp.fc2.\2"),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(layer_scale[12])\.lambda1$", r"layers.\1.\2.lambda1"),
]
# Parts of a transformers ViT / DINOv2 that SAK's stem does not use (final norm, pooler, masked-image token).
_STEM_KEYS_UNUSED = r"^(layernorm\.|pooler\.|embeddings\.mask_token)"


def stem_state_dict_from_transformers(
    state_dict: dict[str, torch.Tensor], source_config, config: SAKConfig
) -> dict[str, torch.Tensor]:
    """Map a transformers `ViTModel` / `Dinov2Model` state dict onto `SAKStem` (q, k, v fused; position embedding
    resampled from the source's square grid to `config.grid_size`)."""
    import re

    mapped, unmatched = {}, []
    for key, value in state_dict.items():
        if re.match(_STEM_KEYS_UNUSED, key):
            continue
        for pattern, target in _STEM_KEY_RULES:
            if re.match(pattern, key):
                mapped[re.sub(pattern, target, key)] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise ValueError(
            f"cannot map stem weights {unmatched[:5]} of a {source_config.model_type} checkpoint onto the SAK stem; "
            f"supported stems are ViT and DINOv2 (with or without registers)"
        )
    for layer in range(config.stem_config.num_hidden_layers):
        for part in ("weight", "bias"):
            pieces = [mapped.pop(f"layers.{layer}.{name}.{part}", None) for name in "qkv"]
            if all(piece is not None for piece in pieces):
                mapped[f"layers.{layer}.attention.qkv.{part}"] = torch.cat(pieces, dim=0)
    positions = mapped["embeddings.position_embeddings"]
    num_patches = positions.shape[1] - 1
    size, patch = source_config.image_size, source_config.patch_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
    source_grid = (size[0] // patch[0], size[1] // patch[1])
    if source_grid[0] * source_grid[1] != num_patches:  # a config whose image_size does not describe its weights
        side = math.isqrt(num_patches)
        source_grid = (side, num_patches // side)
    mapped["embeddings.position_embeddings"] = resize_position_embeddings(positions, source_grid, config.grid_size)
    return mapped


__all__ = ["SAKForMultiTask", "SAKPreTrainedModel", "SAKMultiTaskOutput"]
