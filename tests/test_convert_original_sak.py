"""convert_original_sak: reference-format checkpoints (built from the documented layout) convert to equal outputs."""

from __future__ import annotations

import pytest
import torch
import yaml
from reference_sak import RefMultiTaskModel, RefSAKBackbone, randomize_
from transformers import AutoImageProcessor, AutoModel

from modeling_sak import SAKForMultiTask
from modeling_sak.convert_original_sak import main


# ViT-S- and ViT-B-shaped tiny stems: the head counts and width/head ratios of the real ones, 4 blocks.
SHAPES = {
    "small": {"dim": 48, "depth": 4, "heads": 6, "hidden": 192},
    "base": {"dim": 64, "depth": 4, "heads": 4, "hidden": 256},
}
NYUD_TASKS = {"semseg": 40, "normals": 3, "edge": 1, "depth": 1}
IMAGE_SIZE = (64, 96)


class PicklePayload:
    """An arbitrary object: a checkpoint holding one must not be unpickled."""


def write_reference_run(tmp_path, shape: str, aligner: bool, stage: int, router_type="mor", noisy=True):
    """Write checkpoint.pth + config.yml in the reference layout and return the reference model."""
    dims = SHAPES[shape]
    tea_dims = (
        {"dinov2": 80, "clip": dims["dim"], "sam": 72}
        if aligner
        else dict.fromkeys(("dinov2", "clip", "sam"), dims["dim"])
    )
    backbone_kwargs = dict(
        dim=dims["dim"],
        depth=dims["depth"],
        heads=dims["heads"],
        hidden=dims["hidden"],
        tea_dims=tea_dims,
        out_indices=[0, 1, 2, 3],
        aligner=aligner,
        router_type=router_type,
        noisy=noisy,
    )
    if stage == 2:
        model = RefMultiTaskModel(IMAGE_SIZE, NYUD_TASKS, **backbone_kwargs)
    else:
        model = RefSAKBackbone(IMAGE_SIZE, tasks=[], **backbone_kwargs)
    randomize_(model, seed=3)
    model.eval()
    torch.save(
        {"model": model.state_dict(), "optimizer": {}, "epoch": 3, "iter_count": 10}, tmp_path / "checkpoint.pth"
    )
    config = {
        "dataset": "nyud" if stage == 2 else "imagenet",
        "teachers": {
            name: {"backbone_type": f"{name}_{shape}" if name != "clip" else f"timmclip_{shape}"} for name in tea_dims
        },
        "student": {
            "backbone": {
                "backbone_type": "sak",
                "vit_name": f"vit_{shape}",
                "down_ratio": 4,
                "aligner": aligner,
                "router_type": router_type,
                "noisy_gating": noisy,
            }
        },
        "loss_type": "cos+l1",
    }
    if stage == 2:
        config["task_dict"] = dict.fromkeys(NYUD_TASKS, 1)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    return model


def convert_args(tmp_path, *extra):
    return [
        "--original_config",
        str(tmp_path / "config.yml"),
        "--checkpoint",
        str(tmp_path / "checkpoint.pth"),
        "--output_dir",
        str(tmp_path / "converted"),
        "--image_size",
        *map(str, IMAGE_SIZE),
        *extra,
    ]


@pytest.mark.parametrize("shape", ["small", "base"])
@pytest.mark.parametrize("aligner", [False, True])
def test_stage2_checkpoint_converts_to_equal_outputs(tmp_path, tiny_vit_stems, shape, aligner):
    reference = write_reference_run(tmp_path, shape, aligner, stage=2)
    main(convert_args(tmp_path, "--keep_aligners"))
    model = AutoModel.from_pretrained(tmp_path / "converted", trust_remote_code=True).eval()
    assert model.config.use_aligners == aligner
    assert list(model.config.teachers) == ["dinov2", "clip", "sam"]
    assert list(model.config.tasks) == list(NYUD_TASKS)
    x = torch.randn(2, 3, *IMAGE_SIZE)
    with torch.no_grad():
        ref_aligned, ref_outputs = reference(x)
        out = model(x, output_student_features=True)
    for task, value in ref_outputs.items():
        torch.testing.assert_close(out.task_outputs[task], value, atol=2e-5, rtol=1e-5)
    for teacher, maps in ref_aligned.items():
        for got, expected in zip(out.student_features[teacher], maps):
            torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    processor = AutoImageProcessor.from_pretrained(tmp_path / "converted", trust_remote_code=True)
    assert processor.pad_size == {"height": IMAGE_SIZE[0], "width": IMAGE_SIZE[1]}


