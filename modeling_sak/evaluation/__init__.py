"""Evaluation of SAK, one concept per file: `counts` (count-metric base, best F) <- `metrics` (dense metrics) and
`boundaries` (the paper's odsF) <- `registry` (`make_metrics`, `delta_m`, `MAIN_METRIC`) <- `loop` (`evaluate`,
`evaluation_mode`) and `sak_multitask` (the `evaluate` module); `pictures`. Task facts come from `tasks_sak`, the
copy of `remote_code/tasks_sak.py` that the stand-alone `evaluate` module needs beside it; nothing here imports
training or teachers."""

from pathlib import Path


def metric_module_path() -> str:
    """Path of the `evaluate` module (`evaluate.load(metric_module_path(), "nyud_v2")`; no Hub access needed). Its
    folder stands alone: `evaluate.load` of a copy of it needs no `modeling_sak` installed."""
    return str(Path(__file__).with_name("sak_multitask.py"))
