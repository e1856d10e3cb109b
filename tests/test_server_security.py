"""Credentials and TLS to NATS and etcd (`dynamo_sdk/runtime/security.py`), against real
servers: the embedded default refuses clients without its generated credentials; the
`NATS_*` / `ETCD_*` variables carry user/password and TLS to every runtime."""

from __future__ import annotations

import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import nats
import pytest

from dynamo_sdk.runtime import DistributedRuntime, RuntimeSettings
from dynamo_sdk.runtime.discovery import connect_etcd
from dynamo_sdk.runtime.errors import RuntimeConnectionError
from dynamo_sdk.runtime.security import (
    EtcdSecurity,
    NatsSecurity,
    SecurityConfigError,
    redact,
)
from dynamo_sdk.serve.embedded import (
    EmbeddedServers,
    _spawn,
    _wait_for_port,
    find_binary,
    free_port,
)
from tests.conftest import bare, settings_for


async def test_the_embedded_servers_refuse_clients_without_their_credentials(
    servers: EmbeddedServers,
) -> None:
    assert "@" in servers.nats.url and "@" in servers.etcd.url
    assert stat.S_IMODE((servers.workdir / "nats.conf").stat().st_mode) == 0o600
    tls = servers.workdir / "tls"  # etcd's CA and certificates: the owner's alone
    assert stat.S_IMODE(tls.stat().st_mode) == 0o700
    assert {f.name: stat.S_IMODE(f.stat().st_mode) for f in tls.iterdir()} == {
        name: 0o600 for name in ("ca.pem", "server.pem", "server-key.pem", "client.pem",
                                 "client-key.pem")
    }  # fmt: skip
    with pytest.raises(Exception, match=r"(?i)authorization"):
        await nats.connect(bare(servers.nats.url), allow_reconnect=False, connect_timeout=2)
    # etcd takes no client without a certificate from the graph's CA: not one call is read
    # (its lease calls need no password), whether or not the client trusts etcd's CA
    for outsider in (EtcdSecurity(), EtcdSecurity(ca=servers.etcd_security.ca)):
        with pytest.raises(RuntimeConnectionError, match=r"(?i)handshake"):
            await connect_etcd([bare(servers.etcd.url)], timeout=2.0, security=outsider)
    # with them, the runtime works (every other test of the suite runs this way too)
    rt = await DistributedRuntime.connect(settings_for(servers))
    await rt.shutdown()


async def test_credentials_from_the_environment(servers: EmbeddedServers) -> None:
    """The URLs bare, the user and password in NATS_USER/NATS_PASSWORD and
    ETCD_USER/ETCD_PASSWORD, as a deployment would set them."""
    nats_url, etcd_url = urlsplit(servers.nats.url), urlsplit(servers.etcd.url)
    env = {
        "NATS_USER": nats_url.username or "",
        "NATS_PASSWORD": nats_url.password or "",
        "ETCD_USER": etcd_url.username or "",
        "ETCD_PASSWORD": etcd_url.password or "",
        **servers.etcd.env,  # the TLS files: the embedded etcd takes certified clients only
    }
    settings = RuntimeSettings(
        nats_url=bare(servers.nats.url),
        etcd_endpoints=[bare(servers.etcd.url)],
        nats_security=NatsSecurity.from_env(env),
        etcd_security=EtcdSecurity.from_env(env),
    )
    rt = await DistributedRuntime.connect(settings)
    try:
        await rt.put_leased("security/probe", b"ok")
        got = await rt.etcd.get(b"security/probe")
        assert got is not None and got.value == b"ok"
    finally:
        await rt.shutdown()
    wrong = RuntimeSettings(
        nats_url=bare(servers.nats.url),
        etcd_endpoints=[bare(servers.etcd.url)],
        nats_security=NatsSecurity(user="dynamo", password="wrong"),
    )
    with pytest.raises(RuntimeConnectionError) as caught:
        await DistributedRuntime.connect(wrong)
    assert "wrong" not in str(caught.value)


