"""``serve --cloud ec2`` against moto's standalone server (real HTTP, real boto3)."""

from __future__ import annotations

import base64
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from plugins.backends.ec2.instances import wait_ready
from plugins.backends.ec2.machine import instance_type_for
from plugins.backends.ec2.userdata import VENV, serve_lines
from studio_plugins import ConfigurationError, ModelSpec, ServeOptions, __version__
from studio_plugins.cli import build_cli, parse_serve_argv
from studio_plugins.client import PredictionError, predict
from studio_plugins.testing import ServerProcess, make_host
from studio_plugins.tls import user_ca_file

BUCKET = "models"
STORE = f"s3://{BUCKET}/prod"
MOTO_DLAMI = "ami-dca37ea5"  # "Deep Learning AMI Ubuntu Linux - 2.4_Oct2017" in moto's public set
WEIGHTS = np.array([[1.0], [2.0], [3.0]], np.float32)

WRAPPER = textwrap.dedent("""
    import os
    import numpy as np

    def create_model(modeldir):
        weights = np.load(os.path.join(modeldir, "weights.npy"))
        return lambda data: {key: np.asarray(value, np.float32) @ weights for key, value in data.items()}
""")
OWN_WRAPPER = WRAPPER.replace("@ weights", "@ (2 * weights)")


