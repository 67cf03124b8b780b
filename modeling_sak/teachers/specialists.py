"""Pretrain ToyRooms "specialist" teachers: a geometry ViT (depth + normals) and a semantics ViT (segmentation).

    sak-train-specialists --data DIR --output_dir DIR [--steps N]

Each is a transformers `ViTModel` (width 96, 4 layers, patch 8) trained with a light per-patch head and saved with `save_pretrained` (the head and
the test metrics go beside it in `head.safetensors` / `metrics.json`), so that SAK loads it exactly like a Hub
teacher: `teachers={"geometry": {"hidden_size": 96, "model_id": "DIR/geometry"}, ...}`. Two teachers with different
biases are SAK's premise in miniature. `ensure_toyrooms` / `ensure_specialists` build the data and the teachers once
under a cache folder and reuse them afterwards.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn
from transformers import ViTConfig, ViTModel

from ..cli import advance, progress_bar
from ..data.loading import MultiTaskStream, load_multitask_split
from ..data.toyrooms import CLASSES, OpenedRows
from ..data.transforms import MultiTaskTransform
from ..evaluation.metrics import DepthMetric, NormalsMetric, SemsegMetric
from ..remote_code.losses import cross_entropy_loss, l1_loss, normals_l1_loss


SPECIALISTS = {"geometry": {"depth": 1, "normals": 3}, "semantics": {"semseg": len(CLASSES)}}
DEFAULT_CACHE = Path.home() / ".cache" / "sak_hf"


class PatchHead(nn.Module):
    """Per-token linear prediction of a patch x patch block of every output channel."""

    def __init__(self, width: int, patch: int, outputs: dict[str, int]):
        super().__init__()
        self.patch, self.outputs = patch, dict(outputs)
        self.proj = nn.Linear(width, patch * patch * sum(outputs.values()))

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
        batch = tokens.shape[0]
        maps = self.proj(tokens).transpose(1, 2).reshape(batch, -1, *grid)
        maps = F.pixel_shuffle(maps, self.patch)
        return dict(zip(self.outputs, maps.split(list(self.outputs.values()), dim=1)))


def _loader(data_dir: str, split: str, size: tuple[int, int], train: bool, batch_size: int, seed: int, tasks):
    dataset = load_multitask_split(data_dir, split, streaming=False, shuffle_buffer=1 if train else None, seed=seed)
    # Only the columns the batches need (and semseg in training: the random crop looks at its classes); the others
    # would be decoded and transformed for nothing, without changing any batch. Rows are opened once per process.
    needed = ["id", "image", *tasks, *(["semseg"] if train else [])]
    dataset = dataset.select_columns([column for column in dataset.column_names if column in needed])
    transform = MultiTaskTransform(train=train, size=size, seed=seed, scale_range=(0.8, 1.25), photometric=False)
    stream = MultiTaskStream(OpenedRows(dataset, data_dir, split), transform, tasks, train=train)
    return stream, torch.utils.data.DataLoader(stream, batch_size=batch_size, collate_fn=stream.collate)


def train_specialist(
    kind: str,
    data_dir: str,
    output_dir: str | Path,
    size: tuple[int, int] = (96, 128),
    steps: int = 600,
    batch_size: int = 16,
    width: int = 96,
    depth: int = 4,
    patch: int = 8,
    seed: int = 0,
    learning_rate: float = 1e-3,
) -> dict[str, float]:
    """Train one specialist, save it, and return its test metrics next to a chance baseline."""
    torch.manual_seed(seed)
    outputs = SPECIALISTS[kind]
    config = ViTConfig(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=max(1, width // 32),
        intermediate_size=4 * width,
        image_size=list(size),
        patch_size=patch,
        layer_norm_eps=1e-6,
    )
    model, head = ViTModel(config, add_pooling_layer=False), PatchHead(width, patch, outputs)
    parameters = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    grid = (size[0] // patch, size[1] // patch)
    stream, loader = _loader(data_dir, "train", size, True, batch_size, seed, list(outputs))

    def predict(pixel_values):
        return head(model(pixel_values).last_hidden_state[:, 1:], grid)

    step, epoch, start = 0, 0, time.perf_counter()
    progress = progress_bar(total=steps, desc=f"{kind} teacher", unit="step")
    model.train()
    while step < steps:
        stream.set_epoch(epoch)
        for batch in loader:
            if batch["pixel_values"] is None:
                continue
            prediction, labels = predict(batch["pixel_values"]), batch["labels"]
            if kind == "geometry":
                loss = l1_loss(prediction["depth"], labels["depth"]) + normals_l1_loss(
                    prediction["normals"], labels["normals"]
                )
            else:
                loss = cross_entropy_loss(prediction["semseg"], labels["semseg"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            advance(progress, loss=f"{loss.item():.3f}")
            if step == steps:
                break
        epoch += 1
    progress.close()

    model.eval()
    _, test_loader = _loader(data_dir, "test", size, False, batch_size, seed, list(outputs))
    metrics = {}
    with torch.no_grad():
        if kind == "geometry":
            depth_metric, normals_metric, chance = DepthMetric(), NormalsMetric(), DepthMetric()
            train_mean = _mean_depth(data_dir, size)
            for batch in test_loader:
                prediction = predict(batch["pixel_values"])
                depth_metric.update(prediction["depth"], batch["labels"]["depth"])
                normals_metric.update(prediction["normals"], batch["labels"]["normals"])
                chance.update(torch.full_like(batch["labels"]["depth"], train_mean), batch["labels"]["depth"])
            metrics = {
                "depth_rmse": depth_metric.compute()["rmse"],
                "chance_depth_rmse": chance.compute()["rmse"],
                "normals_mean_angle": normals_metric.compute()["mean"],
            }
        else:
            semseg, chance = SemsegMetric(len(CLASSES)), SemsegMetric(len(CLASSES))
            for batch in test_loader:
                semseg.update(predict(batch["pixel_values"])["semseg"], batch["labels"]["semseg"])
                chance.update(torch.ones_like(batch["labels"]["semseg"]), batch["labels"]["semseg"])  # all "wall"
            metrics = {"mIoU": semseg.compute()["mIoU"], "chance_mIoU": chance.compute()["mIoU"]}
    metrics |= {"train_seconds": round(time.perf_counter() - start, 1), "steps": steps}

    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    save_file(head.state_dict(), str(output_dir / "head.safetensors"))
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _mean_depth(data_dir: str, size: tuple[int, int]) -> float:
    stream, loader = _loader(data_dir, "train", size, False, 64, 0, ["depth"])
    total, count = 0.0, 0
    for batch in loader:
        depth = batch["labels"]["depth"]
        valid = (depth > 0) & (depth != 255)
        total, count = total + depth[valid].sum().item(), count + valid.sum().item()
    return total / max(count, 1)


def source_fingerprint(*modules: str | Path) -> str:
    """8 hex digits over the source of `modules` (paths relative to the package, e.g. "data/toyrooms.py", or
    absolute) and the torch and transformers versions. Cached data, teachers and baselines carry it in their names, so
    that a cache made by other code or versions is never reused: a warm run then computes what a cold run computes."""
    import transformers

    digest = hashlib.sha256(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    for module in modules:
        digest.update((PACKAGE / module).read_bytes())
    return digest.hexdigest()[:8]


PACKAGE = Path(__file__).resolve().parents[1]  # modeling_sak/: what `source_fingerprint` paths are relative to
# The code that renders ToyRooms, and that plus what trains a specialist on it.
TOYROOMS_SOURCES = ("data/toyrooms.py", "data/schema.py", "commands/prepare_dataset.py")
SPECIALIST_SOURCES = (
    *TOYROOMS_SOURCES,
    "teachers/specialists.py",
    "data/loading.py",
    "data/transforms.py",
    "remote_code/losses.py",
)


def ensure_toyrooms(
    cache_dir: str | Path = DEFAULT_CACHE,
    num_train: int = 2000,
    num_test: int = 200,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> Path:
    """The ToyRooms folder for these settings and this code, rendered on first use."""
    from ..commands.prepare_dataset import make_toyrooms

    key = source_fingerprint(*TOYROOMS_SOURCES)
    folder = Path(cache_dir) / f"toyrooms-s{seed}-{size[0]}x{size[1]}-{num_train}-{num_test}-{key}"
    if not (folder / "README.md").exists():  # the card is written last: its presence means a complete folder
        make_toyrooms(folder, num_train, num_test, size, seed)
    return folder


def ensure_specialists(
    data_dir: str | Path,
    cache_dir: str | Path = DEFAULT_CACHE,
    steps: int | dict[str, int] = 600,
    size: tuple[int, int] = (96, 128),
    learning_rate: float | dict[str, float] = 1e-3,
    **kwargs,
) -> dict[str, Path]:
    """`{"geometry": folder, "semantics": folder}`, trained on first use (keyed by data folder, settings and code).

    `steps` and `learning_rate` (the one-cycle peak) are one number or one per teacher (`{"geometry": 1000,
    "semantics": 300}`: depth and normals take longer to learn)."""
    folders = {}
    shape = "-".join([f"{k}{kwargs[k]}" for k in sorted(kwargs)] + [source_fingerprint(*SPECIALIST_SOURCES)])
    for kind in SPECIALISTS:
        kind_steps = steps[kind] if isinstance(steps, dict) else steps
        kind_rate = learning_rate[kind] if isinstance(learning_rate, dict) else learning_rate
        name = f"specialist-{kind}-{Path(data_dir).name}-{kind_steps}-lr{kind_rate:g}-{shape}"
        folder = Path(cache_dir) / name
        if not (folder / "metrics.json").exists():
            train_specialist(
                kind, str(data_dir), folder, size=size, steps=kind_steps, learning_rate=kind_rate, **kwargs
            )
        folders[kind] = folder
    return folders
