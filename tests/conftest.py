"""Shared builders of tiny real SAK models and reference checkpoints."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from modeling_sak import SAKConfig  # noqa: E402


def carried_files() -> set[str]:
    """The file names a checkpoint carries as remote code: the modules of `modeling_sak/remote_code/`."""
    import modeling_sak

    folder = Path(modeling_sak.__file__).parent / "remote_code"
    return {path.name for path in folder.glob("*.py")} - {"__init__.py"}


TINY_IMAGE_SIZE = (64, 96)  # a 4 x 6 patch grid: non-square on purpose
TEACHERS = ("dinov2", "clip", "sam")


def tiny_stem(**overrides) -> dict:
    """A 4-layer, width-32 ViT stem config (LayerNorm eps 1e-6 as the reference)."""
    stem = {
        "model_type": "vit",
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "patch_size": 16,
        "layer_norm_eps": 1e-6,
    }
    stem.update(overrides)
    return stem


def tiny_config(**overrides) -> SAKConfig:
    """Tiny SAK: 4-layer width-32 stem, 3 teachers, the 4 NYUD-v2 tasks."""
    kwargs = {
        "stem_config": tiny_stem(),
        "image_size": list(TINY_IMAGE_SIZE),
        "teachers": {name: 32 for name in TEACHERS},
        "tasks": "nyud_v2",
    }
    kwargs.update(overrides)
    return SAKConfig(**kwargs)


def nyud_labels(batch: int, height: int, width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random NYUD-v2 style labels with some ignored pixels."""
    generator = torch.Generator().manual_seed(seed)
    semseg = torch.randint(0, 40, (batch, height, width), generator=generator)
    semseg[:, :2] = 255
    normals = torch.nn.functional.normalize(torch.randn(batch, 3, height, width, generator=generator), dim=1)
    normals[:, :, -2:] = 255
    edge = (torch.rand(batch, 1, height, width, generator=generator) > 0.9).float()
    depth = torch.rand(batch, 1, height, width, generator=generator) * 5 + 0.5
    depth[:, :, :, :3] = 255
    return {"semseg": semseg, "normals": normals, "edge": edge, "depth": depth}


@pytest.fixture
def tiny_vit_stems(monkeypatch):
    """Let the converter build tiny ViT-S/B shapes for `vit_small` / `vit_base` (see test_convert_original_sak)."""
    from test_convert_original_sak import SHAPES

    from modeling_sak.commands import convert_original_sak

    stems = {
        f"vit_{name}": {
            "hidden_size": d["dim"],
            "num_hidden_layers": d["depth"],
            "num_attention_heads": d["heads"],
            "intermediate_size": d["hidden"],
        }
        for name, d in SHAPES.items()
    }
    monkeypatch.setattr(convert_original_sak, "REFERENCE_STEMS", stems)
    # Tiny teachers: widths come from the aligners in the checkpoint, or equal the stem's without them.
    monkeypatch.setattr(convert_original_sak, "REFERENCE_TEACHERS", {})


@pytest.fixture
def config() -> SAKConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """For train_accelerate.py runs (test_train_accelerate, test_sharding): a 24-image ToyRooms at 32 x 48 and two
    tiny random ViT teachers saved like Hub models."""
    import json

    from transformers import ViTConfig, ViTModel

    from modeling_sak.commands.prepare_dataset import make_toyrooms

    root = tmp_path_factory.mktemp("train")
    os.environ["TQDM_DISABLE"] = "1"
    make_toyrooms(root / "toy", num_train=24, num_test=6, size=(32, 48), rows_per_shard=6)
    teachers = {}
    for name, width in (("geometry", 32), ("semantics", 48)):
        torch.manual_seed(len(name))
        config = ViTConfig(
            hidden_size=width,
            num_hidden_layers=4,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
        )
        ViTModel(config, add_pooling_layer=False).save_pretrained(root / name)
        teachers[name] = str(root / name)
    return {"data": str(root / "toy"), "teachers": json.dumps(teachers), "root": root}


@contextlib.contextmanager
def exits_with_error(capsys, pattern: str):
    """A command's bad-input exit (`modeling_sak.cli`): SystemExit with status 2 and one `error:` line on stderr
    matching `pattern` (a regex, searched across lines; a leading `^` anchors it at the start of the message)."""
    import re

    if pattern.startswith("^"):
        pattern = ": error: " + pattern[1:]

    with pytest.raises(SystemExit) as stopped:
        yield
    error = capsys.readouterr().err
    assert stopped.value.code == 2, error
    assert ": error: " in error and re.search(pattern, error, re.S), error
