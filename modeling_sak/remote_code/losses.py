"""Task and distillation losses of SAK, exactly as the reference implementation computes them.

Every task loss ignores the label value `ignore_index` (`IGNORE_INDEX`, 255) and divides a sum by the number of valid *pixels* (not
elements), so a 3-channel normal map counts each pixel once. Losses are computed in float32 whatever the autocast
dtype of the model outputs. `sak_loss` assembles the training loss of `SAKForMultiTask` from them: it checks the
labels and the teacher features, weights the task losses and adds `distill_alpha` times the distillation total.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .configuration_sak import SAKConfig
from .fast_path_sak import bilinear_resize_matrix
from .tasks_sak import IGNORE_INDEX


def _as_label_map(labels: torch.Tensor, task: str) -> torch.Tensor:
    """(B, H, W) or (B, 1, H, W) class labels -> (B, H, W) long."""
    if labels.dim() == 4 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 3:
        raise ValueError(f"labels['{task}'] must be (batch_size, height, width) class ids, got {tuple(labels.shape)}")
    return labels.long()


def _as_dense(labels: torch.Tensor, channels: int, task: str) -> torch.Tensor:
    """(B, H, W) or (B, C, H, W) dense labels -> (B, C, H, W) float."""
    if labels.dim() == 3 and channels == 1:
        labels = labels[:, None]
    if labels.dim() != 4 or labels.shape[1] != channels:
        raise ValueError(
            f"labels['{task}'] must be (batch_size, {channels}, height, width), got {tuple(labels.shape)}"
        )
    return labels.float()


def cross_entropy_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    balanced: bool = False,
    task: str = "semseg",
) -> torch.Tensor:
    """Summed cross entropy over valid pixels divided by their number.

    With `balanced=True` (saliency, 2 classes) the classes are weighted `[1 - w, w]` with `w` the fraction of valid
    background pixels in the batch, and the sum is still divided by the number of valid pixels.
    """
    labels = _as_label_map(labels, task)
    logits = logits.float()
    valid = labels != ignore_index
    weight = None
    if balanced:
        if logits.shape[1] != 2:
            raise ValueError(f"balanced cross entropy of task '{task}' needs 2 output channels, got {logits.shape[1]}")
        positives = labels[valid].float()
        w = (1.0 - positives).sum() / positives.numel() if positives.numel() else logits.new_tensor(0.5)
        weight = torch.stack((1.0 - w, w)).to(logits.dtype)
    loss = F.cross_entropy(logits, labels, weight=weight, ignore_index=ignore_index, reduction="sum")
    return loss / valid.sum().clamp(min=1)


def normals_l1_loss(prediction: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """L1 between the L2-normalised prediction and the label, summed over channels and valid pixels / #valid pixels.

    A pixel is valid when none of its label channels equals `ignore_index`.
    """
    return l1_loss(F.normalize(prediction.float(), p=2, dim=1), labels, ignore_index, task="normals")


def l1_loss(
    prediction: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX, task: str = "depth"
) -> torch.Tensor:
    """Summed absolute error over valid pixels (all label channels != ignore_index) / number of valid pixels."""
    labels = _as_dense(labels, prediction.shape[1], task)
    valid = (labels != ignore_index).all(dim=1, keepdim=True)
    error = (prediction.float() - labels).abs() * valid
    return error.sum() / valid.sum().clamp(min=1)


def balanced_bce_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: float = 0.95,
    ignore_index: int = IGNORE_INDEX,
    task: str = "edge",
) -> torch.Tensor:
    """HED-style balanced BCE: BCE-with-logits(pos_weight = w / (1 - w)) * (1 - w), averaged over valid pixels."""
    labels = _as_dense(labels, 1, task)
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    per_pixel = F.binary_cross_entropy_with_logits(
        logits.float(), target, pos_weight=logits.new_tensor(pos_weight / (1.0 - pos_weight)).float(), reduction="none"
    )
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1) * (1.0 - pos_weight)


def task_loss(
    loss_type: str, output: torch.Tensor, labels: torch.Tensor, task: str, ignore_index: int = IGNORE_INDEX, **options
) -> torch.Tensor:
    """Dispatch one task's loss by its `loss_type` (see `SAKConfig.task_loss_types`)."""
    if labels.shape[-2:] != output.shape[-2:]:
        raise ValueError(
            f"labels['{task}'] has spatial size {tuple(labels.shape[-2:])} but the prediction is "
            f"{tuple(output.shape[-2:])}; give labels at the size of pixel_values"
        )
    if labels.shape[0] != output.shape[0]:
        raise ValueError(f"labels['{task}'] has batch size {labels.shape[0]}, pixel_values {output.shape[0]}")
    if loss_type == "cross_entropy":
        return cross_entropy_loss(output, labels, ignore_index, task=task)
    if loss_type == "balanced_cross_entropy":
        return cross_entropy_loss(output, labels, ignore_index, balanced=True, task=task)
    if loss_type == "normals_l1":
        return normals_l1_loss(output, labels, ignore_index)
    if loss_type == "l1":
        return l1_loss(output, labels, ignore_index, task=task)
    if loss_type == "balanced_bce":
        return balanced_bce_loss(output, labels, options.get("pos_weight", 0.95), ignore_index, task=task)
    raise ValueError(f"unknown loss type {loss_type!r} for task '{task}'")


