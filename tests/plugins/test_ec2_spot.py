"""``--spot``: spot capacity for a single server and a fleet (against moto's server), and the
graceful exit on the two-minute interruption notice (a real server on 127.0.0.1, the notice
served by a local stand-in for instance metadata, since nothing else can serve it here).

What moto keeps: a single instance's market options show as its ``InstanceLifecycle`` (moto
drops ``SpotOptions``, so the max price is checked on the request we build); a group's
``MixedInstancesPolicy`` and ``CapacityRebalance`` come back as sent. moto starts every replica
on-demand, so the per-replica spot count of ``ls`` is only checked as 0 for a fleet.
"""

from __future__ import annotations

import base64
import http.server
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugins.backends.ec2.options import Ec2Options
from plugins.backends.ec2.spot import market_options, mixed_instances_policy, price
from plugins.backends.ec2.spot_watch import ACTION_PATH, TOKEN_PATH
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess
from tests.plugins.test_ec2_backend import cli, instance, launch, launched, user_data
from tests.plugins.test_ec2_fleet import launch_fleet, launched_fleet

WRAPPER = str(Path(__file__).parents[1] / "cli" / "data" / "behaviour_wrapper.py")


# --- launching on spot capacity (moto) ---------------------------------------------------------


@pytest.fixture
def cloud(fleet_cloud: Any) -> Any:
    """An EC2 client of moto holding experiment ``exp`` in the store ``launch`` uses."""
    return fleet_cloud.ec2


def test_spot_single_instance_is_a_one_time_spot_request_and_ls_says_so(cloud) -> None:
    code, out, err = launch("--port", "5000", "--spot", "--bid", "0.25")
    assert code == 0, err
    _, instance_id, _ = launched(out)
    assert instance(cloud, instance_id).get("InstanceLifecycle") == "spot"
    script = user_data(cloud, instance_id)
    assert "export STUDIO_EC2_SPOT_WATCH=1" in script
    assert "export STUDIO_EC2_SPOT_DRAIN=0" in script  # no balancer to wait for
    # moto keeps only the market type; the request's options are what AWS is sent
    assert market_options(Ec2Options(spot=True, bid=0.25)) == {
        "MarketType": "spot", "SpotOptions": {"SpotInstanceType": "one-time",
                                              "InstanceInterruptionBehavior": "terminate",
                                              "MaxPrice": "0.25"}}
    code, out, _ = cli("ls")
    (row,) = [line for line in out.splitlines() if line.startswith(instance_id)]
    assert " spot " in row


def test_cloud_ec2spot_is_ec2_with_spot_and_on_demand_stays_on_demand(cloud) -> None:
    code, out, err = cli("serve", "exp", "--cloud", "ec2spot", "--store", "s3://models/prod",
                         "--port", "5000")
    assert code == 0, err
    spot_id = launched(out)[1]
    code, out, err = launch("--port", "5001")
    assert code == 0, err
    plain_id = launched(out)[1]
    assert instance(cloud, spot_id).get("InstanceLifecycle") == "spot"
    assert "InstanceLifecycle" not in instance(cloud, plain_id)
    assert "STUDIO_EC2_SPOT_WATCH" not in user_data(cloud, plain_id)
    ls = cli("ls")[1].splitlines()
    assert " spot " in next(line for line in ls if line.startswith(spot_id))
    assert " spot " not in next(line for line in ls if line.startswith(plain_id))


@pytest.mark.parametrize(("args", "message"), [
    (["--bid", "0.3"], "--bid is the most you pay"),
    (["--spot", "--on-demand-base", "1"], "--on-demand-base is the number of on-demand"),
    (["--spot", "--bid", "-1"], "-1"),
    (["--spot", "--bid", "nan"], "nan"),
])
def test_spot_flags_that_make_no_sense_are_refused_before_anything_is_created(
        cloud, args: list[str], message: str) -> None:
    code, out, err = launch("--port", "5000", *args)
    assert code != 0 and message in err + out
    assert not cloud.describe_instances()["Reservations"]


def test_price_is_what_aws_takes() -> None:
    assert price(0.25) == "0.25" and price(1.0) == "1" and price(0.00012) == "0.00012"


