"""The overlapped teacher step (teacher/step_prefetch.py) on CPU, with a recording stand-in for
CUDA streams and events and for host<->device copies: nothing in the step waits for the device.

``torch.cuda.Stream/Event/stream/current_stream`` and ``Tensor.record_stream`` are replaced by
objects that log what is called on which stream; ``Tensor.to`` towards "cuda" lands on the CPU and
is logged with its ``non_blocking`` flag and the stream current at the time; ``.cpu()``,
``.tolist()``, ``.item()``, ``float()``/``int()``/``bool()`` called from megatron_let's code are
logged too (on a GPU each waits for the device). The teacher is a real tiny HF model on the CPU
that reports ``cuda`` as its device. Checked, for LET, LET† (own tokenizer) and KD:

* every copy of the step's inputs to the device is ``non_blocking`` and enqueued on the *main*
  stream before the side stream waits on it;
* the LET† host work (re-tokenisation, alignment indices) is done before any stream work, and no
  host conversion happens once the side stream is in use;
* the teacher's forwards run on the side stream and the states equal the plain teacher's;
* the KD head-fidelity check also runs on this path (TP=1): a teacher whose logits the sliced
  head does not reproduce gets its own logits, not the slice's.
"""

import contextlib
import sys
import weakref

import pytest
import torch

from tiny_teachers import save_tiny_llama_teacher

MAIN, SIDE = "main", "side"


class Recorder:
    def __init__(self):
        self.log = []
        self.current = FakeStream(self, MAIN)
        self.main = self.current
        self.on_device = {}  # id -> weakref of tensors that are "on the device" already

    def device_resident(self, t):
        r = self.on_device.get(id(t))
        return r is not None and r() is t

    def index(self, entry):
        return self.log.index(entry)


class FakeStream:
    count = 0

    def __init__(self, rec, name):
        FakeStream.count += 1
        self.rec, self.name, self.stream_id = rec, name, FakeStream.count

    def wait_stream(self, other):
        self.rec.log.append(("wait_stream", self.name, other.name))

    def wait_event(self, event):
        self.rec.log.append(("wait_event", self.name, event.stream))


class FakeEvent:
    def __init__(self, rec):
        self.rec, self.stream = rec, None

    def record(self, stream=None):
        self.stream = (stream or self.rec.current).name
        self.rec.log.append(("record", self.stream))


def _caller_in_project(depth=2):
    name = sys._getframe(depth).f_code.co_filename.replace("\\", "/")
    return "/megatron_let/" in name, name


@pytest.fixture
def streams(monkeypatch):
    rec = Recorder()
    real_to = torch.Tensor.to

    def is_cuda(d):
        return isinstance(d, (str, torch.device)) and torch.device(d).type == "cuda"

    def to(self, *args, **kwargs):
        target = kwargs.get("device", args[0] if args else None)
        if not is_cuda(target):
            return real_to(self, *args, **kwargs)
        non_blocking = kwargs.get("non_blocking", args[2] if len(args) > 2 else False)
        if "device" in kwargs:
            kwargs["device"] = "cpu"
        else:
            args = ("cpu",) + args[1:]
        out = real_to(self, *args, **kwargs)
        if not rec.device_resident(self):  # a real host-to-device copy
            rec.log.append(("h2d", bool(non_blocking), rec.current.name))
        rec.on_device[id(out)] = weakref.ref(out)
        return out

    monkeypatch.setattr(torch.Tensor, "to", to)
    for name in ("cpu", "tolist", "item", "__float__", "__int__", "__bool__"):
        real = getattr(torch.Tensor, name)

        def host(self, *a, __real=real, __name=name, **k):
            ours, where = _caller_in_project()
            if ours:
                rec.log.append(("host", __name, rec.current.name, where))
            return __real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, host)
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, s: rec.log.append(("record_stream", s.name)), raising=False)

    @contextlib.contextmanager
    def stream(s):
        previous, rec.current = rec.current, s
        try:
            yield
        finally:
            rec.current = previous

    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: FakeStream(rec, SIDE))
    monkeypatch.setattr(torch.cuda, "Event", lambda *a, **k: FakeEvent(rec))
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: rec.current)
    return rec


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    save_tiny_llama_teacher(d)
    return str(d)


class Chars:
    """Student tokenizer stand-in: one character per id."""

    def detokenize(self, ids):
        return "".join(chr(97 + i % 26) for i in ids)


class Triples:
    """Teacher tokenizer stand-in: three characters per token, with character offsets."""

    eod = 2

    def tokenize_with_offsets(self, text):
        spans = [(i, min(i + 3, len(text))) for i in range(0, len(text), 3)]
        return [3 + sum(map(ord, text[a:b])) % 190 for a, b in spans], spans


def _load(teacher_dir):
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

    return HFTeacher.load(TeacherConfig(path=teacher_dir, layer=2))


def _batches(m=3, b=2, s=12):
    g = torch.Generator().manual_seed(4)
    return [{"tokens": torch.randint(3, 200, (b, s), generator=g)} for _ in range(m)]


def _check_no_sync(rec):
    """The log's order: host work, then non-blocking copies on the main stream, then the side
    stream's wait on the main one; nothing after that waits for the device."""
    wait = rec.index(("wait_stream", SIDE, MAIN))
    copies = [i for i, e in enumerate(rec.log) if e[0] == "h2d"]
    assert copies, "no input reached the device"
    bad = [rec.log[i] for i in copies if rec.log[i] != ("h2d", True, MAIN) or i > wait]
    assert not bad, f"blocking or side-stream copies, or copies after the side stream started: {bad}"
    late_host = [e for e in rec.log[wait:] if e[0] == "host"]
    assert not late_host, f"host syncs once the side stream is in use: {late_host}"