def match_feature_grids(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bring two (B, C, h, w) maps to one grid, as the reference does.

    Only the heights are compared: when the teacher's grid is taller the student map is resized to the teacher's
    grid, otherwise (including equal heights with different widths) the teacher map is resized to the student's.
    Bilinear, align_corners=False. (With the paper's teachers this resizes the smaller grid to the larger one.)
    """
    if student.shape[-2:] == teacher.shape[-2:]:
        return student, teacher
    if teacher.shape[-2] > student.shape[-2]:
        student = F.interpolate(student, size=teacher.shape[-2:], mode="bilinear", align_corners=False)
    else:
        teacher = F.interpolate(teacher, size=student.shape[-2:], mode="bilinear", align_corners=False)
    return student, teacher


def _cosine_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """`F.cosine_embedding_loss(student.flatten(1), teacher.flatten(1), ones)` (the mean over the batch of `1 - cos`,
    eps 1e-12 on each squared norm as torch has it), reduced over (C, h, w) in place: no flattening copy whatever
    the maps' memory layout."""
    dims = tuple(range(1, student.dim()))
    dot = (student * teacher).sum(dims)
    norms = ((student * student).sum(dims) + 1e-12) * ((teacher * teacher).sum(dims) + 1e-12)
    return (1 - dot / norms.sqrt()).mean()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, loss_type: str = "cos+l1") -> torch.Tensor:
    """Loss between one student map and one teacher map, both (B, C, h, w) (grids matched first,
    [`match_feature_grids`]).

    "cos+l1": 0.9 * (1 - cos) of the per-sample flattened maps, averaged over the batch, + 0.1 * SmoothL1 (beta 1,
    mean); "cos": the cosine term alone; "l2": mean squared error. Computed in float32. When the student is resized up
    to a taller teacher grid (SAM's 64 x 64 against a 14 x 18 student), [`upsampled_distillation_loss`] gives the same
    value and gradient without the resized map; otherwise the terms are taken on the matched maps.
    """
    if loss_type not in _DISTILLATION_TERMS:
        raise ValueError(f"distill_loss_type={loss_type!r} is not one of {list(_DISTILLATION_TERMS)}")
    if teacher.shape[-2] > student.shape[-2]:  # the teacher is read in float32 chunks, not copied whole
        return upsampled_distillation_loss(student.float(), teacher, loss_type)
    student, teacher = match_feature_grids(student.float().contiguous(), teacher.float())
    if loss_type == "l2":
        return F.mse_loss(student, teacher)
    cosine = _cosine_distance(student, teacher)
    if loss_type == "cos":
        return cosine
    return 0.9 * cosine + 0.1 * F.smooth_l1_loss(student, teacher, beta=1.0)


# loss type -> (weight of the cosine term, elementwise term or None, weight of the elementwise term's mean)
_DISTILLATION_TERMS = {"cos+l1": (0.9, "smooth_l1", 0.1), "cos": (1.0, None, 0.0), "l2": (0.0, "squared", 1.0)}
# Teacher rows per chunk of `upsampled_distillation_loss`: about this many float32 elements, so that a chunk and its
# temporaries stay in the CPU's cache (and a GPU's kernels stay large).
_CHUNK_ELEMENTS = 1 << 20


def upsampled_distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, loss_type: str = "cos+l1"
) -> torch.Tensor:
    """`distillation_loss` for a teacher grid `(H, W)` taller than the student's `(h, w)`: the student map resized to
    `(H, W)` (bilinear, `align_corners=False`, as [`match_feature_grids`]), compared with the teacher, without
    materialising the resized map or its gradient.

    With `R_y` `(H, h)` and `R_x` `(W, w)` the resize matrices ([`bilinear_resize_matrix`]) and `U = R_y S R_x^T` per
    channel, the teacher is read once, in chunks of rows: each chunk of `U` is made from `S`, and its dot product with
    the teacher, its squared norm and its elementwise term (SmoothL1 or squared error) are summed, together with the
    elementwise gradient brought back to the student grid (`R_y^T G R_x`) and `R_y^T T R_x`. The cosine term's
    gradient is then `R^T T / |U||T| - cos * R^T R S / |U|^2` per sample. The backward multiplies the gradient kept
    from the forward (when `student` requires grad). The same value and gradient as the composition (tested in
    float64), in a few passes over the teacher instead of a dozen over maps at its resolution.

    Args:
        student: `(B, C, h, w)`, any memory layout.
        teacher: `(B, C, H, W)` with `H > h`, any memory layout and dtype (read in float32).
        loss_type: "cos+l1", "cos" or "l2".

    Returns:
        A scalar in float32 (float64 for a float64 student). Differentiable once in `student` (the backward scales
        the gradient made in the forward; no second derivative).

    Raises:
        ValueError: if the maps differ in batch size or channels, or the teacher grid is not taller.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"distillation maps must be (batch_size, channels, h, w) with the same batch size and channels, got "
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if teacher.shape[-2] <= student.shape[-2]:
        raise ValueError(f"teacher grid {tuple(teacher.shape[-2:])} is not taller than {tuple(student.shape[-2:])}")
    if student.dtype != torch.float64:
        student = student.float()
    device = student.device.type
    autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext():  # float32 matmuls
        return _UpsampledDistillation.apply(student, teacher, loss_type)


class _UpsampledDistillation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, loss_type: str) -> torch.Tensor:
        cosine_weight, elementwise, elementwise_weight = _DISTILLATION_TERMS[loss_type]
        batch, channels, h, w = student.shape
        height, width = teacher.shape[-2:]
        with_gradient = ctx.needs_input_grad[0]
        rows = bilinear_resize_matrix(h, height).to(student.device, student.dtype)
        columns = bilinear_resize_matrix(w, width).to(student.device, student.dtype)
        source = student.permute(0, 2, 3, 1).contiguous()  # (B, h, w, C)
        target = teacher.permute(0, 2, 3, 1)  # (B, H, W, C): a view, row-major for a channels-last teacher
        # Columns resized once: (B, h, W * C); each chunk of rows is one matmul from it.
        wide = torch.matmul(columns, source.view(batch * h, w, channels)).view(batch, h, width * channels)
        dot = student.new_zeros(batch)
        squares = student.new_zeros(batch)
        teacher_squares = student.new_zeros(batch)
        elementwise_sum = student.new_zeros(())
        back = student.new_zeros(batch, h, width * channels) if with_gradient and elementwise else None
        back_teacher = student.new_zeros(batch, h, width * channels) if with_gradient and cosine_weight else None
        step = min(height, max(1, _CHUNK_ELEMENTS // max(1, batch * width * channels)))
        # Every chunk is computed in two buffers, with dot products as reductions: few temporaries (fresh
        # memory costs page faults on CPU).
        buffers = None
        for start in range(0, height, step):
            chunk_rows = rows[start : start + step]  # (r, h)
            size = (batch, chunk_rows.shape[0], width * channels)
            if buffers is None or buffers[0].shape != size:
                buffers = (student.new_empty(size), student.new_empty(size))
            upsampled, chunk = buffers
            torch.matmul(chunk_rows, wide, out=upsampled)  # (B, r, W * C)
            chunk.view(batch, -1, width, channels).copy_(target[:, start : start + step])
            if cosine_weight:
                dot += _batched_dot(upsampled, chunk)
                squares += _batched_dot(upsampled, upsampled)
                teacher_squares += _batched_dot(chunk, chunk)
                if back_teacher is not None:
                    back_teacher.baddbmm_(chunk_rows.T.expand(batch, -1, -1), chunk)
            if elementwise:
                difference = upsampled.sub_(chunk)
                if elementwise == "squared":
                    elementwise_sum += _batched_dot(difference, difference).sum()
                    gradient = difference.mul_(2.0)
                else:  # SmoothL1 with beta 1 = 0.5 c^2 + |d| - |c| for c = clamp(d, -1, 1)
                    elementwise_sum += difference.abs().sum()
                    gradient = difference.clamp_(-1.0, 1.0)
                    elementwise_sum += 0.5 * _batched_dot(gradient, gradient).sum()
                    elementwise_sum -= gradient.abs().sum()
                if back is not None:
                    back.baddbmm_(chunk_rows.T.expand(batch, -1, -1), gradient)
        count = batch * channels * height * width
        loss = elementwise_weight * (elementwise_sum / count)
        scale = elementwise_weight / count
        gradient = None
        if back is not None:
            gradient = _to_student_grid(back, columns).mul_(scale)
        if cosine_weight:
            norms = ((squares + 1e-12) * (teacher_squares + 1e-12)).sqrt()
            cosine = dot / norms
            loss = cosine_weight * (1 - cosine).mean() + loss
            if with_gradient:
                # d/dS of -(w / B) * sum_b cos_b, on the student grid
                to_teacher = _to_student_grid(back_teacher, columns)
                gram = _gram_resize(source, rows, columns)
                factor = -cosine_weight / batch
                part = to_teacher * (factor / norms)[:, None, None, None]
                part -= gram * (factor * cosine / (squares + 1e-12))[:, None, None, None]
                gradient = part if gradient is None else gradient.add_(part)
        ctx.gradient = gradient  # (B, h, w, C)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        gradient = (ctx.gradient * grad_output).permute(0, 3, 1, 2)
        return gradient, None, None


def _batched_dot(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """`(first * second).sum((1, 2))` for contiguous `(B, r, n)` tensors, as `torch.linalg.vecdot` computes it."""
    return torch.linalg.vecdot(first.flatten(1), second.flatten(1))


def _to_student_grid(rows_back: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`(B, h, W * C)` (rows already brought back) -> `R_x^T` along the columns, with `columns` `R_x` `(W, w)` ->
    `(B, h, w, C)`."""
    batch, h, _ = rows_back.shape
    width, w = columns.shape
    back = torch.matmul(columns.T, rows_back.view(batch * h, width, -1))
    return back.view(batch, h, w, -1)


