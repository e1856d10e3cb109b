"""Small process helpers shared by the supervisor and the embedded servers."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c")
    return ctypes.CDLL(libc_name, use_errno=True).prctl if libc_name else None


# Resolved once, in the parent: `find_library` runs `ldconfig`, which must not happen between
# fork and exec in a process that has threads (gRPC's, for etcd): that can crash the child.
_prctl = _load_prctl()


def die_with_parent() -> None:
    """`preexec_fn` for children: on Linux, receive SIGTERM when the parent dies.

    So a supervisor killed with SIGKILL leaves no orphan workers or servers behind. It only
    makes one system call, as a function run between fork and exec must.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)  # type: ignore[operator]
