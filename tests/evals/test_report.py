"""The report: the markdown table's structure, the Pareto frontier, and a plot that renders."""

import pytest

from evals.report import markdown_table, pareto_frontier, plot_pareto
from evals.scoring import Group, SpecScore


def _score(name, accuracy, tokens, by=None):
    return SpecScore(
        name=name,
        answered=4,
        failed=0,
        accuracy=accuracy,
        by=by or {},
        boxes_n=4,
        region_recall=0.5,
        mean_iou=0.25,
        crop_recall=0.75,
        visual_tokens_computed=tokens / 2,
        visual_tokens_in_context=tokens,
        crops=1.5,
        p50_ms=120.0,
        p95_ms=300.0,
    )


def test_markdown_table_one_row_per_spec_and_one_column_per_group_value():
    by = {"category": {"shape": Group(1.0, 2), "color": Group(0.5, 2)}, "long_side": {"1024": Group(0.75, 4)}}
    table = markdown_table([_score("base", 0.75, 256.0, by), _score("other", None, 64.0)])
    header, rule, base, other = table.strip().splitlines()
    assert header == (
        "| spec | accuracy | shape | color | 1024 | recall@0.5 | mean IoU | in a crop | visual tokens computed | "
        "in context | crops | p50 ms | p95 ms |"
    )
    assert rule == "|" + "---|" * 13
    assert base == "| base | 75.0 | 100.0 | 50.0 | 75.0 | 50.0 | 0.25 | 75.0 | 128 | 256 | 1.5 | 120 | 300 |"
    assert other.startswith("| other | – | – | – | – | 50.0 |")  # nothing answered, groups it lacks


def test_pareto_frontier_keeps_the_points_no_cheaper_point_beats():
    points = [(100.0, 40.0), (400.0, 60.0), (300.0, 55.0), (1000.0, 50.0), (100.0, 30.0), (2000.0, 60.0)]
    assert pareto_frontier(points) == [0, 2, 1]  # by tokens; equal accuracy at more tokens is no gain
    assert pareto_frontier([]) == []


def test_plot_pareto_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "pareto.png"
    scores = [_score("baseline", 0.4, 80.0), _score("sparc", 0.6, 300.0), _score("nothing", None, 10.0)]
    plot_pareto(scores, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_pareto([], tmp_path / "empty.png", "no points")  # a report with nothing answered still has a plot
    assert (tmp_path / "empty.png").is_file()