def test_router_none_and_no_noise_convert(tmp_path, tiny_vit_stems):
    reference = write_reference_run(tmp_path, "base", False, stage=2, router_type="none", noisy=False)
    main(convert_args(tmp_path))
    model = SAKForMultiTask.from_pretrained(tmp_path / "converted").eval()
    assert model.routers is None
    x = torch.randn(1, 3, *IMAGE_SIZE)
    with torch.no_grad():
        expected = reference(x)[1]["normals"]
        torch.testing.assert_close(model(x).task_outputs["normals"], expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("aligner", [False, True])
def test_stage1_checkpoint_converts_to_a_distillation_only_student(tmp_path, tiny_vit_stems, aligner):
    reference = write_reference_run(tmp_path, "small", aligner, stage=1)
    main(convert_args(tmp_path, "--keep_aligners"))
    model = SAKForMultiTask.from_pretrained(tmp_path / "converted").eval()
    assert model.config.tasks == {} and len(model.heads) == 0
    x = torch.randn(2, 3, *IMAGE_SIZE)
    with torch.no_grad():
        expected, _ = reference(x)
        out = model(x, output_student_features=True)
    assert out.task_outputs == {}
    for teacher, maps in expected.items():
        for got, want in zip(out.student_features[teacher], maps):
            torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_inference_checkpoint_drops_aligners_by_default(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", True, stage=2)
    main(convert_args(tmp_path))
    from safetensors import safe_open

    with safe_open(tmp_path / "converted" / "model.safetensors", "pt") as handle:
        assert not any(k.startswith("aligners.") for k in handle.keys())


def test_an_unmapped_key_stops_the_conversion(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", False, stage=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    checkpoint["model"]["backbone.vit.blocks.0.attn.lora_A.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"1 reference keys have no SAK counterpart.*lora_A.*merge them"):
        main(convert_args(tmp_path))
    assert not (tmp_path / "converted").exists()


def test_a_missing_key_stops_the_conversion(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", False, stage=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del checkpoint["model"]["backbone.tsap.sam.2.up.weight"]
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match=r"missing from the checkpoint.*teacher_paths\.sam\.adapters\.2\.up\.weight"):
        main(convert_args(tmp_path))


def test_wrong_image_size_is_reported(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", False, stage=2)
    args = convert_args(tmp_path)
    args[-2:] = ["64", "64"]
    with pytest.raises(ValueError, match="does not fit image_size"):
        main(args)


def test_a_pickled_object_is_refused(tmp_path, tiny_vit_stems):
    write_reference_run(tmp_path, "base", False, stage=2)
    torch.save({"model": PicklePayload()}, tmp_path / "checkpoint.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        main(convert_args(tmp_path))


def test_push_to_hub_uploads_the_converted_folder(tmp_path, tiny_vit_stems, monkeypatch, capsys):
    write_reference_run(tmp_path, "base", False, stage=2)
    calls = []
    import huggingface_hub

    monkeypatch.setattr(
        huggingface_hub.HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id, kw))
    )
    monkeypatch.setattr(
        huggingface_hub.HfApi,
        "upload_folder",
        lambda self, **kw: calls.append(
            ("upload", kw["repo_id"], sorted(p.name for p in __import__("pathlib").Path(kw["folder_path"]).iterdir()))
        ),
    )
    main(convert_args(tmp_path, "--push_to_hub", "org/sak-tiny", "--private"))
    assert calls[0] == ("create", "org/sak-tiny", {"private": True, "exist_ok": True})
    assert calls[1][0] == "upload" and {"config.json", "model.safetensors", "modeling_sak.py"} <= set(calls[1][2])


def test_reference_vit_b_nyud_parameter_count():
    """The converted ViT-B NYUD-v2 student without aligners has the reference's 126.40M parameters."""
    from modeling_sak import SAKConfig
    from modeling_sak.convert_original_sak import REFERENCE_STEMS

    with torch.device("meta"):
        config = SAKConfig(
            stem_config={"model_type": "vit", "layer_norm_eps": 1e-6, **REFERENCE_STEMS["vit_base"]},
            teachers=dict.fromkeys(("dinov2", "clip", "sam"), 768),
            tasks="nyud_v2",
        )
        model = SAKForMultiTask(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 126.40
