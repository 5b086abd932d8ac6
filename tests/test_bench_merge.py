"""bench/merge_fidelity.py runs end to end on the micro zoo and measures what it claims."""

from __future__ import annotations

from bench.merge_fidelity import NON_LINEAR, main


def test_merge_benchmark_on_the_micro_zoo(capsys) -> None:
    ranks = [1, 2, 4, 64]
    report = main(["--zoo", "micro", "--limit", "2", "--ranks", *map(str, ranks),
                   "--accuracy-ranks", "2", "--rank", "2", "--slowdown-methods", "ties",
                   "--slowdown-tokens", "8"])
    printed = capsys.readouterr().out

    assert [c.method for c in report.costs] == list(NON_LINEAR)
    for cost in report.costs:
        assert cost.first_s > 0 and cost.rebuild_s > 0 and cost.mbytes > 0
        assert cost.new_set_s > 0 and cost.rebuild_svd_s > 0 and cost.mbytes_svd > 0
        assert cost.relative_error == 0.0  # exact storage is the default
        if cost.method in ("ties", "dare_ties", "dare_linear", "neuro"):
            assert cost.relative_error_half is not None and 0 < cost.relative_error_half < 1e-3
        else:
            assert cost.relative_error_half is None
        assert cost.hit_us < 1e6 * cost.rebuild_s, f"{cost.method}: a hit cost a rebuild"
        assert f"| {cost.method} |" in printed

    assert set(report.svd_errors) == set(NON_LINEAR) - {"twin"}
    for method, by_rank in report.svd_errors.items():
        errors = [by_rank[r] for r in ranks]
        assert all(0 <= e <= 1 for e in errors), method
        assert errors == sorted(errors, reverse=True), f"{method}: error grows with rank"
        assert by_rank[64] < 1e-6, f"{method}: rank 64 covers the micro model's modules"

    (slow,) = report.slowdown
    assert slow.method == "ties" and slow.alone_tok_s > 0 and slow.during_tok_s > 0
    assert slow.build_s > 0
    assert "## Decode rate of a running stream" in printed

    assert report.accuracy is not None
    assert list(report.accuracy) == ["linear", "exact", "svd@2"]
    # Each build-cost method built three merges; every repeat after the first was a hit.
    assert report.cache.hits >= len(NON_LINEAR) * 200
