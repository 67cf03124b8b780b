"""publish: a folder is checked and proven loadable in a fresh process before anything is uploaded."""

from __future__ import annotations

import json

import huggingface_hub
import pytest
import yaml
from conftest import exits_with_error, tiny_config
from huggingface_hub import ModelCard, metadata_load

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.commands.prepare_dataset import make_toyrooms
from modeling_sak.commands.publish import check_folder, main
from modeling_sak.model_card import render_model_card


def write_checkpoint(folder, **save_kwargs):
    config = tiny_config(
        teachers={"dinov2": {"hidden_size": 48, "model_id": "facebook/dinov2-base"}, "clip": 32}, use_aligners=True
    )
    model = SAKForMultiTask(config).eval()
    model.save_pretrained(folder, **save_kwargs)
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


def test_broken_folders_are_refused_with_the_reason(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: pytest.fail("uploaded"))
    write_checkpoint(tmp_path / "missing_code")
    (tmp_path / "missing_code" / "losses.py").unlink()
    with exits_with_error(capsys, "missing code file losses.py"):
        main(["--checkpoint", str(tmp_path / "missing_code"), "--repo_id", "org/x"])
    write_checkpoint(tmp_path / "bad_config")
    config = json.loads((tmp_path / "bad_config" / "config.json").read_text())
    config["down_ratio"] = 0
    (tmp_path / "bad_config" / "config.json").write_text(json.dumps(config))
    check_folder(tmp_path / "bad_config")  # the files are all there ...
    with exits_with_error(capsys, "(?s)does not load with trust_remote_code.*down_ratio=0"):  # ... but does not load
        main(["--checkpoint", str(tmp_path / "bad_config"), "--repo_id", "org/x"])
    (tmp_path / "no_card").mkdir()
    with pytest.raises(ValueError, match="missing config.json; missing model.safetensors"):
        check_folder(tmp_path / "no_card")


