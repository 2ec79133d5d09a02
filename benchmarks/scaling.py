"""Scaling model: images/s, scaling efficiency, time and cost per ImageNet epoch on G GPUs of each node type.

    python -m benchmarks.scaling --gpus 8,64,256 --model se_googlenet [--measured OUT/gpu_check.json] [--json]

A model, not a measurement. Per training step of per-GPU batch b:
- compute: b / (R1 x packing). R1 = one GPU's images/s: measured by the device check (--measured) and scaled to
  each card by the ratio of bf16 datasheet peaks, else an ASSUMPTION: the MFU of NVIDIA's published single-A100
  ResNet-50 AMP rate, applied to this model's counted FLOPs and the card's peak. packing = NVIDIA's 8-GPU over
  8 x 1-GPU ResNet-50 rate on a DGX A100 (0.84: loader and host contention in a full node, not communication).
- communication: DDP's gradient all-reduce of params x gradient bytes, hierarchical: a ring over the g GPUs of a
  node (NVLink/NVSwitch or PCIe), then a ring over the n nodes through each node's network link,
  2(g-1)/g x N / B_intra + 2(n-1)/n x N / B_net, plus 2(g-1) and 2(n-1) hop latencies per DDP bucket (25 MiB).
  DDP overlaps bucket all-reduces with the backward pass (Li et al., "PyTorch Distributed", VLDB 2020,
  arXiv:2006.15704): exposed = max(comm - overlap x backward, comm / buckets), the last bucket never overlapping.
- input: the node's images/s are capped by its CPU decode capacity and by object-storage throughput (bytes per
  image x images/s against an assumed per-node S3/GCS rate); input traffic takes its share of the network link.
- per epoch: 1,281,167 training images, a 50,000-image evaluation and the checkpoints (every N steps and at the
  epoch's end: local save, then upload), priced per node-hour (on-demand and spot) plus the CPU head.
Every figure the model takes is listed in the output with its source; assumptions are labelled ASSUMPTION.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass

from benchmarks.cluster_specs import HEAD_PRICE, Link, NodeType, node_types
from benchmarks.gpu_specs import card_by_name, find_card

IMAGENET_TRAIN = 1_281_167  # ILSVRC-2012 CLS-LOC training images
IMAGENET_VAL = 50_000
NVIDIA_RN50 = {"one_gpu": 2470.0, "eight_gpus": 16621.0, "card": "A100",
               "source": "NVIDIA DeepLearningExamples PyTorch/Classification/ConvNets/resnet50v1.5/README.md, "
                         "'Training performance: NVIDIA DGX A100 (8x A100 80GB)', mixed precision: 2,470 img/s on 1 "
                         "GPU, 16,621 img/s on 8 (pytorch-21.03 NGC container, DALI)"}


@dataclass(frozen=True)
class Assumptions:
    """What the model takes beyond the node types; each field's source is in SOURCES."""

    per_gpu_batch: int = 32
    grad_bytes: int = 4
    bucket_mib: float = 25.0
    overlap: float = 0.8
    node_packing: float = NVIDIA_RN50["eight_gpus"] / (8 * NVIDIA_RN50["one_gpu"])
    bytes_per_image: float = 147_897_477_120 / IMAGENET_TRAIN
    s3_share_of_link: float = 0.5
    s3_cap_gbps: float = 100.0
    decode_images_per_vcpu: float = 0.6 * 679.3
    trainer_vcpus_per_gpu: int = 2
    checkpoint_every_steps: int = 1000
    checkpoint_copies: int = 2
    local_save_gbytes_per_s: float = 1.0
    eval_cost_vs_train: float = 1 / 3
    epoch_overhead_s: float = 5.0
    startup_minutes: float = 10.0
    epochs: int = 90


