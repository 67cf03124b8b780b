"""PyTorch SAK: a multi-task student distilled from a committee of vision foundation models (ICLR 2025)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import DepthEstimatorOutput, SemanticSegmenterOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_sak import SAKConfig
from .fast_path_sak import SAKDeployedTaskHead, chunked_attention, chunked_attention_is_faster, resized_conv3x3
from .losses import sak_loss, task_losses_of


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
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, num_tokens, hidden_size)`):
            Output of the last stem block (class token, register tokens, then the patch tokens row by row of the
            patch grid of `pixel_values` padded to a multiple of the patch size); the stem has no final norm. The
            first output at inference, so transformers' "image-feature-extraction" pipeline returns it.
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
    last_hidden_state: torch.FloatTensor | None = None
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
    if not torch.compiler.is_exporting() and tuple(old_grid) == tuple(new_grid):  # export: one graph for every size
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


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`softmax((query * scaling) key^T) value` with the softmax in float32, as the reference computes it (the query
    is scaled before the product). Returns `(batch_size, num_tokens, num_heads, head_dim)` and the probabilities."""
    scores = (query * scaling) @ key.transpose(-2, -1)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


class SAKSelfAttention(nn.Module):
    """Multi-head self attention with a fused qkv projection (rows ordered q, k, v), through transformers' attention
    interface (`config._attn_implementation`: "sdpa" by default, "eager", "flex_attention", "flash_attention_2").

    With "sdpa" and no attention dropout it computes the attention with [`chunked_attention`] where that measured
    faster than torch's SDPA ([`chunked_attention_is_faster`]: bfloat16 on a CPU without AMX; in training it saves the
    bfloat16 probabilities for the backward, 2 bytes per logit), the same function up to one rounding.
    """

    def __init__(self, config: SAKConfig):
        super().__init__()
        stem = config.stem_config
        self.config = config
        self.num_heads = stem.num_attention_heads
        self.head_dim = stem.hidden_size // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = stem.attention_probs_dropout_prob
        self.is_causal = False
        self.qkv = nn.Linear(stem.hidden_size, 3 * stem.hidden_size, bias=stem.qkv_bias)
        self.proj = nn.Linear(stem.hidden_size, stem.hidden_size)
        self.proj_dropout = nn.Dropout(stem.hidden_dropout_prob)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = hidden_states.shape
        qkv = self.qkv(hidden_states).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        implementation = self.config._attn_implementation
        dropout = self.attention_dropout if self.training else 0.0
        if implementation == "sdpa" and dropout == 0.0 and chunked_attention_is_faster(query):
            context = chunked_attention(query, key, value, self.scaling).transpose(1, 2)
        else:
            interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
            context, _ = interface(self, query, key, value, None, dropout=dropout, scaling=self.scaling)
        return self.proj_dropout(self.proj(context.reshape(batch, tokens, width)))


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
    ([`mix_experts`]).
    """

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
        return mix_experts([stem_features, *expert_features], weights), weights


class SAKTaskHead(nn.Module):
    """Light decoder of one task over the level features.

    Per level `Linear(C, C/4)` on tokens, bilinear resize to 1/4 of the input size, concatenation, then
    `Conv3x3 -> BatchNorm -> GELU -> Conv1x1(num_outputs)` and a bilinear resize to the input size. With
    `config.head_implementation="low_resolution"` (the default) the resize + 3x3 conv run on the patch grid
    ([`resized_conv3x3`], the same function in about 1/11 of the FLOPs); `"plain"` resizes, then convolves.
    [`SAKForMultiTask.optimize_for_inference`] replaces it by a [`SAKDeployedTaskHead`] computing the same function.
    """

    def __init__(self, config: SAKConfig, num_outputs: int):
        super().__init__()
        width = config.hidden_size
        self.low_resolution_conv = config.head_implementation == "low_resolution"
        self.level_projections = nn.ModuleList(nn.Linear(width, width // 4) for _ in config.out_indices)
        fused = len(config.out_indices) * (width // 4)
        self.fuse_conv = nn.Conv2d(fused, width, kernel_size=3, padding=1)
        self.fuse_norm = nn.BatchNorm2d(width)
        self.activation = nn.GELU()
        self.classifier = nn.Conv2d(width, num_outputs, kernel_size=1)

    def forward(
        self, level_features: list[torch.Tensor], grid: tuple[int, int], output_size: tuple[int, int]
    ) -> torch.Tensor:
        """One `(batch_size, h * w, C)` map per level -> `(batch_size, num_outputs, *output_size)`."""
        quarter = (output_size[0] // 4, output_size[1] // 4)
        if self.low_resolution_conv:
            projected = torch.cat([proj(feature) for proj, feature in zip(self.level_projections, level_features)], -1)
            fused = resized_conv3x3(projected, grid, self.fuse_conv.weight, quarter, self.fuse_conv.bias)
            fused = fused.permute(0, 3, 1, 2)
        else:
            maps = []
            for projection, feature in zip(self.level_projections, level_features):
                projected = projection(feature).transpose(1, 2).reshape(feature.shape[0], -1, *grid)
                maps.append(F.interpolate(projected, size=quarter, mode="bilinear", align_corners=False))
            fused = self.fuse_conv(torch.cat(maps, dim=1))
        fused = self.activation(self.fuse_norm(fused))
        # From a channels-last `fused` the classifier's output is channels-last too: made row-major while it is small,
        # so that the full-resolution logits and the losses over them read row-major memory (as the plain head's).
        logits = self.classifier(fused).contiguous()
        return F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)


class SAKPreTrainedModel(PreTrainedModel):
    """Weight initialisation and the transformers plumbing shared by SAK models."""

    config_class = SAKConfig
    base_model_prefix = "sak"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SAKStemLayer", "SAKEmbeddings"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
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
    `labels` add the task losses and `teacher_features` (from the frozen committee, `modeling_sak.teachers`) add the
    distillation loss.
    """

    def __init__(self, config: SAKConfig):
        super().__init__(config)
        self.stem = SAKStem(config)
        self.teacher_paths = nn.ModuleDict({name: SAKTeacherPath(config) for name in config.teachers})
        width, levels = config.hidden_size, config.out_indices
        self.aligners = self.routers = None
        if config.use_aligners and config.teachers:
            aligners = {n: [nn.Linear(width, t["hidden_size"]) for _ in levels] for n, t in config.teachers.items()}
            self.aligners = nn.ModuleDict({name: nn.ModuleList(layers) for name, layers in aligners.items()})
        if config.router_type == "mor" and config.teachers:
            routers = {task: nn.ModuleList(SAKRouter(config) for _ in levels) for task in config.tasks}
            self.routers = nn.ModuleDict(routers)
        self.heads = nn.ModuleDict({task: SAKTaskHead(config, channels) for task, channels in config.tasks.items()})
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.stem.embeddings.patch_embeddings

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
                output level, e.g. `SAKTeachers.from_config(config)(pixel_values)`. Adds the distillation loss.
            output_hidden_states (`bool`, *optional*):
                Return the stem's embeddings and block outputs.
            output_student_features (`bool`, *optional*):
                Return the student features compared with the teachers (default: when `teacher_features` is given).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states, path_features, task_outputs, router_weights, grid = self._predict(
            pixel_values, list(self.heads)
        )
        student_features = None
        if teacher_features is not None or output_student_features:
            student_features = self._student_features(path_features, grid)

        loss = task_losses = distill_losses = None
        if labels is not None or teacher_features is not None:
            loss, task_losses, distill_losses = sak_loss(
                self.config, task_outputs, labels, student_features, teacher_features
            )

        output = SAKMultiTaskOutput(
            loss=loss,
            task_losses=task_losses,
            distill_losses=distill_losses,
            last_hidden_state=hidden_states[-1],
            task_outputs=task_outputs,
            router_weights=router_weights,
            student_features=student_features,
            hidden_states=hidden_states if output_hidden_states else None,
        )
        return output if return_dict else output.to_tuple()

    def _predict(self, pixel_values: torch.Tensor, tasks) -> tuple:
        """Run the stem, the adapter paths, and the routers and heads of `tasks` only: `(stem hidden states, path
        features, task outputs cropped to the input size, router weights, patch grid)`."""
        self._check_pixel_values(pixel_values)
        height, width = pixel_values.shape[-2:]
        patch_h, patch_w = self.config.patch_size
        # Ceil division with a non-negative numerator: torch.export bounds it, and ONNX's integer Div (which truncates)
        # computes it as Python does.
        grid = ((height + patch_h - 1) // patch_h, (width + patch_w - 1) // patch_w)
        padded_size = (grid[0] * patch_h, grid[1] * patch_w)
        pad_h, pad_w = padded_size[0] - height, padded_size[1] - width
        if torch.compiler.is_exporting() or pad_h or pad_w:  # export: one graph for every size
            pixel_values = F.pad(pixel_values, (0, pad_w, 0, pad_h))

        hidden_states = self.stem(pixel_values)
        path_features = {name: path(hidden_states) for name, path in self.teacher_paths.items()}
        prefix = self.config.num_prefix_tokens
        # Every router and head of a level reads it: the strided slice is copied out once, not once per reader.
        stem_levels = [hidden_states[block + 1][:, prefix:].contiguous() for block in self.config.out_indices]
        task_features, router_weights = self._mix_representations(stem_levels, path_features, list(tasks))
        task_outputs = {task: self.heads[task](task_features[task], grid, padded_size) for task in tasks}
        if torch.compiler.is_exporting():  # a negative pad crops without the slice's bound check on the symbolic size
            task_outputs = {task: F.pad(output, (0, -pad_w, 0, -pad_h)) for task, output in task_outputs.items()}
        else:
            task_outputs = {task: output[..., :height, :width] for task, output in task_outputs.items()}
        return hidden_states, path_features, task_outputs, router_weights, grid

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
        self,
        stem_levels: list[torch.Tensor],
        path_features: dict[str, tuple[torch.Tensor, ...]],
        tasks: list[str] | None = None,
    ) -> tuple[dict[str, list[torch.Tensor]], dict[str, torch.Tensor] | None]:
        """Per task of `tasks` (default: every task) and level: the MoR mixture, the plain sum (router "none"), or the
        stem feature (no teachers)."""
        tasks = list(self.heads) if tasks is None else tasks
        if not path_features:
            return {task: stem_levels for task in tasks}, None
        if self.routers is None:
            summed = [
                level + sum(features[i] for features in path_features.values()) for i, level in enumerate(stem_levels)
            ]
            return {task: summed for task in tasks}, None
        task_features, router_weights = {}, {}
        for task in tasks:
            mixed, weights = [], []
            for i, (router, level) in enumerate(zip(self.routers[task], stem_levels)):
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

    def optimize_for_inference(
        self, dtype: torch.dtype | None = torch.bfloat16, low_resolution_conv: bool = True, compile: bool = False
    ) -> SAKForMultiTask:
        """Deploy the model for fast inference, in place, and return it: a one-way step once the weights are final
        (as RADIO's `switch_to_deploy`).

            model = SAKForMultiTask.from_pretrained(path).optimize_for_inference()   # bfloat16
            with torch.inference_mode():
                outputs = model(pixel_values)

        Switches to eval mode, replaces every task head by a [`SAKDeployedTaskHead`] (the same function in fewer
        operations: BatchNorm folded into the conv, and with `low_resolution_conv` the resize + 3x3 conv computed on
        the patch grid by [`resized_conv3x3`]), casts the parameters and buffers to `dtype` (`None` keeps them) and,
        with `compile=True`, compiles the stem, adapter paths and routers in place with `nn.Module.compile` (each new
        input shape compiles first: tens of seconds).

        Deployed heads are inference-only (training mode raises; the folded conv and norm are frozen) and see later
        weight changes only after another call. The state dict keeps its keys and unfolded values, so
        `save_pretrained` afterwards writes an ordinary checkpoint (in `dtype`); call this again after loading. In
        bfloat16 expect relative errors of about 1e-2 against float32 (bench/speed.py).
        """
        self.heads = nn.ModuleDict(
            {task: SAKDeployedTaskHead(head, dtype, low_resolution_conv) for task, head in self.heads.items()}
        )
        self.eval()
        if dtype is not None:
            self.to(dtype)
        if compile:
            routers = [router for level_routers in (self.routers or {}).values() for router in level_routers]
            for module in [self.stem, *self.teacher_paths.values(), *routers]:
                module.compile()
        return self

    def save_pretrained(self, save_directory, *args, include_aligners: bool = False, **kwargs) -> None:
        """Save as a `from_pretrained`-loadable folder. Aligners are training-only and left out unless
        `include_aligners=True` (e.g. to continue distillation from a stage-1 model).

        The folder carries the model's code (and `pipeline_sak.py`), and its config names every way to load it with
        `trust_remote_code=True`: `auto_map` maps `AutoModel` to [`SAKForMultiTask`],
        `AutoModelForSemanticSegmentation` to [`SAKForSemanticSegmentation`] and `AutoModelForDepthEstimation` to
        [`SAKForDepthEstimation`] (the "image-segmentation", "depth-estimation" and "image-feature-extraction"
        pipelines), and `custom_pipelines` names the "sak-multi-task" pipeline ([`SAKMultiTaskPipeline`]).
        """
        # transformers copies every file this module imports, even inside a function: pipeline_sak.py travels too.
        from .pipeline_sak import custom_pipelines

        if self.aligners is not None and not include_aligners and kwargs.get("state_dict") is None:
            kwargs["state_dict"] = {k: v for k, v in self.state_dict().items() if not k.startswith("aligners.")}
        module = type(self).__module__.rsplit(".", 1)[-1]  # "modeling_sak", also for code loaded from a checkpoint
        auto_map = {auto_class: f"{module}.{name}" for auto_class, name in AUTO_MAP.items()}
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **auto_map}
        self.config.custom_pipelines = custom_pipelines()
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