def _gram_resize(source: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """`R^T R S` for a `(B, h, w, C)` map: the Gram matrices `R_y^T R_y` `(h, h)` and `R_x^T R_x` `(w, w)` applied
    along its rows and columns."""
    batch, h, w, channels = source.shape
    across = torch.matmul(columns.T @ columns, source.reshape(batch * h, w, channels))
    return torch.matmul(rows.T @ rows, across.view(batch, h, w * channels)).view(batch, h, w, channels)


def sak_loss(
    config: SAKConfig,
    task_outputs: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor | None] | None = None,
    student_features: dict[str, tuple[torch.Tensor, ...]] | None = None,
    teacher_features: dict[str, list[torch.Tensor] | tuple[torch.Tensor, ...]] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """SAK's training loss: `(loss, task_losses, distill_losses)`.

    `loss = sum_t task_loss_weights[t] * task_losses[t] + distill_alpha * sum(distill_losses)`; a part whose input is
    None is left out (and returned as None). `task_losses` holds the unweighted loss of every task with a label;
    `distill_losses` the loss per teacher and level, keyed `"{teacher}_level{k}"` (k = 1..num_levels), between each
    `student_features[teacher]` map and the matching `teacher_features[teacher]` map.
    """
    loss = task_losses = distill_losses = None
    if labels is not None:
        task_losses = task_losses_of(config, task_outputs, labels)
        loss = sum(config.task_loss_weights[task] * value for task, value in task_losses.items())
    if teacher_features is not None:
        distill_losses = distillation_losses_of(config, student_features or {}, teacher_features)
        distill_total = config.distill_alpha * sum(distill_losses.values())
        loss = distill_total if loss is None else loss + distill_total
    return loss, task_losses, distill_losses


def task_losses_of(
    config: SAKConfig, task_outputs: dict[str, torch.Tensor], labels: dict[str, torch.Tensor | None]
) -> dict[str, torch.Tensor]:
    """The unweighted loss of every task whose label is not None; every task of the model needs an entry."""
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


def distillation_losses_of(
    config: SAKConfig,
    student_features: dict[str, tuple[torch.Tensor, ...]],
    teacher_features: dict[str, list[torch.Tensor] | tuple[torch.Tensor, ...]],
) -> dict[str, torch.Tensor]:
    """The distillation loss per teacher and level, after checking that `teacher_features` holds one
    `(batch_size, teacher_hidden_size, h, w)` map per level for exactly the config's teachers."""
    if not isinstance(teacher_features, dict):
        raise ValueError(f"teacher_features must be a dict teacher -> list of maps, got {type(teacher_features)}")
    expected = list(config.teachers)
    if set(teacher_features) != set(expected):
        raise ValueError(
            f"teacher_features has teachers {sorted(teacher_features)} but the model distils {expected}; "
            "give one entry per teacher of the config"
        )
    num_levels = len(config.out_indices)
    losses = {}
    for name in expected:
        maps, width = teacher_features[name], config.teachers[name]["hidden_size"]
        if not isinstance(maps, list | tuple) or len(maps) != num_levels:
            count = len(maps) if isinstance(maps, list | tuple) else type(maps).__name__
            raise ValueError(
                f"teacher_features['{name}'] must hold {num_levels} maps (one per output level), got {count}"
            )
        for level, (student, teacher) in enumerate(zip(student_features[name], maps), start=1):
            batch_size = student.shape[0]
            if teacher.dim() != 4 or teacher.shape[0] != batch_size or teacher.shape[1] != width:
                raise ValueError(
                    f"teacher_features['{name}'][{level - 1}] must be (batch_size={batch_size}, {width}, h, w), "
                    f"got {tuple(teacher.shape)}"
                )
            losses[f"{name}_level{level}"] = distillation_loss(
                student, teacher.to(student.device), config.distill_loss_type
            )
    return losses
