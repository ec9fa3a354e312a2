"""The sampling benchmark's run order and comparison, which its ratios rest on (no timing here)."""

import importlib.util
from pathlib import Path

import pytest

SAMPLING = Path(__file__).resolve().parent.parent / "benchmarks" / "sampling.py"


@pytest.fixture(scope="module")
def sampling():
    spec = importlib.util.spec_from_file_location("maskattn_bench_sampling", SAMPLING)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variants,rounds", [(["A"], 5), (["A", "B", "C"], 4)])
def test_every_patched_run_sits_between_two_unpatched_runs(sampling, variants, rounds):
    order = sampling.schedule(variants, rounds)
    assert order[0] == order[-1] == "unpatched"
    assert order[1::2] == [v for v in order if v != "unpatched"]  # patched runs at the odd places only
    assert all(v == "unpatched" for v in order[0::2])
    for variant in variants:
        assert order.count(variant) == rounds


def test_variant_order_rotates_so_no_variant_always_follows_the_same_one(sampling):
    order = [v for v in sampling.schedule(["A", "B", "C"], 3) if v != "unpatched"]
    assert order == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]


def test_each_patched_run_is_compared_with_the_mean_of_its_neighbours(sampling):
    runs = [{"variant": v, "wall_s": s} for v, s in
            [("unpatched", 10.0), ("A", 13.0), ("unpatched", 14.0), ("A", 11.0), ("unpatched", 8.0)]]
    pairs = sampling.bracketed(runs, "A", ("wall_s",))
    assert [(run["wall_s"], base["wall_s"]) for run, base in pairs] == [(13.0, 12.0), (11.0, 11.0)]
