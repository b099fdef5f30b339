"""Hypothesis strategies for what an upstream answers: HTTP/1.x response byte streams, valid and
not, with `1xx` interims, every framing and its misuses, bytes beyond the message, truncation,
and the pieces and pauses in which the bytes go out.

`wild=False` draws only well-formed, well-framed answers that any HTTP/1.1 client must read
(they keep a fail-closed-on-everything client from passing the suite).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hypothesis import strategies as st

from tests.conformance.replay import Answer

CRLF = b"\r\n"
# A complete response glued after the real one: if it ever reaches anyone, a client was served
# bytes the upstream sent unasked (response splitting / a poisoned keep-alive connection).
FORGED = (
    b"HTTP/1.1 302 Found\r\nLocation: http://evil.invalid/\r\nSet-Cookie: session=forged\r\n"
    b"Content-Length: 6\r\n\r\nforged"
)
MAX_BODY = 72 * 1024
TCHAR = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
COMMON_STATUS = [200, 200, 200, 201, 204, 206, 301, 302, 304, 400, 404, 410, 500, 502, 503]
CLEAN_HEADERS = [
    (b"Content-Type", b"text/plain; charset=utf-8"),
    (b"Server", b"legacy/1.0"),
    (b"Set-Cookie", b"sid=abc; Path=/; HttpOnly"),
    (b"Set-Cookie", b"theme=dark"),
    (b"Cache-Control", b"no-store"),
    (b"ETag", b'"v1-abc"'),
    (b"Retry-After", b"2"),
    (b"Access-Control-Allow-Origin", b"*"),
    (b"X-Empty", b""),
]
BAD_HEADER_LINES = [
    b"Bad Name: v",  # space in a field name
    b": no-name",
    b"NoColon",
    b"X-Space-Before-Colon : v",
    b"X-Folded: first\r\n second",  # obs-fold
    b"X-Nul: a\x00b",
    b"X-Bare-CR: a\rb",
    b"X-Del: a\x7fb",
    b"\x80X-Name: v",
    b"X-Ctl: a\x01b",
]
CONNECTION_VALUES = [b"close", b"keep-alive", b"Close", b"keep-alive, close", b"upgrade", b"x-foo"]
TE_ODD = [
    [b"Chunked"],
    [b"CHUNKED"],
    [b"gzip, chunked"],
    [b"chunked, gzip"],
    [b"chunked, chunked"],
    [b"identity"],
    [b"gzip"],
    [b"x-unknown"],
    [b"gzip", b"chunked"],
    [b"chunked", b"chunked"],
    [b"chunked;q=1"],
]
INTERIM_FIELDS = [
    b"",
    b"Link: </style.css>; rel=preload; as=style\r\n",
    b"Content-Length: 5\r\n",  # a 1xx response has no content, whatever it says
    b"Transfer-Encoding: chunked\r\n",
]
UPGRADES = [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
]


def rare(one_in: int) -> st.SearchStrategy[bool]:
    """True about once in `one_in` draws; shrinks to False."""
    return st.integers(0, one_in - 1).map(lambda n: n == one_in - 1)


@dataclass(frozen=True)
class Body:
    data: bytes
    characters: int  # its length in characters (non-ASCII text counts one per character)


@st.composite
def bodies(draw: st.DrawFn) -> Body:
    unit = draw(st.text(alphabet=st.sampled_from("abc xyz0\né€😀"), min_size=1, max_size=8))
    size = draw(st.one_of(st.integers(0, 40), st.integers(0, 3000), st.integers(60_000, 70_000)))
    text = (unit * (size // len(unit) + 1))[:size]
    return Body(text.encode()[:MAX_BODY], size)


@st.composite
def status_lines(draw: st.DrawFn, wild: bool) -> tuple[bytes, int]:
    """The status line (without its line end) and the status code it means."""
    if not wild:
        code = draw(st.sampled_from(COMMON_STATUS))
        return b"HTTP/1.1 %d %s" % (code, draw(st.sampled_from([b"OK", b"Whatever"]))), code
    version = draw(
        st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0"] * 2 + [b"HTTP/2.0", b"http/1.1"])
    )
    code = draw(
        st.one_of(
            st.sampled_from(COMMON_STATUS),
            st.integers(100, 599),
            st.sampled_from([0, 99, 600, 999]),
        )
    )
    status = b"%03d" % code
    if draw(rare(12)):
        status = draw(st.sampled_from([b"20", b"2000", b"+200", b"2OO", b" 200", b"-1"]))
    reason = draw(
        st.sampled_from([b" OK", b" OK", b" Not Found", b"", b" ", b" Gr\xfc\xdfe", b" a\tb  c"])
    )
    return version + b" " + status + reason, code


@st.composite
def header_lines(draw: st.DrawFn, wild: bool) -> list[bytes]:
    """Header fields other than framing and Connection, as lines without their line end."""
    fields = draw(st.lists(st.sampled_from(CLEAN_HEADERS), max_size=4))
    lines = [name + b": " + value for name, value in fields]
    if wild:
        for _ in range(draw(st.integers(0, 2))):
            name = draw(st.text(alphabet=TCHAR, min_size=1, max_size=10)).encode()
            value = draw(
                st.binary(max_size=12).map(
                    lambda b: bytes(c for c in b if c in (9, 32) or 0x21 <= c <= 0x7E or c > 0x7F)
                )
            )
            sep = draw(st.sampled_from([b": ", b":", b":\t", b":  "]))
            trail = draw(st.sampled_from([b"", b"", b"", b" ", b"\t "]))
            lines.append(name + sep + value.strip(b" \t") + trail)
        if draw(rare(8)):
            lines.append(draw(st.sampled_from(BAD_HEADER_LINES)))
    return lines


@st.composite
def chunked(draw: st.DrawFn, body: bytes, wild: bool) -> bytes:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(body)), max_size=4))))
    bounds = [0, *cuts, len(body)]
    pieces = [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]
    eol = b"\n" if wild and draw(rare(20)) else CRLF
    out = []
    for piece in pieces:
        size = b"%x" % len(piece)
        if wild:
            size = draw(st.sampled_from([size, size, size.upper(), b"00" + size]))
            if draw(rare(10)):
                size += draw(st.sampled_from([b";ext=1", b';name="quoted value"', b" ;bad"]))
            if draw(rare(15)):  # a wrong chunk size
                size = b"%x" % max(0, len(piece) + draw(st.sampled_from([-2, -1, 1, 3])))
        out += [size, eol, piece, eol]
    last = draw(st.sampled_from([b"0", b"0", b"000", b"0;done"])) if wild else b"0"
    out += [last, eol]
    if wild and draw(rare(5)):
        out += [draw(st.sampled_from([b"Trailer-Field: t", b"Set-Cookie: trailer=1"])), eol]
    out.append(eol)
    return b"".join(out)


@st.composite
def framed(draw: st.DrawFn, body: Body, wild: bool) -> tuple[list[bytes], bytes]:
    """Framing header lines and the body as sent."""
    n = len(body.data)
    kinds = ["length", "chunked", "close"]
    if wild:
        kinds += ["length", "chunked", "chars", "length-odd", "length-dup", "te-odd", "te+length"]
    kind = draw(st.sampled_from(kinds))
    if kind == "length":
        return [b"Content-Length: %d" % n], body.data
    if kind == "chunked":
        return [b"Transfer-Encoding: chunked"], draw(chunked(body.data, wild))
    if kind == "close":
        return [], body.data
    if kind == "chars":  # Content-Length counted in characters, not UTF-8 bytes
        return [b"Content-Length: %d" % body.characters], body.data
    if kind == "length-odd":
        value = draw(
            st.sampled_from(
                [
                    b"00%d" % n,
                    b"+%d" % n,
                    b"-%d" % n,
                    b"%d, %d" % (n, n),
                    b"%d,%d" % (n, n + 1),
                    b"0x%x" % n,
                    b"",
                    b"%d.0" % n,
                    b"99999999999999999999",
                    b"18446744073709551615",
                    b"%d" % (n + 7),  # longer than what follows: truncated
                    b"%d" % max(0, n - 2),  # shorter: the rest is beyond the message
                ]
            )
        )
        return [b"Content-Length: " + value], body.data
    if kind == "length-dup":
        second = n if draw(st.booleans()) else n + 1
        return [b"Content-Length: %d" % n, b"Content-Length: %d" % second], body.data
    if kind == "te-odd":
        codings = draw(st.sampled_from(TE_ODD))
        lines = [b"Transfer-Encoding: " + coding for coding in codings]
        last = codings[-1].lower()
        return lines, draw(chunked(body.data, wild)) if last.startswith(b"chunked") else body.data
    lengths = [n, len(draw(chunked(body.data, wild=False)))]  # "te+length"
    te_first = draw(st.booleans())
    te, cl = b"Transfer-Encoding: chunked", b"Content-Length: %d" % draw(st.sampled_from(lengths))
    return ([te, cl] if te_first else [cl, te]), draw(chunked(body.data, wild))


@st.composite
def interim_responses(draw: st.DrawFn, wild: bool) -> bytes:
    """A 1xx answer before the final one: 100, 102, 103 or (wild) any other 1xx, with fields
    that would frame a body on another status, and (wild, rarely) bytes that look like one."""
    code = draw(st.sampled_from([100, 103] if not wild else [100, 102, 103, 104, 150, 199]))
    fields = draw(st.sampled_from(INTERIM_FIELDS if wild else INTERIM_FIELDS[:2]))
    tail = (
        draw(st.sampled_from([b"5\r\nhello\r\n0\r\n\r\n", b"hello"]))
        if wild and draw(rare(4))
        else b""
    )
    return b"HTTP/1.1 %d Interim\r\n" % code + fields + CRLF + tail


@st.composite
def messages(draw: st.DrawFn, method: str, wild: bool) -> bytes:
    """1xx interims, then one response, then (wild) bytes beyond its end."""
    interims = draw(st.lists(interim_responses(wild), max_size=2 if wild else 1))
    if wild and draw(rare(10)):
        interims.append(draw(st.sampled_from(UPGRADES)))
    status_line, code = draw(status_lines(wild))
    body = draw(bodies())
    if not wild and code in (204, 304):
        body = Body(b"", 0)
    framing, payload = draw(framed(body, wild))
    if not wild and code in (204, 304):
        framing, payload = [], b""
    if not wild and method == "HEAD":
        payload = b""  # the framing headers describe the body a GET would get
    lines = [*draw(header_lines(wild)), *framing]
    connection = draw(st.sampled_from([None, None, None, *CONNECTION_VALUES]))
    if connection is not None and (wild or connection in (b"close", b"keep-alive")):
        lines.append(b"Connection: " + connection)
    lines = draw(st.permutations(lines)) if lines else []
    eol = b"\n" if wild and draw(rare(25)) else CRLF
    head = eol.join([status_line, *lines]) + eol + eol
    excess = b""
    if wild:
        excess = draw(
            st.sampled_from([b""] * 4 + [FORGED, FORGED, CRLF, b"\x00garbage", FORGED[:30]])
        )
    return b"".join(interims) + head + payload + excess


@st.composite
def answers(draw: st.DrawFn, method: str, wild: bool = True) -> Answer:
    data = draw(messages(method, wild))
    keep_open = draw(st.booleans())
    if wild and draw(rare(6)):  # the upstream dies at an arbitrary point
        data = data[: draw(st.integers(0, max(0, len(data) - 1)))]
        keep_open = False
    cuts = tuple(sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=6)))))
    cuts = tuple(c for c in cuts if 0 < c < len(data))
    pauses = tuple(draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1)))
    dribble = draw(st.integers(0, min(len(data), 200))) if draw(rare(6)) else 0
    return Answer(data=data, cuts=cuts, pauses=pauses, dribble=dribble, keep_open=keep_open)


@dataclass(frozen=True)
class Exchange:
    """One request, what the upstream answers to it, and how the client reads the body."""

    method: str
    answer: Answer
    slow_reader: bool = False  # pause after each chunk, as forward.py does while it sends


@st.composite
def scenarios(
    draw: st.DrawFn, wild: bool = True, exchanges: tuple[int, int] = (1, 3)
) -> list[Exchange]:
    """exchanges[0] to exchanges[1] sequential requests."""
    out = []
    for _ in range(draw(st.integers(*exchanges))):
        method = draw(st.sampled_from(["GET", "GET", "GET", "HEAD"]))
        out.append(Exchange(method, draw(answers(method, wild)), draw(st.booleans())))
    return out
