"""Faults a long pretraining run meets, reproduced on CPU with real runs of pretrain_let.py.

Kills land at deterministic points of a save: ``MEGATRON_LET_TEST_PAUSE_IN_SAVE=PHASE@ITER`` makes
rank 0 stop there and print a line, and the test SIGKILLs the run as soon as it sees it. Runs that
resume must log exactly the reference (uninterrupted) run's losses.

``FAULT_CASES`` is the table of docs/reliability.md (tools/reliability_table.py generates it;
test_reliability_doc_is_current keeps them in step). Each test names the case(s) it proves.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch import ROOT, TINY_MODEL, base_env, read_metrics, run_pretrain

FAULT_CASES = [
    # (name, fault, expected behaviour)
    ("first-save-killed", "SIGKILL while the first checkpoint is written (only `iter_N.tmp` exists)",
     "next `--load` starts from scratch and says so, naming the ignored `.tmp` (deleted); equal losses"),
    ("later-save-killed", "SIGKILL while a later checkpoint is written",
     "resumes from the previous checkpoint; equal losses"),
    ("killed-before-tracker", "a kill after `iter_N` is renamed in, before the tracker names it",
     "loads the tracker's checkpoint (no tracker: the newest complete `iter_*`)"),
    ("resave-killed-before-cleanup", "a kill while re-saving an existing iteration with a complete "
     "`iter_N.tmp` not yet renamed, or after the tracker update with `iter_N.old` left",
     "loads `iter_N`; the writer deletes the leftovers (or puts `.old` back when `iter_N` is gone)"),
    ("resave-killed-between-renames", "SIGKILL while re-saving the tracker's iteration (a finished run "
     "relaunched), after the old copy is moved to `iter_N.old`, before the new one is renamed in",
     "resumes at that iteration; the writer completes the re-save from the complete `iter_N.tmp`"),
    ("interrupted-resave-read-only", "a reader (`--load` of another run, evaluation) meets an "
     "interrupted re-save", "uses the complete `iter_N.tmp` or `iter_N.old` without changing the folder"),
    ("stale-lock", "the lock of a killed run (dead pid on this host) or with a heartbeat older than "
     "10 min", "taken over with a warning naming the old holder"),
    ("second-writer", "a second run on the same `--save` while the first is alive",
     "refused before any compute (`--dry-run` too), naming host, pid and SLURM job of the holder; exit 2"),
    ("flipped-byte", "one byte flipped inside a shard", "error naming the file (CRC-32), the newest "
     "complete older checkpoint and `--ckpt-step`; exit 2. `tools/evaluate.py` and `tools/export_hf.py` "
     "refuse it the same way, and take `--no-verify-checkpoint` as training does"),
    ("truncated-or-deleted-shard", "a shard truncated or deleted",
     "error naming the file and its expected size, or that it is missing"),
    ("corrupt-metadata", "garbage `metadata.json`, `.metadata` or `common.pt` (`--no-verify-checkpoint`)",
     "error naming the file and the newest complete older checkpoint with `--ckpt-step`"),
    ("tracker-names-missing", "the tracker names a checkpoint folder that is gone, or an iteration "
     "that never existed (a truncated tracker: \"1\" for \"12\")",
     "error listing the complete checkpoints present and the `--ckpt-step N` to load"),
    ("ckpt-step", "`--ckpt-step N` after that error", "resumes from iteration N; equal losses"),
    ("load-iter-folder", "`--load DIR/iter_0000002` (one checkpoint folder)", "loads that iteration (never a silent fresh start); "
     "equal losses"),
    ("incompatible-checkpoint", "resume with a different `--vocab-size`, `--num-attention-heads`, tied "
     "embeddings", "error listing every mismatch with both values, before any tensor is read; exit 2"),
    ("changed-math", "resume with another `--norm-epsilon`, `--rotary-base`, "
     "`--make-vocab-size-divisible-by` (padded vocabulary) or any other model field",
     "error listing every mismatch with both values (every model config field is compared but an "
     "allow-list with reasons); exit 2"),
    ("changed-data", "resume with another `--seed`, `--data-path`, `--split` or `--kd-data-selection` file",
     "error naming both values and `--override-data-on-resume`; with that flag: resumes, logged"),
    ("longer-run", "resume extending `--train-iters` (`--override-opt_param-scheduler`) on a "
     "multi-epoch dataset", "continues the uninterrupted run's sample sequence exactly (per-sample "
     "hashes) with equal losses"),
    ("global-batch-change", "resume with another `--global-batch-size` (4 → 8)",
     "the next samples in sequence: nothing repeated, nothing skipped (per-sample hashes)"),
    ("reprocessed-in-place", "a `--data-path` dataset re-preprocessed in place (other documents)",
     "the index cache is keyed to the files' sizes and mtimes: new indices, the new data's windows"),
    ("load-parent-folder", "`--load DIR` with no checkpoint in DIR but one in a subfolder",
     "error naming the subfolder to pass; a `--load` that does not exist (and is not `--save`): error"),
    ("objective-change", "resume a baseline checkpoint with `--objective let`", "allowed, logged"),
    ("nan-loss", "`--lr 1e3`: loss/grad norm become NaN", "stops at that iteration naming term and "
     "rank, exit 1; no checkpoint of that or a later step"),
    ("nan-flag", "`--let-lambda nan`, `--lr inf`, any float flag non-finite", "parse-time error naming the flag"),
    ("nan-teacher", "NaN in the teacher's weights", "error at teacher load naming the folder and tensor"),
    ("nan-teacher-output", "a teacher whose output overflows to NaN/inf although its weights are finite",
     "stops at that iteration naming the teacher folder, the rank and micro-batch, and that the "
     "teacher's output (not the student) was non-finite; exit 1 (the flag rides on the step's one "
     "reduction: no extra host sync)"),
    ("disk-full", "the `--save` file system fills up during a save", "error saying the disk is full, "
     "naming the checkpoint path and the free space; the partial `.tmp` is removed; exit 1"),
    ("write-error-every-site", "`ENOSPC` or `EIO` injected at each write of a save: a shard, "
     "`.metadata`, `metadata.json`, `common.pt`, the RNG file, the manifest, the tracker, the lock's "
     "heartbeat", "one error line naming the file, exit 1; the previous checkpoint stays the latest "
     "and loads; no temporary file left (`iter_N.tmp`, tracker or lock `.tmp`); a tracker failure says "
     "the complete `iter_N` and its `--ckpt-step`; a heartbeat failure comes after the save is logged"),
    ("async-save-killed", "SIGKILL while an `--async-save` checkpoint is being written in the "
     "background (shards written, not finalised)", "`iter_N.tmp` without manifest is ignored: resumes "
     "from the previous checkpoint; equal losses (and an async run equals a sync run)"),
    ("stop-signal-every-process", "SIGTERM or SIGUSR1 to every process of the job step, "
     "megatron-core's helper processes included (SLURM's time limit, `scancel` without `--batch`), "
     "after a periodic save", "checkpoint of the step it arrived in, exit 0 (plain `torchrun`'s agent "
     "exits 1 by its own SIGTERM handling, its workers checkpoint all the same); equal losses on resume"),
    ("sigkill-trainer-helpers", "SIGKILL of a trainer whose checkpoint helpers run (megatron-core's "
     "write-results Manager, shielded from the stop signals)", "the helper dies with the trainer "
     "(the kernel SIGKILLs it): no orphan is left holding memory"),
]

ARGS = TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                     "--micro-batch-size", "2", "--global-batch-size", "4", "--seed", "5"]
ITERS = 5  # checkpoints at 2, 4 and 5 (5 is not a multiple of 2: relaunching re-saves it)
TRACKER = "latest_checkpointed_iteration.txt"


def _case(name):
    assert name in {c[0] for c in FAULT_CASES}, name
    return name


def _tracker(d):
    return open(os.path.join(d, TRACKER)).read().strip()


def _run(args, check=True):
    proc = run_pretrain(ARGS + args, check=check)
    return proc


def _assert_same_losses(metrics_path, reference, iterations):
    got = read_metrics(metrics_path)
    assert sorted(got) == list(iterations), sorted(got)
    for it in iterations:
        assert got[it]["lm loss"] == pytest.approx(reference[it]["lm loss"], abs=1e-6, rel=0), it


def _killed_in_save(args, phase, log, timeout=300):
    """Run until rank 0 pauses at ``phase`` of a save, then SIGKILL it. Returns its output."""
    env = base_env()
    env["MEGATRON_LET_TEST_PAUSE_IN_SAVE"] = phase
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_let.py"), *ARGS, *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + timeout
        while "test pause in save" not in open(log).read():
            assert proc.poll() is None, f"ended (rc {proc.returncode}) before {phase}:\n" + open(log).read()[-3000:]
            assert time.time() < deadline, open(log).read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return open(log).read()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run: its metrics, and its checkpoints (2, 4, 5) to damage."""
    d = tmp_path_factory.mktemp("reference")
    metrics = str(d / "m.jsonl")
    _run(["--train-iters", str(ITERS), "--save", str(d / "ck"), "--save-interval", "2",
          "--metrics-jsonl", metrics])
    return read_metrics(metrics), str(d / "ck")


