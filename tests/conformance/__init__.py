"""Conformance suite: differential fuzzing of pollguard's own HTTP/1.1 upstream client against h11.

Hypothesis writes what an upstream answers (`strategies.py`): valid and invalid responses, 1xx
interims (100, 103, 101, unknown ones), every framing and its misuses (Content-Length variants,
Transfer-Encoding codings, both at once, EOF-delimited), chunk extensions and trailers, odd
status lines and header fields, bodies of 0–70 KiB, bytes beyond the message (a forged response,
Content-Length counted in characters, garbage), truncation at any point, delivered in arbitrary
pieces (1-byte writes included) with pauses. A raw-socket upstream (`replay.py`) replays it; h11
reads the same bytes (`oracle.py`).

Layers
- `test_upstream_differential.py`: `proxy.upstream.Upstream` in-process, 1–3 sequential requests
  on one pool (`exchanges.py` drives and judges); plus a non-differential property: well-formed
  answers must be delivered (failing closed on everything would otherwise pass).
- `test_proxy_differential.py`: the same answers behind a real `pollguard serve`, two requests
  from two client connections.

The property, per exchange: pollguard delivers exactly h11's status, header list and body bytes,
or fails closed (an UpstreamError before the head — a 502/504 problem — or after it, which cuts
the client's connection mid-body). When h11 read a head, a head pollguard delivered before failing
must be that head, and the body bytes it delivered a prefix of h11's. Bytes beyond a message reach
no one, and a connection that saw them (or that h11 would not reuse for any other reason) never
carries another request. No exception may escape into the event loop; end to end, pollguard's log
shows no traceback.

Allowed divergences, each decided on purpose:
1. pollguard may fail closed where h11 accepts (llhttp is stricter in places: obs-fold, bare LF
   line ends, repeated Content-Length, Content-Length with Transfer-Encoding). A 502 never serves wrong
   content; `test_well_formed_answers_are_delivered` keeps this from becoming "reject everything".
2. Empty lines before a status line: llhttp skips them, h11 rejects them. pollguard may read the
   response after them (RFC 9112 §2.2 lets a recipient ignore CRLFs before a start line; they
   carry no content).
3. CR/LF bytes alone after a complete message do not count as unsolicited bytes: the connection
   may be reused (llhttp skips them invisibly before the next status line, and nothing can be
   delivered from them). Any other byte after a message forbids reuse.
4. An HTTP/1.0 answer with `Connection: keep-alive` (and no `close`) may be reused (RFC 9112 §9.3,
   Appendix C.2.2); h11 never keeps HTTP/1.0 connections.
5. Header lists compare byte for byte (names lower-cased by both, same order, values including
   whitespace), except: equal Content-Length values (repeated fields or a list) may be merged into
   one, as h11 does and RFC 9110 §8.6 allows.
6. Not compared: the reason phrase and HTTP version (pollguard exposes neither); trailer fields
   (pollguard may drop them, but must never add them to the head); hop-by-hop fields and those
   Connection names (the upstream client consumes them and hands out the end-to-end fields — the
   framing they decide is what the body and reuse properties check). End to end also:
   Content-Length (framing is each hop's own) and X-Request-ID (pollguard's).

Run: `scripts/test tests/conformance` (profile "default", also under CI: about 30 s here),
nightly `scripts/test tests/conformance --hypothesis-profile=long` (about 15 min; profiles.py).
"""
