"""The accuracy-per-FLOP chart: published points at their own crop's cost, the frontier, the winners, our points;
and jobs.report / jobs.evaluate writing it."""
from __future__ import annotations

import json

import pytest

from distributed.config import dump_yaml, load_config
from evaluation import frontier
from jobs import report as report_job
from models import summarize

PNG = b"\x89PNG\r\n\x1a\n"


def test_published_points_cost_their_own_crop():
    points = frontier.published_points()
    by = {(p.model, p.top1): p for p in points}
    xception = by[("xception", 79.0)]
    assert xception.crop == 299 and xception.gflops == pytest.approx(summarize("xception", image_size=299)["gflops"])
    assert by[("efficientnet_b1", 79.838)].crop == 240
    assert by[("regnety_016", 80.876)].gflops == pytest.approx(3.22, abs=0.01)  # 1.61 GMACs (torchvision: 1.612)
    assert all(p.top1 is not None for p in points) and "se_googlenet" not in {p.model for p in points}


def test_frontier_keeps_only_points_no_cheaper_point_beats():
    P = frontier.Point
    pts = [P("a", 1, 70, "a", 224), P("b", 2, 65, "b", 224), P("c", 3, 75, "c", 224), P("d", 3, 74, "d", 224),
           P("e", 10, 75, "e", 224), P("f", 20, 80, "f", 224)]
    assert [p.label for p in frontier.frontier(pts)] == ["a", "c", "f"]
    edge = frontier.frontier(frontier.published_points())
    assert [p.model for p in edge][:1] == ["efficientnet_b1"]  # the cheapest accurate model of the zoo
    assert all(x.top1 < y.top1 and x.gflops <= y.gflops for x, y in zip(edge, edge[1:]))


def test_winners_are_placed_where_the_registry_builds_their_architecture():
    winners = dict(frontier.winner_points(frontier.published_points()))
    assert set(winners) == {2012, 2014, 2017}
    assert winners[2012].model == "alexnet" and winners[2014].model == "googlenet" and winners[2017].model == "senet154"
    assert winners[2017].top1 == 81.32


def test_our_point_costs_the_run_at_its_own_size(tmp_path):
    p = frontier.our_point("run", "se_googlenet", 0.5, 64, {"se_placement": "module", "num_classes": 5}, 5)
    assert p.top1 == 50.0 and p.crop == 64
    assert p.gflops == pytest.approx(summarize("se_googlenet", image_size=64, num_classes=5,
                                               se_placement="module")["gflops"])
    frontier.frontier_chart([p], str(tmp_path / "frontier.png"))
    assert (tmp_path / "frontier.png").read_bytes()[:8] == PNG


def test_report_draws_the_runs_on_the_frontier(tmp_path):
    run = tmp_path / "runs/se_googlenet"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "eval", "epoch": 1, "step": 4, "val_top1": 0.4,
                                                   "val_top5": 0.9, "val_loss": 1.0, "val_samples": 12}) + "\n")
    (run / "config.yaml").write_text(dump_yaml(load_config(None, ["data.image_size=96"])))
    assert report_job.main([str(run), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report/frontier.png").read_bytes()[:8] == PNG
    assert "frontier.png" in (tmp_path / "report/report.md").read_text()
    [point] = frontier.run_points([report_job.read_run(str(run))])
    assert point.top1 == 40.0 and point.crop == 96 and point.model == "se_googlenet"
