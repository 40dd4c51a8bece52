"""s4e-gateway: the inbound e-mail-to-ticket gateway of S4E's service desk."""

__version__ = "0.1.0"
