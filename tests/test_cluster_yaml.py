"""cluster.yaml (AWS) and cluster-gcp.yaml: Ray's own validator (as Ray's test_autoscaler_yaml.py does),
the cluster's invariants, and, for AWS, Ray's bootstrap and node launch against moto's EC2 and IAM.
All offline, a few seconds."""
from __future__ import annotations

import copy
import functools
import json
import re
import shlex
import socket
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from distributed.cluster import HEAD_SYSTEM_CONFIG

ROOT = Path(__file__).resolve().parents[1]
AWS, GCP = "cluster.yaml", "cluster-gcp.yaml"
# The pins the setup commands must repeat, read from pyproject.toml so a bump there fails here.
PINNED = ("torch", "torchvision", "ray", "deepspeed")


@functools.cache
def _load(name: str) -> tuple[str, dict, dict]:
    """(text, parsed file, config as `ray up` sees it after Ray fills in defaults), all offline."""
    text = (ROOT / name).read_text()
    raw = yaml.safe_load(text)
    real_connect = socket.socket.connect

    def no_network(*args, **kwargs):
        raise AssertionError(f"prepare_config/validate_config({name}) tried to open a connection")

    socket.socket.connect = no_network
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    finally:
        socket.socket.connect = real_connect
    return text, raw, prepared


@pytest.fixture(params=[AWS, GCP])
def cluster(request) -> tuple[str, dict, dict]:
    return _load(request.param)


def _node_types(config) -> dict:
    return config["available_node_types"]


def _workers(config) -> dict:
    return {k: v for k, v in _node_types(config).items() if k != config["head_node_type"]}


def _is_spot(node_type: dict) -> bool:
    node = node_type["node_config"]
    aws = node.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    gcp = node.get("scheduling", {}).get("provisioningModel") == "SPOT"
    return aws or gcp


def _machine(node_type: dict) -> str:
    node = node_type["node_config"]
    return node.get("InstanceType") or node["machineType"]


def _ray_start(commands: list[str], head: bool) -> list[str]:
    found = [c for c in commands if "ray start" in c and ("--head" in c) == head]
    assert found, f"no `ray start{' --head' if head else ''}` command in {commands}"
    return found


def _commented_commands(text: str, marker: str) -> list[dict]:
    """The `--option value` pairs of each shell command in the file's comments that contains marker."""
    commands = [shlex.split(line.lstrip("# ")) for line in text.splitlines() if marker in line]
    return [{a: b for a, b in zip(args, args[1:]) if a.startswith("--")} for args in commands]


def test_validates_with_ray_schema_offline(cluster):
    _, _, config = cluster
    assert config["provider"]["type"] in ("aws", "gcp")


def test_head_has_no_gpu_and_takes_no_training_workers(cluster):
    _, _, config = cluster
    head = _node_types(config)[config["head_node_type"]]
    assert head["resources"].get("GPU") == 0, "head must advertise GPU: 0"
    assert head["max_workers"] == 0 and head["min_workers"] == 0
    # AWS g*/p* and GCP a2/a3/g2 families carry GPUs; GCP can also attach them to any machine.
    assert not _machine(head).startswith(("g", "p", "a2", "a3")), "head is a GPU machine"
    assert "guestAccelerators" not in head["node_config"]
    # Every worker type offers GPUs (where training workers go) and none offers the head's marker.
    for name, node_type in _workers(config).items():
        assert node_type["resources"].get("GPU", 0) >= 1, f"{name} has no GPU"
        assert "head" not in node_type["resources"], f"{name} offers the head's driver resource"
    assert head["resources"].get("head", 0) >= 1, "head needs its custom `head` resource for drivers"


def test_at_least_two_gpu_machine_types_with_explicit_bounds(cluster):
    _, raw, config = cluster
    assert len({_machine(n) for n in _workers(config).values()}) >= 2
    for name, node_type in raw["available_node_types"].items():
        if name == raw["head_node_type"]:
            continue
        assert "min_workers" in node_type and "max_workers" in node_type, f"{name}: set both"
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] >= 1, name
        assert node_type["max_workers"] <= raw["max_workers"], name


