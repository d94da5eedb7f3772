"""Byte sizes written by people ('5GB', '512MiB', a plain count), parsed in one place."""

from __future__ import annotations

from converter.errors import ConversionError

UNITS = {
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "B": 1,
}


def parse_bytes(text: str, flag: str) -> int:
    """'5GB', '2GiB', '512MiB' or a byte count -> bytes (GiB = 2**30, GB = 10**9)."""
    t = str(text).strip().upper().replace(" ", "")
    try:
        unit = next((u for u in UNITS if t.endswith(u)), None)
        value = int(float(t[: -len(unit)]) * UNITS[unit]) if unit else int(t)
    except (ValueError, OverflowError):
        raise ConversionError(
            f"{flag} {text!r} is not a size like 5GB, 512MiB or a byte count"
        ) from None
    if value < 1:
        raise ConversionError(f"{flag} {text!r} must be positive")
    return value
