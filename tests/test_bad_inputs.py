"""What a newcomer's first mistakes give, through the real entry points: one `PROG: error: MESSAGE` line naming the
bad value and the fix, exit status 2, no traceback, before any long work, and nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from modeling_sak import SAKForMultiTask, SAKImageProcessor
from modeling_sak.training.recipe import load_recipe


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny SAK folder, damaged copies of it, a photo, and an output folder that already holds a run."""
    root = tmp_path_factory.mktemp("bad_inputs")
    model = root / "model"
    torch.manual_seed(0)
    SAKForMultiTask(tiny_config()).save_pretrained(model)
    SAKImageProcessor(pad_size=(64, 96)).save_pretrained(model)
    Image.fromarray(np.full((40, 50, 3), 128, np.uint8)).save(root / "photo.png")
    damaged = {
        "bad_json": lambda d: (d / "config.json").write_text("{not json"),
        "truncated_weights": lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00not a header"),
        "no_weights": lambda d: (d / "model.safetensors").unlink(),
        "no_config": lambda d: (d / "config.json").unlink(),
    }
    for name, damage in damaged.items():
        shutil.copytree(model, root / name)
        damage(root / name)
    (root / "finished_run" / "final").mkdir(parents=True)
    (root / "finished_run" / "all_results.json").write_text("{}")
    (root / "not_toyrooms").mkdir()
    return root


def train(*argv):
    import train_accelerate

    return train_accelerate.main(list(argv))


def module(name: str):
    import importlib

    return importlib.import_module(f"modeling_sak.commands.{name}").main