def test_every_spot_type_has_an_on_demand_fallback(cluster):
    _, _, config = cluster
    workers = _workers(config)
    spot = {k: v for k, v in workers.items() if _is_spot(v)}
    on_demand = {k: v for k, v in workers.items() if not _is_spot(v)}
    assert spot, "no spot worker type"
    for name, node_type in spot.items():
        fallbacks = [v for v in on_demand.values() if _machine(v) == _machine(node_type)]
        assert fallbacks, f"{name}: no on-demand type with {_machine(node_type)}"
        for fallback in fallbacks:
            assert fallback["resources"] == node_type["resources"], name
            # Spot is tried first: higher priority when both could serve the same request.
            assert node_type.get("priority", 0) > fallback.get("priority", 0), name


def test_idle_timeout_is_set(cluster):
    _, raw, _ = cluster
    assert 0 < raw["idle_timeout_minutes"] <= 60


def test_setup_commands_pin_the_project_versions(cluster):
    _, _, config = cluster
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = {re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower(): d for d in pyproject["dependencies"]}
    # Head and workers each run setup_commands (merged in by prepare_config).
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands = " ".join(config[key])
        for name in PINNED:
            assert "==" in pins[name], f"pyproject.toml does not pin {name}: {pins[name]}"
            assert pins[name] in commands, f"{key} lacks {pins[name]!r}"
        tag = f"@v{pyproject['version']}"
        project = rf"{pyproject['name']}(\[[\w,]+\])? @ git\+https://\S+{re.escape(tag)}\b"
        assert re.search(project, commands), f"{key} must install {pyproject['name']} at tag {tag}"


def test_dashboard_only_on_loopback(cluster):
    _, _, config = cluster
    head_start = _ray_start(config["head_start_ray_commands"], head=True)
    assert all("--dashboard-host=127.0.0.1" in c for c in head_start)
    every = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    hosts = re.findall(r"--dashboard-host[= ]+(\S+)", " ".join(every))
    assert hosts and set(hosts) == {"127.0.0.1"}, hosts
    assert not any("0.0.0.0" in c for c in every)


def test_head_detects_a_lost_node_as_the_multinode_fixture_does(cluster):
    """The head's --system-config is distributed.cluster.HEAD_SYSTEM_CONFIG, which tests/multinode.py and the
    recovery benchmark start their head with: the figures in BENCHMARKS.md are those of this setting."""
    _, _, config = cluster
    (head,) = _ray_start(config["head_start_ray_commands"], head=True)
    (value,) = re.findall(r"--system-config=(\S+)", head)
    assert json.loads(shlex.split(value)[0]) == HEAD_SYSTEM_CONFIG


def test_token_auth_is_on_everywhere(cluster):
    text, _, config = cluster
    assert not re.search(r"RAY_AUTH_MODE\s*=\s*['\"]?(?!token\b)", text), "auth mode other than token"
    for key, head in (("head_start_ray_commands", True), ("worker_start_ray_commands", False)):
        for command in _ray_start(config[key], head=head):
            assert "RAY_AUTH_MODE=token" in command, f"{key}: {command}"
    # The head creates the token before Ray starts there; the autoscaler copies it to each worker.
    generate = [c for c in config["head_setup_commands"] if "get-auth-token --generate" in c]
    assert generate and all("> /dev/null" in c and "umask 077" in c for c in generate), generate
    assert "~/.ray/auth_token" in config["cluster_synced_files"]


def test_no_credentials_in_the_file(cluster):
    text, _, config = cluster
    assert not re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text), "AWS access key id"
    lowered = text.lower()
    for word in ("aws_secret_access_key", "aws_access_key_id", "aws_session_token", "secret_key",
                 "private_key_id", "credentials"):
        assert word not in lowered, word
    for name, node_type in _workers(config).items():
        node = node_type["node_config"]
        # AWS: an instance profile; GCP: a named service account (else the project's default one).
        assert "Arn" in node.get("IamInstanceProfile", {}) or node.get("serviceAccounts"), name
    head = _node_types(config)[config["head_node_type"]]["node_config"]
    # The head's GCP account is the one `ray up` creates; on AWS the head names its own profile.
    assert config["provider"]["type"] == "gcp" or "Arn" in head.get("IamInstanceProfile", {})


def test_aws_security_group_opens_only_ssh():
    text, _, config = _load(AWS)
    # Naming a group on every node type stops Ray from creating its default one (SSH from 0.0.0.0/0).
    groups = {tuple(n["node_config"].get("SecurityGroupIds", ())) for n in _node_types(config).values()}
    assert len(groups) == 1 and all(groups), groups
    assert "security_group" not in config["provider"]
    assert "0.0.0.0/0" not in text
    # The commands in the file's header that fill the group: tcp 22 from a CIDR, the rest from itself.
    rules = _commented_commands(text, "authorize-security-group-ingress")
    assert rules
    for opts in rules:
        if "--cidr" in opts:
            assert opts.get("--protocol") == "tcp" and opts.get("--port") == "22", opts
        else:
            assert opts.get("--source-group") == opts.get("--group-id"), opts


