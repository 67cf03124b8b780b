"""convert_original_sak: reference-format checkpoints (built from the documented layout) convert to equal outputs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import carried_files, exits_with_error
from huggingface_hub import ModelCard
from reference_sak import RefMultiTaskModel, RefSAKBackbone, randomize_
from transformers import AutoImageProcessor, AutoModel

import modeling_sak
from modeling_sak import SAKForMultiTask
from modeling_sak.commands.convert_original_sak import main


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


def test_a_converted_checkpoint_carries_exactly_the_remote_code_and_loads_without_the_package(
    tmp_path, tiny_vit_stems
):
    reference = write_reference_run(tmp_path, "small", True, stage=2)
    main(convert_args(tmp_path))
    converted = tmp_path / "converted"
    assert {path.name for path in converted.glob("*.py")} == carried_files()
    x = torch.randn(1, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(x)[1]
    torch.save({"x": x, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.modules["modeling_sak"] = None  # the checkpoint's own code, as on a machine without this package
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(converted)!r}, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        io = torch.load({str(tmp_path / "io.pt")!r})
        with torch.no_grad():
            out = model(io["x"]).task_outputs
        for task, value in io["expected"].items():
            torch.testing.assert_close(out[task], value, atol=2e-5, rtol=1e-5)
        print("OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


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


def test_an_unmapped_key_stops_the_conversion(tmp_path, tiny_vit_stems, capsys):
    write_reference_run(tmp_path, "base", False, stage=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    checkpoint["model"]["backbone.vit.blocks.0.attn.lora_A.weight"] = torch.zeros(2, 2)
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with exits_with_error(capsys, r"1 reference keys have no SAK counterpart.*lora_A.*merge them"):
        main(convert_args(tmp_path))
    assert not (tmp_path / "converted").exists()


def test_a_missing_key_stops_the_conversion(tmp_path, tiny_vit_stems, capsys):
    write_reference_run(tmp_path, "base", False, stage=2)
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    del checkpoint["model"]["backbone.tsap.sam.2.up.weight"]
    torch.save(checkpoint, tmp_path / "checkpoint.pth")
    with exits_with_error(capsys, r"missing from the checkpoint.*teacher_paths\.sam\.adapters\.2\.up\.weight"):
        main(convert_args(tmp_path))


def test_wrong_image_size_is_reported(tmp_path, tiny_vit_stems, capsys):
    write_reference_run(tmp_path, "base", False, stage=2)
    args = convert_args(tmp_path)
    args[-2:] = ["64", "64"]
    with exits_with_error(capsys, "does not fit image_size"):
        main(args)


def test_a_pickled_object_is_refused(tmp_path, tiny_vit_stems, capsys):
    write_reference_run(tmp_path, "base", False, stage=2)
    torch.save({"model": PicklePayload()}, tmp_path / "checkpoint.pth")
    with exits_with_error(capsys, "weights_only=True"):
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
    from modeling_sak.commands.convert_original_sak import REFERENCE_STEMS

    with torch.device("meta"):
        config = SAKConfig(
            stem_config={"model_type": "vit", "layer_norm_eps": 1e-6, **REFERENCE_STEMS["vit_base"]},
            teachers=dict.fromkeys(("dinov2", "clip", "sam"), 768),
            tasks="nyud_v2",
        )
        model = SAKForMultiTask(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == 126.40


COMMIT = "5f3c1e2d9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d"  # the snapshot of the tests' fake yxlu0/SAK


def hub_cache(tmp_path: Path, files: dict[str, bytes], repo_id: str = "yxlu0/SAK") -> Path:
    """A huggingface_hub cache holding `files` (path in the repo -> content) of `repo_id` at main, in the layout
    hf_hub_download writes: blobs named by hash, snapshots/COMMIT/PATH linked to them, refs/main naming COMMIT."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / COMMIT / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return cache