def test_spot_fleet_gets_a_mixed_instances_policy_with_the_on_demand_base(fleet_cloud) -> None:
    code, out, err = launch_fleet("--port", "5000", "--replicas", "3", "--spot",
                                  "--on-demand-base", "1", "--bid", "0.5",
                                  "--fleet-name", "spot-fleet")
    assert code == 0, err
    _, name, _ = launched_fleet(out)
    (group,) = fleet_cloud.asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert group["CapacityRebalance"] is True
    assert "LaunchTemplate" not in group
    policy = group["MixedInstancesPolicy"]
    distribution = policy["InstancesDistribution"]
    assert distribution["OnDemandBaseCapacity"] == 1
    assert distribution["OnDemandPercentageAboveBaseCapacity"] == 0
    assert distribution["SpotMaxPrice"] == "0.5"
    assert distribution["SpotAllocationStrategy"] == "price-capacity-optimized"
    types = [o["InstanceType"] for o in policy["LaunchTemplate"]["Overrides"]]
    assert types[0] == "m5.large" and len(types) > 1  # same size: m5a/m6i/m6a.large
    template_id = policy["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateId"]
    data = fleet_cloud.ec2.describe_launch_template_versions(
        LaunchTemplateId=template_id)["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    script = base64.b64decode(data["UserData"]).decode()
    assert "export STUDIO_EC2_SPOT_WATCH=1" in script
    assert "export STUDIO_EC2_SPOT_DRAIN=50" in script  # the balancer takes it out first
    assert len(group["Instances"]) == 3
    ls = cli("ls")[1]
    assert "(0 spot)" in next(line for line in ls.splitlines() if line.startswith(name))
    assert cli("stop", name)[0] == 0


def test_an_instance_type_named_by_the_user_is_the_only_one(fleet_cloud) -> None:
    code, _, err = launch_fleet("--port", "5000", "--replicas", "1", "--spot",
                                  "--instance-type", "m5.large", "--fleet-name", "spot-one")
    assert code == 0, err
    (group,) = fleet_cloud.asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=["spot-one"])["AutoScalingGroups"]
    overrides = group["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"]
    assert [o["InstanceType"] for o in overrides] == ["m5.large"]
    assert group["MixedInstancesPolicy"]["InstancesDistribution"]["OnDemandBaseCapacity"] == 0
    assert cli("stop", "spot-one")[0] == 0


def test_the_policy_without_a_bid_leaves_the_price_to_aws() -> None:
    policy = mixed_instances_policy("lt-1", ["m5.large"], 0, None)
    assert "SpotMaxPrice" not in policy["InstancesDistribution"]


# --- the interruption notice (a real server, a stand-in for instance metadata) --------------------


class Metadata:
    """Instance metadata's two IMDSv2 endpoints the watcher uses: a session token (PUT), then
    ``spot/instance-action``, 404 until ``notice`` is set, 401 without the token."""

    TOKEN = "session-token-1"

    def __init__(self) -> None:
        self.notice = threading.Event()
        self.reads = 0
        self.unauthorised = 0
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_PUT(self) -> None:
                if self.path != TOKEN_PATH or not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
                    self.send_error(400)
                    return
                self._send(200, stand_in.TOKEN.encode())

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != stand_in.TOKEN:
                    stand_in.unauthorised += 1
                    self.send_error(401)
                    return
                if self.path != ACTION_PATH or not stand_in.notice.is_set():
                    stand_in.reads += 1
                    self.send_error(404)
                    return
                self._send(200, b'{"action": "terminate", "time": "2026-12-02T23:59:00Z"}')

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ready(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url + "v2/health/ready", timeout=5) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError as exc:
        return type(getattr(exc, "reason", exc)).__name__


def until(what: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.05)
    return what()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", ["1", "2"])
def test_the_interruption_notice_drains_the_request_in_flight_and_exits_0(
        modeldir: Path, workers: str) -> None:
    metadata = Metadata()
    env = {"STUDIO_EC2_SPOT_WATCH": "1", "STUDIO_EC2_METADATA_URL": metadata.url,
           "STUDIO_EC2_SPOT_POLL": "0.1", "STUDIO_EC2_SPOT_DRAIN": "1.5"}
    running = ServerProcess("exp", "--wrapper", WRAPPER, "--workers", workers, env=env).start()
    results: list[Any] = []
    try:
        assert ready(running.url) == 200
        assert until(lambda: metadata.reads >= 2, 10)  # polling, with its session token
        slow = threading.Thread(target=lambda: results.append(
            predict(running.url, {"sleep": np.array([5.0]), "x": np.ones(1)}, timeout=30)))
        slow.start()
        time.sleep(0.5)
        metadata.notice.set()
        noticed = time.monotonic()
        # not ready at once (a balancer stops sending), while still answering for the drain
        assert until(lambda: ready(running.url) == 503, 5)
        assert time.monotonic() - noticed < 1.5
        # then it stops accepting: a new connection is refused, the slow request still runs
        host, port = running.url.removeprefix("http://").rstrip("/").split(":")

        def refused() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except ConnectionRefusedError:
                return True
            return False

        if workers == "1":  # workers keep their inherited copy of the socket until they exit
            assert until(refused, 5)
            assert slow.is_alive()
        slow.join(30)
        assert results and results[0]["done"] is True  # answered 200 in full
        assert running.wait(timeout=15) == 0
        output = running.output()
        assert "spot interruption notice: terminate at 2026-12-02T23:59:00Z" in output
        assert metadata.unauthorised == 0
    finally:
        running.kill()
        metadata.close()


@pytest.mark.timeout(30)
def test_without_the_variable_nothing_watches_and_a_dead_metadata_service_does_no_harm(
        modeldir: Path) -> None:
    metadata = Metadata()
    metadata.notice.set()
    with ServerProcess("exp", env={"STUDIO_EC2_METADATA_URL": metadata.url,
                                   "STUDIO_EC2_SPOT_POLL": "0.1"}) as running:
        time.sleep(1.0)
        assert ready(running.url) == 200 and metadata.reads == 0
    closed = f"http://127.0.0.1:{free_port()}"
    with ServerProcess("exp", env={"STUDIO_EC2_SPOT_WATCH": "1", "STUDIO_EC2_METADATA_URL": closed,
                                   "STUDIO_EC2_SPOT_POLL": "0.1"}) as running:
        time.sleep(1.0)
        assert ready(running.url) == 200
        assert running.output().count("cannot read the spot interruption notice") == 1
    metadata.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