class _SAKSingleTaskModel(SAKForMultiTask):
    """What the single-task heads share: the config must have their task, and `forward` runs only that task's router
    and head (same weights as [`SAKForMultiTask`])."""

    task: str

    def __init__(self, config: SAKConfig):
        _check_task(type(self).__name__, self.task, config)
        super().__init__(config)

    def _forward_task(self, pixel_values: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        """`(the task's output (batch_size, channels, height, width), its loss or None, the stem's hidden states)`."""
        hidden_states, _, task_outputs, _, _ = self._predict(pixel_values, [self.task])
        loss = None
        if labels is not None:
            loss = task_losses_of(self.config, task_outputs, {self.task: labels})[self.task]
        return task_outputs[self.task], loss, hidden_states


class SAKForSemanticSegmentation(_SAKSingleTaskModel):
    """The semantic segmentation head of a multi-task SAK, in transformers' form: the same weights as
    [`SAKForMultiTask`] (a checkpoint of either loads into the other), but `forward` runs only the `semseg` router and
    head and returns a `SemanticSegmenterOutput`. `AutoModelForSemanticSegmentation` and transformers'
    "image-segmentation" pipeline load it from any SAK checkpoint with a `semseg` task (`trust_remote_code=True`).

    Raises a `ValueError` for a config without a `semseg` task.
    """

    task = "semseg"

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images (see [`SAKImageProcessor`]), any size.
            labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
                Class ids; `semantic_loss_ignore_index` (255) marks ignored pixels. Adds the task's loss (cross
                entropy by default, `config.task_loss_types["semseg"]`).
            output_hidden_states (`bool`, *optional*):
                Return the stem's embeddings and block outputs.

        Returns `SemanticSegmenterOutput` with `logits` `(batch_size, num_labels, height, width)` at the size of
        `pixel_values` (not reduced, unlike most segmentation models).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits, loss, hidden_states = self._forward_task(pixel_values, labels)
        output = SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=hidden_states if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()


