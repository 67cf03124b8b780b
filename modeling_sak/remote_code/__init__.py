"""What a checkpoint carries as remote code: `save_pretrained` copies these files, flat, into the checkpoint folder,
and `from_pretrained(..., trust_remote_code=True)` runs them where this package is not installed.

They import only the standard library, torch, transformers, numpy, PIL and each other, by single-level relative
imports (`from .tasks_sak import TASKS`): what transformers copies (tests/test_architecture.py checks both).
`configuration_sak` (`SAKConfig`), `modeling_sak` (the student, its losses in `losses`, the deployed heads in
`fast_path_sak`), `image_processing_sak` (with `image_io_sak`), `pipeline_sak` (the "sak-multi-task" pipeline) and
`tasks_sak` (the task table). Nothing of teachers, data, evaluation or training.
"""