@pytest.fixture(scope="module")
def kill_chain(tmp_path_factory, reference):
    """One save folder through a sequence of kills; each run resumes what the previous left."""
    ref, _ = reference
    d = tmp_path_factory.mktemp("chain")
    ck = str(d / "ck")
    base = ["--train-iters", str(ITERS), "--save", ck, "--load", ck, "--save-interval", "2"]
    out = {}

    def resume(step, phase=None, extra=()):
        metrics = str(d / f"{step}.jsonl")
        args = base + ["--metrics-jsonl", metrics, *extra]
        if phase:
            text = _killed_in_save(args, phase, str(d / f"{step}.log"))
        else:
            proc = _run(args)
            text = proc.stdout + proc.stderr
        out[step] = {"log": text, "metrics": metrics,
                     "listing": sorted(n for n in os.listdir(ck) if not n.startswith(".")),
                     "tracker": _tracker(ck) if os.path.isfile(os.path.join(ck, TRACKER)) else None}

    resume("A", "write@2")        # first save killed: only iter_0000002.tmp
    resume("B", "write@4")        # from scratch; later save killed
    resume("C", extra=["--load", os.path.join(ck, "iter_0000002")])  # from 2 (that folder), to the end
    resume("D", "old_moved@5")    # finished run relaunched: re-save of 5 killed between renames
    out["D_copy"] = str(d / "ck_after_D")
    shutil.copytree(ck, out["D_copy"])  # for the read-only reader test
    resume("E")                   # completes the interrupted re-save
    out["ck"] = ck
    return out


def test_first_save_killed(kill_chain, reference):
    _case("first-save-killed")
    ref, _ = reference
    assert kill_chain["A"]["listing"] == ["iter_0000002.tmp"]
    log = kill_chain["B"]["log"]
    assert "deleted the incomplete" in log and "iter_0000002.tmp" in log
    assert kill_chain["B"]["tracker"] == "2"
    assert "no complete checkpoint under" in log and "starting from scratch" in log
    _assert_same_losses(kill_chain["B"]["metrics"], ref, range(1, 5))


def test_stale_lock_of_killed_run_is_taken_over(kill_chain):
    _case("stale-lock")
    log = kill_chain["B"]["log"]
    assert "WARNING: taking over the stale lock" in log and "is gone" in log


