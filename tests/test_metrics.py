"""Metrics checked against values worked out by hand and against literal ports of the official code.

The expected numbers below are literals. Each comment shows the arithmetic behind it. The
reference implementations (compute_ap.cpp, revisitop compute_ap / compute_map) are ported here
line by line, separately from imgdb.metrics.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from imgdb.evaluation.metrics import (QueryScores, Summary, ap_from_positions, average_precision,
                           ns_score, precision_at_k, rank_ids, summarize)

# --------------------------------------------------------------------------------------------
# literal ports of the official code (the references)


def oxford_compute_ap(pos: set, amb: set, ranked_list: list, dtype=float) -> float:
    """Port of Philbin's compute_ap.cpp. `dtype=np.float32` mimics its `float` variables."""
    f = dtype
    old_recall = f(0.0)
    old_precision = f(1.0)
    ap = f(0.0)
    intersect_size = 0
    j = 0
    for i in range(len(ranked_list)):
        if ranked_list[i] in amb:
            continue
        if ranked_list[i] in pos:
            intersect_size += 1
        recall = f(intersect_size / f(len(pos)))
        precision = f(intersect_size / (j + 1.0))
        ap = f(ap + (recall - old_recall) * ((old_precision + precision) / 2.0))
        old_recall = recall
        old_precision = precision
        j += 1
    return float(ap)


def revisitop_compute_ap(ranks, nres):
    """Port of revisitop's compute_ap (same as Holidays score_ap_from_ranks_1)."""
    nimgranks = len(ranks)
    ap = 0
    recall_step = 1. / nres
    for j in np.arange(nimgranks):
        rank = ranks[j]
        if rank == 0:
            precision_0 = 1.
        else:
            precision_0 = float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.
    return ap


def revisitop_compute_map(ranks, gnd, kappas=[]):
    """Port of revisitop's compute_map. ranks: (n_db, n_queries); gnd[i]: {'ok', 'junk'}."""
    map = 0.
    nq = len(gnd)
    aps = np.zeros(nq)
    pr = np.zeros(len(kappas))
    prs = np.zeros((nq, len(kappas)))
    nempty = 0
    for i in np.arange(nq):
        qgnd = np.array(gnd[i]['ok'])
        if qgnd.shape[0] == 0:
            aps[i] = float('nan')
            prs[i, :] = float('nan')
            nempty += 1
            continue
        try:
            qgndj = np.array(gnd[i]['junk'])
        except KeyError:
            qgndj = np.empty(0)
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap = revisitop_compute_ap(pos, len(qgnd))
        map = map + ap
        aps[i] = ap
        pos += 1
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]
    map = map / (nq - nempty)
    pr = pr / (nq - nempty)
    return map, aps, pr, prs


# --------------------------------------------------------------------------------------------
# average_precision: hand cases


def test_ap_two_positives_no_junk() -> None:
    # ranking a b c d e, positives a, c (ranks 1 and 3), trapezoids (old_r=0, old_p=1):
    #   a +: r .5, p 1/1 -> (.5 - 0) * (1 + 1)/2      = .5
    #   b -: r .5, p 1/2 -> 0
    #   c +: r 1,  p 2/3 -> (1 - .5) * (1/2 + 2/3)/2  = .5 * 7/12 = 7/24 = .2916667
    #   d, e -: recall stays 1 -> 0
    # total .5 + 7/24 = 19/24 = 0.7916666666666666
    assert average_precision(list("abcde"), {"a", "c"}) == pytest.approx(0.7916666666666666,
                                                                        abs=1e-15)


def test_ap_junk_is_removed_before_counting() -> None:
    # ranking a b c d e, positives c, e, junk b -> counted ranking a c d e:
    #   a -: r 0,  p 0   -> 0
    #   c +: r .5, p 1/2 -> .5 * (0 + 1/2)/2   = .125
    #   d -: r .5, p 1/3 -> 0
    #   e +: r 1,  p 2/4 -> .5 * (1/3 + 1/2)/2 = .5 * 5/12 = .2083333
    # total .125 + .2083333 = 1/3
    assert average_precision("abcde", {"c", "e"}, {"b"}) == pytest.approx(0.3333333333333333,
                                                                         abs=1e-15)
    # the same ranking without the junk rule: c, e at 3, 5 ->
    #   .5*(0 + 1/3)/2 + .5*(1/4 + 2/5)/2 = 1/12 + .1625 = .2458333
    assert average_precision("abcde", {"c", "e"}) == pytest.approx(0.24583333333333332,
                                                                  abs=1e-15)


