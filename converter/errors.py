"""Errors the CLI turns into one clear sentence and a non-zero exit (no traceback)."""


class ConversionError(Exception):
    """A problem the user can fix (bad input, impossible settings); the message says how."""


class UnsupportedModelError(ConversionError):
    """The source model uses a feature the conversion cannot keep exact or meaningful."""
