"""Weights & Biases logging (Megatron-LM's --wandb-* flags), offline: the W&B run holds the same
scalars, at the same steps, as the TensorBoard event file of the same run.

The run file (``run-<id>.wandb``) is read with wandb's own protobuf ``Record`` messages; only its
framing (a LevelDB-style log: 32 KiB blocks of crc32/length/type-prefixed chunks behind a
``:W&B`` header) is parsed here, since wandb >= 0.19 ships no Python reader for it.
"""

import glob
import json
import os
import struct
import zlib

import pytest

from launch import TINY_MODEL, base_env, run_script, with_wandb

pytest.importorskip("wandb", reason="wandb is optional (pip install -e .[wandb])")

_BLOCK, _HEADER = 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def wandb_records(path):
    """Every ``wandb_internal_pb2.Record`` in a .wandb file, in order (checksums verified)."""
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        ident, magic, version = struct.unpack("<4sHB", f.read(_HEADER))
        assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
        offset, pending = _HEADER, b""
        while True:
            left = _BLOCK - offset % _BLOCK
            if left < _HEADER:  # a block's tail too short for a chunk header is zero padding
                assert f.read(left) == b"\0" * left
                offset += left
            head = f.read(_HEADER)
            if len(head) < _HEADER:
                assert not pending, "truncated record at the end of the file"
                return
            crc, length, kind = struct.unpack("<IHB", head)
            data = f.read(length)
            offset += _HEADER + length
            assert zlib.crc32(data, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF == crc, "bad checksum"
            assert (kind in (_FULL, _FIRST)) == (not pending), "chunk sequence broken"
            pending += data
            if kind in (_FULL, _LAST):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                yield record


def wandb_history(path):
    """step -> {key: value} of the run's logged rows (wandb's own _step/_runtime/... left out)."""
    rows, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = rows.setdefault(record.history.step.num, {})
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    row[key] = json.loads(item.value_json)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            for item in updates:
                config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            if kind == "run":
                config["_project"], config["_name"] = record.run.project, record.run.display_name
    return rows, config


def test_wandb_offline_run_holds_the_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb, wb = tmp_path / "tb", tmp_path / "wandb"
    env = with_wandb(base_env())
    env.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=str(tmp_path / "unused"))
    run_script("pretrain_let.py",
               TINY_MODEL + ["--objective", "baseline", "--mock-data", "--vocab-size", "200",
                             "--micro-batch-size", "2", "--train-iters", "4",
                             "--eval-interval", "2", "--eval-iters", "1",
                             "--tensorboard-dir", str(tb), "--wandb-project", "megatron-let-test",
                             "--wandb-exp-name", "tiny-baseline", "--wandb-save-dir", str(wb),
                             "--log-throughput", "--log-params-norm", "--log-timers-to-tensorboard"],
               env=env)
    files = glob.glob(str(wb / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, os.listdir(wb)  # the run directory is under --wandb-save-dir
    rows, config = wandb_history(files[0])

    acc = EventAccumulator(str(tb))
    acc.Reload()
    tb_rows = {}
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):
            tb_rows.setdefault(event.step, {})[tag] = event.value
    # step 0 holds the run's FLOP estimates (config/*, logged once by the trainer)
    assert sorted(tb_rows) == [0, 1, 2, 3, 4]
    assert tb_rows[0] and all(tag.startswith("config/") for tag in tb_rows[0])
    assert {"train/lm_loss", "train/lr", "valid/lm_loss", "valid/ppl"} <= set(tb_rows[4])
    # Megatron-LM's logging flags reach W&B too (the rows are compared below)
    assert {"train/throughput", "train/params-norm", "train/forward-backward-time"} <= set(tb_rows[4])
    assert sorted(rows) == sorted(tb_rows)
    for step, tb_values in tb_rows.items():
        assert set(rows[step]) == set(tb_values), step
        for tag, value in tb_values.items():  # TensorBoard stores float32
            assert rows[step][tag] == pytest.approx(value, rel=1e-6, abs=1e-6), (step, tag)
    # Megatron-LM records the run's arguments as the W&B config
    assert (config["_project"], config["_name"]) == ("megatron-let-test", "tiny-baseline")
    assert config["train_iters"] == 4 and config["objective"] == "baseline"


@pytest.mark.parametrize("flags,message", [
    (["--wandb-exp-name", "x"], "--wandb-exp-name given without --wandb-project"),
    (["--wandb-project", "p"], "--wandb-project p needs --wandb-exp-name"),
    (["--wandb-project", "p", "--wandb-exp-name", "x"], "needs --wandb-save-dir DIR (or --save DIR"),
])
def test_wandb_flag_errors(flags, message):
    from megatron_let.training.arguments import parse_args

    base = ["--model-preset", "tiny", "--mock-data", "--vocab-size", "200", "--objective", "baseline"]
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        parse_args(base + flags)


def test_wandb_save_dir_defaults_under_save_and_missing_package_is_named(tmp_path, monkeypatch):
    import importlib.util

    from megatron_let.training.arguments import parse_args

    base = ["--model-preset", "tiny", "--mock-data", "--vocab-size", "200", "--objective", "baseline",
            "--wandb-project", "p", "--wandb-exp-name", "x", "--save", str(tmp_path / "ck")]
    assert parse_args(base).logging.wandb.save_dir == str(tmp_path / "ck" / "wandb")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="the wandb package is not installed"):
        parse_args(base)
