"""The glibc malloc settings of SAK's commands (`modeling_sak.training.cpu_allocator`): a real training step of the
student faults far fewer pages with them and computes bit-identical parameters; train_accelerate.py applies the
recipe's choice, sak-predict and sak-evaluate the tuned one; a bad value is named."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


ROOT = Path(__file__).resolve().parents[1]
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
TUNED = ["M_MMAP_THRESHOLD", "M_TRIM_THRESHOLD"] if GLIBC else []  # what "tuned" sets here

# A stage-2 step of a real SAKForMultiTask (a 4-block width-384 ViT stem, three teachers, the four NYUD-v2 tasks at
# 224 x 288, batch 2: the training size of bench/vs_reference.py, the heads' quarter-resolution maps MiB-sized), five
# times after two warm-up steps: the minor page faults per step and a hash of every parameter and AdamW moment
# afterwards.
STEPS = r"""
import hashlib, json, resource, sys
import torch
from modeling_sak.training.cpu_allocator import configure_cpu_allocator
applied = configure_cpu_allocator(sys.argv[1])
sys.path.insert(0, sys.argv[2])
from conftest import nyud_labels, tiny_config, tiny_stem
from modeling_sak import SAKForMultiTask
from modeling_sak.training.optimization import make_optimizer

torch.manual_seed(0)
size = (224, 288)
stem = tiny_stem(hidden_size=384, num_attention_heads=6, intermediate_size=1536)
teacher_widths = dict.fromkeys(("dinov2", "clip", "sam"), 384)
model = SAKForMultiTask(tiny_config(stem_config=stem, image_size=list(size), teachers=teacher_widths)).train()
optimizer = make_optimizer(model, 1e-4, 1e-6)
pixel_values = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
labels = nyud_labels(2, *size, seed=2)
grid = (size[0] // 16, size[1] // 16)
teachers = {name: [torch.randn(2, 384, *grid, generator=torch.Generator().manual_seed(3 + i)) for _ in range(4)]
            for i, name in enumerate(("dinov2", "clip", "sam"))}

def step():
    torch.manual_seed(4)
    loss = model(pixel_values, labels=labels, teacher_features=teachers).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
digest = hashlib.sha256()
for tensor in [*model.state_dict().values(), *(v for s in optimizer.state.values() for v in s.values())]:
    digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
print(json.dumps({"applied": applied, "faults_per_step": faults, "digest": digest.hexdigest()}))
"""


def run_steps(mode: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", STEPS, mode, str(ROOT / "tests")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def settings_after(
    call: str, argv: list[str], cwd: Path, setup: str = "", stops: str = "SystemExit, ValueError"
) -> list[str]:
    """The names `configure_cpu_allocator` reports as set after `call(argv)` ran in a fresh process of this checkout,
    `setup` run first on its module (`entry`); the exceptions `stops` end the call (the probes stop right after the
    settings), any other fails the test."""
    module, function = call.rsplit(".", 1)
    probe = (
        f"import json, sys, {module} as entry, modeling_sak.training.cpu_allocator as allocator\n{setup}\n"
        f"try:\n    entry.{function}(sys.argv[1:])\nexcept ({stops}):\n    pass\n"
        "print(json.dumps(sorted(allocator.configure_cpu_allocator('default'))))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, "-c", probe, *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's mallopt; other C libraries are left alone")
def test_tuned_allocator_faults_far_fewer_pages_per_training_step_and_trains_bit_identical_parameters():
    default, tuned = run_steps("default"), run_steps("tuned")
    assert default["applied"] == {}
    assert tuned["applied"] == {"M_MMAP_THRESHOLD": 32 * 2**20, "M_TRIM_THRESHOLD": 2 * 2**30}
    # glibc's defaults map the step's large tensors afresh every step; the settings keep them mapped.
    # (Measured here: 37,000 against 2,700 per step; two untuned processes differ by up to 2x.)
    assert default["faults_per_step"] > 10_000, default
    assert tuned["faults_per_step"] < default["faults_per_step"] / 5, (default, tuned)
    # Where memory comes from changes no arithmetic: every parameter, buffer and AdamW moment is bit-identical.
    assert tuned["digest"] == default["digest"]


def test_a_mode_that_does_not_exist_is_named_with_the_choices():
    from modeling_sak.training.cpu_allocator import configure_cpu_allocator

    with pytest.raises(ValueError, match=r"cpu_allocator='jemalloc' is not one of \('tuned', 'default'\)"):
        configure_cpu_allocator("jemalloc")


def test_train_accelerate_applies_the_recipe_allocator_and_refuses_a_bad_one(tmp_path):
    """The flag and the recipe key reach `configure_cpu_allocator` before training; a bad value fails in parsing,
    naming the choices (argparse) or the key (a YAML recipe)."""
    from train_accelerate import parse_args

    assert parse_args([])[1].cpu_allocator == "tuned"
    assert parse_args(["--cpu_allocator", "default"])[1].cpu_allocator == "default"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"cpu_allocator": "default"}))
    assert parse_args(["--config", str(recipe)])[1].cpu_allocator == "default"
    for argv in (["--cpu_allocator", "jemalloc"], ["--config", str(recipe)]):
        recipe.write_text(yaml.safe_dump({"cpu_allocator": "jemalloc"}))
        result = subprocess.run(
            [sys.executable, str(ROOT / "train_accelerate.py"), *argv], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 2, result.stderr
        assert "cpu_allocator" in result.stderr and "jemalloc" in result.stderr, result.stderr
    # The script applies the parsed value: what the module reports once `_main` has configured the process (the
    # probe stops it at the Accelerator, which comes next).
    stop = "entry.Accelerator = lambda *a, **k: (_ for _ in ()).throw(SystemExit(0))"
    for extra, expected in (([], TUNED), (["--cpu_allocator", "default"], [])):
        argv = ["--output_dir", str(tmp_path / f"run{len(extra)}"), *extra]
        assert settings_after("train_accelerate._main", argv, ROOT, setup=stop, stops="SystemExit") == expected


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        # Each stops on a bad value checked after the settings are applied (so no model is needed).
        ("predict", ["image.png", "--model", "m", "--batch_size", "0"]),
        ("evaluate_model", ["--model", "m", "--dataset", "d", "--baseline", "no-such-metrics.json"]),
    ],
)
def test_sak_predict_and_sak_evaluate_apply_the_tuned_settings(module, argv, tmp_path):
    assert settings_after(f"modeling_sak.commands.{module}._main", argv, tmp_path) == TUNED