def test_later_save_killed_then_load_iter_folder(kill_chain, reference):
    _case("later-save-killed")
    _case("load-iter-folder")
    ref, _ = reference
    assert kill_chain["B"]["tracker"] == "2" and "iter_0000004.tmp" in kill_chain["B"]["listing"]
    log = kill_chain["C"]["log"]
    assert "deleted the incomplete" in log and "at iteration 2" in log
    assert f"resumed from {os.path.join(kill_chain['ck'], 'iter_0000002')}" in log
    assert "starting from scratch" not in log
    _assert_same_losses(kill_chain["C"]["metrics"], ref, range(3, 6))
    assert kill_chain["C"]["listing"] == ["iter_0000002", "iter_0000004", "iter_0000005", TRACKER]


def test_resave_killed_between_renames(kill_chain):
    _case("resave-killed-between-renames")
    d = kill_chain["D"]
    assert d["tracker"] == "5" and "iter_0000005" not in d["listing"]
    assert {"iter_0000005.old", "iter_0000005.tmp"} <= set(d["listing"])
    e = kill_chain["E"]
    assert "completed the interrupted re-save" in e["log"] and "resumed from" in e["log"]
    assert "at iteration 5" in e["log"]
    assert e["listing"] == ["iter_0000002", "iter_0000004", "iter_0000005", TRACKER]
    assert e["tracker"] == "5"


def test_interrupted_resave_read_only(kill_chain):
    """The loader alone (no writer to repair the folder) picks the complete copy and changes nothing."""
    _case("interrupted-resave-read-only")
    from megatron_let.training.checkpointing import find_checkpoint

    d = kill_chain["D_copy"]
    before = sorted(os.listdir(d))
    it, path, _ = find_checkpoint(d)
    assert (it, os.path.basename(path)) == (5, "iter_0000005.tmp")  # the new copy, complete
    shutil.rmtree(path)
    it, path, _ = find_checkpoint(d)
    assert (it, os.path.basename(path)) == (5, "iter_0000005.old")
    assert sorted(os.listdir(d)) == [n for n in before if n != "iter_0000005.tmp"]


def test_other_kill_points(reference, tmp_path):
    """The remaining phases of a save (SAVE_PHASES), as the folder states they leave, read by the
    loader and repaired by the writer; the states are made from real checkpoints."""
    _case("killed-before-tracker")
    _case("resave-killed-before-cleanup")
    from megatron_let.training.checkpointing import (SAVE_PHASES, find_checkpoint,
                                                     recover_interrupted_saves)

    assert set(SAVE_PHASES) == {"write", "written", "old_moved", "renamed", "tracker"}
    d, it5 = _damaged_copy(reference, tmp_path)
    tracker = os.path.join(d, TRACKER)
    # "renamed": iter_5 in place, the tracker still names 4 -> 4; without any tracker -> newest, 5
    open(tracker, "w").write("4")
    assert find_checkpoint(d)[:2] == (4, os.path.join(d, "iter_0000004"))
    os.remove(tracker)
    assert find_checkpoint(d)[:2] == (5, it5)
    open(tracker, "w").write("5")
    # "written" (re-save: complete .tmp, nothing renamed) and "tracker" (.old left): iter_5 wins
    shutil.copytree(it5, it5 + ".tmp")
    shutil.copytree(it5, it5 + ".old")
    assert find_checkpoint(d)[:2] == (5, it5)
    assert recover_interrupted_saves(d) == [f"deleted the incomplete {it5}.tmp"]
    assert sorted(os.listdir(d)) == ["iter_0000002", "iter_0000004", "iter_0000005", TRACKER]
    # "old_moved" with the new copy lost: the old one is put back
    os.replace(it5, it5 + ".old")
    assert recover_interrupted_saves(d) == [f"restored {it5} from iter_0000005.old"]
    assert find_checkpoint(d)[:2] == (5, it5)


def _damaged_copy(reference, tmp_path):
    _, src = reference
    d = str(tmp_path / "ck")
    shutil.copytree(src, d)
    return d, os.path.join(d, "iter_0000005")


def _fails(args, code=2):
    proc = _run(args, check=False)
    assert proc.returncode == code, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "pretrain_let.py: error:" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "iteration        6" not in proc.stdout
    return proc.stderr


def _flip_middle_byte(path: str) -> str:
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    return path


def test_flipped_byte_in_shard(reference, tmp_path):
    _case("flipped-byte")
    d, it5 = _damaged_copy(reference, tmp_path)
    shard = _flip_middle_byte(os.path.join(it5, "__0_0.distcp"))
    err = _fails(["--train-iters", "6", "--load", d])
    assert f"{shard} fails its CRC-32 check" in err
    assert f"{os.path.join(d, 'iter_0000004')}: load it with --ckpt-step 4" in err


def test_tracker_names_missing_then_ckpt_step(reference, tmp_path):
    _case("tracker-names-missing")
    _case("ckpt-step")
    ref, _ = reference
    d, it5 = _damaged_copy(reference, tmp_path)
    shutil.rmtree(it5)
    from megatron_let.training.checkpointing import find_checkpoint
    from megatron_let.training.errors import CheckpointError

    with pytest.raises(CheckpointError, match="names iteration 5 but .* complete checkpoints under "
                                              ".*: iterations 2, 4; load the newest older one with "
                                              "--ckpt-step 4"):
        find_checkpoint(d)  # a run prints this and exits 2 (as test_flipped_byte_in_shard shows)
    open(os.path.join(d, TRACKER), "w").write("1")  # "12" truncated: newer ones exist
    with pytest.raises(CheckpointError, match="names iteration 1 but .*iterations 2, 4; load the "
                                              "newest one with --ckpt-step 4"):
        find_checkpoint(d)
    open(os.path.join(d, TRACKER), "w").write("5")
    metrics = str(tmp_path / "step.jsonl")
    out = _run(["--train-iters", "5", "--load", d, "--ckpt-step", "4", "--metrics-jsonl", metrics]).stdout
    assert "resumed from" in out and "at iteration 4" in out
    _assert_same_losses(metrics, ref, [5])