class SAKForDepthEstimation(_SAKSingleTaskModel):
    """The depth head of a multi-task SAK, in transformers' form: the same weights as [`SAKForMultiTask`], but
    `forward` runs only the `depth` router and head and returns a `DepthEstimatorOutput`.
    `AutoModelForDepthEstimation` and transformers' "depth-estimation" pipeline load it from any SAK checkpoint with a
    `depth` task (`trust_remote_code=True`).

    Raises a `ValueError` for a config without a `depth` task.
    """

    task = "depth"

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DepthEstimatorOutput | tuple:
        r"""
        Args:
            pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
                Normalised images (see [`SAKImageProcessor`]), any size.
            labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
                Depth in metres; `semantic_loss_ignore_index` (255) marks pixels without a measurement. Adds the
                task's loss (L1 by default, `config.task_loss_types["depth"]`).
            output_hidden_states (`bool`, *optional*):
                Return the stem's embeddings and block outputs.

        Returns `DepthEstimatorOutput` with `predicted_depth` `(batch_size, height, width)` in metres, at the size of
        `pixel_values` and not clamped (the image processor's `post_process_depth_estimation` clamps at 0).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        labels = labels[:, None] if labels is not None and labels.dim() == 3 else labels
        depth, loss, hidden_states = self._forward_task(pixel_values, labels)
        output = DepthEstimatorOutput(
            loss=loss, predicted_depth=depth[:, 0], hidden_states=hidden_states if output_hidden_states else None
        )
        return output if return_dict else output.to_tuple()


def _check_task(class_name: str, task: str, config: SAKConfig) -> None:
    if task not in config.tasks:
        tasks = list(config.tasks) or "none (a stage-1, distillation-only student)"
        raise ValueError(
            f"{class_name} needs a '{task}' task, but this SAK's tasks are {tasks}; load it with AutoModel "
            '(SAKForMultiTask), or use the pipeline of one of its tasks ("sak-multi-task" for all of them, '
            '"image-feature-extraction" for the stem features)'
        )


# Every auto class a SAK checkpoint's config maps (`SAKForMultiTask.save_pretrained`).
AUTO_MAP = {
    "AutoModel": "SAKForMultiTask",
    "AutoModelForSemanticSegmentation": "SAKForSemanticSegmentation",
    "AutoModelForDepthEstimation": "SAKForDepthEstimation",
}

_LAYER = r"^(?:encoder\.layer|layers)\.(\d+)\."  # a block of a transformers ViT / DINOv2, 4.x or 5.x names
_STEM_KEY_RULES = [  # (transformers name pattern, SAK stem name)
    (r"^embeddings\.(cls_token|register_tokens|position_embeddings)$", r"embeddings.\1"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"embeddings.patch_embeddings.projection.\1"),
    (_LAYER + r"(?:layernorm_before|norm1)\.(weight|bias)$", r"layers.\1.norm1.\2"),
    (_LAYER + r"(?:layernorm_after|norm2)\.(weight|bias)$", r"layers.\1.norm2.\2"),
    (_LAYER + r"attention\.(?:attention\.query|q_proj)\.(weight|bias)$", r"layers.\1.q.\2"),
    (_LAYER + r"attention\.(?:attention\.key|k_proj)\.(weight|bias)$", r"layers.\1.k.\2"),
    (_LAYER + r"attention\.(?:attention\.value|v_proj)\.(weight|bias)$", r"layers.\1.v.\2"),
    (_LAYER + r"attention\.(?:output\.dense|o_proj)\.(weight|bias)$", r"layers.\1.attention.proj.\2"),
    (_LAYER + r"(?:intermediate\.dense|mlp\.fc1)\.(weight|bias)$", r"layers.\1.mlp.fc1.\2"),
    (_LAYER + r"(?:output\.dense|mlp\.fc2)\.(weight|bias)$", r"layers.\1.mlp.fc2.\2"),
    (_LAYER + r"(layer_scale[12])\.lambda1$", r"layers.\1.\2.lambda1"),
]
# Parts of a transformers ViT / DINOv2 that SAK's stem does not use (final norm, pooler, masked-image token).
_STEM_KEYS_UNUSED = r"^(layernorm\.|pooler\.|embeddings\.mask_token)"


def stem_state_dict_from_transformers(
    state_dict: dict[str, torch.Tensor], source_config, config: SAKConfig
) -> dict[str, torch.Tensor]:
    """Map a transformers `ViTModel` / `Dinov2Model` state dict onto `SAKStem` (q, k, v fused; position embedding
    resampled from the source's square grid to `config.grid_size`)."""
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


__all__ = [
    "SAKForDepthEstimation",
    "SAKForMultiTask",
    "SAKForSemanticSegmentation",
    "SAKMultiTaskOutput",
    "SAKPreTrainedModel",
]