SOURCES = {
    "per_gpu_batch": "configs/se_googlenet.yaml, googlenet.yaml, resnet50.yaml: data.global_batch_size 256 = 32 "
                     "per GPU on 8 GPUs; the model keeps 32 per GPU (data.global_batch_size = 32 x GPUs)",
    "grad_bytes": "DDP with bf16 autocast keeps fp32 parameters, so gradients (and the all-reduce) are fp32",
    "bucket_mib": "torch DistributedDataParallel bucket_cap_mb default",
    "overlap": "ASSUMPTION (judgement): share of the backward pass during which bucket all-reduces run; DDP starts "
               "a bucket as soon as its gradients are ready (Li et al. 2020, arXiv:2006.15704, sec. 3.2.3)",
    "node_packing": f"{NVIDIA_RN50['source']}: 16,621 / (8 x 2,470) = 0.84, applied to every node with more than "
                    "one GPU (ASSUMPTION that it carries over to other models and cards)",
    "bytes_per_image": "ILSVRC2012_img_train.tar, 147,897,477,120 bytes for 1,281,167 images (image-net.org "
                       "download page); shards prepared at a smaller side carry fewer",
    "s3_share_of_link": "ASSUMPTION: object-storage reads reach half of the node's link line rate",
    "s3_cap_gbps": "AWS S3 performance guidelines: up to 100 Gb/s between one EC2 instance and S3 "
                   "(https://docs.aws.amazon.com/AmazonS3/latest/userguide/optimizing-performance.html)",
    "decode_images_per_vcpu": "measured here: 679.3 images/s per core for decode + RandomResizedCrop(224) + flip of "
                              "500x375 q90 JPEGs (BENCHMARKS.md, data pipeline); x 0.6 per vCPU (ASSUMPTION: two "
                              "hyperthreads of a core give about 1.2 cores)",
    "trainer_vcpus_per_gpu": "ASSUMPTION: vCPUs each training process keeps for itself (not decoding)",
    "checkpoint_every_steps": "configs/se_googlenet.yaml run.checkpoint_every_steps; one more at every epoch end",
    "checkpoint_copies": "DDP checkpoint = weights + SGD momentum (no EMA in the configs)",
    "local_save_gbytes_per_s": "ASSUMPTION: torch.save + sha256 manifest to local NVMe/EBS",
    "eval_cost_vs_train": "a forward pass is about 1/3 of a training step's FLOPs (backward ~ 2 x forward)",
    "epoch_overhead_s": "ASSUMPTION: per epoch, the loop builds a training and an evaluation loader (loader workers "
                        "start, first shards fetched; distributed/loop.py) and waits at Ray Train's report barrier",
    "startup_minutes": "ASSUMPTION, once per run: GPU nodes launch, run cluster.yaml's setup_commands (uv installs "
                       "torch, Ray, DeepSpeed) and Ray Train starts the workers; measure it with `ray up`",
    "epochs": "configs/*.yaml schedule.epochs (the ResNet/torchvision 90-epoch budget)",
}


@dataclass(frozen=True)
class ModelStats:
    name: str
    params: int  # trainable parameters in training (aux heads included): all get gradients
    train_flops_per_image: float  # 3 x counted training-mode forward FLOPs


def model_stats(name: str) -> ModelStats:
    from benchmarks.gpu_specs import train_flops_per_image

    f = train_flops_per_image(name, 224)
    return ModelStats(name, f["params"], f["train_step"])


# -- the arithmetic (pure functions; tests/test_scaling.py checks them by hand) --------------------------------

def allreduce_seconds(nbytes: float, gpus_per_node: int, nodes: int, intra: Link, net: Link,
                      net_gbytes_per_s: float, buckets: int) -> dict:
    """Hierarchical ring all-reduce: reduce-scatter/all-gather in the node, all-reduce across nodes.

    `net_gbytes_per_s` is what the network link gives the all-reduce (after efficiency and input traffic).
    """
    intra_bw = intra.gbytes_per_s * intra.efficiency * 1e9
    bandwidth = 2 * (gpus_per_node - 1) / gpus_per_node * nbytes / intra_bw
    hops = 2 * (gpus_per_node - 1) * intra.latency_us
    if nodes > 1:
        bandwidth += 2 * (nodes - 1) / nodes * nbytes / (net_gbytes_per_s * 1e9)
        hops += 2 * (nodes - 1) * net.latency_us
    latency = buckets * hops * 1e-6
    return {"bandwidth_s": bandwidth, "latency_s": latency, "total_s": bandwidth + latency}


def exposed_comm(comm_s: float, backward_s: float, overlap: float, buckets: int) -> float:
    """Communication left on the step's critical path after DDP's overlap with the backward pass."""
    return max(comm_s - overlap * backward_s, comm_s / buckets)


