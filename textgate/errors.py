"""Errors that textgate reports to users: each message names the problem and where it is."""


class TextgateError(Exception):
    """A problem with the user's input or configuration, reported without a traceback."""


class ConfigError(TextgateError):
    """params.yaml is missing, malformed, or has an unknown key or a wrong type."""


class DataError(TextgateError):
    """A data file is missing, unreadable, or has the wrong shape."""