def test_half_a_credential_pair_or_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SecurityConfigError, match="NATS_PASSWORD"):
        NatsSecurity.from_env({"NATS_USER": "u"})
    with pytest.raises(SecurityConfigError, match="ETCD_USER"):
        EtcdSecurity.from_env({"ETCD_PASSWORD": "p"})
    with pytest.raises(SecurityConfigError, match="no such file"):
        NatsSecurity.from_env({"NATS_TLS_CA": str(tmp_path / "missing.pem")})
    with pytest.raises(SecurityConfigError, match="ETCD_KEY"):
        EtcdSecurity.from_env({"ETCD_CERT": __file__})


def test_passwords_never_reach_a_log_line() -> None:
    assert redact("nats://dynamo:s3cret@127.0.0.1:4222") == "nats://dynamo:***@127.0.0.1:4222"
    assert (
        redact("http://root:s3cret@a:2379,http://b:2379") == "http://root:***@a:2379,http://b:2379"
    )
    assert redact("nats://token@h:4222") == "nats://***@h:4222"
    assert redact("127.0.0.1:2379") == "127.0.0.1:2379"


# ---- TLS: a CA, a certificate for 127.0.0.1, servers that speak only TLS ------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
        "-days", "1", "-subj", "/CN=dynamo-test-ca")  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")  # fmt: skip
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.cnf")  # fmt: skip
    return d


@pytest.fixture
def tls_servers(pki: Path, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """nats-server and etcd that accept TLS clients only; their URLs."""
    nats_port, etcd_port, peer_port = free_port(), free_port(), free_port()
    conf = tmp_path / "nats.conf"
    conf.write_text(
        f'listen: "127.0.0.1:{nats_port}"\n'
        f'tls {{ cert_file: "{pki / "server.pem"}", key_file: "{pki / "server.key"}" }}\n'
    )
    etcd_url = f"https://127.0.0.1:{etcd_port}"
    peer = f"http://127.0.0.1:{peer_port}"
    procs = []
    with open(tmp_path / "servers.log", "wb") as log:
        procs.append(_spawn([find_binary("nats-server"), "-c", str(conf)], log))
        procs.append(_spawn([
            find_binary("etcd"), "--name", "tls", "--data-dir", str(tmp_path / "etcd"),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"tls={peer}", "--log-level", "error",
            "--cert-file", str(pki / "server.pem"), "--key-file", str(pki / "server.key"),
        ], log))  # fmt: skip
    try:
        _wait_for_port(nats_port, procs[0], "nats-server", 15)
        _wait_for_port(etcd_port, procs[1], "etcd", 30)
        yield f"nats://127.0.0.1:{nats_port}", etcd_url
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_tls_to_both_servers_with_the_configured_ca(
    pki: Path, tls_servers: tuple[str, str]
) -> None:
    nats_url, etcd_url = tls_servers
    env = {"NATS_TLS_CA": str(pki / "ca.pem"), "ETCD_CA_CERT": str(pki / "ca.pem")}
    settings = RuntimeSettings(
        nats_url=nats_url,
        etcd_endpoints=[etcd_url],
        nats_security=NatsSecurity.from_env(env),
        etcd_security=EtcdSecurity.from_env(env),
    )
    rt = await DistributedRuntime.connect(settings)
    try:

        async def echo(n: int):  # type: ignore[no-untyped-def]
            yield n

        await rt.serve_endpoint("tls", "Echo", "generate", echo, request_type=int)
        client = rt.endpoint_client("tls", "Echo", "generate", response_type=int)
        assert await client.wait_for_instance_ids(5.0) == [rt.instance_id]
        assert await client.direct(rt.instance_id, 7) == 7
    finally:
        await rt.shutdown()

    # an https:// endpoint keeps its scheme: without the CA the server is not trusted, and
    # a plain client of the TLS-only servers gets nowhere
    with pytest.raises(RuntimeConnectionError):
        await connect_etcd([etcd_url], timeout=2.0)
    with pytest.raises(Exception):  # noqa: B017 (nats-py raises several types here)
        await nats.connect(nats_url, allow_reconnect=False, connect_timeout=2)