def test_card_for_a_converted_reference_checkpoint(tmp_path, tiny_vit_stems):
    from test_convert_original_sak import convert_args, write_reference_run

    from modeling_sak import SAKConfig
    from modeling_sak.commands.convert_original_sak import main as convert

    write_reference_run(tmp_path, "base", True, stage=2)
    convert(convert_args(tmp_path))
    config = SAKConfig.from_pretrained(tmp_path / "converted")
    card = str(
        render_model_card(config, "org/sak-converted", {"depth": {"rmse": 0.5}}, {"source": "converted"}, "nyud-v2")
    )
    metadata = yaml.safe_load(card.split("---")[1])
    assert metadata["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.5
    assert "dinov2 (" in card and "reported by the authors" not in card  # a tiny stem is not a released configuration


def test_a_sharded_checkpoint_is_checked_shard_by_shard_loaded_and_uploaded(tmp_path, monkeypatch, capsys):
    from safetensors import safe_open

    write_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    folder = tmp_path / "sharded"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert not (folder / "model.safetensors").exists() and len(shards) >= 3
    assert sorted(p.name for p in folder.glob("model-*.safetensors")) == shards
    stored = {}
    for shard in shards:
        with safe_open(str(folder / shard), framework="pt") as handle:
            stored |= dict.fromkeys(handle.keys(), shard)
    assert stored == index["weight_map"]  # a real transformers sharding: every tensor in the shard the index names
    calls = []
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append("create"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: calls.append(kw["folder_path"]))
    main(["--checkpoint", str(folder), "--repo_id", "org/sak-tiny"])  # loads in a fresh process, then uploads
    assert calls == ["create", str(folder)]

    # A missing shard is refused by name before anything loads or uploads; so is a shard without its tensors.
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", lambda self, **kw: pytest.fail("uploaded"))
    (folder / shards[1]).rename(tmp_path / "aside.safetensors")
    with exits_with_error(capsys, rf"missing shard {shards[1]} \(named by model.safetensors.index.json\)"):
        main(["--checkpoint", str(folder), "--repo_id", "org/sak-tiny"])
    (tmp_path / "aside.safetensors").rename(folder / shards[1])
    (folder / shards[2]).write_bytes((folder / shards[0]).read_bytes())
    with pytest.raises(ValueError, match=rf"shard {shards[2]} lacks \d+ tensors the index puts in it"):
        check_folder(folder)


def card_metadata(card, folder):
    """The card as the Hub and huggingface_hub read it back: `ModelCard.load` and `metadata_load` of its README."""
    card.save(folder / "README.md")
    loaded = ModelCard.load(folder / "README.md")
    metadata = metadata_load(folder / "README.md")
    assert loaded.data.to_dict() == metadata
    return loaded, metadata


def test_card_metadata_round_trips_with_one_honest_result_per_task(tmp_path):
    config = tiny_config(tasks="pascal_context", teachers={})
    results = {
        "semseg": {"mIoU": 61.25, "pixel_accuracy": 90.0},
        "human_parts": {"mIoU": 55.5},
        "normals": {"mean": 14.5, "rmse": 20.0},
        "edge": {"odsF": 70.125, "odsF_tol": 71.0},
        "sal": {"maxF": 80.0},
    }
    card = render_model_card(
        config,
        "org/sak-pascal",
        results,
        {"max_steps": 5},
        "org/pascal-context-multitask",
        base_model="google/vit-base-patch16-384",
        dataset_split="test",
    )
    loaded, metadata = card_metadata(card, tmp_path)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-segmentation"
    assert metadata["base_model"] == "google/vit-base-patch16-384"
    assert metadata["datasets"] == ["org/pascal-context-multitask"]
    entries = metadata["model-index"][0]["results"]
    by_type = {entry["task"]["type"]: entry for entry in entries}
    assert len(entries) == len(by_type) == 5  # one entry per task: no task filed under another's type
    assert {t: [(m["name"], m["value"]) for m in e["metrics"]] for t, e in by_type.items()} == {
        "image-segmentation": [("mIoU", 61.25)],
        "human-part-segmentation": [("mIoU", 55.5)],
        "surface-normal-estimation": [("mean angular error", 14.5)],
        "boundary-detection": [("boundary odsF", 70.125), ("boundary F (tolerance)", 71.0)],
        "saliency-detection": [("maxF", 80.0)],
    }
    for entry in entries:
        assert entry["dataset"] == {
            "name": "org/pascal-context-multitask",
            "type": "org/pascal-context-multitask",
            "split": "test",
        }
    assert {(r.task_type, r.metric_name, r.metric_value) for r in loaded.data.eval_results} >= {
        ("surface-normal-estimation", "mean angular error", 14.5),
        ("boundary-detection", "boundary odsF", 70.125),
    }
    for tag in ("surface-normal-estimation", "boundary-detection", "saliency-detection", "multi-task"):
        assert tag in metadata["tags"]
    assert "knowledge-distillation" not in metadata["tags"]  # no teachers: a multi-task baseline


def test_local_data_and_checkpoints_stay_out_of_the_metadata(tmp_path):
    make_toyrooms(tmp_path / "toy", num_train=1, num_test=1, size=(16, 24))
    stage1 = tmp_path / "run" / "stage1" / "final"
    stage1.mkdir(parents=True)
    config = tiny_config(tasks={"depth": 1, "normals": 3})
    card = render_model_card(
        config,
        "org/sak-geometry",
        {"depth": {"rmse": 0.5}, "normals": {"mean": 20.0}},
        {"dataset": str(tmp_path / "toy")},
        str(tmp_path / "toy"),
        base_model=[str(stage1), "facebook/dinov2-small"],
        dataset_split="test",
    )
    _, metadata = card_metadata(card, tmp_path)
    assert str(tmp_path) not in yaml.safe_dump(metadata)  # no local path anywhere in the metadata ...
    assert "datasets" not in metadata and metadata["base_model"] == "facebook/dinov2-small"
    assert metadata["pipeline_tag"] == "depth-estimation"
    for entry in metadata["model-index"][0]["results"]:  # ... the data by its card's name, read as parquet
        assert entry["dataset"] == {"name": "ToyRooms", "type": "parquet", "split": "test"}
    assert [e["task"]["type"] for e in metadata["model-index"][0]["results"]] == [
        "depth-estimation",
        "surface-normal-estimation",
    ]
    text = str(card)  # ... but named in the card text
    assert f"the local folder `{tmp_path / 'toy'}` (not on the Hub)" in text
    assert f"`{stage1}` (local, not on the Hub); [`facebook/dinov2-small`]" in text

    # No semseg and no depth: the stock pipeline it serves is feature extraction; no Hub origin, no base_model.
    features_only = render_model_card(tiny_config(tasks={"normals": 3}), "org/n", {}, {}, "toyrooms")
    _, metadata = card_metadata(features_only, tmp_path)
    assert metadata["pipeline_tag"] == "image-feature-extraction"
    assert "base_model" not in metadata and "datasets" not in metadata and "model-index" not in metadata
    assert "Weights started from (nearest first): random initialisation" in str(features_only)
