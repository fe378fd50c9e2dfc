"""``--async-save`` on CPU/gloo: the same run as a synchronous save, and every lifecycle guarantee.

* an --async-save run logs the sync run's losses and writes byte-identical checkpoint files
  (``.metadata`` aside: it records the writer's plan);
* a SIGKILL while an asynchronous save of iteration 4 is being finalised (its shards written by the
  background process, no manifest yet) leaves ``iter_0000004.tmp``, ignored: the resume starts from
  iteration 2 and logs the uninterrupted run's losses.
"""

from __future__ import annotations

import json
import os

import pytest

from launch import read_metrics, run_pretrain
from test_faults import ARGS, TRACKER, _assert_same_losses, _case, _killed_in_save


def _run(ck, metrics, *extra):
    return run_pretrain(ARGS + ["--train-iters", "5", "--save", ck, "--load", ck, "--save-interval", "2",
                                "--metrics-jsonl", metrics, *extra])


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sync")
    _run(str(d / "ck"), str(d / "m.jsonl"))
    return str(d / "ck"), read_metrics(str(d / "m.jsonl"))


def _manifest(ck, it):
    with open(os.path.join(ck, f"iter_{it:07d}", "manifest.json")) as f:
        return json.load(f)["files"]


def test_async_save_matches_sync_save(sync_run, tmp_path):
    ck, metrics = str(tmp_path / "ck"), str(tmp_path / "m.jsonl")
    out = _run(ck, metrics, "--async-save").stdout
    assert f"writing checkpoint {ck}/iter_0000002 in the background" in out
    assert f"saved checkpoint {ck}/iter_0000005" in out and "asynchronous save; finalising blocked training" in out
    ref_ck, ref = sync_run
    _assert_same_losses(metrics, ref, range(1, 6))
    assert open(os.path.join(ck, TRACKER)).read().strip() == "5"
    for it in (2, 4, 5):
        mine, theirs = _manifest(ck, it), _manifest(ref_ck, it)
        assert sorted(mine) == sorted(theirs)
        for name in mine:
            if name != ".metadata":
                assert mine[name] == theirs[name], (it, name)
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]


def test_kill_during_async_save_resumes_from_previous(sync_run, tmp_path):
    _case("async-save-killed")
    ck = str(tmp_path / "ck")
    args = ["--train-iters", "5", "--save", ck, "--load", ck, "--save-interval", "2", "--async-save"]
    out = _killed_in_save(args, "write@4", str(tmp_path / "killed.log"))
    assert f"writing checkpoint {ck}/iter_0000004 in the background" in out
    assert open(os.path.join(ck, TRACKER)).read().strip() == "2"
    assert os.path.isdir(os.path.join(ck, "iter_0000004.tmp"))  # shards written, no manifest
    assert not os.path.exists(os.path.join(ck, "iter_0000004.tmp", "manifest.json"))
    metrics = str(tmp_path / "resumed.jsonl")
    out = _run(ck, metrics, "--async-save").stdout
    assert f"resumed from {ck} at iteration 2" in out
    _assert_same_losses(metrics, sync_run[1], range(3, 6))
    assert open(os.path.join(ck, TRACKER)).read().strip() == "5"
    assert not [n for n in os.listdir(ck) if n.endswith(".tmp")]
