"""PURE: client- and upstream-controlled values made safe for one log line.

A path, job key, header value or error message logged as received lets its sender write log
lines of their own (a CR/LF, a U+2028 that a viewer breaks on, a bidi override that reorders what
an operator reads). `log_safe` escapes all of those visibly and bounds the length, the way repr()
shows a string, without the quotes. Call it only once a line is known to be emitted
(`logger.isEnabledFor`): the guarded hot path must not pay for logs nobody writes.
"""

from __future__ import annotations

MAX_LOGGED_CHARS = 256
ELLIPSIS = "…"  # marks a value cut at MAX_LOGGED_CHARS


def log_safe(value: str | bytes, limit: int = MAX_LOGGED_CHARS) -> str:
    """`value` as printable text on one line, at most `limit` characters plus ELLIPSIS.

    Kept: every character str.isprintable() accepts (printable UTF-8, including non-ASCII).
    Escaped: backslash as `\\\\` (so an escape can't be forged), and everything else — C0 and C1
    controls, DEL, line and paragraph separators, format characters (bidi overrides), lone
    surrogates, unassigned code points — as `\\xNN`, `\\uNNNN` or `\\UNNNNNNNN`. Bytes are read
    as UTF-8; a byte that is not part of valid UTF-8 shows as `\\xNN`. Escapes are never cut.
    """
    text = value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value
    if len(text) <= limit and text.isprintable() and "\\" not in text:
        return text  # the common case: nothing to escape
    pieces: list[str] = []
    size = 0
    for char in text:
        piece = _escaped(char, from_bytes=isinstance(value, bytes))
        if size + len(piece) > limit:
            pieces.append(ELLIPSIS)
            break
        pieces.append(piece)
        size += len(piece)
    return "".join(pieces)


def _escaped(char: str, *, from_bytes: bool) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    code = ord(char)
    if from_bytes and 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for a raw byte
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
