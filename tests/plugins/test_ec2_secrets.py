"""The token and the TLS key in Parameter Store, never in user data or launch templates; HTTPS
on the instance with a certificate from the user's CA (moto's standalone server, real HTTP).

The end-to-end run of the boot script's secret fetch and serve line, verified over HTTPS with
the CA, is ``test_the_user_data_command_serves_the_models_with_their_wrappers`` in
test_ec2_backend.py (its instance's address is 127.0.0.1, so the certificate names it); all of
it run as the instance does, from the shipped wheel in a fresh venv, is
``test_the_instance_installs_the_wheel_of_what_runs_here_and_serves`` in test_ec2_wheels.py.
"""

from __future__ import annotations

import json
import shlex
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from plugins.backends.ec2.boot import fetch, write_tls
from plugins.backends.ec2.ca import CertificateAuthority
from plugins.backends.ec2.parameters import RUN_TAG, put_secret, to_delete
from plugins.backends.ec2.userdata import VENV, serve_lines
from studio_plugins.client import predict
from studio_plugins.testing import ServerProcess
from studio_plugins.tls import user_ca_file
from tests.plugins import test_ec2_backend
from tests.plugins.test_ec2_backend import (
    WRAPPER,
    cli,
    instance,
    launch,
    launched,
    live_instances,
    loopback_instances,
    run_user_data_locally,
    user_data,
)
from tests.plugins.test_ec2_fleet import launch_fleet, launched_fleet, template_user_data

cloud = test_ec2_backend.cloud
"""The fixture: moto with experiment ``exp`` in ``s3://models/prod``; an EC2 client."""
__all__ = ["loopback_instances"]  # a fixture too


def ssm() -> Any:
    import boto3

    return boto3.client("ssm")


def parameters() -> dict[str, dict[str, Any]]:
    """Every parameter in moto: name -> its type, tags and decrypted value."""
    client = ssm()
    found = {}
    for described in client.describe_parameters()["Parameters"]:
        name = described["Name"]
        tags = client.list_tags_for_resource(ResourceType="Parameter", ResourceId=name)["TagList"]
        value = client.get_parameter(Name=name, WithDecryption=True)["Parameter"]["Value"]
        found[name] = {"type": described["Type"], "tags": {t["Key"]: t["Value"] for t in tags},
                       "value": value}
    return found


def test_the_token_and_key_are_tagged_securestrings_not_in_user_data(cloud) -> None:
    code, out, err = launch()
    assert code == 0, err
    url, instance_id, token = launched(out)
    assert token and url.startswith("https://")
    run = {t["Key"]: t["Value"] for t in instance(cloud, instance_id)["Tags"]}[RUN_TAG]
    stored = parameters()
    assert set(stored) == {f"/studio-plug/{run}/token", f"/studio-plug/{run}/tls"}
    for parameter in stored.values():
        assert parameter["type"] == "SecureString"
        assert parameter["tags"] == {"studio-plug:managed": "true", RUN_TAG: run}
    assert stored[f"/studio-plug/{run}/token"]["value"] == token
    tls = json.loads(stored[f"/studio-plug/{run}/tls"]["value"])
    assert set(tls) == {"cert.pem", "key.pem"} and "PRIVATE KEY" in tls["key.pem"]

    script = user_data(cloud, instance_id)
    assert token not in script and "PRIVATE KEY" not in script and "CERTIFICATE" not in script
    assert f"/studio-plug/{run}/token" in script and f"/studio-plug/{run}/tls" in script
    # the certificate names the instance's address, signed by the CA whose file is printed
    assert f"curl --cacert {user_ca_file()} {url}v2/health/ready" in err
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(tls["cert.pem"].encode())
    address = instance(cloud, instance_id)["PublicIpAddress"]
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == [address]
    ca = x509.load_pem_x509_certificate(user_ca_file().read_bytes())
    certificate.verify_directly_issued_by(ca)

    # ls shows them beside the server; stop deletes them, and runs again without complaint
    code, listed, err = cli("ls")
    assert code == 0, err
    assert f"/studio-plug/{run}/tls,/studio-plug/{run}/token" in listed
    code, stopped, err = cli("stop", instance_id)
    assert code == 0, err
    assert f"deleted parameter /studio-plug/{run}/token" in stopped
    assert parameters() == {}
    assert cli("stop", "--all")[0] == 0