def run_offline(cache: Path, tmp_path: Path, *command: str) -> subprocess.CompletedProcess:
    """A fresh interpreter with HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1 (huggingface_hub reads both on import)."""
    env = {
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf_home"),
        "PATH": "/usr/bin:/bin",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(modeling_sak.__file__).parents[1]),
    }
    return subprocess.run(
        [sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )


def test_a_hub_checkpoint_converts_like_the_local_files(tmp_path, tiny_vit_stems):
    """--repo_id/--filename: the checkpoint and the config.yml beside it come through hf_hub_download (here from an
    offline cache) and convert to exactly the model the same files give from local paths."""
    reference = write_reference_run(tmp_path, "base", True, stage=2)
    cache = hub_cache(
        tmp_path,
        {
            "sak_vitb_nyud/checkpoint.pth": (tmp_path / "checkpoint.pth").read_bytes(),
            "sak_vitb_nyud/config.yml": (tmp_path / "config.yml").read_bytes(),
        },
    )
    # The tiny stems of the `tiny_vit_stems` fixture, in the fresh process that runs the command's main().
    script = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_convert_original_sak import SHAPES
        from modeling_sak.commands import convert_original_sak
        convert_original_sak.REFERENCE_STEMS = {
            f"vit_{name}": {"hidden_size": d["dim"], "num_hidden_layers": d["depth"],
                            "num_attention_heads": d["heads"], "intermediate_size": d["hidden"]}
            for name, d in SHAPES.items()
        }
        convert_original_sak.REFERENCE_TEACHERS = {}
        convert_original_sak.main(sys.argv[2:])
        """
    )
    hub_args = ["--repo_id", "yxlu0/SAK", "--filename", "sak_vitb_nyud/checkpoint.pth"]
    hub_args += ["--output_dir", str(tmp_path / "from_hub"), "--image_size", *map(str, IMAGE_SIZE), "--keep_aligners"]
    result = run_offline(cache, tmp_path, "-c", script, str(Path(__file__).parent), *hub_args)
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = cache / "models--yxlu0--SAK" / "snapshots" / COMMIT / "sak_vitb_nyud" / "checkpoint.pth"
    assert f"reference run yxlu0/SAK/sak_vitb_nyud/checkpoint.pth: {snapshot}" in result.stdout, result.stdout

    # Its card names the authors' repo as base_model; a local conversion names its file in the text only.
    assert ModelCard.load(tmp_path / "from_hub" / "README.md").data.base_model == "yxlu0/SAK"
    main(convert_args(tmp_path, "--keep_aligners"))
    local_card = ModelCard.load(tmp_path / "converted" / "README.md")
    assert local_card.data.base_model is None and str(tmp_path / "checkpoint.pth") in local_card.text
    assert str(tmp_path) not in local_card.data.to_yaml()
    from_hub = SAKForMultiTask.from_pretrained(tmp_path / "from_hub").eval()
    local = SAKForMultiTask.from_pretrained(tmp_path / "converted").eval()
    saved = [(tmp_path / folder / "config.json").read_text() for folder in ("from_hub", "converted")]
    assert saved[0] == saved[1]
    for key, value in local.state_dict().items():
        assert torch.equal(from_hub.state_dict()[key], value), key
    x = torch.randn(2, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got, ref_outputs = local(x).task_outputs, from_hub(x).task_outputs, reference(x)[1]
    for task, value in expected.items():
        assert torch.equal(got[task], value), task
        torch.testing.assert_close(got[task], ref_outputs[task], atol=2e-5, rtol=1e-5)


def test_without_a_filename_or_with_a_wrong_one_the_repo_is_listed(tmp_path):
    """The real command, offline: no --filename lists the checkpoints the cache holds; a missing file is named with
    that list; a repo the cache does not hold says the listing needs the network."""
    cache = hub_cache(
        tmp_path,
        {
            "sak_vitb_nyud/checkpoint.pth": b"weights",
            "sak_vitb_nyud/config.yml": b"student: {}",
            "stage1_vitb/checkpoint.pth": b"weights",
            "README.md": b"# SAK",
        },
    )
    command = ["-m", "modeling_sak.commands.convert_original_sak", "--output_dir", str(tmp_path / "out")]
    listed = run_offline(cache, tmp_path, *command, "--repo_id", "yxlu0/SAK")
    assert listed.returncode == 1, listed.stderr[-3000:]
    assert "yxlu0/SAK holds these checkpoints according to the local cache" in listed.stderr, listed.stderr
    assert "OfflineModeIsEnabled" in listed.stderr
    assert "  sak_vitb_nyud/checkpoint.pth  (with sak_vitb_nyud/config.yml)" in listed.stderr
    assert "  stage1_vitb/checkpoint.pth  (no config.yml beside it)" in listed.stderr
    assert "pass one with --filename PATH" in listed.stderr

    missing = run_offline(
        cache, tmp_path, *command, "--repo_id", "yxlu0/SAK", "--filename", "nyud_vitl/checkpoint.pth"
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr  # a bad input: one error line
    assert "error: 'nyud_vitl/config.yml' is not in yxlu0/SAK (LocalEntryNotFoundError)" in missing.stderr
    assert "  sak_vitb_nyud/checkpoint.pth  (with sak_vitb_nyud/config.yml)" in missing.stderr
    assert not (tmp_path / "out").exists()

    unknown = run_offline(cache, tmp_path, *command, "--repo_id", "someone/else")
    assert unknown.returncode == 1
    assert "someone/else holds no checkpoint (.pth/.pt/.ckpt/.bin) according to the local cache" in unknown.stderr
    assert "nothing (listing the repo needs the network: unset HF_HUB_OFFLINE)" in unknown.stderr


def test_the_sources_are_checked_before_anything_runs(capsys):
    for argv, message in [
        (["--repo_id", "yxlu0/SAK", "--checkpoint", "c.pth"], "either --repo_id"),
        (["--checkpoint", "c.pth"], "pass --repo_id (e.g. yxlu0/SAK)"),
        (["--checkpoint", "c.pth", "--original_config", "c.yml", "--revision", "v1"], "need --repo_id"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--output_dir", "out"])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