def test_ap_junk_at_the_top_does_not_advance_rank() -> None:
    # j1 j2 p n, positives {p}, junk {j1, j2} -> counted ranking p n -> p first -> 1.0
    assert average_precision(["j1", "j2", "p", "n"], {"p"}, {"j1", "j2"}) == 1.0


def test_ap_positive_never_retrieved_counts_in_denominator() -> None:
    # ranking a b c, positives a and z (z absent): a +: r 1/2, p 1 -> .5 * (1 + 1)/2 = .5; rest 0
    assert average_precision("abc", {"a", "z"}) == 0.5
    # prefix ranking a b c of a longer list, positives a, c, x (x beyond the prefix):
    #   a +: r 1/3, p 1   -> 1/3 * (1 + 1)/2     = 1/3
    #   c +: r 2/3, p 2/3 -> 1/3 * (1/2 + 2/3)/2 = 1/3 * 7/12 = 7/36
    # total 12/36 + 7/36 = 19/36 = 0.5277777777777778
    assert average_precision("abc", {"a", "c", "x"}) == pytest.approx(0.5277777777777778,
                                                                     abs=1e-15)
    # nothing retrieved at all -> 0
    assert average_precision([], {"a"}) == 0.0
    assert average_precision(["b", "c"], {"a"}) == 0.0


def test_ap_single_positive_second() -> None:
    # x p: x -: r 0, p 0 -> 0; p +: r 1, p 1/2 -> 1 * (0 + 1/2)/2 = .25
    assert average_precision(["x", "p"], {"p"}) == 0.25


def test_ap_no_positives_is_nan() -> None:
    assert math.isnan(average_precision("abc", set()))
    assert math.isnan(average_precision("abc", [], {"a"}))
    assert math.isnan(average_precision(np.arange(5), np.array([], dtype=np.int64)))


def test_ap_all_positives_first() -> None:
    # every trapezoid is 1/n * (1 + 1)/2 = 1/n -> 1/3 + 1/3 + 1/3 = 1.0 exactly
    assert average_precision("abcxyz", {"a", "b", "c"}) == 1.0
    assert average_precision(["p"], {"p"}) == 1.0


def test_ap_on_integer_ids() -> None:
    # ranking 3 1 2 0 with junk 2 -> 3 1 0; positives 1, 0 at 0-based 1, 2:
    #   j=0, rank 1: p0 = 0/1 = 0,  p1 = 1/2 -> (0 + 1/2) * 1/2 / 2   = .125
    #   j=1, rank 2: p0 = 1/2,      p1 = 2/3 -> (1/2 + 2/3) * 1/2 / 2 = 7/24
    # total 3/24 + 7/24 = 10/24 = 0.4166666666666667
    ranking = np.array([3, 1, 2, 0])
    assert average_precision(ranking, {1, 0}, {2}) == pytest.approx(0.4166666666666667,
                                                                    abs=1e-15)
    assert average_precision(ranking, np.array([1, 0]), np.array([2])) == pytest.approx(
        0.4166666666666667, abs=1e-15)


def test_ap_item_both_positive_and_junk_is_junk() -> None:
    # compute_ap.cpp tests the junk set first: b is skipped, but it is still one of the
    # 2 positives. Counted ranking a c: a +: r .5, p 1 -> .5; c -: 0 -> AP .5
    assert average_precision("abc", {"a", "b"}, {"b"}) == 0.5
    assert oxford_compute_ap({"a", "b"}, {"b"}, list("abc")) == 0.5