def test_incompatible_checkpoint_names_both_values(reference):
    _case("incompatible-checkpoint")
    _, ck = reference
    err = _fails(["--train-iters", "6", "--load", ck, "--vocab-size", "300", "--num-attention-heads", "8",
                  "--tie-embeddings-and-output-weights"])
    assert "does not match this run" in err
    assert "--vocab-size: checkpoint 200, this run 300" in err
    assert "--num-attention-heads: checkpoint 4, this run 8" in err
    assert "--untie-embeddings-and-output-weights: checkpoint True, this run False" in err


def test_objective_change_is_logged_and_nan_teacher_refused(reference, tmp_path):
    _case("objective-change")
    _case("nan-teacher")
    from tiny_teachers import save_tiny_llama_teacher

    _, ck = reference
    model = save_tiny_llama_teacher(tmp_path / "teacher", vocab_size=200)
    import torch

    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")
    model.save_pretrained(str(tmp_path / "teacher"), safe_serialization=True)
    proc = run_pretrain(TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                                      "--global-batch-size", "4", "--objective", "let",
                                      "--teacher-path", str(tmp_path / "teacher"), "--train-iters", "6",
                                      "--let-student-layer", "2", "--load", ck, "--no-load-optim",
                                      "--no-load-rng"], check=False)  # as the reproduction does
    assert "objective changes from baseline (checkpoint) to let" in proc.stdout
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "non-finite (NaN/inf) weights" in proc.stderr
    assert "model.layers.1.mlp.down_proj.weight" in proc.stderr and "teacher" in proc.stderr


def test_nan_loss_stops_before_any_save(tmp_path):
    _case("nan-loss")
    ck = str(tmp_path / "ck")
    proc = _run(["--lr", "1e3", "--train-iters", "30", "--save", ck, "--save-interval", "3"], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "pretrain_let.py: error: non-finite values at iteration" in err and "Traceback" not in err
    bad = int(err.split("non-finite values at iteration ")[1].split(":")[0])
    assert bad < 30
    assert "on rank 0" in err and ("grad norm = nan" in err or "lm loss = nan" in err)
    # every checkpoint is from before the bad step, the tracker names the last of them
    iters = sorted(int(n[5:]) for n in os.listdir(ck) if n.startswith("iter_"))
    assert iters == list(range(3, bad, 3)) and _tracker(ck) == str(iters[-1])
    assert not os.path.exists(os.path.join(ck, ".megatron_let.lock"))  # released at exit


def test_second_writer_refused(tmp_path, capsys):
    _case("second-writer")
    import socket

    ck = tmp_path / "ck"
    ck.mkdir()
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": "777",
            "started": time.time(), "heartbeat": time.time()}
    (ck / ".megatron_let.lock").write_text(json.dumps(lock))  # this pytest process: alive
    err = _fails(["--train-iters", "2", "--save", str(ck)])
    assert f"is in use by another run (host {socket.gethostname()} pid {os.getpid()}, SLURM job 777" in err
    assert os.listdir(ck) == [".megatron_let.lock"]  # nothing written, the holder's lock kept
    sys.path.insert(0, ROOT)
    import pretrain_let

    assert pretrain_let.main(["--dry-run", *ARGS, "--train-iters", "2", "--save", str(ck)]) == 2
    assert f"is in use by another run (host {socket.gethostname()} pid {os.getpid()}, SLURM job 777" \
        in capsys.readouterr().err  # --dry-run refuses as the run does


def _mount_tmpfs(path, size):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_disk_full_names_the_path(tmp_path):
    _case("disk-full")
    mnt = str(tmp_path / "small")
    if not _mount_tmpfs(mnt, "1m"):  # a checkpoint of the tiny model is 2.4 MB
        pytest.skip("needs root to mount a 1 MB tmpfs (the in-process test covers the error text)")
    try:
        ck = os.path.join(mnt, "ck")
        proc = _run(["--train-iters", "2", "--save", ck], check=False)
        assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
        err = proc.stderr
        assert f"pretrain_let.py: error: [Errno 28] disk full while saving checkpoint {ck}/iter_0000002.tmp" in err
        assert "MiB free" in err and "Traceback" not in err
        assert sorted(os.listdir(ck)) == []  # partial .tmp removed, lock released
    finally:
        subprocess.run(["umount", mnt], check=False)


WRITE_SITES = [  # (site, glob of the file whose write fails, errno, iteration of the failing save)
    ("shard", "*/iter_0000004.tmp/__0_1.distcp", "ENOSPC", 4),
    ("shard", "*/iter_0000004.tmp/__0_0.distcp", "EIO", 4),
    (".metadata", "*/iter_0000004.tmp/.metadata*", "ENOSPC", 4),
    ("metadata.json", "*/iter_0000004.tmp/metadata.json", "EIO", 4),
    ("common.pt", "*/iter_0000004.tmp/common.pt", "ENOSPC", 4),
    ("rng", "*/iter_0000004.tmp/rng/*", "EIO", 4),
    ("manifest", "*/iter_0000004.tmp/manifest.json.tmp", "ENOSPC", 4),
    ("tracker", "*/latest_checkpointed_iteration.txt.tmp", "ENOSPC", 2),
    ("tracker", "*/latest_checkpointed_iteration.txt.tmp", "EIO", 2),
    ("heartbeat", "*/.megatron_let.lock.*.tmp#3", "ENOSPC", 4),  # 1: acquire, 2: after save 2
    ("heartbeat", "*/.megatron_let.lock.*.tmp#3", "EIO", 4),
]


