"""edgeq.metrics: cosine and retrieval agreement on embeddings with analytically known answers.

Tolerances: everything is computed in float64 from float32 or float64 input; the analytic values are exact, so the
only error is rounding: 1e-6 for float32 input (~1e-7 relative per element, accumulated over <= 64 dimensions),
1e-12 for float64 input.
"""

from __future__ import annotations

import numpy as np
import pytest

from edgeq.metrics import EncoderAccuracy, compare, per_sample_cosine, retrieval_agreement, retrieval_top1


def unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def orthogonal_unit(u: np.ndarray, rng) -> np.ndarray:
    """Per row, a unit vector orthogonal to that row of u (u rows are unit)."""
    r = rng.standard_normal(u.shape)
    r -= (r * u).sum(1, keepdims=True) * u
    return unit_rows(r)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def clustered():
    """10 embeddings in 5 tight, well-separated pairs (i, i^1): each one's nearest other text is its partner."""
    rng = np.random.default_rng(7)
    centers = np.eye(16)[:5] * 10.0
    pts = np.repeat(centers, 2, axis=0) + 0.1 * rng.standard_normal((10, 16))
    return pts.astype(np.float32)


def test_identical_embeddings(rng):
    ref = rng.standard_normal((20, 32)).astype(np.float32)
    acc = compare(ref, ref.copy())
    assert acc == EncoderAccuracy(pytest.approx(1.0, abs=1e-6), pytest.approx(1.0, abs=1e-6), 1.0, 20)
    assert retrieval_top1(ref, ref) == 1.0


def test_cosine_ignores_norm(rng):
    ref = rng.standard_normal((6, 8))
    scale = np.array([0.001, 0.5, 1, 2, 10, 1e4])[:, None]
    np.testing.assert_allclose(per_sample_cosine(ref, ref * scale), 1.0, atol=1e-12)


def test_rotation_by_known_angle_gives_its_cosine(rng):
    """out_i = cos(t_i) u_i + sin(t_i) v_i with v_i orthogonal to u_i: cosine(ref_i, out_i) = cos(t_i) exactly."""
    n, dim = 32, 64
    ref = rng.standard_normal((n, dim)) * rng.uniform(0.5, 5.0, (n, 1))
    u = unit_rows(ref)
    v = orthogonal_unit(u, rng)
    theta = np.linspace(0.0, np.pi, n)  # includes 0 (cos 1), pi/2 (cos ~0) and pi (cos -1)
    out = (np.cos(theta)[:, None] * u + np.sin(theta)[:, None] * v) * 3.0
    cos = per_sample_cosine(ref, out)
    np.testing.assert_allclose(cos, np.cos(theta), atol=1e-12)
    acc = compare(ref, out)
    assert acc.mean_cosine == pytest.approx(np.cos(theta).mean(), abs=1e-12)
    assert acc.min_cosine == pytest.approx(-1.0, abs=1e-12)
    assert acc.samples == n


def test_small_orthogonal_perturbation(rng):
    """out = u + eps * w, w orthogonal unit: cosine = 1 / sqrt(1 + eps^2) (eps = 0.05 -> 0.998752...)."""
    ref = unit_rows(rng.standard_normal((50, 64)))
    eps = 0.05
    out = (ref + eps * orthogonal_unit(ref, rng)).astype(np.float32)
    expected = 1.0 / np.sqrt(1.0 + eps**2)
    np.testing.assert_allclose(per_sample_cosine(ref.astype(np.float32), out), expected, atol=1e-6)


def test_float32_input_is_computed_in_float64():
    a = np.array([[1.0, 1e-4]], np.float32)
    b = np.array([[1.0, 0.0]], np.float32)
    # 1 - cos = 5e-9, below float32 resolution near 1; float64 keeps it
    assert 1.0 - per_sample_cosine(a, b)[0] == pytest.approx(5e-9, rel=1e-3)


def test_zero_vector_has_cosine_zero_not_nan():
    ref = np.array([[1.0, 0.0], [0.0, 1.0]])
    out = np.array([[0.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(per_sample_cosine(ref, out), [0.0, 1.0])


def test_global_rotation_keeps_retrieval_but_not_cosine(rng, clustered):
    q, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    out = clustered @ q.astype(np.float32)
    acc = compare(clustered, out)
    assert acc.retrieval_top1 == 1.0  # pairwise cosines are preserved
    assert acc.mean_cosine < 0.9  # but each embedding moved


def test_swapping_two_embeddings_changes_exactly_four_neighbours(clustered):
    """Swap items 0 and 2 (from pairs {0,1} and {2,3}): the nearest neighbour changes for 0, 1, 2 and 3 and for no
    one else, so retrieval_top1 = 1 - 4/10."""
    out = clustered.copy()
    out[[0, 2]] = out[[2, 0]]
    assert retrieval_top1(clustered, clustered) == 1.0
    assert retrieval_top1(clustered, out) == pytest.approx(0.6, abs=0)
    assert compare(clustered, out).retrieval_top1 == 0.6
    assert retrieval_agreement(clustered, out).tolist() == [False] * 4 + [True] * 6  # which four, by name


def test_moving_one_text_to_another_cluster_changes_two_neighbours(clustered):
    """Item 0 moves into pair {4,5}'s direction (cosine ~0.96 to them, while 4 and 5 stay ~0.9999 to each other):
    item 0's nearest becomes 4 or 5 and item 1 loses its partner; nobody else changes, so 1 - 2/10."""
    out = clustered.copy()
    out[0] = clustered[4] + np.float32(3.0) * np.eye(16, dtype=np.float32)[15]
    assert retrieval_top1(clustered, out) == pytest.approx(0.8, abs=0)


def test_retrieval_needs_two_texts():
    one = np.ones((1, 4))
    assert retrieval_top1(one, -one) == 1.0
    assert compare(one, -one) == EncoderAccuracy(-1.0, -1.0, 1.0, 1)


def test_to_dict():
    acc = EncoderAccuracy(0.99, 0.9, 0.95, 10)
    assert acc.to_dict() == {"mean_cosine": 0.99, "min_cosine": 0.9, "retrieval_top1": 0.95, "samples": 10}