@pytest.fixture
def cloud(aws, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """moto with a bucket holding experiment ``exp`` (weights.npy) and the AMI lookup pointed at
    moto's public Deep Learning AMI; returns an EC2 client."""
    import boto3

    monkeypatch.setenv("STUDIO_EC2_AMI_NAME", "Deep Learning AMI Ubuntu Linux*")
    monkeypatch.setenv("STUDIO_EC2_AMI_OWNER", "898082745236")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    source = tmp_path / "exp-modeldir"
    source.mkdir()
    np.save(source / "weights.npy", WEIGHTS)
    assert cli("experiments", "push", "exp", str(source), "--store", STORE)[0] == 0
    return boto3.client("ec2")


@pytest.fixture
def loopback_instances(monkeypatch: pytest.MonkeyPatch) -> None:
    """moto (a thread of this process) gives instances 127.0.0.1 as their public address: the
    certificate the CLI signs for that address then names the one the test's local server is
    reached at, and the client verifies it for real."""
    from moto.ec2.models import elastic_network_interfaces

    monkeypatch.setattr(elastic_network_interfaces, "random_public_ip", lambda: "127.0.0.1")


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(build_cli(make_host()), list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def launch(*args: str, key: str = "exp") -> tuple[int, str, str]:
    return cli("serve", key, "--cloud", "ec2", "--store", STORE, *args)


def launched(stdout: str) -> tuple[str, str, str | None]:
    """(url, instance id, token) from what a successful launch printed."""
    lines = stdout.splitlines()
    url = lines[0]
    instance_id = lines[1].split()[1]
    token = lines[2].removeprefix("token: ") if len(lines) > 2 else None
    return url, instance_id, token


def instance(ec2: Any, instance_id: str) -> dict[str, Any]:
    return ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]


def user_data(ec2: Any, instance_id: str) -> str:
    value = ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
    return base64.b64decode(value["UserData"]["Value"]).decode()


def our_groups(ec2: Any) -> list[dict[str, Any]]:
    return ec2.describe_security_groups(
        Filters=[{"Name": "tag:studio-plug:managed", "Values": ["true"]}]
    )["SecurityGroups"]


def ingress(group: dict[str, Any]) -> set[tuple[str, int, int, str]]:
    return {
        (p["IpProtocol"], p["FromPort"], p["ToPort"], r["CidrIp"])
        for p in group["IpPermissions"]
        for r in p["IpRanges"]
    }


def live_instances(ec2: Any) -> list[str]:
    reservations = ec2.describe_instances(Filters=[
        {"Name": "instance-state-name", "Values": ["pending", "running", "shutting-down"]}
    ])["Reservations"]
    return [i["InstanceId"] for r in reservations for i in r["Instances"]]


# --- what a launch creates ------------------------------------------------------------------


def test_launch_creates_the_instance_firewall_and_user_data_asked_for(cloud) -> None:
    code, out, err = launch("--gpus", "1", "--port", "8080", "--cidr", "203.0.113.0/24",
                            "--killafter", "600")
    assert code == 0, err
    url, instance_id, token = launched(out)
    described = instance(cloud, instance_id)
    assert url == f"https://{described['PublicIpAddress']}:8080/"  # HTTPS by default
    assert token and len(token) >= 24

    assert described["InstanceType"] == "g5.xlarge"
    assert described["ImageId"] == MOTO_DLAMI
    assert described["State"]["Name"] == "running"
    behaviour = cloud.describe_instance_attribute(
        InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    tags = {t["Key"]: t["Value"] for t in described["Tags"]}
    assert tags["studio-plug:managed"] == "true"
    assert tags["studio-plug:key"] == "exp"
    assert tags["studio-plug:port"] == "8080"
    assert "@" in tags["studio-plug:started-by"]
    assert tags["studio-plug:store"] == STORE

    (group,) = our_groups(cloud)
    assert [g["GroupId"] for g in described["SecurityGroups"]] == [group["GroupId"]]
    assert ingress(group) == {("tcp", 8080, 8080, "203.0.113.0/24")}  # and no port 22

    script = user_data(cloud, instance_id)
    assert script.startswith("#!/bin/bash\n")
    syntax = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True, timeout=10)
    assert syntax.returncode == 0, syntax.stderr
    assert "trap '" in script and "shutdown -h now' EXIT" in script
    assert f"/wheels/studio_plugins-{__version__}-py3-none-any.whl[all]" in script  # shipped
    assert token not in script and "PRIVATE KEY" not in script  # read from SSM at boot
    (line,) = serve_lines(script)
    argv = shlex.split(line)
    assert argv[:3] == ["studio-plug", "serve", "exp"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == "8080"
    assert argv[argv.index("--certfile") + 1] == f"{VENV}/tls/cert.pem"
    assert argv[argv.index("--keyfile") + 1] == f"{VENV}/tls/key.pem"
    assert argv[argv.index("--killafter") + 1] == "600"
    assert argv[argv.index("--store") + 1] == STORE
    assert argv[argv.index("--gpus") + 1] == "1"
    assert "--token" not in argv and token not in line  # the token is not on the command line
    assert "download.pytorch.org/whl/cpu" not in script  # a GPU instance gets CUDA torch


def test_ssh_only_with_a_key_pair_and_an_identical_group_is_reused(cloud) -> None:
    code, out, err = launch("--key-name", "mine", "--cidr", "198.51.100.7")
    assert code == 0, err
    first = instance(cloud, launched(out)[1])
    assert first["KeyName"] == "mine"
    (group,) = our_groups(cloud)
    assert ingress(group) == {("tcp", 5000, 5000, "198.51.100.7/32"), ("tcp", 22, 22, "198.51.100.7/32")}
    assert "created" in err

    code, out, err = launch("--key-name", "mine", "--cidr", "198.51.100.7/32")
    assert code == 0, err
    assert "reused" in err
    assert len(our_groups(cloud)) == 1
    assert instance(cloud, launched(out)[1])["SecurityGroups"][0]["GroupId"] == group["GroupId"]

    code, out, err = launch("--cidr", "198.51.100.7/32")  # no key pair: other rules, other group
    assert code == 0, err
    assert len(our_groups(cloud)) == 2


def test_grpc_port_is_opened_beside_port_and_served_there(cloud) -> None:
    code, out, err = launch("--port", "8080", "--grpc-port", "8001", "--cidr", "203.0.113.0/24")
    assert code == 0, err
    (group,) = our_groups(cloud)
    assert ingress(group) == {("tcp", 8080, 8080, "203.0.113.0/24"), ("tcp", 8001, 8001, "203.0.113.0/24")}
    instance_id = launched(out)[1]
    (line,) = serve_lines(user_data(cloud, instance_id))
    argv = shlex.split(line)
    assert argv[argv.index("--grpc-port") + 1] == "8001"
    address = instance(cloud, instance_id)["PublicIpAddress"]
    assert f"V2 over gRPC on {address}:8001 (TLS, the same certificate as HTTPS)" in err

    for args, message in ((("--grpc-port", "0"), "fixed --grpc-port"),
                          (("--port", "8001", "--grpc-port", "8001"), "gRPC needs a port of its own")):
        code, _out, err = launch(*args)
        assert code == 1 and message in err
    assert len(our_groups(cloud)) == 1


def test_instance_type_table_and_overrides(cloud) -> None:
    assert [instance_type_for(n) for n in (0, 1, 2, 4, 5, 8)] == [
        "m5.large", "g5.xlarge", "g5.12xlarge", "g5.12xlarge", "g5.48xlarge", "g5.48xlarge"]
    with pytest.raises(ConfigurationError, match="has 9 GPUs") as caught:
        instance_type_for(9)
    assert "--instance-type" in (caught.value.hint or "")

    code, out, err = launch("--no-auth")  # --gpus 0
    assert code == 0, err
    instance_id = launched(out)[1]
    assert instance(cloud, instance_id)["InstanceType"] == "m5.large"
    script = user_data(cloud, instance_id)
    assert "pip install -q torch --index-url https://download.pytorch.org/whl/cpu" in script
    assert "STUDIO_TOKEN" not in script and "token:" not in out
    assert "warning: --no-auth" in err

    code, out, err = launch("--gpus", "3", "--instance-type", "g4dn.12xlarge", "--ami", "ami-760aaa0f")
    assert code == 0, err
    described = instance(cloud, launched(out)[1])
    assert (described["InstanceType"], described["ImageId"]) == ("g4dn.12xlarge", "ami-760aaa0f")

    code, _out, err = launch("--gpus", "2", "--instance-type", "g5.xlarge")
    assert code == 1 and "g5.xlarge has 1 GPUs, --gpus asks for 2" in err
    code, _out, err = launch("--instance-type", "x9.nonsense")
    assert code == 1 and err.startswith("error: EC2 has no instance type 'x9.nonsense' in us-east-1")


def test_every_backend_option_given_on_the_command_line_is_read_back() -> None:
    # each option is declared once (plugins/backends/ec2/flags.py): its flag comes from its field
    import dataclasses

    from plugins.backends.ec2.fleet_options import FleetOptions
    from plugins.backends.ec2.options import Ec2Options

    argv = shlex.split(
        "studio-plug serve exp --cloud ec2 --instance-type g5.xlarge --region eu-west-1 --ami ami-1 "
        "--key-name mine --cidr 10.0.0.0/8 --subnet-id subnet-1 --iam-profile reader --no-auth "
        "--no-tls "
        "--wait-ready --launch-timeout 60 --install studio-plugins --replicas 2 --min-replicas 1 "
        "--max-replicas 3 --target-rps 2.5 --lb-port 8000 --fleet-name exp-prod --spot --bid 0.5 "
        "--on-demand-base 1 --certificate-arn arn:aws:acm:eu-west-1:123456789012:certificate/c")
    options = parse_serve_argv(make_host(), argv)
    ec2, fleet = Ec2Options.from_options(options), FleetOptions.from_options(options)
    assert ec2 == Ec2Options(
        instance_type="g5.xlarge", region="eu-west-1", ami="ami-1", key_name="mine",
        cidr="10.0.0.0/8", subnet_id="subnet-1", iam_profile="reader", no_auth=True,
        no_tls=True, wait_ready=True, launch_timeout=60.0, install="studio-plugins", spot=True,
        bid=0.5)
    assert fleet == FleetOptions(replicas=2, min_replicas=1, max_replicas=3, target_rps=2.5,
                                 lb_port=8000, fleet_name="exp-prod", on_demand_base=1,
                                 certificate_arn="arn:aws:acm:eu-west-1:123456789012:certificate/c")
    for given in (ec2, fleet):  # every field was given (a new one must join the command line)
        assert all(getattr(given, f.name) != f.default for f in dataclasses.fields(given))
    defaults = parse_serve_argv(make_host(), ["studio-plug", "serve", "exp", "--cloud", "ec2"])
    assert Ec2Options.from_options(defaults) == Ec2Options()
    assert Ec2Options().launch_timeout == 900.0 and Ec2Options().cidr == "0.0.0.0/0"


def test_refusals_before_anything_is_created(
    cloud, studio_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code, _out, err = cli("serve", "exp", "--cloud", "ec2")  # the embedded (local) store
    assert code == 1
    assert "needs a store the instance can reach" in err
    assert (f"`studio-plug experiments push exp {studio_home}/experiments/exp/modeldir "
            "--store s3://BUCKET/PREFIX`") in err

    code, _out, err = launch("--port", "0")
    assert code == 1 and "fixed --port" in err
    code, _out, err = launch(key="missing")
    assert code == 1 and "no experiment 'missing' in s3://models/prod" in err
    code, _out, err = launch("--cidr", "everyone")
    assert code == 1 and "--cidr 'everyone' is not an address range" in err
    monkeypatch.delenv("STUDIO_EC2_AMI_NAME")  # the real default: not in moto's image set
    code, _out, err = launch()
    assert code == 1
    assert "no x86_64 AMI named 'Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 24.04) *'" in err
    assert "STUDIO_EC2_AMI_NAME" in err
    assert our_groups(cloud) == [] and live_instances(cloud) == []


# --- failures after something was created clean up ----------------------------------------


def test_a_launch_failing_after_the_group_was_created_leaves_no_group(
    cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moto import settings

    # moto now checks key pairs as EC2 does: RunInstances fails after our group exists
    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, _out, err = launch("--key-name", "no-such-key")
    assert code == 1
    assert "InvalidKeyPair.NotFound" in err
    assert "cleaning up: deleting security group sg-" in err
    assert our_groups(cloud) == [] and live_instances(cloud) == []

    # a group that was reused, not created, is left alone
    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", False)
    code, _out, err = launch("--key-name", "no-such-key")
    assert code == 0, err
    (group,) = our_groups(cloud)
    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, _out, err = launch("--key-name", "no-such-key")
    assert code == 1
    assert "reused" in err and "deleting security group" not in err
    assert [g["GroupId"] for g in our_groups(cloud)] == [group["GroupId"]]


@pytest.mark.timeout(60)
def test_a_launch_failing_after_the_instance_started_terminates_it(cloud) -> None:
    # moto's instance address is not reachable from here: --wait-ready times out
    code, _out, err = launch("--wait-ready", "--launch-timeout", "3")
    assert code == 1
    assert "was not ready after 3 s" in err
    assert "cleaning up: terminating i-" in err
    assert live_instances(cloud) == []
    assert our_groups(cloud) == []


# --- the user data's command really serves --------------------------------------------------


def run_user_data_locally(script: str, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """Run the script's wrapper fetches for real (against moto) and return the serve arguments
    (after ``serve``) and environment, with host and port swapped for 127.0.0.1:0 and the
    instance's wrapper paths (under its venv) for the same paths under ``workdir``."""

    def here(path: str) -> str:
        return str(workdir / Path(path).relative_to(VENV)) if path.startswith(VENV) else path

    env: dict[str, str] = {}
    for line in script.splitlines():
        if line.startswith("export ") and "=" in line and "$" not in line:
            for assignment in shlex.split(line.removeprefix("export ")):
                name, _, value = assignment.partition("=")
                env[name] = value
        if line.startswith("python -c "):
            argv = shlex.split(line)
            argv[0], argv[-1] = sys.executable, here(argv[-1])
            Path(argv[-1]).parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(argv, check=True, timeout=60)
        if line.startswith('STUDIO_TOKEN="$(') and line.endswith(')"'):  # the token, from SSM
            argv = shlex.split(line.removeprefix('STUDIO_TOKEN="$(').removesuffix(')"'))
            argv[0] = sys.executable
            env["STUDIO_TOKEN"] = subprocess.run(argv, check=True, timeout=60, text=True,
                                                 capture_output=True).stdout
        if line.startswith("python -m plugins.backends.ec2.boot tls "):  # key and certificate
            argv = [here(arg) for arg in shlex.split(line)]
            argv[0] = sys.executable
            subprocess.run(argv, check=True, timeout=60)
    (line,) = serve_lines(script)
    argv = shlex.split(line)[2:]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = "0"
    argv = [here(arg) for arg in argv]  # --certfile/--keyfile
    for i, arg in enumerate(argv[:-1]):
        if arg == "--wrapper":
            name, sep, path = argv[i + 1].rpartition("=")
            argv[i + 1] = f"{name}{sep}{here(path)}"
    for name in ("HOME", "AWS_DEFAULT_REGION"):
        env.pop(name, None)
    return argv, env


# where ``two_wrappers``' files go: beside the experiment in the store, under the instance's venv
COMMON_KEY = "prod/experiments/exp/wrapper/matmul_wrapper.py"
OWN_KEY = "prod/experiments/exp/wrapper/twice/matmul_wrapper.py"
COMMON_PATH = f"{VENV}/wrapper/matmul_wrapper.py"
OWN_PATH = f"{VENV}/wrapper/twice/matmul_wrapper.py"


def two_wrappers(tmp_path: Path) -> list[str]:
    """``serve`` arguments for model ``twice`` (of ``exp``) with a wrapper of its own, beside a
    common wrapper of the same basename (they must not clash)."""
    common = tmp_path / "matmul_wrapper.py"
    common.write_text(WRAPPER)
    (tmp_path / "own").mkdir()
    own = tmp_path / "own" / "matmul_wrapper.py"
    own.write_text(OWN_WRAPPER)
    return ["--model", "twice=exp", "--wrapper", f"twice={own}", "--wrapper", str(common)]


def wrapper_fetches(script: str) -> set[tuple[str, str, str]]:
    """(bucket, key, path on the instance) of each wrapper the user data copies from the store."""
    fetches = (shlex.split(line)[-3:] for line in script.splitlines() if line.startswith("python -c "))
    return {(bucket, key, path) for bucket, key, path in fetches
            if path.startswith(f"{VENV}/wrapper/")}  # not the shipped wheels


def check_two_wrappers_shipped(script: str, token: str | None, monkeypatch: pytest.MonkeyPatch,
                               killafter: float, tls: bool = False) -> None:
    """Both files of ``two_wrappers`` are in the store at the keys the user data fetches them
    from, to the paths its serve line names; that line parses back to both wrappers (they once
    came out as two commons)."""
    import boto3

    s3 = boto3.client("s3")
    for key, text in ((COMMON_KEY, WRAPPER), (OWN_KEY, OWN_WRAPPER)):
        assert s3.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode() == text
    assert wrapper_fetches(script) == {(BUCKET, COMMON_KEY, COMMON_PATH), (BUCKET, OWN_KEY, OWN_PATH)}
    (line,) = serve_lines(script)
    with monkeypatch.context() as env:  # the token as the instance gets it (the client reads it too)
        env.setenv("STUDIO_TOKEN", token or "")
        env.delenv("STUDIO_STORE", raising=False)
        assert parse_serve_argv(make_host(), shlex.split(line)) == ServeOptions(
            keys=("exp",), models=(ModelSpec("twice", "exp"),), host="0.0.0.0", killafter=killafter,
            store_url=STORE, token=token, wrapper=COMMON_PATH, wrappers={"twice": OWN_PATH},
            certfile=f"{VENV}/tls/cert.pem" if tls else None,
            keyfile=f"{VENV}/tls/key.pem" if tls else None,
        )


@pytest.mark.timeout(120)
def test_the_user_data_command_serves_the_models_with_their_wrappers(
    cloud, loopback_instances, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a common wrapper and one model's own: both files reach the store and the instance, and
    # the instance's command line gives each model its own
    code, out, err = launch(*two_wrappers(tmp_path), "--killafter", "120")
    assert code == 0, err
    _url, instance_id, token = launched(out)
    script = user_data(cloud, instance_id)
    check_two_wrappers_shipped(script, token, monkeypatch, killafter=120.0, tls=True)

    workdir = tmp_path / "instance"
    workdir.mkdir()
    argv, env = run_user_data_locally(script, workdir)
    assert (workdir / "wrapper" / "matmul_wrapper.py").read_text() == WRAPPER  # fetched there
    assert (workdir / "wrapper" / "twice" / "matmul_wrapper.py").read_text() == OWN_WRAPPER
    assert env["STUDIO_TOKEN"] == token
    with ServerProcess(*argv, env=env) as server:
        assert server.url.startswith("https://127.0.0.1:")  # the CLI's certificate, verified
        x = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], np.float32)
        result = predict(server.url, {"x": x}, token=token)
        np.testing.assert_allclose(result["x"], x @ WEIGHTS)
        result = predict(f"{server.url}models/twice", {"x": x}, token=token)
        np.testing.assert_allclose(result["x"], 2 * (x @ WEIGHTS))
        with pytest.raises(PredictionError) as caught:
            predict(server.url, {"x": x})
        assert caught.value.status == 401
        wait_ready(server.url, timeout=10, cafile=str(user_ca_file()))  # what --wait-ready polls


@pytest.mark.timeout(180)
def test_the_user_data_command_serves_a_keras_checkpoint(
    cloud, loopback_instances, tmp_path: Path
) -> None:
    if "keras" not in make_host().loaders():
        pytest.skip("needs the keras loader (issue 3)")
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.layers[0].set_weights([WEIGHTS, np.array([0.5], np.float32)])
    source = tmp_path / "keras-modeldir"
    source.mkdir()
    model.save(source / "checkpoint.01-0.10.keras")
    assert cli("experiments", "push", "dense", str(source), "--store", STORE)[0] == 0

    code, out, err = launch("--gpus", "1", key="dense")
    assert code == 0, err
    _url, instance_id, token = launched(out)
    argv, env = run_user_data_locally(user_data(cloud, instance_id), tmp_path)
    assert "--gpus" in argv
    argv[argv.index("--gpus") + 1] = "0"  # no GPU here
    with ServerProcess(*argv, env=env) as server:
        result = predict(server.url, {"x": np.ones((1, 3), np.float32)}, token=token)
        assert float(np.asarray(result["x"]).ravel()[0]) == pytest.approx(6.5)


@pytest.mark.timeout(60)
def test_no_public_address_in_a_private_subnet_times_out_and_cleans_up(cloud) -> None:
    vpc = cloud.create_vpc(CidrBlock="10.9.0.0/16")["Vpc"]["VpcId"]
    subnet = cloud.create_subnet(VpcId=vpc, CidrBlock="10.9.1.0/24")["Subnet"]["SubnetId"]
    code, _out, err = launch("--subnet-id", subnet, "--launch-timeout", "2")
    assert code == 1
    assert "has no public address after 2 s" in err and "--subnet-id" in err
    assert "cleaning up: terminating i-" in err and "cleaning up: deleting security group" in err
    assert live_instances(cloud) == [] and our_groups(cloud) == []
