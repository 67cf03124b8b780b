"""SAKConfig: defaults of the paper, presets, serialisation order, and errors that name the field and the fix."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_config, tiny_stem
from transformers import AutoConfig

from modeling_sak import SAKConfig
from modeling_sak.remote_code.configuration_sak import default_out_indices


def test_defaults_are_the_reference_vit_b_nyud_student():
    config = SAKConfig(teachers={"dinov2": 768, "clip": 768, "sam": 768})
    assert config.stem_config.model_type == "vit" and config.hidden_size == 768
    assert config.stem_config.layer_norm_eps == 1e-6
    assert config.image_size == [448, 576] and config.grid_size == (28, 36)
    assert config.out_indices == [2, 5, 8, 11]
    assert config.tasks == {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
    assert config.task_loss_weights == {"semseg": 1.0, "normals": 10.0, "edge": 50.0, "depth": 1.0}
    assert config.task_loss_types["edge"] == "balanced_bce" and config.edge_pos_weight == 0.95
    assert config.router_type == "mor" and config.noisy_gating and config.down_ratio == 4
    assert config.distill_loss_type == "cos+l1" and config.distill_alpha == 1.0
    assert len(config.id2label) == 40 and config.id2label[0] == "wall"
    assert config.num_experts == 4


def test_pascal_context_preset():
    config = SAKConfig(tasks="pascal_context", teachers={"dinov2": 768})
    assert config.tasks == {"semseg": 21, "human_parts": 7, "normals": 3, "edge": 1, "sal": 2}
    assert config.task_loss_weights["human_parts"] == 2.0 and config.task_loss_weights["sal"] == 5.0
    assert config.task_loss_types["sal"] == "balanced_cross_entropy"
    assert config.id2label[0] == "background" and len(config.id2label) == 21


def test_id2label_names_every_semseg_class(tmp_path):
    # The stock image-segmentation pipeline looks every predicted class id up in id2label: a custom class count gets
    # one LABEL_i per class (not transformers' two defaults), names that survive a save, and a wrong count is refused.
    config = SAKConfig(teachers={}, tasks={"semseg": 5, "depth": 1})
    assert config.id2label == {i: f"LABEL_{i}" for i in range(5)} and config.label2id["LABEL_4"] == 4
    named = SAKConfig(teachers={}, tasks={"semseg": 3}, id2label={0: "floor", 1: "wall", 2: "sofa"})
    named.save_pretrained(tmp_path)
    assert SAKConfig.from_pretrained(tmp_path).id2label == {0: "floor", 1: "wall", 2: "sofa"}
    with pytest.raises(ValueError, match=r"id2label has 2 names but tasks\['semseg'\] has 3 classes"):
        SAKConfig(teachers={}, tasks={"semseg": 3}, id2label={0: "floor", 1: "wall"})


@pytest.mark.parametrize(
    "depth, expected",
    [(12, [2, 5, 8, 11]), (24, [5, 11, 17, 23]), (32, [7, 15, 23, 31]), (40, [9, 19, 29, 39]), (4, [0, 1, 2, 3])],
)
def test_depth_rule_for_output_levels(depth, expected):
    assert default_out_indices(depth) == expected


def test_depth_without_a_rule_asks_for_out_indices():
    with pytest.raises(ValueError, match="set `out_indices` explicitly"):
        tiny_config(stem_config=tiny_stem(num_hidden_layers=6))
    assert tiny_config(stem_config=tiny_stem(num_hidden_layers=6), out_indices=[1, 3, 5]).out_indices == [1, 3, 5]


def test_save_and_load_keeps_teacher_and_task_order(tmp_path):
    teachers = {"sam": {"hidden_size": 48, "model_id": "facebook/sam-vit-base"}, "dinov2": 32, "clip": 32}
    tasks = {"normals": 3, "semseg": 13, "depth": 1}
    config = tiny_config(teachers=teachers, tasks=tasks, use_aligners=True)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert [next(iter(entry)) for entry in saved["teachers"]] == ["sam", "dinov2", "clip"]
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is SAKConfig
    assert list(loaded.teachers) == ["sam", "dinov2", "clip"]
    assert loaded.teachers["sam"] == {"hidden_size": 48, "model_id": "facebook/sam-vit-base", "out_indices": None}
    assert list(loaded.tasks) == ["normals", "semseg", "depth"]
    assert loaded.stem_config.hidden_size == 32 and loaded.image_size == [64, 96]
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"teachers": {"dinov2": 48}}, r"teacher 'dinov2': hidden_size 48 != stem width 32; set use_aligners=True"),
        ({"router_type": "moe"}, r"router_type='moe' is not one of \['mor', 'none'\]"),
        ({"distill_loss_type": "kl"}, "distill_loss_type='kl'"),
        ({"tasks": "cityscapes"}, r"tasks='cityscapes' is not a preset; use one of \['nyud_v2', 'pascal_context'\]"),
        ({"tasks": {"albedo": 3}}, r"task 'albedo' has no default loss; set task_loss_types=\{'albedo': ...\}"),
        ({"tasks": {"depth": 0}}, "output channels 0 must be a positive int"),
        ({"task_loss_weights": {"sal": 5.0}}, r"task_loss_weights names unknown tasks \['sal'\]"),
        ({"image_size": [60, 96]}, "image_size height 60 is not a multiple of the stem patch size 16; use 48 or 64"),
        ({"out_indices": [0, 1, 4]}, r"must be 0-based block indices in \[0, 3\]"),
        ({"out_indices": [2, 1]}, "strictly increasing"),
        ({"down_ratio": 0}, "down_ratio=0 must be a positive int"),
        ({"stem_config": {"model_type": "swin"}}, "stem_config.model_type='swin' is not a supported stem"),
        ({"teachers": {"dino-v2": 32}}, "must be a Python identifier"),
        ({"teachers": {"dinov2": {"model_id": "x"}}}, "needs at least a hidden_size"),
        ({"teachers": {}, "tasks": {}}, "a SAK needs tasks, teachers or both"),
        ({"edge_pos_weight": 1.0}, "strictly between 0 and 1"),
    ],
)
def test_invalid_combinations_fail_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_unknown_task_with_an_explicit_loss_type_is_accepted():
    config = tiny_config(tasks={"albedo": 3}, task_loss_types={"albedo": "l1"})
    assert config.task_loss_weights == {"albedo": 1.0}