@pytest.mark.parametrize("site,glob,code,at", WRITE_SITES,
                         ids=[f"{s}-{c}" for s, _, c, _ in WRITE_SITES])
def test_write_error_at_every_site(site, glob, code, at, reference, tmp_path):
    """The failing write is injected in the real run (MEGATRON_LET_TEST_FAIL_WRITE: the file is
    created, then its write fails, as on a full disk) in megatron-core's writers as in ours."""
    _case("write-error-every-site")
    ck = str(tmp_path / "ck")
    env = base_env()
    env["MEGATRON_LET_TEST_FAIL_WRITE"] = f"{glob}:{code}"
    cmd = [sys.executable, os.path.join(ROOT, "pretrain_let.py"), *ARGS, "--train-iters", "4",
           "--save", ck, "--save-interval", "2"]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    errors = [l for l in proc.stderr.splitlines() if l.startswith("pretrain_let.py: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    error = errors[0]
    assert f"[Errno {getattr(__import__('errno'), code)}]" in error, error
    assert ("disk full" in error) == (code == "ENOSPC"), error
    left = []
    for dirpath, dirs, files in os.walk(ck):
        left += [os.path.join(dirpath, n) for n in dirs + files if n.endswith(".tmp")]
    assert not left, left
    assert not [n for n in os.listdir(ck) if n.startswith(".megatron_let.lock")], os.listdir(ck)
    if site == "tracker":  # the checkpoint is complete, only the tracker is behind
        assert f"cannot write the checkpoint tracker {ck}/{TRACKER}" in error, error
        assert f"{ck}/iter_0000002 is complete" in error and "--ckpt-step 2" in error, error
        assert not os.path.exists(os.path.join(ck, TRACKER))
        assert os.path.isfile(os.path.join(ck, "iter_0000002", "manifest.json"))
        return
    if site == "heartbeat":  # after the save, which completed and was logged
        assert f"saved checkpoint {ck}/iter_0000004" in proc.stdout, proc.stdout[-2000:]
        assert f"the lock file {ck}/.megatron_let.lock" in error, error
        assert _tracker(ck) == "4"
        return
    tmp = f"{ck}/iter_0000004.tmp"
    assert f"checkpoint {tmp}" in error and f"{tmp}/" in error, error  # the folder and the file
    assert f"saved checkpoint {ck}/iter_0000002" in proc.stdout
    assert _tracker(ck) == "2" and sorted(os.listdir(ck)) == ["iter_0000002", TRACKER]
    if (site, code) == ("shard", "ENOSPC"):  # the previous checkpoint is whole: resume, same losses
        ref, _ = reference
        metrics = str(tmp_path / "resumed.jsonl")
        _run(["--train-iters", "4", "--save", ck, "--load", ck, "--save-interval", "2",
              "--metrics-jsonl", metrics])
        _assert_same_losses(metrics, ref, range(3, 5))  # constant LR: the reference's steps 3, 4


# ------------------------------------------------------------------ in-process (no extra runs)

def test_disk_full_error_recognises_torch_and_dcp_errors(tmp_path):
    _case("disk-full")
    import errno

    from megatron_let.training.checkpoint_integrity import disk_full_error

    torch_err = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1088 vs 1024")
    e = disk_full_error(torch_err, str(tmp_path / "iter_0000002.tmp"))
    assert e.errno == errno.ENOSPC and str(tmp_path / "iter_0000002.tmp") in str(e) and "disk full" in str(e)
    wrapped = RuntimeError("rank 0 failed")
    wrapped.failures = {0: OSError(errno.ENOSPC, "No space left on device")}  # DCP's CheckpointException
    assert disk_full_error(wrapped, str(tmp_path)) is not None
    assert disk_full_error(RuntimeError("CUDA error"), str(tmp_path)) is None


def test_truncated_or_deleted_shard_named(reference, tmp_path):
    _case("truncated-or-deleted-shard")
    from megatron_let.training.checkpointing import verify_checkpoint
    from megatron_let.training.errors import CheckpointError

    d, it5 = _damaged_copy(reference, tmp_path)
    shard = os.path.join(it5, "__0_1.distcp")
    size = os.path.getsize(shard)
    with open(shard, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=f"{shard} has {size - 100} bytes, the manifest says {size}"):
        verify_checkpoint(it5, d, 5, log=lambda m: None)
    os.remove(shard)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(it5, d, 5, log=lambda m: None)
    assert f"{shard} is missing" in str(e.value) and "--ckpt-step 4" in str(e.value)


@pytest.mark.parametrize("name", ["metadata.json", ".metadata", "common.pt"])
def test_corrupt_metadata_named_without_verification(megatron_single_process, reference, tmp_path, name):
    _case("corrupt-metadata")
    from megatron_let.model.llama import LlamaConfig, build_student
    from megatron_let.runtime.device import ParallelConfig
    from megatron_let.training.checkpointing import load_checkpoint
    from megatron_let.training.errors import CheckpointError

    d, it5 = _damaged_copy(reference, tmp_path)
    with open(os.path.join(it5, name), "wb") as f:
        f.write(b"\x00garbage" * 8)
    model = build_student(LlamaConfig(num_layers=4, hidden_size=64, ffn_hidden_size=128,
                                      num_attention_heads=4, num_query_groups=2, seq_length=32,
                                      vocab_size=200), ParallelConfig(), use_cpu=True)
    with pytest.raises(CheckpointError) as e:  # verification would name it too (CRC-32)
        load_checkpoint(d, model, None, None, load_optim=False, load_rng=False, verify=False,
                        log=lambda m: None)
    msg = str(e.value)
    assert (os.path.join(it5, name) in msg) if name != ".metadata" else (".metadata" in msg and it5 in msg)
    assert "load it with --ckpt-step 4" in msg


def test_stale_heartbeat_taken_over_live_lock_refused(tmp_path):
    _case("stale-lock")
    _case("second-writer")
    from megatron_let.training.errors import SaveLockError
    from megatron_let.training.save_lock import LOCK_NAME, SaveLock

    lock_file = tmp_path / LOCK_NAME
    old = time.time() - 3600
    lock_file.write_text(json.dumps({"host": "other-node", "pid": 1, "started": old, "heartbeat": old}))
    logged = []
    lock = SaveLock(str(tmp_path), log=logged.append)
    lock.acquire()
    assert "taking over the stale lock" in logged[0] and "host other-node pid 1" in logged[0]
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(SaveLockError, match="in use by another run"):
        SaveLock(str(tmp_path)).acquire()  # live holder, fresh heartbeat
    lock.release()
    assert not lock_file.exists()


def test_every_float_flag_must_be_finite():
    _case("nan-flag")
    from megatron_let.training.arguments import build_parser, parse_args

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--mock-data",
            "--vocab-size", "200"]
    floats = [a.option_strings[0] for a in build_parser()._actions if a.type is float]
    assert {"--lr", "--min-lr", "--let-lambda", "--kd-weight", "--kd-temperature"} <= set(floats)
    for flag in floats:
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(ValueError, match=f"{flag} {float(bad)} is not a finite number"):
                parse_args(base + [f"{flag}={bad}"])
    sys.path.insert(0, ROOT)
    import pretrain_let

    assert pretrain_let.main(base + ["--dry-run", "--let-lambda", "nan"]) == 2  # --dry-run refuses too


def test_non_finite_metric_names_term_and_rank(megatron_single_process):
    _case("nan-loss")
    import torch

    from megatron_let.training.metrics import MetricAccumulator

    acc = MetricAccumulator()
    acc.add("lm loss", torch.tensor(3.0), torch.tensor(2.0), replicated=True)
    acc.add("kd loss", torch.tensor(float("inf")), torch.tensor(2.0), replicated=True)
    out = acc.reduce(["lm loss", "kd loss"], finite_checks={"grad norm": 1.5})
    assert out["lm loss"] == 1.5 and acc.non_finite == {"kd loss": [0]}
    acc.add("lm loss", torch.tensor(3.0), torch.tensor(2.0), replicated=True)
    acc.reduce(["lm loss"], finite_checks={"grad norm": float("nan")})
    assert acc.non_finite == {"grad norm": [0]}
    acc.add("lm loss", torch.tensor(float("nan")), torch.tensor(2.0), replicated=True)
    acc.reduce(["lm loss"])  # evaluation: no check requested
    assert acc.non_finite == {}


def test_reliability_doc_is_current():
    # loaded by path: tools/ on sys.path would shadow packages by the tools' names (evaluate) for the
    # rest of this worker's files
    spec = importlib.util.spec_from_file_location("reliability_table", os.path.join(ROOT, "tools", "reliability_table.py"))
    reliability_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reliability_table)

    with open(os.path.join(ROOT, "docs", "reliability.md")) as f:
        current = reliability_table.SECTION.current(f.read())
    assert current == reliability_table.render(), \
        "docs/reliability.md is stale: run python tools/reliability_table.py"
    assert f"**{len(FAULT_CASES)} faults survived**" in current


