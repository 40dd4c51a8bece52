"""The few exceptions that cross module boundaries. Each carries a one-line message
meant for the operator (CLI) or, for `SmtpReplyError`, the SMTP reply to send."""


class GatewayError(Exception):
    """A user-facing error: the CLI prints str(err) on one line and exits 1."""


class ConfigError(GatewayError):
    pass


class StoreError(GatewayError):
    pass


class SchemaTooNewError(StoreError):
    pass


class ClaimLost(StoreError):
    """PostgreSQL: a message's claim passed to another node while this one worked."""


class NotFoundError(GatewayError):
    pass


class TransitionError(GatewayError):
    pass


def expected_failure(err: BaseException) -> str | None:
    """The one-line reason when `err` is a failure operation must expect: our own
    StoreError, a locked or full database, disk full, an I/O error, permission
    denied. None for anything else, which is a bug and keeps its traceback."""
    import sqlite3

    if isinstance(err, StoreError):
        return str(err)
    if isinstance(err, sqlite3.OperationalError):
        return f"database: {err}"
    if isinstance(err, OSError) and err.errno is not None:
        where = f": {err.filename}" if err.filename else ""
        return f"{err.strerror or err}{where}"
    return None
