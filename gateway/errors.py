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


class NotFoundError(GatewayError):
    pass


class TransitionError(GatewayError):
    pass
