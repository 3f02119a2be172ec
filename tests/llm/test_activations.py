"""edgeq.llm.activations.InputStats: the calibration sums a layer's GPTQ and sensitivities read, against numpy."""

from __future__ import annotations

import numpy as np

from edgeq.llm.activations import FLOAT64_MAX_K, InputStats


def test_sums_over_windows_equal_numpy():
    rng = np.random.default_rng(0)
    windows = [rng.standard_normal((1, 7, 16)).astype(np.float32) for _ in range(3)]  # [batch, tokens, K]
    stats = InputStats.empty(16)
    for x in windows:
        stats.add(x)
    rows = np.concatenate([x.reshape(-1, 16) for x in windows]).astype(np.float64)
    assert stats.rows == 21 and stats.hessian.dtype == np.float64
    np.testing.assert_allclose(stats.hessian, rows.T @ rows, rtol=1e-12)
    np.testing.assert_allclose(stats.mean_abs, np.abs(rows).mean(0), rtol=1e-12)


def test_wide_inputs_accumulate_in_float32():
    """Above FLOAT64_MAX_K the Hessian is float32 (half the memory and time of a 1B model's down_proj); its entries
    sum a few rows here, so float32 keeps them to its own rounding."""
    k = FLOAT64_MAX_K + 32
    x = np.random.default_rng(1).standard_normal((5, k)).astype(np.float32)
    stats = InputStats.empty(k)
    stats.add(x)
    assert stats.hessian.dtype == np.float32 and stats.abs_sum.dtype == np.float64
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(stats.hessian, x64.T @ x64, rtol=0, atol=1e-5 * np.abs(x64.T @ x64).max())
