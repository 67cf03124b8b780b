"""The frozen teachers a student is distilled from (training only; a checkpoint carries none of this).

`base` (`FrozenTeacher`, SAM's resize-and-pad) <- `committee` (transformers teachers by family, their position
embeddings, `SAKTeachers`, `teacher_specs`, `student_config`, `TeacherFeatureCache`) and `timm_teachers` (timm models
by Hub id); `fast_path` (bf16 SDPA blocks of the committee's families); `specialists` (the two ToyRooms teachers of the
default run, trained once and cached).
"""

from .committee import (
    SAKTeacher,
    SAKTeachers,
    TeacherFeatureCache,
    from_stem_and_teachers,
    load_teacher,
    student_config,
    teacher_specs,
    teacher_widths,
)


__all__ = [
    "SAKTeacher",
    "SAKTeachers",
    "TeacherFeatureCache",
    "from_stem_and_teachers",
    "load_teacher",
    "student_config",
    "teacher_specs",
    "teacher_widths",
]
