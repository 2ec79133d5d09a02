"""The GPU node types of cluster.yaml (AWS) and cluster-gcp.yaml (GCP), their links and prices, with sources.

Used by `benchmarks.scaling`. Line rates and list prices are published figures; how much of a line rate NCCL
gets, the spot discount and the per-hop latencies are assumptions, named as such. Prices are hourly, Linux,
on-demand list prices of the regions in the cluster files, as docs/cluster.md records them (June 2025);
check the pricing pages before relying on them.
"""
from __future__ import annotations

from dataclasses import dataclass

PCIE4_X16_GBYTES = 31.5  # per direction: 16 GT/s x 16 lanes x 128/130 (PCI-SIG PCIe 4.0 base specification)
PCIE4_SOURCE = "PCI Express 4.0: 16 GT/s per lane, 128b/130b encoding -> 31.5 GB/s per direction for x16 (PCI-SIG)"
A100_NVLINK_GBYTES = 300.0  # per direction per GPU (600 GB/s total), through NVSwitch in 8-GPU boards
A100_NVLINK_SOURCE = ("NVIDIA A100 datasheet: third-generation NVLink 600 GB/s per GPU (300 GB/s each way), "
                      "NVSwitch on 8-GPU HGX boards")


@dataclass(frozen=True)
class Link:
    kind: str  # "NVSwitch", "PCIe", "EFA", "TCP"
    gbytes_per_s: float  # line rate per direction (intra: per GPU; network: per node)
    efficiency: float  # ASSUMPTION: fraction of the line rate NCCL's all-reduce reaches
    latency_us: float  # ASSUMPTION: per ring step
    source: str


@dataclass(frozen=True)
class NodeType:
    name: str  # the node type in the cluster file
    cloud: str
    instance: str
    card: str  # a CardPeak name in benchmarks.gpu_specs
    gpus: int
    vcpus: int
    intra: Link
    network: Link
    price_on_demand: float  # $/h
    price_source: str
    spot_fraction: float  # ASSUMPTION: spot price / on-demand price
    spot_source: str
    cluster_file: str


AWS_SPOT = ("ASSUMPTION: spot at 40 % of on-demand. AWS states discounts 'up to 90 %' "
            "(https://aws.amazon.com/ec2/spot/pricing/); GPU spot prices vary by zone and hour: check "
            "`aws ec2 describe-spot-price-history --instance-types g5.12xlarge p4d.24xlarge`")
GCP_SPOT = ("ASSUMPTION: Spot at 40 % of the standard price, the shallow end of the 60-91 % discount GCP states "
            "for Spot VMs (https://cloud.google.com/compute/docs/instances/spot)")
NCCL_EFFICIENCY = ("ASSUMPTION (judgement, to be replaced by nccl-tests all_reduce_perf on the cluster): NCCL bus "
                   "bandwidth as a fraction of the line rate")

NODE_TYPES: tuple[NodeType, ...] = (
    NodeType("gpu-a10g (spot/ondemand)", "aws", "g5.12xlarge", "A10G", 4, 48,
             Link("PCIe", PCIE4_X16_GBYTES, 0.5, 10.0, f"A10G on PCIe 4.0 x16, no NVLink "
                  f"(https://aws.amazon.com/ec2/instance-types/g5/); {PCIE4_SOURCE}; efficiency: {NCCL_EFFICIENCY}"),
             Link("TCP", 40 / 8, 0.6, 50.0, "40 Gbps network (https://aws.amazon.com/ec2/instance-types/g5/); "
                  "cluster.yaml sets no EFA interface and no cluster placement group, so NCCL runs over TCP "
                  f"sockets on ENA; efficiency: {NCCL_EFFICIENCY}"),
             5.672, "g5.12xlarge Linux on-demand, us-west-2, $5.672/h (https://aws.amazon.com/ec2/pricing/on-demand/; "
             "docs/cluster.md, June 2025)", 0.40, AWS_SPOT, "cluster.yaml"),
    NodeType("gpu-a100 (spot/ondemand)", "aws", "p4d.24xlarge", "A100", 8, 96,
             Link("NVSwitch", A100_NVLINK_GBYTES, 0.75, 5.0, f"{A100_NVLINK_SOURCE}; efficiency: {NCCL_EFFICIENCY}"),
             Link("EFA", 400 / 8, 0.8, 20.0, "400 Gbps EFA, 4 x 100 Gbps (https://aws.amazon.com/ec2/instance-types/p4/). "
                  "cluster.yaml does not attach EFA interfaces yet (NetworkInterfaces with InterfaceType: efa) "
                  f"nor a placement group: without them NCCL falls back to TCP; efficiency: {NCCL_EFFICIENCY}"),
             21.96, "p4d.24xlarge Linux on-demand, us-west-2: $32.7726/h less AWS's June 2025 cut of 33 % for P4d "
             "('Announcing up to 45% price reduction for Amazon EC2 NVIDIA GPU-accelerated instances', AWS What's "
             "New, 2025-06-05) = $21.96/h; docs/cluster.md", 0.40, AWS_SPOT, "cluster.yaml"),
    NodeType("gpu-l4 (spot/ondemand)", "gcp", "g2-standard-48", "L4", 4, 48,
             Link("PCIe", PCIE4_X16_GBYTES, 0.5, 10.0, f"L4 on PCIe 4.0 x16 (https://cloud.google.com/compute/docs/"
                  f"gpus#l4-gpus); {PCIE4_SOURCE}; efficiency: {NCCL_EFFICIENCY}"),
             Link("TCP", 50 / 8, 0.6, 50.0, "50 Gbps maximum egress for g2-standard-48 (https://cloud.google.com/"
                  f"compute/docs/gpus/gpu-network-bandwidth); efficiency: {NCCL_EFFICIENCY}"),
             4.00, "g2-standard-48 us-central1, about $4.00/h (https://cloud.google.com/compute/vm-instance-pricing; "
             "docs/cluster.md, June 2025)", 0.40, GCP_SPOT, "cluster-gcp.yaml"),
    NodeType("gpu-a100 (spot/ondemand)", "gcp", "a2-highgpu-8g", "A100", 8, 96,
             Link("NVSwitch", A100_NVLINK_GBYTES, 0.75, 5.0, f"{A100_NVLINK_SOURCE}; efficiency: {NCCL_EFFICIENCY}"),
             Link("TCP", 100 / 8, 0.6, 50.0, "100 Gbps for a2-highgpu-8g (https://cloud.google.com/compute/docs/gpus/"
                  f"gpu-network-bandwidth); efficiency: {NCCL_EFFICIENCY}"),
             29.39, "a2-highgpu-8g us-central1, about $29.39/h (https://cloud.google.com/compute/vm-instance-pricing; "
             "docs/cluster.md, June 2025)", 0.40, GCP_SPOT, "cluster-gcp.yaml"),
)

HEAD_PRICE = {"aws": (0.384, "m5.2xlarge Linux on-demand, us-west-2 (docs/cluster.md, June 2025)"),
              "gcp": (0.389, "n2-standard-8 us-central1 (docs/cluster.md, June 2025)")}


def node_types(instances: list[str] | None = None) -> list[NodeType]:
    """The node types, all or those whose instance name is listed; an unknown name is an error naming the valid ones."""
    if not instances:
        return list(NODE_TYPES)
    known = {n.instance: n for n in NODE_TYPES}
    unknown = [i for i in instances if i not in known]
    if unknown:
        raise ValueError(f"unknown node type(s) {', '.join(unknown)}; valid: {', '.join(known)}")
    return [known[i] for i in instances]
