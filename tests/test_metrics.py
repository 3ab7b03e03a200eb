"""Metrics against values worked out by hand and literal ports of the official code."""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgdb.metrics import (QueryScores, ap_from_positions, average_precision, ns_score,
                           precision_at_k, rank_ids, summarize)


def oxford_compute_ap(ranking, pos, junk) -> float:
    """Literal port of Oxford's compute_ap.cpp."""
    old_recall, old_precision, ap, intersect, j = 0.0, 1.0, 0.0, 0, 0
    for item in ranking:
        if item in junk:
            continue
        if item in pos:
            intersect += 1
        recall = intersect / len(pos)
        precision = intersect / (j + 1.0)
        ap += (recall - old_recall) * ((old_precision + precision) / 2.0)
        old_recall, old_precision = recall, precision
        j += 1
    return ap


def revisitop_positions(ranking, pos, junk) -> np.ndarray:
    """Literal port of revisitop compute_map's junk shifting."""
    ranking = np.asarray(ranking)
    p = np.arange(len(ranking))[np.isin(ranking, list(pos))]
    jk = np.arange(len(ranking))[np.isin(ranking, list(junk))]
    k = ij = ip = 0
    if len(jk):
        while ip < len(p):
            while ij < len(jk) and p[ip] > jk[ij]:
                k += 1
                ij += 1
            p[ip] = p[ip] - k
            ip += 1
    return p


def test_hand_cases() -> None:
    # positives at ranks 1 and 3 of 5: steps (r .5, p 1) -> .5*(1+1)/2 = .5;
    # (r .5, p .5) -> 0; (r 1, p 2/3) -> .5*(.5 + 2/3)/2 = 0.2916667; total 0.7916667
    assert average_precision("abcde", {"a", "c"}) == pytest.approx(0.7916667, abs=1e-7)
    # junk "b" removed: ranking a c d e -> positives at 1, 2 -> AP 1
    assert average_precision("abcde", {"a", "c"}, {"b"}) == pytest.approx(1.0)
    # a positive never retrieved ("z") halves the recall: (1 + 1)/2 * .5 = .5
    assert average_precision("abcde", {"a", "z"}) == pytest.approx(0.5)
    # single positive at rank 2: step (r 0, p 0) -> 0, step (r 1, p .5) -> 1*(0+.5)/2 = .25
    assert average_precision(["x", "p"], {"p"}) == pytest.approx(0.25)
    assert math.isnan(average_precision("abc", set()))
    assert average_precision("abc", {"a", "b", "c"}) == 1.0


def test_ap_from_positions_hand() -> None:
    # positions 0 and 2 of 2 positives: (1 + 1)/2/2 + (1/2 + 2/3)/2/2 = .5 + .2916667
    assert ap_from_positions(np.array([0, 2]), 2) == pytest.approx(0.7916667, abs=1e-7)


def test_official_definitions_agree_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(5, 60))
        items = [f"im{i}" for i in rng.permutation(n)]
        labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])
        pos = {it for it, lab in zip(items, labels) if lab == 1} | {"never_found"}
        junk = {it for it, lab in zip(items, labels) if lab == 2}
        expected = oxford_compute_ap(items, pos, junk)
        assert average_precision(items, pos, junk) == pytest.approx(expected, abs=1e-12)
        shifted = revisitop_positions(items, pos, junk)
        assert ap_from_positions(shifted, len(pos)) == pytest.approx(expected, abs=1e-12)


def test_precision_at_k_hand() -> None:
    # junk b removed: ranking a c d e f; positives a, e -> 1-based positions 1, 4
    p = precision_at_k("abcdef", {"a", "e"}, {"b"}, ks=(1, 5, 10))
    # k=1: kq 1, 1 hit -> 1; k=5: kq = min(4, 5) = 4, 2 hits -> .5; k=10: kq 4 -> .5
    np.testing.assert_allclose(p, [1.0, 0.5, 0.5])
    # first positive at position 3: P@1 = 0 (kq 1), P@5 = kq min(3, 5)=3, 1/3
    np.testing.assert_allclose(precision_at_k("xyzp", {"z"}, (), ks=(1, 5)), [0.0, 1 / 3])
    assert np.isnan(precision_at_k("abc", set())).all()


def test_ns_score_and_summary() -> None:
    assert ns_score(["q", "a", "x", "b", "c"], {"q", "a", "b", "c"}) == 3
    s = summarize([QueryScores("a", 0.5, {1: 1.0}), QueryScores("b", math.nan, {1: math.nan}),
                   QueryScores("c", 1.0, {1: 0.0})])
    assert (s.mAP, s.mP[1], s.n_queries, s.n_empty) == (0.75, 0.5, 3, 1)


def test_rank_ids_breaks_ties_by_id() -> None:
    sims = np.array([[0.5, 0.9, 0.5, 0.1], [1.0, 1.0, 1.0, 1.0]])
    assert rank_ids(sims).tolist() == [[1, 0, 2, 3], [0, 1, 2, 3]]
