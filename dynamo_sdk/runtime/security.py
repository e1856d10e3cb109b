"""Credentials and TLS for NATS and etcd, for every process of a graph.

Each server takes its credentials from environment variables (what `dynamo serve` hands its
workers) or from the URL itself (`nats://user:pass@host:4222`, `https://user:pass@host:2379`):

* NATS: ``NATS_USER`` + ``NATS_PASSWORD``, or ``NATS_TOKEN``, or ``NATS_CREDS`` (a JWT
  ``.creds`` file), or ``NATS_NKEY_SEED`` (an NKey seed file); TLS with ``NATS_TLS_CA`` (the CA
  that signed the server's certificate; a ``tls://`` URL alone uses the system's roots) and,
  for servers that verify clients, ``NATS_TLS_CERT`` + ``NATS_TLS_KEY``.
* etcd: ``ETCD_USER`` + ``ETCD_PASSWORD``; TLS for ``https://`` endpoints (or any endpoint
  when ``ETCD_CA_CERT`` is set) with ``ETCD_CA_CERT`` and, for client certificates,
  ``ETCD_CERT`` + ``ETCD_KEY``.

The TCP response plane's peers prove ``DYN_GRAPH_SECRET`` to each other (`response_plane`);
`dynamo serve` generates one when it is unset (`new_graph_secret`). A graph across hosts sets
the same value on every host.

URLs are redacted (`redact`) wherever they are logged or put in an error.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aetcd
import grpc
from aetcd import rpc

GRAPH_SECRET_ENV = "DYN_GRAPH_SECRET"
MIN_SECRET_LENGTH = 16


def new_graph_secret() -> str:
    """A random per-graph secret (256 bits, URL-safe text) for `GRAPH_SECRET_ENV`."""
    return secrets.token_urlsafe(32)


class SecurityConfigError(ValueError):
    """A credential or TLS setting that cannot be used (a missing file, half a pair)."""


def redact(url: str) -> str:
    """``url`` (or a comma-separated list of them) with any password replaced by ``***``,
    for logs and error messages."""
    if "," in url:
        return ",".join(redact(one) for one in url.split(","))
    parts = urlsplit(url if "://" in url else f"//{url}")
    if parts.password is None and not (parts.username and "@" in parts.netloc):
        return url
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or ""
    netloc = f"{user}:***@{host}" if parts.password is not None else f"***@{host}"
    out = urlunsplit(parts._replace(netloc=netloc))
    return out if "://" in url else out.removeprefix("//")


def _file(env: dict[str, str] | os._Environ[str], name: str) -> str | None:
    value = env.get(name, "").strip()
    if not value:
        return None
    if not Path(value).is_file():
        raise SecurityConfigError(f"{name}={value!r}: no such file")
    return value


@dataclass
class NatsSecurity:
    """How to authenticate to NATS and whether to use TLS (see module docstring)."""

    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None
    nkey_seed_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] | None = None) -> NatsSecurity:
        env = os.environ if env is None else env
        sec = cls(
            user=env.get("NATS_USER") or None,
            password=env.get("NATS_PASSWORD") or None,
            token=env.get("NATS_TOKEN") or None,
            creds_file=_file(env, "NATS_CREDS"),
            nkey_seed_file=_file(env, "NATS_NKEY_SEED"),
            tls_ca=_file(env, "NATS_TLS_CA"),
            tls_cert=_file(env, "NATS_TLS_CERT"),
            tls_key=_file(env, "NATS_TLS_KEY"),
        )
        if (sec.user is None) != (sec.password is None):
            raise SecurityConfigError("set both NATS_USER and NATS_PASSWORD, or neither")
        if (sec.tls_cert is None) != (sec.tls_key is None):
            raise SecurityConfigError("set both NATS_TLS_CERT and NATS_TLS_KEY, or neither")
        return sec

    def connect_options(self, urls: list[str]) -> dict[str, Any]:
        """Keyword arguments for `nats.connect` (credentials in a URL are nats-py's own)."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"], options["password"] = self.user, self.password
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            options["user_credentials"] = self.creds_file
        if self.nkey_seed_file is not None:
            options["nkeys_seed"] = self.nkey_seed_file
        if self.tls_ca or self.tls_cert or any(u.startswith("tls://") for u in urls):
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert is not None:
                context.load_cert_chain(self.tls_cert, self.tls_key)
            options["tls"] = context
        return options


@dataclass
class EtcdSecurity:
    """How to authenticate to etcd and whether to use TLS (see module docstring)."""

    user: str | None = None
    password: str | None = None
    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ[str] | None = None) -> EtcdSecurity:
        env = os.environ if env is None else env
        sec = cls(
            user=env.get("ETCD_USER") or None,
            password=env.get("ETCD_PASSWORD") or None,
            ca=_file(env, "ETCD_CA_CERT"),
            cert=_file(env, "ETCD_CERT"),
            key=_file(env, "ETCD_KEY"),
        )
        if (sec.user is None) != (sec.password is None):
            raise SecurityConfigError("set both ETCD_USER and ETCD_PASSWORD, or neither")
        if (sec.cert is None) != (sec.key is None):
            raise SecurityConfigError("set both ETCD_CERT and ETCD_KEY, or neither")
        return sec


