"""Errors raised at the boundary (configs, files): one line that names what is wrong."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


class DataError(RuntimeError):
    """A data set cannot be used as given (missing path, empty split, ...)."""