def test_ap_large_ranking() -> None:
    # 200000 ids; positives at positions 0 and 199999, junk at 1..9 (9 items) ->
    # the second positive is at 0-based 199990 of 199991 counted items:
    #   first: 1/2 * (1 + 1)/2 = .5
    #   second: 1/2 * (1/199990 + 2/199991)/2
    ranking = np.arange(200_000)[::-1].copy()
    positives = {int(ranking[0]), int(ranking[-1])}
    junk = set(ranking[1:10].tolist())
    expected = 0.5 + 0.5 * (1 / 199990 + 2 / 199991) / 2
    assert average_precision(ranking, positives, junk) == pytest.approx(expected, abs=1e-15)
    keys = [f"img{i:06d}.jpg" for i in ranking]
    assert average_precision(keys, {keys[0], keys[-1]}, set(keys[1:10])) == pytest.approx(
        expected, abs=1e-15)


# --------------------------------------------------------------------------------------------
# ap_from_positions


def test_ap_from_positions_hand() -> None:
    # positions 0 and 2, nres 2:
    #   j=0, rank 0: p0 = 1 (rank 0), p1 = 1/1 -> (1 + 1) * 1/2 / 2   = .5
    #   j=1, rank 2: p0 = 1/2,        p1 = 2/3 -> (1/2 + 2/3) * 1/2 / 2 = 7/24
    assert ap_from_positions(np.array([0, 2]), 2) == pytest.approx(0.7916666666666666,
                                                                   abs=1e-15)
    # the order of the given positions does not matter
    assert ap_from_positions(np.array([2, 0]), 2) == ap_from_positions(np.array([0, 2]), 2)
    # nres 4 with the same two found: half of it
    assert ap_from_positions(np.array([0, 2]), 4) == pytest.approx(0.3958333333333333,
                                                                   abs=1e-15)
    assert ap_from_positions(np.array([], dtype=np.int64), 3) == 0.0
    assert math.isnan(ap_from_positions(np.array([], dtype=np.int64), 0))


def test_ap_from_positions_last_digit() -> None:
    # 10 positives all first: each trapezoid is (1 + 1) * 0.1 / 2 = 0.1, added in order
    # 0.1 + 0.1 + ... (10 times) = 0.9999999999999999 in float64, and that is what revisitop
    # prints. A pairwise sum or n/n would give 1.0.
    assert ap_from_positions(np.arange(10), 10) == 0.9999999999999999
    assert revisitop_compute_ap(np.arange(10), 10) == 0.9999999999999999


def test_ap_from_positions_bit_identical_to_revisitop() -> None:
    rng = np.random.default_rng(1)
    for _ in range(200):
        n_db = int(rng.integers(1, 3000))
        found = int(rng.integers(0, min(n_db, 300) + 1))
        pos = np.sort(rng.choice(n_db, size=found, replace=False))
        nres = found + int(rng.integers(0, 5))
        if nres == 0:
            continue
        assert ap_from_positions(pos, nres) == revisitop_compute_ap(pos, nres)


# --------------------------------------------------------------------------------------------
# the official definitions agree


def _random_case(rng: np.random.Generator) -> tuple[list[str], set[str], set[str]]:
    n = int(rng.integers(1, 80))
    items = [f"im{i}" for i in rng.permutation(n)]
    labels = rng.choice(3, size=n, p=[0.6, 0.25, 0.15])  # 0 negative, 1 positive, 2 junk
    pos = {it for it, lab in zip(items, labels) if lab == 1}
    junk = {it for it, lab in zip(items, labels) if lab == 2}
    if rng.random() < 0.3:
        pos |= {f"missing{i}" for i in range(int(rng.integers(1, 4)))}  # never retrieved
    if rng.random() < 0.2:
        items = items[: int(rng.integers(0, n + 1))]  # a prefix of the ranking
    return items, pos, junk


def test_oxford_cpp_and_revisitop_agree_on_random_rankings() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        items, pos, junk = _random_case(rng)
        if not pos:
            assert math.isnan(average_precision(items, pos, junk))
            continue
        checked += 1
        expected = oxford_compute_ap(pos, junk, items)
        ours = average_precision(items, pos, junk)
        assert ours == pytest.approx(expected, abs=1e-12)
        # compute_ap.cpp in single precision: the same to ~6 printed digits
        assert ours == pytest.approx(oxford_compute_ap(pos, junk, items, np.float32), abs=1e-5)
        # revisitop: junk shifting over the ranking, then compute_ap with nres = |positives|
        arr = np.array(items, dtype=object)
        p = np.arange(len(arr))[np.isin(arr, list(pos))]
        jk = np.arange(len(arr))[np.isin(arr, list(junk))]
        k = ij = ip = 0
        while len(jk) and ip < len(p):
            while ij < len(jk) and p[ip] > jk[ij]:
                k += 1
                ij += 1
            p[ip] -= k
            ip += 1
        assert revisitop_compute_ap(p, len(pos)) == pytest.approx(expected, abs=1e-12)
        assert ours == revisitop_compute_ap(p, len(pos))  # bit for bit
    assert checked > 100


