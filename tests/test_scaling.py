"""The scaling model's arithmetic (benchmarks.scaling), checked against hand-computed cases."""
from __future__ import annotations

import json

import pytest

from benchmarks import scaling
from benchmarks.cluster_specs import HEAD_PRICE, NODE_TYPES, Link, NodeType, node_types
from benchmarks.scaling import Assumptions, ModelStats, allreduce_seconds, exposed_comm, predict

# Round numbers: 4 GPUs per node on a 10 GB/s link, 5 GB/s between nodes, no latencies, a 1 GB gradient.
INTRA = Link("PCIe", 10.0, 1.0, 0.0, "test")
NET = Link("TCP", 5.0, 1.0, 0.0, "test")
NODE = NodeType("test", "aws", "t.4x", "A100", 4, 10_000, INTRA, NET, 10.0, "test", 0.5, "test", "none")
MODEL = ModelStats("toy", params=250_000_000, train_flops_per_image=1e9)  # 250 M x 4 bytes = 1 GB of gradients
A = Assumptions(per_gpu_batch=100, bucket_mib=1e6, overlap=0.5, node_packing=0.8, bytes_per_image=1.0,
                s3_share_of_link=1.0, checkpoint_every_steps=10**9, epoch_overhead_s=0.0, startup_minutes=0.0)


def test_hierarchical_allreduce_by_hand():
    t = allreduce_seconds(1e9, 4, 2, INTRA, NET, 5.0, buckets=1)
    # in the node: 2 x 3/4 x 1 GB / 10 GB/s = 0.15 s; between the 2 nodes: 2 x 1/2 x 1 GB / 5 GB/s = 0.2 s
    assert t["bandwidth_s"] == pytest.approx(0.35) and t["latency_s"] == 0
    one_node = allreduce_seconds(1e9, 4, 1, INTRA, Link("TCP", 5.0, 1.0, 50.0, "t"), 5.0, buckets=3)
    assert one_node["total_s"] == pytest.approx(0.15)  # one node: no network term, no network hops
    latent = allreduce_seconds(1e9, 4, 3, Link("PCIe", 10.0, 1.0, 10.0, "t"), Link("TCP", 5.0, 1.0, 50.0, "t"), 5.0,
                               buckets=2)
    assert latent["latency_s"] == pytest.approx(2 * (2 * 3 * 10e-6 + 2 * 2 * 50e-6))


def test_exposed_communication_by_hand():
    assert exposed_comm(1.0, 1.0, 0.8, buckets=4) == pytest.approx(0.25)  # the last bucket cannot overlap
    assert exposed_comm(1.0, 0.5, 0.8, buckets=10) == pytest.approx(0.6)  # backward too short to hide it


def test_a_two_node_prediction_by_hand():
    row = predict(NODE, 8, MODEL, one_gpu_rate=1000.0, a=A)
    # compute: 100 / (1000 x 0.8) = 0.125 s; backward 2/3 of it; the all-reduce (0.35 s, 1 bucket) cannot hide
    assert row["nodes"] == 2 and row["buckets"] == 1
    assert row["compute_ms"] == pytest.approx(125.0)
    assert row["exposed_comm_ms"] == pytest.approx(350.0, rel=1e-6)
    assert row["images_per_s"] == pytest.approx(2 * 4 * 100 / 0.475, rel=1e-6)  # 1,684.2 images/s
    assert row["scaling_efficiency"] == pytest.approx(1684.2105 / 8000, rel=1e-5)
    assert row["bound"] == "compute + communication"
    train_s = 1_281_167 / row["images_per_s"]
    eval_s = 50_000 / 3 / row["images_per_s"]
    ckpt_s = 2e9 / 1e9 + 2e9 / 5e9  # weights + momentum: 2 GB saved at 1 GB/s, uploaded at 5 GB/s
    assert row["epoch_minutes"] == pytest.approx((train_s + eval_s + ckpt_s) / 60, rel=1e-6)
    per_hour = 2 * 10.0 + HEAD_PRICE["aws"][0]
    assert row["epoch_cost"]["on_demand"] == pytest.approx(per_hour * row["epoch_minutes"] / 60)
    assert row["run_cost"]["spot"] == pytest.approx((2 * 5.0 + HEAD_PRICE["aws"][0]) * 90 * row["epoch_minutes"] / 60)


def test_input_limits_cap_the_node():
    slow_cpu = NodeType("test", "aws", "t.4x", "A100", 4, 10, INTRA, NET, 10.0, "test", 0.5, "test", "none")
    row = predict(slow_cpu, 4, MODEL, 1000.0, A)  # (10 vCPUs - 2 x 4) x 407.6 images/s
    assert row["bound"] == "CPU decode"
    assert row["images_per_s"] == pytest.approx(2 * 0.6 * 679.3)
    with pytest.raises(ValueError, match="not a whole number of t.4x nodes"):
        predict(NODE, 6, MODEL, 1000.0, A)


def test_node_types_match_the_cluster_files():
    assert {(n.instance, n.gpus, n.card) for n in NODE_TYPES} == {
        ("g5.12xlarge", 4, "A10G"), ("p4d.24xlarge", 8, "A100"), ("g2-standard-48", 4, "L4"),
        ("a2-highgpu-8g", 8, "A100")}
    for n in NODE_TYPES:
        assert n.instance in open(n.cluster_file).read()
    with pytest.raises(ValueError, match="valid: g5.12xlarge"):
        node_types(["p5.48xlarge"])


def test_measured_rate_comes_from_a_check_json(tmp_path):
    report = {"started": "2026-12-01", "parts": {
        "env": {"status": "ok", "kind": "env", "result": {"device": "NVIDIA H200"}},
        "train/se_googlenet/bf16/cl/eager": {"status": "ok", "kind": "train", "params": {
            "model": "se_googlenet", "precision": "bf16"}, "result": {"images_per_s": 12000.0, "batch": 256}},
        "train/se_googlenet/bf16/cl/eager/b32": {"status": "ok", "kind": "train", "params": {
            "model": "se_googlenet", "precision": "bf16"}, "result": {"images_per_s": 6000.0, "batch": 32}}}}
    m = scaling.measured_rate(report, "se_googlenet", 32)
    assert (m["images_per_s"], m["card"], m["batch"]) == (6000.0, "H200 SXM", 32)
    rate, source = scaling.one_gpu_rate(node_types(["p4d.24xlarge"])[0], MODEL, m)
    assert rate == pytest.approx(6000.0 * 312.0 / 989.5) and source.startswith("measured:")
    path = tmp_path / "gpu_check.json"
    path.write_text(json.dumps(report))
    result = scaling.run(scaling.parse_args(["--gpus", "8", "--model", "se_googlenet", "--measured", str(path),
                                             "--node-types", "p4d.24xlarge"]))
    assert [r["gpus"] for r in result["rows"]] == [8]
    assert result["one_gpu_rate"]["p4d.24xlarge"]["images_per_s"] == pytest.approx(rate)


def test_cli_lists_every_assumption_with_its_source(capsys):
    assert scaling.main(["--gpus", "8,64", "--model", "se_googlenet", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"].startswith("MODEL")
    assert len(result["rows"]) == 2 * len(NODE_TYPES)
    assert all(a["source"] for a in result["assumptions"].values())
    assert all(v["source"].startswith("ASSUMPTION") for v in result["one_gpu_rate"].values())
    with pytest.raises(SystemExit):
        scaling.parse_args(["--gpus", "8,x"])
