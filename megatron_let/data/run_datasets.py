"""The datasets of a training run, built from its RunConfig (the trainer and tools/select_data.py
share them, so that a selection indexes exactly the training sample order)."""

from __future__ import annotations

from megatron_let.data.datasets import DataConfig, build_datasets
from megatron_let.training.preflight import read_selection, sample_counts


def load_selection(path: str, dataset_size: int):
    """A SALT_DS selection: a 1-D .npy of training-sample indices written by tools/select_data.py.
    Its format is checked by the preflight; its range needs the built dataset."""
    sel = read_selection(path)
    if sel.max() >= dataset_size:
        raise ValueError(
            f"--kd-data-selection {path} indexes sample {int(sel.max())} but the training dataset "
            f"has {dataset_size} samples: was it made with the same --data-path/--split/"
            "--seq-length/--train-iters/--global-batch-size?"
        )
    return sel


def build_run_datasets(cfg, tokenizer, global_batch_size: int):
    """(train, valid) datasets of a run (``cfg``: its RunConfig). Shared with tools (select_data)
    that must see exactly the training sample order: megatron-core's shuffle depends on the
    number of samples requested."""
    d = cfg.data
    data_config = DataConfig(
        data_path=d.data_path, split=d.split, seq_length=cfg.model.seq_length,
        mock_data=d.mock_data, seed=cfg.seed, data_cache_path=d.data_cache_path,
        tokenizer_type=d.tokenizer_type or "NullTokenizer", tokenizer_model=d.tokenizer_model,
        vocab_size=d.vocab_size, num_workers=cfg.runtime.num_workers,
        mmap_bin_files=cfg.runtime.mmap_bin_files, reset_position_ids=cfg.runtime.reset_position_ids,
        eod_mask_loss=cfg.runtime.eod_mask_loss,
    )
    train_samples, valid_samples = sample_counts(cfg, global_batch_size)
    # no test split: megatron-core would refuse an empty one even when it is never read
    train_ds, valid_ds, _ = build_datasets(data_config, tokenizer, train_samples, valid_samples, 0)
    return train_ds, valid_ds