def predict(node: NodeType, gpus: int, model: ModelStats, one_gpu_rate: float, a: Assumptions) -> dict:
    """One row: a cluster of `gpus` GPUs of `node`, per-GPU batch a.per_gpu_batch."""
    if gpus % node.gpus:
        raise ValueError(f"{gpus} GPUs is not a whole number of {node.instance} nodes ({node.gpus} GPUs each)")
    g, n, b = node.gpus, gpus // node.gpus, a.per_gpu_batch
    packing = a.node_packing if g > 1 else 1.0
    t_compute = b / (one_gpu_rate * packing)
    grad = model.params * a.grad_bytes
    buckets = math.ceil(grad / (a.bucket_mib * 2**20))
    net_line = node.network.gbytes_per_s * node.network.efficiency
    storage = min(node.network.gbytes_per_s, a.s3_cap_gbps / 8) * a.s3_share_of_link
    decode_cap = max(node.vcpus - a.trainer_vcpus_per_gpu * g, 1) * a.decode_images_per_vcpu
    input_gbytes = 0.0
    for _ in range(8):  # input and gradients share the network link: iterate to a fixed point
        comm = allreduce_seconds(grad, g, n, node.intra, node.network, max(net_line - input_gbytes, 0.1 * net_line),
                                 buckets)
        exposed = exposed_comm(comm["total_s"], 2 / 3 * t_compute, a.overlap, buckets) if gpus > 1 else 0.0
        limits = {"compute + communication": g * b / (t_compute + exposed), "CPU decode": decode_cap,
                  "object storage": storage * 1e9 / a.bytes_per_image}
        bound = min(limits, key=limits.get)
        input_gbytes = limits[bound] * a.bytes_per_image / 1e9
    images_per_s = n * limits[bound]
    return _epoch_costs(node, gpus, n, model, a, images_per_s, storage) | {
        "node_type": node.name, "instance": node.instance, "cloud": node.cloud, "card": node.card, "gpus": gpus,
        "nodes": n, "per_gpu_batch": b, "global_batch": gpus * b, "one_gpu_images_per_s": one_gpu_rate,
        "compute_ms": 1000 * t_compute, "allreduce_ms": 1000 * comm["total_s"], "exposed_comm_ms": 1000 * exposed,
        "step_ms": 1000 * (t_compute + exposed), "gradient_mb": grad / 1e6, "buckets": buckets, "bound": bound,
        "limits_images_per_s_per_node": limits, "input_gbytes_per_s_per_node": input_gbytes,
        "storage_gbytes_per_s_per_node": storage, "images_per_s": images_per_s,
        "scaling_efficiency": images_per_s / (gpus * one_gpu_rate)}


def _epoch_costs(node: NodeType, gpus: int, nodes: int, model: ModelStats, a: Assumptions, images_per_s: float,
                 storage_gbytes: float) -> dict:
    ckpt_bytes = model.params * 4 * a.checkpoint_copies
    ckpt_s = ckpt_bytes / (a.local_save_gbytes_per_s * 1e9) + ckpt_bytes / (storage_gbytes * 1e9)
    steps = IMAGENET_TRAIN // (gpus * a.per_gpu_batch)
    checkpoints = steps / a.checkpoint_every_steps + 1
    train_s = IMAGENET_TRAIN / images_per_s
    eval_s = IMAGENET_VAL * a.eval_cost_vs_train / images_per_s
    epoch_s = train_s + eval_s + checkpoints * ckpt_s + a.epoch_overhead_s
    head = HEAD_PRICE[node.cloud][0]
    per_hour = {"on_demand": nodes * node.price_on_demand + head,
                "spot": nodes * node.price_on_demand * node.spot_fraction + head}
    hours = epoch_s / 3600
    run_hours = hours * a.epochs + a.startup_minutes / 60
    return {"steps_per_epoch": steps, "checkpoint_s": ckpt_s, "epoch_minutes": epoch_s / 60,
            "epoch_parts_s": {"train": train_s, "eval": eval_s, "checkpoints": checkpoints * ckpt_s,
                              "overhead": a.epoch_overhead_s},
            "cluster_dollars_per_hour": per_hour, "epoch_cost": {k: v * hours for k, v in per_hour.items()},
            "run_hours": run_hours, "run_cost": {k: v * run_hours for k, v in per_hour.items()}}


# -- the single-GPU rate --------------------------------------------------------------------------------------

def assumed_rate(node: NodeType, model: ModelStats) -> tuple[float, str]:
    """ASSUMPTION: the model reaches the MFU of NVIDIA's single-A100 ResNet-50 AMP figure, on the node's card."""
    rn50 = model_stats("resnet50") if model.name != "resnet50" else model
    ref_mfu = NVIDIA_RN50["one_gpu"] * rn50.train_flops_per_image / (card_by_name("A100").tflops["bf16"] * 1e12)
    rate = ref_mfu * card_by_name(node.card).tflops["bf16"] * 1e12 / model.train_flops_per_image
    return rate, (f"ASSUMPTION: {model.name} at the MFU of NVIDIA's ResNet-50 figure ({100 * ref_mfu:.1f} % of the "
                  f"A100's bf16 peak; {NVIDIA_RN50['source']}) on the {node.card}'s bf16 peak; Inception-style nets "
                  "of many small convolutions usually reach less: read it as an upper bound")