def test_gcp_firewall_opens_only_ssh():
    text, _, config = _load(GCP)
    # Naming the subnet on every node stops Ray from using the default network (SSH open to all).
    subnets = {str(n["node_config"].get("networkInterfaces")) for n in _node_types(config).values()}
    assert len(subnets) == 1 and "None" not in subnets, subnets
    assert "0.0.0.0/0" not in text
    rules = _commented_commands(text, "firewall-rules create")
    assert rules
    for opts in rules:
        if "--source-ranges" in opts:
            assert opts["--allow"] == "tcp:22", opts
        else:
            assert opts.get("--source-tags") == opts.get("--target-tags"), opts


def _fill_placeholders(cfg: dict, iam, ami: str, sg: str) -> None:
    """The REPLACE_ME placeholders of every node type, filled with moto's resources of the same names."""
    for node_type in cfg["available_node_types"].values():
        node = node_type["node_config"]
        profile = node["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1]
        try:
            iam.create_role(RoleName=profile, AssumeRolePolicyDocument="{}")
            iam.create_instance_profile(InstanceProfileName=profile)
            iam.add_role_to_instance_profile(InstanceProfileName=profile, RoleName=profile)
        except iam.exceptions.EntityAlreadyExistsException:
            pass
        node["IamInstanceProfile"]["Arn"] = iam.get_instance_profile(
            InstanceProfileName=profile)["InstanceProfile"]["Arn"]
        node.update(ImageId=ami, SecurityGroupIds=[sg])


def test_aws_bootstrap_and_launch_against_moto(tmp_path, monkeypatch):
    """Ray's AWS bootstrap keeps our group and profiles, and each type launches as spot or on-demand."""
    moto = pytest.importorskip("moto")
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    cfg = copy.deepcopy(_load(AWS)[2])
    region = cfg["provider"]["region"]
    monkeypatch.setenv("HOME", str(tmp_path))  # bootstrap writes the SSH key under ~/.ssh
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", region)):
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    with moto.mock_aws():
        ec2 = boto3.client("ec2", region_name=region)
        vpc = ec2.describe_vpcs()["Vpcs"][0]["VpcId"]
        sg = ec2.create_security_group(GroupName="imagenet-ray", Description="t", VpcId=vpc)["GroupId"]
        ami = ec2.describe_images()["Images"][0]["ImageId"]
        _fill_placeholders(cfg, boto3.client("iam"), ami, sg)
        groups_before = len(ec2.describe_security_groups()["SecurityGroups"])

        booted = bootstrap_aws(cfg)

        assert len(ec2.describe_security_groups()["SecurityGroups"]) == groups_before
        provider = AWSNodeProvider(booted["provider"], booted["cluster_name"])
        for name, node_type in booted["available_node_types"].items():
            provider.create_node(node_type["node_config"], {"ray-user-node-type": name}, 1)
        launched = {
            tag["Value"]: inst
            for r in ec2.describe_instances()["Reservations"] for inst in r["Instances"]
            for tag in inst.get("Tags", []) if tag["Key"] == "ray-user-node-type"
        }
        machines = sorted({_machine(n) for n in cfg["available_node_types"].values()})
        facts = {t["InstanceType"]: t for t in ec2.describe_instance_types(InstanceTypes=machines)["InstanceTypes"]}

    assert set(launched) == set(booted["available_node_types"])
    for name, node_type in booted["available_node_types"].items():
        inst = launched[name]
        assert (inst.get("InstanceLifecycle") == "spot") == _is_spot(node_type), name
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [sg], name
        assert inst["IamInstanceProfile"]["Arn"] == node_type["node_config"]["IamInstanceProfile"]["Arn"]
        # The advertised CPUs and GPUs are what AWS says the instance has (the head's are fewer on purpose).
        fact = facts[_machine(node_type)]
        gpus = sum(g["Count"] for g in fact.get("GpuInfo", {}).get("Gpus", []))
        assert node_type["resources"].get("GPU", 0) == gpus, name
        if name != booted["head_node_type"]:
            assert node_type["resources"]["CPU"] == fact["VCpuInfo"]["DefaultVCpus"], name