def test_compute_map_port_matches_bit_for_bit() -> None:
    rng = np.random.default_rng(2)
    n_db, n_q = 400, 60
    ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)], axis=1)  # (n_db, n_q)
    gnd = []
    for i in range(n_q):
        ids = rng.permutation(n_db)
        n_ok = 0 if i % 7 == 3 else int(rng.integers(1, 40))
        n_junk = int(rng.integers(0, 30))
        gnd.append({"ok": ids[:n_ok].tolist(), "junk": ids[n_ok:n_ok + n_junk].tolist()})
    kappas = [1, 5, 10]
    ref_map, ref_aps, ref_pr, ref_prs = revisitop_compute_map(ranks, gnd, kappas)

    scores = []
    for i in range(n_q):
        ap = average_precision(ranks[:, i], gnd[i]["ok"], gnd[i]["junk"])
        pk = precision_at_k(ranks[:, i], gnd[i]["ok"], gnd[i]["junk"], kappas)
        np.testing.assert_array_equal(ap, ref_aps[i])  # NaN == NaN here
        np.testing.assert_array_equal(pk, ref_prs[i])
        scores.append(QueryScores(f"q{i}", ap, dict(zip(kappas, pk.tolist())),
                                  len(gnd[i]["ok"]), len(gnd[i]["junk"])))
    s = summarize(scores)
    assert s.mAP == ref_map
    assert [s.mP[k] for k in kappas] == ref_pr.tolist()
    assert (s.n_queries, s.n_empty) == (60, 9)  # i % 7 == 3: 3, 10, ..., 59 -> 9 queries


# --------------------------------------------------------------------------------------------
# precision_at_k


def test_precision_at_k_kq_rule_and_junk_shift() -> None:
    # junk b removed: a c d e f; positives a, e -> 1-based positions 1, 4
    #   k=1:  kq = min(4, 1) = 1,  #(pos <= 1) = 1 -> 1/1 = 1
    #   k=5:  kq = min(4, 5) = 4,  #(pos <= 4) = 2 -> 2/4 = .5   (plain P@5 would be 2/5)
    #   k=10: kq = min(4, 10) = 4, 2 -> .5                        (plain P@10 would be 2/10)
    np.testing.assert_array_equal(precision_at_k("abcdef", {"a", "e"}, {"b"}, ks=(1, 5, 10)),
                                  [1.0, 0.5, 0.5])
    # first (only) positive at position 3: k=1: kq 1, 0 hits -> 0; k=5: kq = min(3, 5) = 3 -> 1/3
    np.testing.assert_allclose(precision_at_k("xyzp", {"z"}, (), ks=(1, 5)), [0.0, 1 / 3],
                               rtol=0, atol=1e-15)
    # junk shifting: j1 p1 j2 n p2, junk j1 j2 -> p1 n p2 -> positions 1, 3
    #   k=1: kq 1 -> 1/1; k=2: kq 2 -> 1/2; k=3: kq 3 -> 2/3; k=10: kq 3 -> 2/3
    # (without the shift p1, p2 would be at 2, 5 and P@1 would be 0)
    np.testing.assert_allclose(
        precision_at_k(["j1", "p1", "j2", "n", "p2"], {"p1", "p2"}, {"j1", "j2"},
                       ks=(1, 2, 3, 10)),
        [1.0, 0.5, 2 / 3, 2 / 3], rtol=0, atol=1e-15)


def test_precision_at_k_edge_cases() -> None:
    assert np.isnan(precision_at_k("abc", set())).all()
    assert precision_at_k("abc", set(), ks=(1, 5)).shape == (2,)
    # positives that are not in the ranking at all: 0 (revisitop would fail on max([]))
    np.testing.assert_array_equal(precision_at_k("abc", {"z"}, ks=(1, 5)), [0.0, 0.0])
    # all positives first: positions 1, 2 -> k=1: 1/1; k=5: kq 2 -> 2/2
    np.testing.assert_array_equal(precision_at_k("abxyz", {"a", "b"}, ks=(1, 5)), [1.0, 1.0])
    with pytest.raises(ValueError):
        precision_at_k("abc", {"a"}, ks=(0,))


