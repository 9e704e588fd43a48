import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PipelineError
from pipeline.splits import SPLITS, assign_splits, check_required, parse_fractions, target_counts

fractions_st = st.sampled_from(
    [(0.7, 0.15, 0.15), (0.5, 0.5, 0.0), (1.0, 0.0, 0.0), (0.6, 0.2, 0.2), (0.34, 0.33, 0.33)]
)
ids_st = st.lists(st.text("abcdef0123456789_", min_size=1, max_size=8), unique=True, max_size=40)


@settings(max_examples=150, deadline=None)
@given(
    ids=ids_st,
    n_existing=st.integers(0, 40),
    fractions=fractions_st,
    seed=st.integers(0, 2**32 - 1),
)
def test_every_patient_gets_exactly_one_split(ids, n_existing, fractions, seed):
    n_existing = min(n_existing, len(ids))
    existing_ids, new_ids = ids[:n_existing], ids[n_existing:]
    existing = assign_splits({}, existing_ids, fractions, seed + 1)
    new = assign_splits(existing, new_ids, fractions, seed)
    assert set(new) == set(new_ids)
    assert not set(new) & set(existing)  # existing assignments untouched, never re-split
    assert set(new.values()) <= set(SPLITS)
    assert assign_splits(existing, list(reversed(new_ids)), fractions, seed) == new  # order-free
    if not existing:
        counts = [list(new.values()).count(s) for s in SPLITS]
        assert counts == target_counts(len(new_ids), fractions)
        for s, f, c in zip(SPLITS, fractions, counts, strict=True):
            if f == 0:
                assert c == 0, s


@settings(max_examples=100, deadline=None)
@given(n=st.integers(0, 200), fractions=fractions_st)
def test_target_counts_are_balanced(n, fractions):
    counts = target_counts(n, fractions)
    assert sum(counts) == n
    positive = sum(1 for f in fractions if f > 0)
    for f, c in zip(fractions, counts, strict=True):
        assert abs(c - f * n) <= 1 + (1 if n >= positive else 0)
        if f > 0 and n >= positive:
            assert c >= 1


def test_seed_changes_assignment_but_not_counts():
    ids = [f"p{i:02d}" for i in range(20)]
    a = assign_splits({}, ids, (0.7, 0.15, 0.15), 0)
    b = assign_splits({}, ids, (0.7, 0.15, 0.15), 1)
    assert a != b
    assert sorted(a.values()) == sorted(b.values())


def test_adding_patients_rebalances_towards_targets():
    first = assign_splits({}, [f"a{i}" for i in range(10)], (0.6, 0.2, 0.2), 0)
    second = assign_splits(first, [f"b{i}" for i in range(10)], (0.6, 0.2, 0.2), 0)
    merged = list(first.values()) + list(second.values())
    assert [merged.count(s) for s in SPLITS] == [12, 4, 4]


def test_parse_and_required_sets():
    assert parse_fractions("0.7,0.15,0.15") == (0.7, 0.15, 0.15)
    for bad in ["0.7,0.3", "a,b,c", "0.5,0.5,0.5", "0,0.5,0.5", "-0.1,0.6,0.5"]:
        with pytest.raises(PipelineError):
            parse_fractions(bad)
    with pytest.raises(PipelineError, match="leaves val, test empty"):
        check_required({"train": 1, "val": 0, "test": 0}, (0.7, 0.15, 0.15), "0.7,0.15,0.15")
    check_required({"train": 1, "val": 0, "test": 0}, (1.0, 0.0, 0.0), "1,0,0")
