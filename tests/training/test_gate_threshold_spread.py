"""scripts/gate_threshold_spread.py: the bootstrap reads the recall rule's threshold, and a sparse tail spreads it."""

from __future__ import annotations

import numpy as np


def test_a_sparse_tail_of_white_cells_spreads_the_threshold_and_a_dense_one_does_not(script) -> None:
    module = script("gate_threshold_spread")
    dense = np.linspace(0.90, 0.99, 500)  # every white cell scored alike: any resample gives about the same threshold
    spread = np.quantile(module.bootstrap_thresholds(dense, 0.98, 300), [0.05, 0.95])
    assert spread[1] - spread[0] < 0.01
    sparse = np.concatenate([np.linspace(0.02, 0.7, 12), np.full(488, 0.95)])  # 12 low white cells, as the shipped gate's
    spread = np.quantile(module.bootstrap_thresholds(sparse, 0.98, 300), [0.05, 0.95])
    assert spread[1] - spread[0] > 0.2
    assert module.bootstrap_thresholds(dense, 0.98, 5, seed=1).tolist() == module.bootstrap_thresholds(dense, 0.98, 5, seed=1).tolist()