def test_a_failed_launch_deletes_its_parameters(cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    # the instance is never ready (moto's address answers nothing): after the tls parameter
    code, _out, err = launch("--wait-ready", "--launch-timeout", "2")
    assert code == 1
    assert err.count("cleaning up: deleting parameter /studio-plug/") == 2
    assert parameters() == {} and live_instances(cloud) == []

    # RunInstances fails: after the token's parameter, before the certificate's
    from moto import settings

    monkeypatch.setattr(settings, "ENABLE_KEYPAIR_VALIDATION", True)
    code, _out, err = launch("--key-name", "no-such-key")
    assert code == 1 and "InvalidKeyPair.NotFound" in err
    assert "cleaning up: deleting parameter /studio-plug/" in err
    assert parameters() == {}


def test_no_tls_serves_http_with_a_warning(cloud) -> None:
    code, out, err = launch("--no-tls")
    assert code == 0, err
    url, instance_id, token = launched(out)
    assert url.startswith("http://") and "warning: --no-tls" in err and "--cacert" not in err
    assert [name.rsplit("/", 1)[1] for name in parameters()] == ["token"]
    (line,) = serve_lines(user_data(cloud, instance_id))
    assert "--certfile" not in line and token not in line


def test_the_users_own_certificate_travels_as_a_parameter_not_a_path(
    cloud, tmp_path: Path
) -> None:
    issued = CertificateAuthority.load_or_create(tmp_path / "own-ca").issue(dns_names=["models.example"])
    certfile, keyfile = tmp_path / "cert.pem", tmp_path / "key.pem"
    certfile.write_bytes(issued.chain_pem)
    keyfile.write_bytes(issued.key_pem)
    code, out, err = launch("--certfile", str(certfile), "--keyfile", str(keyfile))
    assert code == 0, err
    _url, instance_id, _token = launched(out)
    script = user_data(cloud, instance_id)
    assert str(tmp_path) not in script and "PRIVATE KEY" not in script
    argv = shlex.split(serve_lines(script)[0])
    assert argv[argv.index("--certfile") + 1] == f"{VENV}/tls/cert.pem"
    (tls,) = [p for name, p in parameters().items() if name.endswith("/tls")]
    assert json.loads(tls["value"]) == {"cert.pem": issued.chain_pem.decode(),
                                        "key.pem": issued.key_pem.decode()}

    code, _out, err = launch("--certfile", str(certfile), "--keyfile", str(keyfile), "--no-tls")
    assert code == 2 or code == 1
    assert "--no-tls and --certfile contradict each other" in err
    code, _out, err = launch("--certfile", str(tmp_path / "missing.pem"), "--keyfile", str(keyfile))
    assert code != 0 and "missing.pem" in err and "Traceback" not in err
    code, _out, err = launch("--ca-certs", str(certfile))  # without a certificate of its own
    assert code != 0 and "--keyfile and --ca-certs go with --certfile" in err


def test_the_boot_fetch_waits_bounded_and_writes_private_files(aws, tmp_path: Path) -> None:
    client = ssm()
    with pytest.raises(SystemExit, match="cannot read parameter /studio-plug/none/tls: ParameterNotFound"):
        fetch(client, "/studio-plug/none/tls", wait=0.3, sleep=0.1)
    put_secret(client, "/studio-plug/r1/tls", json.dumps({"cert.pem": "C", "key.pem": "K"}),
               {"studio-plug:managed": "true", RUN_TAG: "r1"})
    write_tls(fetch(client, "/studio-plug/r1/tls", wait=0), tmp_path / "tls")
    assert (tmp_path / "tls" / "key.pem").read_text() == "K"
    assert (tmp_path / "tls").stat().st_mode & 0o777 == 0o700
    assert {(p.name, p.stat().st_mode & 0o777) for p in (tmp_path / "tls").iterdir()} == {
        ("cert.pem", 0o600), ("key.pem", 0o600)}
    with pytest.raises(SystemExit, match="not what the CLI writes"):  # no file of its choosing
        write_tls(json.dumps({"../../etc/cron.d/x": "evil"}), tmp_path / "tls")


def test_stop_deletes_parameters_left_behind_but_not_a_launch_under_way(aws) -> None:
    client = ssm()
    tags = {"studio-plug:managed": "true"}
    put_secret(client, "/studio-plug/orphan/token", "t", {**tags, RUN_TAG: "orphan"})
    put_secret(client, "/studio-plug/live/token", "t", {**tags, RUN_TAG: "live"})
    assert to_delete(client, [], ["live"], grace=0) == ["/studio-plug/orphan/token"]
    assert to_delete(client, [], ["live"]) == []  # young: may be a launch under way


def test_a_fleets_token_is_a_parameter_not_in_its_launch_template(fleet_cloud, tmp_path: Path) -> None:
    code, out, err = launch_fleet("--replicas", "1")
    assert code == 0, err
    _url, name, token = launched_fleet(out)
    (template,) = fleet_cloud.ec2.describe_launch_templates(LaunchTemplateNames=[name])["LaunchTemplates"]
    script = template_user_data(fleet_cloud, template["LaunchTemplateId"])
    assert token and token not in script
    ((parameter_name, parameter),) = parameters().items()
    assert parameter_name in script and parameter["value"] == token
    assert parameter["type"] == "SecureString"
    assert parameter["tags"]["studio-plug:managed"] == "fleet"
    assert parameter["tags"]["studio-plug:fleet"] == name
    code, listed, err = cli("ls")
    assert parameter_name in listed

    code, _out, err = launch_fleet("--replicas", "1", "--certfile", str(tmp_path / "c.pem"))
    assert code != 0 and "--certfile is for a single instance" in err

    code, _out, err = cli("stop", name)
    assert code == 0, err
    assert parameters() == {}
    code, _out, err = cli("stop", name)  # again: nothing left, no failure
    assert code in (0, 1) and "Traceback" not in err



@pytest.mark.timeout(120)
def test_wait_ready_verifies_the_instance_over_https_with_the_ca(
    cloud, loopback_instances, tmp_path: Path, free_tcp_port: int
) -> None:
    # the launch runs meanwhile; the "instance" (the user data's boot and serve lines, run here
    # on the address moto gave it, 127.0.0.1) waits for its certificate, as the real one does
    wrapper = tmp_path / "matmul_wrapper.py"
    wrapper.write_text(WRAPPER)
    result: dict[str, Any] = {}
    launching = threading.Thread(target=lambda: result.update(ran=launch(
        "--wait-ready", "--port", str(free_tcp_port), "--launch-timeout", "60",
        "--wrapper", str(wrapper))))
    launching.start()
    try:
        deadline = time.monotonic() + 30
        while not live_instances(cloud) and time.monotonic() < deadline:
            time.sleep(0.1)
        (instance_id,) = live_instances(cloud)
        argv, env = run_user_data_locally(user_data(cloud, instance_id), tmp_path / "instance")
        argv[argv.index("--port") + 1] = str(free_tcp_port)
        with ServerProcess(*argv, env=env, port=None) as server:
            launching.join(60)
            code, out, err = result["ran"]
            assert code == 0, err
            url, _instance_id, token = launched(out)
            assert url == f"https://127.0.0.1:{free_tcp_port}/" == server.url
            assert "waiting for " + url in err
            x = np.ones((1, 3), np.float32)
            assert predict(url, {"x": x}, token=token)["x"].tolist() == [[6.0]]
    finally:
        launching.join(60)
