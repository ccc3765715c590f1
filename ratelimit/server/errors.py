"""Errors the servers raise to the process that runs them (its own module: every server imports it)."""


class ServerError(RuntimeError):
    """A server could not start (port taken, address not available)."""