@pytest.mark.parametrize("dagger", [False, True], ids=["let", "let-dagger"])
def test_overlapped_let_step_never_syncs(teacher_dir, streams, dagger):
    from megatron_let.teacher.step_prefetch import StepTeacher, StepWork
    from megatron_let.teacher.token_alignment import TokenAligner

    teacher = _load(teacher_dir)
    aligner = TokenAligner(Chars(), Triples()) if dagger else None
    batches = _batches()
    # references, by the plain (inline, CPU) path
    want = [aligner.teacher_hidden(teacher, b["tokens"]) if dagger
            else teacher.hidden_states(b["tokens"]) for b in batches]
    streams.log.clear()
    teacher._device = torch.device("cuda")  # the stand-in's "device"
    st = StepTeacher(teacher, aligner, overlap=True)
    assert st.overlap and st.eager
    st.begin_step(batches, StepWork(hidden=True, logits=False))
    got = [st.hidden(j, b["tokens"])[0] for j, b in enumerate(batches)]
    _check_no_sync(streams)
    assert st.streams_used == {st._stream.stream_id} and st.forwards == len(batches)
    assert [e for e in streams.log if e[0] == "wait_event"] == [("wait_event", MAIN, SIDE)] * 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_overlapped_kd_step_never_syncs(teacher_dir, streams):
    from megatron_let.teacher.step_prefetch import StepTeacher, StepWork

    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig

    teacher = HFTeacher.load(TeacherConfig(path=teacher_dir))  # the final layer: KD
    batches = _batches()
    want = [teacher.logits(b["tokens"], vocab_range=(10, 150)) for b in batches]
    teacher.sliced_head_ok(batches[0]["tokens"])  # the once-per-teacher check (it syncs)
    streams.log.clear()
    teacher._device = torch.device("cuda")
    st = StepTeacher(teacher, None, overlap=True)
    st.begin_step(batches, StepWork(hidden=False, logits=True, vocab_range=(10, 150)))
    got = [st.logits(j, b["tokens"], (10, 150)) for j, b in enumerate(batches)]
    _check_no_sync(streams)
    assert st.streams_used == {st._stream.stream_id}
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_head_fidelity_check_runs_on_the_overlap_path(teacher_dir, streams, capsys):
    """A family whose logits are not the head's slice (here: its forward doubles them) gets its
    own logits on the overlapped TP=1 path as on every other, not the slice's."""
    from megatron_let.teacher.hf_teacher import HFTeacher, TeacherConfig
    from megatron_let.teacher.step_prefetch import StepTeacher, StepWork

    teacher = HFTeacher.load(TeacherConfig(path=teacher_dir))
    model = teacher.model
    real_forward = model.forward

    def doubled(*a, **k):
        out = real_forward(*a, **k)
        out.logits = out.logits * 2
        return out

    model.forward = doubled
    batches = _batches()
    want = [model(input_ids=b["tokens"], use_cache=False).logits[..., 10:150] for b in batches]
    teacher._device = torch.device("cuda")
    st = StepTeacher(teacher, None, overlap=True)
    st.begin_step(batches, StepWork(hidden=False, logits=True, vocab_range=(10, 150)))
    got = [st.logits(j, b["tokens"], (10, 150)) for j, b in enumerate(batches)]
    assert "does not reproduce" in capsys.readouterr().out
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pin", [False, True])
def test_loader_pins_memory_when_asked(monkeypatch, pin):
    """The trainer asks for pinned batches on CUDA (pin_memory=device is CUDA); the loader passes
    it to the DataLoader (on CPU pinning needs an accelerator, so the flag itself is checked)."""
    from megatron_let.data import datasets

    seen = {}
    real = torch.utils.data.DataLoader

    def loader(*a, **k):
        seen.update(k)
        return real(*a, **{**k, "pin_memory": False})

    monkeypatch.setattr(datasets.torch.utils.data, "DataLoader", loader)
    ds = [{"tokens": torch.tensor([i, i + 1])} for i in range(8)]
    it = datasets.build_data_iterator(ds, 2, 0, 0, 1, seed=0, pin_memory=pin)
    assert next(it)["tokens"].shape == (2, 2) and seen["pin_memory"] is pin


@pytest.mark.parametrize("mismatch", [False, True])
def test_dry_run_counts_the_prefetched_let_dagger_states(mismatch):
    """LET† prefetches the step (its host work first) also at TP=1 on CPU: the dry run's held
    teacher states are the step's m micro-batches, not one."""
    from types import SimpleNamespace as NS

    from megatron_let.training.dry_run import teacher_state_memory

    cfg = NS(batch=NS(micro_batch_size=2), device="cpu", parallel=NS(sequence_parallel=False),
             teacher=NS(tp_split=None, overlap=None, tokenizer_mismatch=mismatch))
    held = teacher_state_memory(cfg, NS(seq_length=32), NS(tp=1), 5,
                                NS(hidden_size=48, output_width=48), NS(lm_head=False))
    assert held == (5 if mismatch else 1) * 2 * 32 * 48 * 2