# ------------------------------------------------------------------ resumes that change the math or the data

def test_changed_math_refused_naming_both_values(reference):
    _case("changed-math")
    _, ck = reference
    err = _fails(["--train-iters", "6", "--load", ck, "--norm-epsilon", "1e-6", "--rotary-base", "500000",
                  "--make-vocab-size-divisible-by", "100"])
    assert "does not match this run" in err
    assert "--norm-epsilon: checkpoint 1e-05, this run 1e-06" in err
    assert "--rotary-base: checkpoint 10000, this run 500000" in err
    assert "--make-vocab-size-divisible-by: checkpoint 128, this run 100" in err
    assert "padded vocabulary (--make-vocab-size-divisible-by x --tensor-model-parallel-size): " \
           "checkpoint 256, this run 200" in err


def test_model_check_covers_every_config_field():
    """A field added to LlamaConfig later is compared without touching the check; only the
    allow-list may differ, and an older checkpoint's missing field counts as its default."""
    _case("changed-math")
    import dataclasses

    from megatron_let.model.llama import LlamaConfig
    from megatron_let.training.compatibility import (MAY_CHANGE_ON_RESUME, MODEL_ONLY_START_MAY_CHANGE,
                                                     model_problems)

    cfg = LlamaConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                      vocab_size=200)
    saved = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        changed = dict(saved)
        value = saved[f.name]
        changed[f.name] = (not value) if isinstance(value, bool) else \
            (value * 2 if isinstance(value, (int, float)) else 7)
        problems = model_problems(changed, cfg)
        if f.name in MAY_CHANGE_ON_RESUME:
            assert problems == [], f.name
        else:
            assert len(problems) == 1 and problems[0].startswith("--" + f.name.replace("_", "-")), \
                (f.name, problems)
        if f.name in MODEL_ONLY_START_MAY_CHANGE:
            assert model_problems(changed, cfg, check_seq_length=False) == []
    old = {k: v for k, v in saved.items() if k != "rotary_base"}  # an older checkpoint
    assert model_problems(old, cfg) == []
    assert model_problems(old, dataclasses.replace(cfg, rotary_base=500000)) == [
        "--rotary-base: checkpoint 10000, this run 500000"]
    # a checkpoint from before the Megatron-LM architecture flags: kv_channels None meant hidden/heads
    megatron_fields = ("kv_channels", "rotary_percent", "attention_dropout", "hidden_dropout",
                       "apply_layernorm_1p")
    older = {k: v for k, v in saved.items() if k not in megatron_fields}
    assert model_problems(older, cfg) == []
    assert model_problems({**saved, "kv_channels": None}, cfg) == []
    assert model_problems(older, dataclasses.replace(cfg, kv_channels=32)) == [
        "--kv-channels: checkpoint 16, this run 32"]