# --------------------------------------------------------------------------------------------
# N-S score, summarize


def test_ns_score() -> None:
    group = {"q", "a", "b", "c"}
    # top 4 = q a x b -> q, a, b are in the group -> 3
    assert ns_score(["q", "a", "x", "b", "c"], group) == 3
    assert ns_score(["q", "c", "b", "a", "x"], group) == 4
    assert ns_score(["x", "y", "z", "w", "q"], group) == 0
    # shorter than 4
    assert ns_score(["a", "q"], group) == 2
    assert ns_score(np.array([7, 3, 9, 4, 5]), {4, 5, 6, 7}) == 2  # 7, 4


def test_summarize_excludes_nan_queries() -> None:
    s = summarize([QueryScores("a", 0.5, {1: 1.0, 5: 0.4}, 3, 0),
                   QueryScores("b", math.nan, {1: math.nan, 5: math.nan}, 0, 2),
                   QueryScores("c", 1.0, {1: 0.0, 5: 0.6}, 2, 1)])
    # mAP (.5 + 1)/2 = .75; mP@1 (1 + 0)/2 = .5; mP@5 (.4 + .6)/2 = .5; 3 queries, 1 empty
    assert s == Summary(0.75, {1: 0.5, 5: 0.5}, 3, 1)


def test_summarize_adds_in_order_like_compute_map() -> None:
    # ten APs of 0.1: 0.1 + ... + 0.1 = 0.9999999999999999, / 10 = 0.09999999999999999
    # (np.mean would give 0.1)
    s = summarize([QueryScores(str(i), 0.1, {1: 0.1}, 1, 0) for i in range(10)])
    assert s.mAP == 0.09999999999999999
    assert s.mP[1] == 0.09999999999999999


def test_summarize_all_empty_and_no_queries() -> None:
    s = summarize([QueryScores("a", math.nan, {1: math.nan}, 0, 0)])
    assert math.isnan(s.mAP) and s.mP == {} and (s.n_queries, s.n_empty) == (1, 1)
    s = summarize([])
    assert math.isnan(s.mAP) and s.mP == {} and (s.n_queries, s.n_empty) == (0, 0)


# --------------------------------------------------------------------------------------------
# rank_ids


def test_rank_ids_breaks_ties_by_lower_id() -> None:
    sims = np.array([[0.5, 0.9, 0.5, 0.1],
                     [1.0, 1.0, 1.0, 1.0],
                     [0.2, 0.7, 0.7, 0.7]])
    assert rank_ids(sims).tolist() == [[1, 0, 2, 3], [0, 1, 2, 3], [1, 2, 3, 0]]
    # one query as a 1-D vector
    assert rank_ids(np.array([0.0, 3.0, 3.0, -1.0])).tolist() == [[1, 2, 0, 3]]


def test_rank_ids_dtypes() -> None:
    # unsigned ints must not wrap when negated: 255 first, then 0s by id
    assert rank_ids(np.array([[0, 255, 0, 7]], dtype=np.uint8)).tolist() == [[1, 3, 0, 2]]
    assert rank_ids(np.array([[-128, 127, 0]], dtype=np.int8)).tolist() == [[1, 2, 0]]
    assert rank_ids(np.array([[False, True, True]])).tolist() == [[1, 2, 0]]
    assert rank_ids(np.array([[0.5, 0.5]], dtype=np.float16)).tolist() == [[0, 1]]
    # NaN last
    assert rank_ids(np.array([[np.nan, 0.1, 0.3]])).tolist() == [[2, 1, 0]]


def test_rank_ids_random_against_sorted() -> None:
    rng = np.random.default_rng(3)
    sims = rng.integers(0, 5, size=(20, 50)).astype(np.float32) / 4  # many ties
    order = rank_ids(sims)
    for q in range(20):
        expected = sorted(range(50), key=lambda i: (-float(sims[q, i]), i))
        assert order[q].tolist() == expected
