"""Errors a user can act on.

Every error lineguard raises on purpose is a ``LineguardError``; its message names what failed,
the offending value and what to do about it. The CLI prints these as one line, without a
traceback, so an operator reads the fix instead of a stack.
"""


class LineguardError(Exception):
    """Base class for errors whose message tells the user what to do."""


class ConfigError(LineguardError):
    """A setting, argument or model configuration is invalid."""


class WeightsError(LineguardError):
    """Pretrained weights are missing, unreadable or do not fit the architecture."""


class BundleError(LineguardError):
    """A model bundle is missing, incomplete, tampered with or from an unknown schema."""


class RuntimeUnavailableError(LineguardError):
    """The requested runtime or device cannot be used on this machine."""


class InputError(LineguardError):
    """An input image or batch has the wrong shape, dtype or size."""
