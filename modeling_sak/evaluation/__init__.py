"""Evaluation of SAK: dense metrics, boundary odsF, Delta_m, the `evaluate` module and pictures."""

from pathlib import Path


def metric_module_path() -> str:
    """Path of the `evaluate` module (`evaluate.load(metric_module_path(), "nyud_v2")`; no Hub access needed)."""
    return str(Path(__file__).with_name("sak_multitask.py"))