@dataclass(frozen=True)
class EtcdEndpoint:
    """One etcd endpoint as a client needs it: where, who, and whether over TLS."""

    host: str
    port: int
    tls: bool
    user: str | None
    password: str | None

    @classmethod
    def parse(cls, endpoint: str, security: EtcdSecurity) -> EtcdEndpoint:
        """``http(s)://[user:pass@]host[:port]`` or ``host[:port]``; the URL's credentials
        win over the environment's; TLS for https or when a CA is configured."""
        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        if parts.scheme not in ("http", "https"):
            raise SecurityConfigError(f"etcd endpoint {redact(endpoint)!r}: use http or https")
        if not parts.hostname:
            raise SecurityConfigError(f"etcd endpoint {redact(endpoint)!r} names no host")
        user = unquote(parts.username) if parts.username else security.user
        password = unquote(parts.password) if parts.password else security.password
        tls = parts.scheme == "https" or security.ca is not None
        return cls(parts.hostname, parts.port or 2379, tls, user, password)

    def client(self, security: EtcdSecurity, timeout: float) -> aetcd.Client:
        """An (unconnected) etcd client for this endpoint."""
        cls = TlsEtcdClient if self.tls else aetcd.Client
        client = cls(
            host=self.host,
            port=self.port,
            username=self.user,
            password=self.password,
            timeout=int(max(timeout, 1)),
        )
        if isinstance(client, TlsEtcdClient):
            client.credentials = _grpc_credentials(security)
        return client


def clone_client(client: aetcd.Client) -> aetcd.Client:
    """A new, unconnected client to the same endpoint with the same credentials and TLS (for
    a thread with its own event loop: gRPC's asyncio channels are per loop)."""
    twin = type(client)(
        host=client._host,
        port=client._port,
        username=client._username,
        password=client._password,
        timeout=client._timeout,
    )
    if isinstance(client, TlsEtcdClient):
        twin.credentials = client.credentials
    return twin


def _grpc_credentials(security: EtcdSecurity) -> grpc.ChannelCredentials:
    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(security.ca),
        private_key=read(security.key),
        certificate_chain=read(security.cert),
    )


class TlsEtcdClient(aetcd.Client):
    """aetcd's client over a TLS channel (aetcd itself opens plain channels only).

    Its `connect` opens the channel with ``credentials`` and builds the same stubs and
    watcher aetcd's does, then leaves the rest (authentication included) to aetcd's methods.
    """

    credentials: grpc.ChannelCredentials | None = None
    _is_connecting: bool  # aetcd's, set in its __init__

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            target = f"{self._host}:{self._port}"
            self.channel = rpc.secure_channel(
                target, self.credentials, options=list(self._options.items())
            )
            await self._open_stubs()
            self._connected.set()
        except grpc.aio.AioRpcError as exc:
            aetcd.exceptions._handle_exception(exc)
        finally:
            self._is_connecting = False

    async def _open_stubs(self) -> None:
        if self._username is not None:
            self.auth_stub = rpc.AuthStub(self.channel)
            reply = await self.auth_stub.Authenticate(
                rpc.AuthenticateRequest(name=self._username, password=self._password),
                timeout=self._timeout,
            )
            self.metadata = (("token", reply.token),)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = aetcd.client.watcher.Watcher(
            rpc.WatchStub(self.channel), timeout=self._timeout, metadata=self.metadata
        )