# (entry point, argv with {root} for the fixture's folder and {out} for a fresh output folder, expected message)
CASES = [
    # train_accelerate.py: the recipe's values and their relations, before anything is rendered or trained
    ("train", ["--learning_rate", "-1"], "learning_rate=-1.0 must be greater than 0, e.g. --learning_rate 1e-4"),
    ("train", ["--max_steps", "0"], "max_steps=0 must be at least 1"),
    ("train", ["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0 must be at least 1"),
    ("train", ["--warmup_steps", "500", "--max_steps", "10"], "warmup_steps=500 is more than max_steps=10"),
    ("train", ["--scale_range", "2", "1"], "scale_range=[2.0, 1.0] must be LOW HIGH with 0 < LOW <= HIGH"),
    ("train", ["--toyrooms", "teacher_steps=10"], "teacher_steps geometry=10 must be an integer >= 20"),
    ("train", ["--toyrooms", "{num_tain: 64}"], "toyrooms: unknown keys ['num_tain']; valid keys are"),
    ("train", ["--lora", "{rank: 8}"], "lora: unknown keys ['rank']; valid keys are r, alpha, dropout"),
    ("train", ["--tasks", "{}"], "tasks={} in stage 2: name at least one task"),
    ("train", ["--tasks", "semseg=40"], "tasks: semseg=40 but ToyRooms has 7 classes"),
    ("train", ["--tasks", "sal=2"], "task_loss_weights has no weight for the tasks ['sal']; add e.g."),
    (
        "train",
        ["--tasks", "sal=2", "--task_loss_weights", "sal=1"],
        "tasks ['sal']: ToyRooms has semseg, normals, edge and depth only",
    ),
    ("train", ["--stem", "num_hidden_layers=3"], "stem of 3 blocks): no default output levels for a network of 3"),
    ("train", ["--stem", "hidden_size=100"], "hidden_size 100 is not divisible by num_attention_heads"),
    ("train", ["--image_size", "448"], "--image_size 448: expected two numbers, e.g. --image_size 448 576"),
    ("train", ["--noisy_gating", "maybe"], "'maybe' is not a boolean; write true or false"),
    ("train", ["--dataset", "./no/such/folder", "--teachers", "none"], "dataset='./no/such/folder': no such folder"),
    ("train", ["--dataset", "{root}/not_toyrooms"], "teachers 'toyrooms_specialists' need dataset 'toyrooms'"),
    ("train", ["--init_from", "{root}/missing_run/final"], "init_from='{root}/missing_run/final': no such folder"),
    ("train", ["--stem_model", "./missing_stem"], "stem_model='./missing_stem': no such folder"),
    ("train", ["--teachers", "dinov2=facebook/not-a-cached-model"], "teachers: "),
    ("train", ["--resume_from_checkpoint", "latest"], "--resume_from_checkpoint latest: no checkpoint-* folder in"),
    ("train", ["--output_dir", "{root}/finished_run"], "already holds a run (all_results.json, final); continue it"),
    ("train", ["--distributed_strategy", "fsdp2"], "distributed_strategy 'fsdp2' shards the student across processes"),
    # predict, evaluate_model: models that are missing or damaged
    ("predict", ["--model", "{root}/missing", "{root}/photo.png"], "--model {root}/missing: no such folder"),
    ("predict", ["--model", "{root}/no_config", "{root}/photo.png"], "the folder has no config.json"),
    ("predict", ["--model", "{root}/bad_json", "{root}/photo.png"], "is not a valid JSON file"),
    ("predict", ["--model", "{root}/no_weights", "{root}/photo.png"], "no file named model.safetensors"),
    ("predict", ["--model", "{root}/truncated_weights", "{root}/photo.png"], "a damaged safetensors file"),
    (
        "predict",
        ["--model", "{root}/model", "--batch_size", "0", "{root}/photo.png"],
        "--batch_size 0: must be at least 1",
    ),
    ("evaluate_model", ["--model", "{root}/missing", "--dataset", "x"], "--model {root}/missing: no such folder"),
    ("evaluate_model", ["--model", "{root}/model", "--dataset", "./no_data"], "--dataset ./no_data: no such folder"),
    (
        "evaluate_model",
        ["--model", "{root}/model", "--dataset", "toyrooms"],
        "--dataset toyrooms: ToyRooms is rendered",
    ),
    # the other commands
    ("prepare_dataset", ["nyud", "--source", "{root}/no_nyud", "--output_dir", "{out}"], "does not exist"),
    (
        "convert_original_sak",
        ["--checkpoint", "{root}/none.pth", "--original_config", "{root}/none.yml", "--output_dir", "{out}"],
        "does not exist",
    ),
    ("train_specialists", ["--data", "toyrooms", "--output_dir", "{out}"], "--data toyrooms: not a ToyRooms folder"),
]


@pytest.mark.parametrize(("entry", "argv", "message"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_a_bad_input_is_one_error_line_with_exit_status_2_before_any_work(
    files, tmp_path, entry, argv, message, capsys
):
    out = tmp_path / "out"
    argv = [a.replace("{root}", str(files)).replace("{out}", str(out)) for a in argv]
    message = message.replace("{root}", str(files))
    if entry == "train" and "--output_dir" not in argv:
        argv += ["--output_dir", str(out)]
    if entry == "train":
        argv += ["--cache_dir", str(tmp_path / "cache")]
    main = train if entry == "train" else (lambda *a: module(entry)(list(a)))
    with pytest.raises(SystemExit) as stopped:
        main(*argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert "error: " in error and message in error, error
    assert not out.exists() and not (tmp_path / "cache").exists()  # nothing rendered, trained or written


def test_the_real_commands_print_no_traceback(files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    commands = [
        [sys.executable, str(ROOT / "train_accelerate.py"), "--toyrooms", "teacher_steps=10"],
        [sys.executable, "-m", "modeling_sak.commands.predict", "--model", str(files / "truncated_weights"), "x.png"],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
        assert result.returncode == 2, result.stderr[-2000:]
        assert "Traceback" not in result.stderr and ": error: " in result.stderr.strip().splitlines()[-1]


def test_mappings_are_read_as_people_type_them_and_a_partial_one_keeps_the_rest():
    from train_accelerate import parse_args

    _, recipe = parse_args(["--toyrooms", "{num_train:64,num_test:8}"])
    defaults = load_recipe(None, {}).toyrooms
    assert recipe.toyrooms == defaults | {"num_train": 64, "num_test": 8}  # seed and teacher settings kept
    _, recipe = parse_args(["--toyrooms", "{teacher_steps:{geometry:40}}"])
    assert recipe.toyrooms["teacher_steps"] == {"geometry": 40, "semantics": defaults["teacher_steps"]["semantics"]}
    _, recipe = parse_args(["--teachers", "{dinov2:facebook/dinov2-small,clip:timm/vit_base_patch16_clip_224}"])
    assert recipe.teachers == {"dinov2": "facebook/dinov2-small", "clip": "timm/vit_base_patch16_clip_224"}


def test_overwrite_output_dir_starts_over_in_a_folder_that_holds_a_run(tmp_path):
    from modeling_sak.training.checkpoints import clear_run
    from modeling_sak.training.preflight import check_recipe

    recipe = load_recipe(None, {"output_dir": str(tmp_path)})
    for name in ("checkpoint-2", "final", "stage1"):
        (tmp_path / name).mkdir()
    (tmp_path / "all_results.json").write_text(json.dumps({}))
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds a run"):
        check_recipe(recipe)
    check_recipe(recipe, overwrite_output_dir=True)
    clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # only the run's own files go
    check_recipe(recipe)


def test_predict_names_a_missing_image_and_still_writes_the_others(files, tmp_path, capsys):
    from modeling_sak.commands.predict import main

    status = main(
        ["--model", str(files / "model"), str(files / "photo.png"), "missing.jpg", "--output_dir", str(tmp_path)]
    )
    assert status == 1
    assert "skipped missing.jpg: cannot read the image (FileNotFoundError" in capsys.readouterr().err
    assert (tmp_path / "photo_grid.png").is_file()


def test_the_library_raises_what_the_commands_print(files):
    """The processor, the pipeline and AutoModel on bad inputs: ValueError / OSError naming what is wrong."""
    from transformers import AutoModel, pipeline

    from modeling_sak.cli import BAD_INPUT

    processor = SAKImageProcessor(pad_size=(64, 96))
    with pytest.raises(ValueError, match="looks like a depth or disparity map, not a photo"):
        processor(np.full((8, 8), 3000, np.uint16), return_tensors="pt")
    with pytest.raises(ValueError, match="has NaN or infinite values"):
        processor(np.full((8, 8, 3), np.nan, np.float32), return_tensors="pt")
    with pytest.raises(ValueError, match="has shape \\(10,\\); expected \\(H, W\\), \\(H, W, C\\) or \\(C, H, W\\)"):
        processor(np.zeros(10, np.float32), return_tensors="pt")
    depth = pipeline("depth-estimation", model=str(files / "model"), trust_remote_code=True)
    with pytest.raises(ValueError, match="Got missing.jpg"):
        depth("missing.jpg")
    with pytest.raises(OSError, match="not a valid JSON file"):
        AutoModel.from_pretrained(files / "bad_json", trust_remote_code=True)
    with pytest.raises(BAD_INPUT):  # safetensors' own error type: the commands print it as a damaged file
        AutoModel.from_pretrained(files / "truncated_weights", trust_remote_code=True)
