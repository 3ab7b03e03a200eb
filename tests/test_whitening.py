"""PCA-whitening against an independent eigendecomposition and hand-checkable cases."""

from __future__ import annotations

import numpy as np
import pytest

from imgdb.errors import UserError
from imgdb.numeric import l2_normalize, power_normalize, principal_axes
from imgdb.retrieval.whitening import Identity, PCAWhitening


def reference(x: np.ndarray, dims: int, whiten: bool, power: float | None = None) -> np.ndarray:
    """Babenko eq.5-6 written out with numpy's eigh on the covariance matrix."""
    x = x.astype(np.float64)
    if power is not None:
        x = np.sign(x) * np.abs(x) ** power
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    mean = x.mean(axis=0)
    cov = np.cov((x - mean).T)  # ddof=1, like sklearn's explained_variance_
    vals, vecs = np.linalg.eigh(cov)
    order = np.argsort(vals)[::-1][:dims]
    y = (x - mean) @ vecs[:, order]
    if whiten:
        y = y / np.sqrt(vals[order])
    return y / np.linalg.norm(y, axis=1, keepdims=True)


def same_up_to_sign(a: np.ndarray, b: np.ndarray) -> None:
    """Principal axes are defined up to sign: align each column, then compare."""
    signs = np.sign(np.sum(a * b, axis=0))
    np.testing.assert_allclose(a * signs, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("whiten", [True, False])
def test_matches_eigendecomposition(whiten: bool) -> None:
    rng = np.random.default_rng(0)
    x = np.abs(rng.normal(size=(200, 12)) * np.linspace(3, 0.2, 12)).astype(np.float32)
    model = PCAWhitening(dims=5, whiten=whiten).fit(x)
    same_up_to_sign(model.transform(x), reference(x, 5, whiten))


def test_power_option() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    model = PCAWhitening(dims=4, power=0.5).fit(x)
    same_up_to_sign(model.transform(x), reference(x, 4, True, power=0.5))


def test_whitened_training_data_has_identity_covariance() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    model = PCAWhitening(dims=6, whiten=True).fit(x)
    z = (model._prepare(x) - model.mean) @ model.components.T / np.sqrt(model.eigenvalues)
    np.testing.assert_allclose(np.cov(z.T), np.eye(6), atol=1e-3)


def test_hand_example() -> None:
    # two points on a line through the centre: one principal axis; both map to +-1
    x = np.array([[3.0, 4.0], [4.0, 3.0]])
    model = PCAWhitening(dims=1, whiten=True).fit(x)
    y = model.transform(x)
    assert sorted(y[:, 0].round(6).tolist()) == [-1.0, 1.0]


def test_roundtrip_arrays_and_errors() -> None:
    rng = np.random.default_rng(3)
    x = rng.random((50, 10))
    model = PCAWhitening(dims=3, whiten=False, power=None).fit(x)
    again = PCAWhitening.from_arrays(model.arrays(), whiten=False, power=None)
    np.testing.assert_array_equal(again.transform(x), model.transform(x))
    with pytest.raises(UserError, match="dims 10 or fewer"):
        PCAWhitening(dims=11).fit(x)


def test_helpers() -> None:
    np.testing.assert_allclose(l2_normalize(np.array([[3.0, 4.0], [0.0, 0.0]])),
                               [[0.6, 0.8], [0.0, 0.0]])
    np.testing.assert_allclose(power_normalize(np.array([-4.0, 9.0]), 0.5), [-2.0, 3.0])
    np.testing.assert_allclose(Identity(power=0.5).transform(np.array([[9.0, 16.0]])),
                               [[0.6, 0.8]])


def test_principal_axes_by_hand_and_three_ways_agree():
    # two points on the diagonal: one axis (1, 1)/sqrt(2) with variance (2 + 2) / 2 = 2
    ev, axes = principal_axes(np.array([[-1.0, -1.0], [1.0, 1.0]]))
    np.testing.assert_allclose(ev, [2.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(axes[0], [2 ** -0.5, 2 ** -0.5])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 6)) * np.array([5, 4, 3, 2, 1, 0.5])
    x -= x.mean(axis=0)
    ev, axes = principal_axes(x, 4)  # eigh of the covariance (n >= D)
    ev_c, axes_c = principal_axes(cov=x.T @ x / len(x), dims=4)
    _, sv, vt = np.linalg.svd(x, full_matrices=False)  # an independent route
    np.testing.assert_allclose(ev, sv[:4] ** 2 / len(x), rtol=1e-10)
    np.testing.assert_allclose(ev_c, ev, rtol=1e-10)
    same_up_to_sign(axes.T, vt[:4].T)
    np.testing.assert_allclose(axes_c, axes, atol=1e-10)  # signs fixed: identical, not +-
    wide = x[:4]  # fewer vectors than dimensions: the SVD route, completed on request
    ev_w, axes_w = principal_axes(wide - wide.mean(axis=0), complete=True)
    assert axes_w.shape == (6, 6) and ev_w[4:].max() < 1e-20
    np.testing.assert_allclose(axes_w @ axes_w.T, np.eye(6), atol=1e-10)
    cov = np.cov((wide - wide.mean(axis=0)).T, ddof=0)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(cov))[::-1], ev_w, atol=1e-10)
