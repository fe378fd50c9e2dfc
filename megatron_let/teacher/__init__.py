"""Frozen Hugging Face teachers (LET hidden-state alignment, logit distillation)."""

from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig, resolve_dtype
from megatron_let.teacher.inspection import (
    TeacherInfo,
    check_vocab_compatible,
    find_weight_files,
    inspect_teacher,
    resolve_layer,
    teacher_tokenizer_size,
)

__all__ = [
    "HFTeacher",
    "TeacherConfig",
    "TeacherInfo",
    "check_vocab_compatible",
    "find_weight_files",
    "inspect_teacher",
    "resolve_dtype",
    "resolve_layer",
    "teacher_tokenizer_size",
]