def measured_rate(report: dict, model: str, batch: int) -> dict:
    """Best bf16/fp16 training images/s of `model` in a gpu_check JSON, at `batch` if measured there."""
    env = report["parts"].get("env", {}).get("result") or {}
    card = find_card(env.get("device", ""))
    if card is None:
        raise ValueError(f"--measured: the check ran on {env.get('device')!r}, a card without a datasheet peak in "
                         "benchmarks/gpu_specs.py; add it there")
    found = [(p["result"]["images_per_s"], name, p["result"]["batch"]) for name, p in report["parts"].items()
             if p.get("status") == "ok" and p["kind"] == "train" and p["params"]["model"] == model
             and p["params"]["precision"] in ("bf16", "fp16")]
    if not found:
        raise ValueError(f"--measured: no finished bf16/fp16 training part of {model} in the check's JSON")
    at_batch = [f for f in found if f[2] == batch]
    rate, part, measured_batch = max(at_batch or found)
    return {"images_per_s": rate, "card": card.name, "part": part, "batch": measured_batch,
            "date": report.get("started"), "device": env.get("device")}


def one_gpu_rate(node: NodeType, model: ModelStats, measured: dict | None) -> tuple[float, str]:
    if measured is None:
        return assumed_rate(node, model)
    scale = card_by_name(node.card).tflops["bf16"] / card_by_name(measured["card"]).tflops["bf16"]
    return measured["images_per_s"] * scale, (
        f"measured: {measured['part']} (batch {measured['batch']}) on {measured['device']}, {measured['date']}, "
        f"{measured['images_per_s']:,.0f} img/s, x {scale:.3f} (bf16 peak ratio {node.card} / {measured['card']}: "
        "ASSUMPTION of equal MFU across cards)")


# -- command line ------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace) -> dict:
    a = Assumptions(**{k: v for k, v in vars(args).items() if k in {f.name for f in dataclasses.fields(Assumptions)}
                       and v is not None})
    model = model_stats(args.model)
    measured = None
    if args.measured:
        with open(args.measured) as f:
            measured = measured_rate(json.load(f), args.model, a.per_gpu_batch)
    rows, rates = [], {}
    for node in node_types(args.node_types.split(",") if args.node_types else None):
        rate, source = one_gpu_rate(node, model, measured)
        rates[node.instance] = {"images_per_s": rate, "source": source}
        rows += [predict(node, g, model, rate, a) for g in args.gpus]
    return {"kind": "MODEL, not a measurement", "command": "python -m benchmarks.scaling " + " ".join(args.argv),
            "generated": time.strftime("%Y-%m-%d"), "model": dataclasses.asdict(model),
            "one_gpu_rate": rates, "assumptions": {k: {"value": getattr(a, k), "source": SOURCES[k]}
                                                   for k in SOURCES},
            "node_types": [dataclasses.asdict(n) for n in node_types(None)],
            "head_price": HEAD_PRICE, "rows": rows}


def markdown(result: dict) -> str:
    lines = [f"Scaling MODEL (not measured) for {result['model']['name']}, per-GPU batch "
             f"{result['rows'][0]['per_gpu_batch']}: `{result['command']}` ({result['generated']}).", "",
             "| instance | GPUs | nodes | images/s | efficiency | step ms (compute + exposed comm) | bound | "
             "epoch min | $/epoch on-demand | $/epoch spot | 90 epochs h | 90 epochs $ on-demand | $ spot |",
             "|---|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['instance']} ({r['card']}) | {r['gpus']} | {r['nodes']} | {r['images_per_s']:,.0f} | "
                     f"{100 * r['scaling_efficiency']:.0f} % | {r['step_ms']:.1f} ({r['compute_ms']:.1f} + "
                     f"{r['exposed_comm_ms']:.1f}) | {r['bound']} | {r['epoch_minutes']:.2f} | "
                     f"{r['epoch_cost']['on_demand']:,.2f} | {r['epoch_cost']['spot']:,.2f} | {r['run_hours']:.2f} | "
                     f"{r['run_cost']['on_demand']:,.0f} | {r['run_cost']['spot']:,.0f} |")
    lines += ["", "One-GPU rate per card: " + "; ".join(f"{k}: {v['images_per_s']:,.0f} img/s ({v['source']})"
                                                         for k, v in result["one_gpu_rate"].items())]
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default="8,64,256", help="comma-separated GPU counts")
    p.add_argument("--model", default="se_googlenet")
    p.add_argument("--measured", help="gpu_check.json of a device check: the one-GPU rate comes from it")
    p.add_argument("--node-types", help="instances to model (default: every one in cluster_specs.py)")
    p.add_argument("--json", action="store_true", help="print the whole result as JSON")
    for f in dataclasses.fields(Assumptions):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), help=SOURCES[f.name][:120])
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        args.gpus = [int(g) for g in args.gpus.split(",")]
    except ValueError:
        p.error(f"--gpus {args.gpus!r}: give comma-separated whole numbers, e.g. 8,64,256")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
