"""Single byte-range parsing (RFC 9110 §14.1.2), as much as the simulated backend supports."""

from __future__ import annotations


class RangeNotSatisfiable(ValueError):
    """The range lies wholly outside the representation (answer 416)."""


def parse_single_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(first, last) inclusive for one `bytes=` range, or None to serve the whole file
    (no header, a malformed one, or several ranges — all allowed to be ignored by the RFC)."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    start_text, dash, end_text = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if start_text == "":
            suffix = int(end_text)
            if suffix <= 0:
                raise RangeNotSatisfiable(header)
            return max(size - suffix, 0), size - 1
        first = int(start_text)
        last = int(end_text) if end_text else size - 1
    except ValueError:
        return None
    if first >= size:
        raise RangeNotSatisfiable(header)
    if first < 0 or last < first:
        return None
    return first, min(last, size - 1)
