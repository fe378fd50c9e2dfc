"""At S_stop the trainer releases the teacher and nothing keeps it alive: the module is collected
(weakref dead after gc.collect) with and without --teacher-compile, and the compiled blocks' dynamo
cache (attached to the blocks' shared forward code, so it outlives the module) is reset."""

import gc
import weakref

import pytest
import torch

from launch import TINY_MODEL
from tiny_teachers import save_tiny_llama_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_llama_teacher(d)
    return str(d)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "teacher-compile"])
def test_teacher_is_collected_after_s_stop(megatron_single_process, teacher, tmp_path, monkeypatch,
                                           compiled):
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    from megatron_let.teacher.hf_teacher import HFTeacher
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.trainer import Trainer

    loaded = []
    real_load = HFTeacher.load.__func__

    def load(cls, *a, **k):
        t = real_load(cls, *a, **k)
        block = t.model.model.layers[0]
        loaded.append((weakref.ref(t.model), weakref.ref(block), type(block).forward.__code__))
        return t

    # an earlier test of this worker process may have compiled the same block class's forward
    torch._dynamo.reset()
    monkeypatch.setattr(HFTeacher, "load", classmethod(load))
    cfg = parse_args(TINY_MODEL + [
        "--mock-data", "--vocab-size", "200", "--micro-batch-size", "2", "--global-batch-size", "2",
        "--seed", "5", "--objective", "let", "--teacher-path", teacher, "--let-student-layer", "2",
        "--let-stop-step", "1", "--train-iters", "2", "--metrics-jsonl", str(tmp_path / "m.jsonl"),
        *(["--teacher-compile"] if compiled else [])])
    trainer = Trainer(cfg)
    trainer.setup()
    try:
        trainer.train()
        assert len(loaded) == 1 and trainer.teacher.loaded is None  # released at iteration 2
        gc.collect()
        model_ref, block_ref, code = loaded[0]
        assert model_ref() is None and block_ref() is None, "the released teacher is still referenced"
        # compiled: dynamo's graphs and guards for the block's forward are gone with it
        assert _debug_get_cache_entry_list(code) == []
    finally:
        trainer.close()
