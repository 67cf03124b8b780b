"""Specialist ToyRooms teachers: trained, saved with save_pretrained, loaded like Hub teachers, cached."""

from __future__ import annotations

import json

import torch

from modeling_sak import SAKConfig
from modeling_sak.teachers.committee import SAKTeachers
from modeling_sak.teachers.specialists import TOYROOMS_SOURCES, ensure_specialists, ensure_toyrooms, source_fingerprint


def test_specialists_train_save_and_load_as_sak_teachers(tmp_path, monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    data = ensure_toyrooms(tmp_path, num_train=8, num_test=4, size=(32, 48))
    assert (data / "README.md").exists()
    folders = ensure_specialists(data, tmp_path, steps=2, size=(32, 48), width=32, depth=4, patch=8, batch_size=4)
    metrics = {kind: json.loads((folder / "metrics.json").read_text()) for kind, folder in folders.items()}
    assert set(metrics["geometry"]) >= {"depth_rmse", "chance_depth_rmse", "normals_mean_angle"}
    assert 0 <= metrics["semantics"]["mIoU"] <= 100 and metrics["semantics"]["chance_mIoU"] > 0

    config = SAKConfig(
        stem_config={
            "model_type": "vit",
            "hidden_size": 32,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "patch_size": 8,
        },
        image_size=[32, 48],
        teachers={kind: {"hidden_size": 32, "model_id": str(folder)} for kind, folder in folders.items()},
    )
    features = SAKTeachers.from_config(config)(torch.randn(2, 3, 32, 48))
    assert [tuple(f.shape) for f in features["geometry"]] == [(2, 32, 4, 6)] * 4

    # Second call: reused from the cache, not retrained.
    stamp = (folders["geometry"] / "model.safetensors").stat().st_mtime_ns
    again = ensure_specialists(data, tmp_path, steps=2, size=(32, 48), width=32, depth=4, patch=8, batch_size=4)
    assert again == folders and (folders["geometry"] / "model.safetensors").stat().st_mtime_ns == stamp


def test_caches_are_keyed_by_the_code_and_versions_that_made_them(tmp_path, monkeypatch):
    source = tmp_path / "renderer.py"
    source.write_text("SCALE = 1\n")
    before = source_fingerprint(source)
    assert source_fingerprint(source) == before  # deterministic
    source.write_text("SCALE = 2\n")
    assert source_fingerprint(source) != before  # an edited renderer is a new cache
    edited = source_fingerprint(source)
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert source_fingerprint(source) != edited  # so is another torch
    monkeypatch.undo()
    # The default run's cache folders carry the fingerprint of the code that fills them.
    data = ensure_toyrooms(tmp_path, num_train=2, num_test=1, size=(16, 24))
    assert data.name.endswith(source_fingerprint(*TOYROOMS_SOURCES))
