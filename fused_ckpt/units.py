"""Byte sizes: parsing (``"24GiB"``, ``"80GB"``, ``1.5e11``) and printing.

One parser for every size the project reads: :class:`fused_ckpt.policy.MemoryBudget`,
:func:`fused_ckpt.plan`, and the ``fused-ckpt`` options ``--budget`` and ``--memory-cap``.
Depends on nothing else in the package.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def _parse_size(value, what: Optional[str]):
    """(bytes, whether a unit was written) of an int, an integral float or a string."""
    subj = what or "byte size"
    pre = f"{what}: " if what else ""
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
        raise ValueError(f"{pre}malformed byte size {value!r}: expected a number of bytes or a string such as "
                         "'24GiB'")
    if isinstance(value, numbers.Integral):
        n = int(value)
        if n < 0:
            raise ValueError(f"{subj} must be positive, got {value!r}")
        return n, False
    if isinstance(value, numbers.Real):
        v = float(value)
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"{subj} must be a finite positive number of bytes, got {value!r}")
        if not v.is_integer():
            raise ValueError(f"{subj} {value!r} is not a whole number of bytes")
        return int(v), False
    s = value.strip().lower().replace(" ", "").replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = s[len(num):]
    if unit not in _UNITS or not num:
        raise ValueError(f"{pre}malformed byte size {value!r}: expected a number with an optional unit "
                         "(B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 24GiB")
    try:
        v = float(num)
    except ValueError:
        raise ValueError(f"{pre}malformed byte size {value!r}: {num!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{subj} must be a finite positive number, got {value!r}")
    if not unit and not v.is_integer():
        raise ValueError(f"{subj} {value!r} is not a whole number of bytes; add a unit, e.g. {num}GiB")
    return int(round(v * _UNITS[unit])), bool(unit)


def parse_bytes(value, what: Optional[str] = None) -> int:
    """A byte count from an int, an integral float (``1.5e11``) or a string: ``"24GiB"``,
    ``"24 GB"``, ``"512MiB"``, ``"1.5e11"``, ``"1000"`` (bytes). GB/MB/KB/TB are decimal,
    GiB/MiB/KiB/TiB and bare G/M/K/T binary. Zero is allowed; negative, non-finite or
    fractional byte counts and anything else raise ValueError (naming ``what`` when given)."""
    return _parse_size(value, what)[0]


def parse_budget(value, what: Optional[str] = "budget", *, require_unit: bool = False) -> int:
    """A memory budget in bytes: the one parser behind :class:`MemoryBudget`,
    :func:`fused_ckpt.plan` and the ``fused-ckpt`` options ``--budget`` and ``--memory-cap``.
    The forms of :func:`parse_bytes`; the result must be positive. ``require_unit``: a bare
    number such as ``"24"`` is refused (it would mean 24 bytes); the command line sets it."""
    n, has_unit = _parse_size(value, what)
    if n <= 0:
        raise ValueError(f"{what or 'size'} must be positive, got {value!r}")
    if require_unit and isinstance(value, str) and not has_unit:
        v = value.strip()
        raise ValueError(f"{what + ' ' if what else ''}{v!r} has no unit (as written it means {n} bytes): "
                         f"write e.g. {v}GiB or {v}GB, or {v}B for bytes")
    return n


def format_bytes(n: Optional[int]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


__all__ = ["parse_bytes", "parse_budget", "format_bytes"]
