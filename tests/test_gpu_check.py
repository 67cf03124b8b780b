"""bench/gpu_check.sh, the one-command GPU check, run for real in its reduced form, and its model builders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from gpu_check import CHECKS, as_check  # noqa: E402
from train_step import build_teachers, check_realistic_weights, teacher_configs  # noqa: E402


@pytest.fixture(scope="module")
def reduced_report(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    """`bash bench/gpu_check.sh --reduced` in a subprocess (about a minute on two quiet cores) and its JSON report."""
    output = tmp_path_factory.mktemp("gpu_check") / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--reduced", "--output", str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert output.exists(), f"no report (exit {result.returncode})\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result, json.loads(output.read_text())


def expected_skips() -> set[str]:
    if not torch.cuda.is_available():
        return {"torch_compile"}  # reduced mode on CPU skips compile (with a reason) unless --compile
    return {"ddp_2proc", "fsdp2_2proc"} if torch.cuda.device_count() < 2 else set()


@pytest.mark.slow
def test_reduced_gpu_check_passes_every_check(reduced_report):
    result, report = reduced_report
    failed = {name: check for name, check in report["checks"].items() if check["status"] == "failed"}
    assert not failed, json.dumps(failed, indent=1)[-6000:]
    assert result.returncode == 0, result.stdout[-3000:]
    assert report["passed"] is True and report["failed_checks"] == []
    assert report["mode"] == "reduced"
    assert list(report["checks"]) == list(CHECKS)
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert statuses == {name: "skipped" if name in expected_skips() else "passed" for name in CHECKS}
    for name in expected_skips():
        assert report["checks"][name]["reason"]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_gpu_check_trains_in_mixed_precision(reduced_report, precision):
    check = reduced_report[1]["checks"][f"train_{precision}"]
    losses = check["losses"]
    assert len(losses) == reduced_report[1]["settings"]["steps"]
    assert all(torch.isfinite(torch.tensor(losses)).tolist())
    assert losses[-1] < losses[0], losses
    assert check["skipped_steps"] < len(losses)
    # Every parameter that received a gradient was updated, and all of them received one in this configuration.
    assert check["parameters_changed"] == check["parameters_with_gradients"] == check["parameters"] > 0
    assert check["unchanged_with_gradient"] == []
    assert check["max_abs_change"] > 0
    assert check["stem_matmul_dtype"] == {"fp16": "torch.float16", "bf16": "torch.bfloat16"}[precision]
    assert check["parameter_dtypes"] == check["gradient_dtypes"] == ["torch.float32"]
    assert check["teacher_dtype"] == "torch.bfloat16"
    assert check["teacher_feature_dtypes"] == ["torch.float32"]
    assert check["error"] is None
    assert all(check["criteria"].values()), check["criteria"]
    if precision == "fp16":
        assert check["grad_scaler"] == "GradScaler"


@pytest.mark.slow
def test_reduced_gpu_check_ddp_inference_and_memory(reduced_report):
    checks = reduced_report[1]["checks"]
    if not torch.cuda.is_available():
        ddp = checks["ddp_2proc"]
        assert ddp["processes"] == 2 and ddp["backend"] == "gloo"
        assert ddp["criteria"]["replicas_identical"] and ddp["criteria"]["ranks_saw_different_data"]
        assert all(torch.isfinite(torch.tensor(ddp["losses"])).tolist())
    inference = checks["inference_speed"]["results"]
    assert list(inference) == ["batch 1", "batch 8"]
    for row in inference.values():
        assert row["eager_fp32_seconds"] > 0 and row["fast_bf16_seconds"] > 0
        assert set(row["relative_error"]) == {"semseg", "normals", "edge", "depth"}
        assert max(row["relative_error"].values()) < 5e-2
    memory = checks["peak_memory"]["configurations"]
    assert len(memory) == 2
    for configuration in memory.values():
        assert configuration["status"] == "passed"
        assert configuration["peak_memory_mib"] > 0


def test_a_check_fails_on_any_false_criterion():
    assert as_check({"criteria": {"a": True, "b": False}}, 1.0)["status"] == "failed"
    assert as_check({"criteria": {"a": True, "b": False}}, 1.0)["failed_criteria"] == ["b"]
    assert as_check({"criteria": {"a": True}}, 1.0)["status"] == "passed"


def test_benchmarks_refuse_near_zero_random_weights():
    """transformers' SamVisionConfig initialises at std 1e-10 (subnormal float32 activations, ~10x slower on CPU):
    the benchmark builders set 0.02, which must reach the weights, and refuse a near-zero model by name."""
    from transformers import SamVisionConfig, SamVisionModel

    tiny = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "mlp_dim": 64,
        "image_size": 64,
        "window_size": 2,
    }
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"teacher 'sam'.*1\.0e-10.*initializer_range=0\.02"):
        check_realistic_weights("teacher 'sam'", SamVisionModel(SamVisionConfig(**tiny)))
    configs = teacher_configs("tiny")
    assert {name: config.initializer_range for name, config in configs.items()} == dict.fromkeys(configs, 0.02)
    teachers, _ = build_teachers(configs, torch.float32, fast_path=True)
    medians = {name: check_realistic_weights(name, teacher) for name, teacher in teachers.teachers.items()}
    # initializer_range drives SAM's and DINOv2's Linear/Conv init; CLIP scales its own by width and depth.
    torch.testing.assert_close(medians["sam"], 0.02, rtol=0.05, atol=0)
    torch.testing.assert_close(medians["dinov2"], 0.02, rtol=0.05, atol=0)
    assert medians["clip"] > 1e-2