def test_changed_data_refused_unless_overridden(reference, tmp_path):
    _case("changed-data")
    _, ck = reference
    err = _fails(["--train-iters", "6", "--load", ck, "--seed", "6"])
    assert "was trained on other data than this run: --seed: checkpoint 5, this run 6" in err
    assert "pass --override-data-on-resume" in err
    d = str(tmp_path / "ck")
    shutil.copytree(ck, d)
    proc = _run(["--train-iters", "6", "--load", d, "--seed", "6", "--override-data-on-resume",
                 "--override-opt_param-scheduler"])
    assert "WARNING: --override-data-on-resume: resuming on other data than the checkpoint's: " \
           "--seed: checkpoint 5, this run 6" in proc.stdout
    assert "resumed from" in proc.stdout and "iteration        6/" in proc.stdout


def test_data_record_names_path_split_and_selection(tmp_path):
    _case("changed-data")
    import numpy as np

    from megatron_let.training.arguments import parse_args
    from megatron_let.training.compatibility import data_problems, data_record

    sel = tmp_path / "sel.npy"
    np.save(sel, np.arange(4))
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "200", "--objective", "salt",
            "--kd-data-selection", str(sel)]
    pa, pb = _write_dataset(str(tmp_path / "a"), 1), _write_dataset(str(tmp_path / "b"), 2)
    a = data_record(parse_args(base + ["--data-path", pa, "--split", "98,2"]))
    same = data_record(parse_args(base + ["--data-path", pa, "--split", "98,2,0"]))
    assert data_problems(a, same) == []
    np.save(sel, np.arange(5))  # the same file name, another selection
    b = data_record(parse_args(base + ["--data-path", "0.5", pa, "0.5", pb, "--split", "9,1"]))
    problems = data_problems(a, b)
    assert problems[0] == f"--data-path: checkpoint {pa}, this run 0.5 {pa} 0.5 {pb}"
    assert problems[1] == "--split: checkpoint 0.98,0.02,0, this run 0.9,0.1,0"
    assert problems[2].startswith(f"--kd-data-selection: checkpoint {sel} (sha256 ")
    assert len(problems) == 3


DATA_ARGS = TINY_MODEL + ["--objective", "baseline", "--tokenizer-type", "NullTokenizer",
                          "--vocab-size", "200", "--micro-batch-size", "2", "--seed", "5",
                          "--split", "1,0,0"]


