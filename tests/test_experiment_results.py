"""benchmarks/experiment.py: merging an earlier invocation's results into the tables and the budget plot."""

from __future__ import annotations

import sys

from conftest import REPO

sys.path.insert(0, str(REPO))
from benchmarks.experiment import merge_points  # noqa: E402


def _row(model: str, seeds: list[int], fds: list[float]) -> dict:
    return {"partition": "kmeans", "model": model, "seeds": seeds, "fd": fds, "fd_pca": [f / 20 for f in fds],
            "precision": [0.8] * len(seeds), "recall": [0.7] * len(seeds), "coverage_tv": [], "evals": [39] * len(seeds)}


def _point(steps: int, rows: list[dict]) -> dict:
    return {"k": 4, "steps": steps, "flops": {"ensemble": steps * 1e9}, "rows": rows, "header": f"S={steps}",
            "metric_name": "FD"}


def test_merge_points_joins_seeds_new_runs_win_and_budgets_sort():
    """Seeds join per (budget, model); a seed measured now replaces the earlier value of that seed; a budget or
    a model only the earlier file has is kept; the points come out sorted by budget; the header says what was
    merged."""
    now = [_point(3000, [_row("monolith", [0], [30.0])]), _point(300, [_row("monolith", [0, 2], [90.0, 95.0])])]
    earlier = [_point(300, [_row("monolith", [0, 1], [92.9, 93.4]), _row("student", [0, 1], [85.9, 97.2])]),
               _point(1000, [_row("monolith", [0, 1], [39.3, 50.3])])]
    merged = merge_points(now, earlier, "old.json")
    assert [p["steps"] for p in merged] == [300, 1000, 3000]
    s300 = {r["model"]: r for r in merged[0]["rows"]}
    assert s300["monolith"]["seeds"] == [0, 1, 2] and s300["monolith"]["fd"] == [90.0, 93.4, 95.0]
    assert s300["monolith"]["fd_pca"] == [4.5, 93.4 / 20, 4.75] and s300["monolith"]["coverage_tv"] == []
    assert s300["student"]["seeds"] == [0, 1] and s300["student"]["fd"] == [85.9, 97.2]
    assert merged[0]["header"] == "S=300; cells of seeds [0, 1] from old.json"  # the student: both seeds
    assert merged[1]["rows"][0]["fd"] == [39.3, 50.3] and merged[1]["header"] == "S=1000 (from old.json)"
    assert merged[2] is now[0]  # nothing earlier at this budget


def test_table_has_a_speckle_column_and_the_k_sweep_is_drawn(tmp_path):
    """The table shows each row's speckle (- where an earlier result has none); the K-sweep figure is a PNG."""
    from benchmarks.experiment import format_table, plot_k_sweep

    rows = [{**_row("monolith", [0, 1], [30.0, 32.0]), "speckle": [1.2, 1.4]}, _row("full", [0, 1], [28.0, 29.0])]
    table = format_table(rows, "FD")
    assert "speckle (1 = data)" in table.splitlines()[0]
    monolith, full = table.splitlines()[2:4]
    assert "| 1.30 ± 0.14 |" in monolith and "| 0.700 ± 0.000 | - | - | 39 |" in full
    points = [{**_point(2000, rows), "k": k} for k in (2, 4, 8)]
    path = tmp_path / "fd_ksweep_s2000.png"
    plot_k_sweep(points, path, "K sweep")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
