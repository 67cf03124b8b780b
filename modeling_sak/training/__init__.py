"""What `train_accelerate.py` runs, one concept a module: `recipe` (the run's settings and their flags), `preflight`
(`check_recipe`), `loaders` (dataset, teachers and DataLoaders), `student` (config and model), `lora`,
`optimization` (AdamW groups, `make_optimizer`, schedules, the non-finite guard), `checkpoints` (atomic saves,
resume), `sharding` (FSDP2 and the launch checks) and `run_outputs` (final folder, model card, pictures).
Evaluation is `modeling_sak.evaluation.loop`.
"""

from .optimization import make_optimizer, make_scheduler, parameter_groups


__all__ = ["make_optimizer", "make_scheduler", "parameter_groups"]
