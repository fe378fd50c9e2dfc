"""Sample orders that do not depend on how many samples a run asks for.

megatron-core's ``GPTDataset`` derives its number of epochs from the number of samples requested
(``--train-iters`` x ``--global-batch-size``) and shuffles the documents of all epochs together
(and the samples of all but a short final epoch together). A run that needs more than one epoch
therefore reads another order when it is resumed with a longer ``--train-iters`` or another
global batch: some samples are read twice, others never. Here every dataset is built by
megatron-core for exactly one epoch (the same order megatron-core gives a one-epoch run), and
further epochs are ours:

* :class:`EpochCycle`: position ``p`` is sample ``p % n`` of epoch ``p // n``; epoch 0 is
  megatron-core's order, epoch ``e > 0`` a permutation of it seeded by ``(seed, e)``.
* :class:`GreedyBlend`: a weighted ``--data-path`` blend with megatron-core's greedy blending
  index (which is prefix-stable: position ``p``'s source depends on nothing after ``p``) over
  the components' endless :class:`EpochCycle` streams.

So the sample at every position is a pure function of the data, ``--split``, ``--seed`` and
``--seq-length``: a resume that changes the sample count continues the same sequence.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

ORDER_VERSION = "one-epoch-cycles-v1"  # recorded in checkpoints: how positions map to samples


class EpochCycle(torch.utils.data.Dataset):
    """Endless (or ``length``-long) epochs of a one-epoch dataset; see the module doc."""

    def __init__(self, dataset, seed: int, length: Optional[int] = None) -> None:
        self.dataset = dataset
        self.epoch_size = len(dataset)
        if self.epoch_size < 1:
            raise ValueError("a dataset split with no samples cannot be cycled")
        self.seed = int(seed)
        self.length = length
        self._orders: dict = {}

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("an endless EpochCycle has no length")
        return self.length

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) >= 2:  # consecutive reads touch one or two epochs
                self._orders.pop(min(self._orders))
            self._orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.epoch_size)
        return self._orders[epoch]

    def index(self, position: int) -> int:
        """The underlying (one-epoch) dataset's index read at ``position``."""
        epoch, j = divmod(int(position), self.epoch_size)
        return j if epoch == 0 else int(self._order(epoch)[j])

    def __getitem__(self, position: int):
        if self.length is not None and not 0 <= int(position) < self.length:
            raise IndexError(f"position {position} outside [0, {self.length})")
        return self.dataset[self.index(position)]


class GreedyBlend(torch.utils.data.Dataset):
    """``length`` samples drawn from ``components`` (endless streams) in proportion to ``weights``,
    with megatron-core's blending index (the same one its ``BlendedDataset`` builds)."""

    def __init__(self, components: Sequence, weights: Sequence[float], length: int) -> None:
        # lazy: megatron.core's C++ helpers load (and may build) on import; only a blend needs them
        from megatron.core.datasets import helpers

        w = np.asarray(weights, dtype=np.float64)
        w = w / w.sum()
        self.components = list(components)
        self.length = int(length)
        self.dataset_index = np.zeros(self.length, dtype=np.int16)
        self.dataset_sample_index = np.zeros(self.length, dtype=np.int64)
        helpers.build_blending_indices(self.dataset_index, self.dataset_sample_index, w,
                                       len(self.components), self.length, False)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int):
        d = int(self.dataset_index[position])
        return self.components[d][int(self.dataset_sample_index[position])]