def _write_dataset(prefix, seed, n_docs=40):
    """A small NullTokenizer dataset: ~23 samples of 32 tokens per epoch."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        doc = rng.integers(0, 199, size=int(rng.integers(8, 30))).astype(np.uint16)
        b.add_document(doc, [len(doc)])
    b.finalize(prefix + ".idx")
    return prefix


def _data_run(args, sample_log, check=True):
    from launch import run_script

    env = base_env()
    env["MEGATRON_LET_TEST_SAMPLE_LOG"] = sample_log
    return run_script("pretrain_let.py", DATA_ARGS + args, env=env, check=check)


def _samples(log):
    with open(log) as f:
        return [(int(p), h) for p, h in (line.split() for line in f)]


@pytest.fixture(scope="module")
def data_reference(tmp_path_factory):
    """An uninterrupted 12-iteration run over ~2 epochs of a small dataset: (prefix, samples, metrics)."""
    d = tmp_path_factory.mktemp("data_reference")
    prefix = _write_dataset(str(d / "ds"), seed=1)
    log, metrics = str(d / "samples.txt"), str(d / "m.jsonl")
    _data_run(["--data-path", prefix, "--train-iters", "12", "--global-batch-size", "4",
               "--metrics-jsonl", metrics], log)
    samples = _samples(log)
    assert [p for p, _ in samples] == list(range(48))
    assert len(set(h for _, h in samples[:23])) > 20  # distinct windows
    return prefix, samples, read_metrics(metrics)


def test_longer_run_continues_the_sample_sequence(data_reference, tmp_path):
    _case("longer-run")
    prefix, ref_samples, ref_metrics = data_reference
    ck, a, b = str(tmp_path / "ck"), str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    common = ["--data-path", prefix, "--global-batch-size", "4", "--save", ck]
    _data_run(common + ["--train-iters", "6"], a)
    metrics = str(tmp_path / "m.jsonl")
    _data_run(common + ["--train-iters", "12", "--load", ck, "--override-opt_param-scheduler",
                        "--metrics-jsonl", metrics], b)
    assert _samples(a) + _samples(b) == ref_samples  # nothing repeated, nothing skipped
    _assert_same_losses(metrics, ref_metrics, range(7, 13))


def test_global_batch_change_continues_the_sample_sequence(data_reference, tmp_path):
    _case("global-batch-change")
    prefix, ref_samples, _ = data_reference
    ck, a, b = str(tmp_path / "ck"), str(tmp_path / "a.txt"), str(tmp_path / "b.txt")
    _data_run(["--data-path", prefix, "--save", ck, "--train-iters", "3", "--global-batch-size", "4"], a)
    _data_run(["--data-path", prefix, "--save", ck, "--load", ck, "--train-iters", "6",
               "--global-batch-size", "8", "--override-opt_param-scheduler"], b)
    assert _samples(a) + _samples(b) == ref_samples[:36]  # 3 x 4, then 3 x 8


def test_reprocessed_dataset_gets_new_indices(tmp_path):
    _case("reprocessed-in-place")
    prefix = _write_dataset(str(tmp_path / "ds"), seed=1)
    cache = str(tmp_path / "cache")
    common = ["--data-path", prefix, "--train-iters", "2", "--global-batch-size", "4"]
    _data_run(common + ["--data-cache-path", cache], str(tmp_path / "old.txt"))
    time.sleep(0.01)
    _write_dataset(prefix, seed=2, n_docs=55)  # other documents, same file names
    _data_run(common + ["--data-cache-path", cache], str(tmp_path / "new.txt"))
    _data_run(common + ["--data-cache-path", str(tmp_path / "fresh_cache")], str(tmp_path / "fresh.txt"))
    new = _samples(str(tmp_path / "new.txt"))
    assert new == _samples(str(tmp_path / "fresh.txt"))  # the new data's windows
    assert new != _samples(str(tmp_path / "old.txt"))


def test_load_parent_folder_names_the_subfolder(reference, tmp_path):
    _case("load-parent-folder")
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.checkpointing import find_checkpoint
    from megatron_let.training.errors import CheckpointError

    _, ck = reference
    parent = tmp_path / "runs"
    shutil.copytree(ck, parent / "run1" / "ck")
    with pytest.raises(CheckpointError, match=f"--load {parent} holds no checkpoint, but "
                                              f"{parent / 'run1' / 'ck'} holds one: pass --load "
                                              f"{parent / 'run1' / 'ck'}"):
        find_checkpoint(str(parent))
    err = _fails(["--train-iters", "6", "--load", str(parent)])  # a run: exit 2, nothing trained
    assert f"pass --load {parent / 'run1' / 'ck'}" in err
    assert find_checkpoint(str(tmp_path / "empty_dir_absent")) is None
    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--mock-data",
            "--vocab-size", "200"]
    with pytest.raises(FileNotFoundError, match="--load .*typo does not exist"):
        parse_args(base + ["--load", str(tmp_path / "typo"), "--save", str(tmp_path / "ck")])
    parse_args(base + ["--load", str(tmp_path / "ck") + "/", "--save", str(tmp_path / "ck")])  # first run


def test_non_finite_teacher_output_names_the_teacher(tmp_path):
    _case("nan-teacher-output")
    import torch
    from tiny_teachers import save_tiny_llama_teacher

    path = tmp_path / "teacher"
    model = save_tiny_llama_teacher(path, vocab_size=200)
    with torch.no_grad():  # finite weights whose products overflow float32
        for layer in model.model.layers:
            layer.mlp.gate_proj.weight.fill_(1e38)
            layer.mlp.up_proj.weight.fill_(1e38)
    model.save_pretrained(str(path), safe_serialization=True)
    proc = run_pretrain(TINY_MODEL + ["--mock-data", "--vocab-size", "200", "--micro-batch-size", "2",
                                      "--global-batch-size", "4", "--objective", "let",
                                      "--teacher-path", str(path), "--train-iters", "3",
                                      "--let-student-layer", "2"], check=False)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-3000:]
    err = proc.stderr
    assert "pretrain_let.py: error: the teacher's output is non-finite (NaN/inf) at iteration 1 " \
           "(rank 0: hidden states of micro-batch 0, hidden states of micro-batch 1)" in err, err[-3000:]
    assert f"teacher {path}" in err and "the student's values are not the cause" in err
    assert "Traceback" not in err and "lower --lr" not in err


def test_tools_verify_checkpoint_or_skip_it(reference, tmp_path):
    _case("flipped-byte")
    from launch import run_script

    d, it5 = _damaged_copy(reference, tmp_path)
    shard = _flip_middle_byte(os.path.join(it5, "__0_0.distcp"))
    prefix = _write_dataset(str(tmp_path / "ds"), seed=1)
    tools = {"export_hf.py": ["--load", d, "--out", str(tmp_path / "hf")],
             "evaluate.py": ["--task", "ppl", "--load", d, "--data-path", prefix, "--device", "cpu"]}
    for tool, args in tools.items():
        proc = run_script(os.path.join("tools", tool), args, check=False)
        assert proc.returncode != 0 and f"{shard} fails its CRC-32 check" in proc.stderr, \
            (tool, proc.stderr[-2000:])
        proc = run_script(os.path.join("tools", tool), args + ["--no-verify-checkpoint"], check=False)
        assert proc.returncode == 0, (tool, proc.stderr[-2000:])
        assert "CRC-32" not in proc.stderr


def test_model_only_start_logs_data_differences(tmp_path):
    """--no-load-optim (or an iteration-0 checkpoint, the reproduction's shared initial one) is a
    new run from the weights: data differences are logged, not refused."""
    _case("changed-data")
    from megatron_let.training.arguments import parse_args
    from megatron_let.training.compatibility import data_record
    from megatron_let.training.errors import CheckpointError
    from megatron_let.training.run_checkpoints import check_data_on_resume

    base = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--mock-data",
            "--vocab-size", "200", "--load", str(tmp_path)]
    saved = {"iteration": 4, "data": data_record(parse_args(base + ["--seed", "5"]))}
    for extra, saved_iteration, refused in (([], 4, True), (["--no-load-optim"], 4, False), ([], 0, False)):
        cfg = parse_args(base + ["--seed", "6", *extra])
        logged = []
        record = dict(saved, iteration=saved_iteration)
        if refused:
            with pytest.raises(CheckpointError, match="--seed: checkpoint 5, this run 6"):
                check_data_on_resume(cfg, record, "ck", logged.append)
        else:
            check_data_on_resume(cfg, record, "ck", logged.append)
            assert logged == ["data differs from the checkpoint's (a model-only start, allowed): "
                              "--seed: checkpoint 5, this run 6"]
