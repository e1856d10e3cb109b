"""Errors a service raises about itself."""

from __future__ import annotations


class ConfigurationError(Exception):
    """The service cannot start as configured (a bad setting, a missing model, a taken port).

    Raised from `__init__` or `@async_on_start`, it ends the worker with `EXIT_CONFIG`: the
    supervisor stops the graph and `dynamo serve` exits with the message, instead of
    restarting a worker that would fail the same way forever.
    """


EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: a worker that cannot start as configured
