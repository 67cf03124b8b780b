"""publish: a folder is checked and proven loadable in a fresh process before anything is uploaded."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import yaml
from conftest import tiny_config

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.model_card import render_model_card
from modeling_sak.publish import check_folder, main


def write_checkpoint(folder):
    config = tiny_config(
        teachers={"dinov2": {"hidden_size": 48, "model_id": "facebook/dinov2-base"}, "clip": 32}, use_aligners=True
    )
    model = SAKForMultiTask(config).eval()
    model.save_pretrained(folder)
    SAKImageProcessor(pad_size=config.image_size).save_pretrained(folder)
    results = {"semseg": {"mIoU": 41.5, "pixel_accuracy": 70.0}, "depth": {"rmse": 0.61}, "normals": {"mean": 21.0}}
    card = render_model_card(config, "org/sak-tiny", results, {"max_steps": 5}, "toyrooms", "router_weights.png")
    card.save(folder / "README.md")
    return card


def test_model_card_sections_and_model_index(tmp_path):
    card = str(write_checkpoint(tmp_path))
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["library_name"] == "transformers" and "sak" in metadata["tags"]
    metrics = [m for r in metadata["model-index"][0]["results"] for m in r["metrics"]]
    assert {(m["name"], m["value"]) for m in metrics} == {("mIoU", 41.5), ("RMSE", 0.61), ("mean angular error", 21.0)}
    for section in (
        "## Usage",
        "## Model",
        "## Training",
        "## Evaluation",
        "## Router weights",
        "## Limitations",
        "## Citation",
        "trust_remote_code=True",
        "dinov2 (facebook/dinov2-base)",
        "measured with this package",
    ):
        assert section in card


def test_publish_uploads_only_a_folder_that_loads(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "ok")
    calls = []
    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"]))
    )
    main(["--checkpoint", str(tmp_path / "ok"), "--repo_id", "org/sak-tiny"])
    assert calls == [("create", "org/sak-tiny"), ("upload", "org/sak-tiny")]


def test_broken_folders_are_refused_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: pytest.fail("uploaded"))
    write_checkpoint(tmp_path / "missing_code")
    (tmp_path / "missing_code" / "losses.py").unlink()
    with pytest.raises(ValueError, match="missing code file losses.py"):
        main(["--checkpoint", str(tmp_path / "missing_code"), "--repo_id", "org/x"])
    write_checkpoint(tmp_path / "bad_config")
    config = json.loads((tmp_path / "bad_config" / "config.json").read_text())
    config["down_ratio"] = 0
    (tmp_path / "bad_config" / "config.json").write_text(json.dumps(config))
    check_folder(tmp_path / "bad_config")  # the files are all there ...
    with pytest.raises(
        ValueError, match="(?s)does not load with trust_remote_code.*down_ratio=0"
    ):  # ... but it does not load
        main(["--checkpoint", str(tmp_path / "bad_config"), "--repo_id", "org/x"])
    (tmp_path / "no_card").mkdir()
    with pytest.raises(ValueError, match="missing config.json; missing model.safetensors"):
        check_folder(tmp_path / "no_card")


def test_card_for_a_converted_reference_checkpoint(tmp_path, tiny_vit_stems):
    from test_convert_original_sak import convert_args, write_reference_run

    from modeling_sak import SAKConfig
    from modeling_sak.convert_original_sak import main as convert

    write_reference_run(tmp_path, "base", True, stage=2)
    convert(convert_args(tmp_path))
    config = SAKConfig.from_pretrained(tmp_path / "converted")
    card = str(
        render_model_card(config, "org/sak-converted", {"depth": {"rmse": 0.5}}, {"source": "converted"}, "nyud-v2")
    )
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert "dinov2 (" in card and "reported by the authors" not in card  # a tiny stem is not a released configuration
