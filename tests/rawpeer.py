"""Raw-socket peers for wire-level tests: an upstream whose every byte a test writes by hand, and
client helpers that send bytes no HTTP library would send and read what comes back.

The upstream runs in threads (one per connection) so it works beside a `pollguard serve`
subprocess and a synchronous test body.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Self

import h11

LOOPBACK = "127.0.0.1"


class RawConnection:
    """One accepted upstream connection, from the upstream's side."""

    def __init__(self, sock: socket.socket, number: int) -> None:
        self.sock = sock
        self.number = number  # 1 for the first connection the server accepted
        self._pending = b""

    def read_request(self, timeout: float = 10.0) -> bytes:
        """The next request's head and body (Content-Length or chunked, trailers included) as
        the raw bytes received; b"" when the peer closed first."""
        self.sock.settimeout(timeout)
        try:
            head = self._take_through(b"\r\n\r\n")
        except EOFError:
            return b""
        lowered = head.lower()
        if b"transfer-encoding: chunked" in lowered:
            body = b""
            while True:
                size_line = self._take_through(b"\r\n")
                body += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (line := self._take_through(b"\r\n")) != b"\r\n":
                        body += line  # a trailer field
                    return head + body + b"\r\n"
                body += self._take(size + 2)
        length = 0
        for line in lowered.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip() == b"content-length":
                length = int(value.strip())
        return head + self._take(length)

    def _recv(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError
        self._pending += chunk

    def _take_through(self, marker: bytes) -> bytes:
        while marker not in self._pending:
            self._recv()
        end = self._pending.index(marker) + len(marker)
        taken, self._pending = self._pending[:end], self._pending[end:]
        return taken

    def _take(self, count: int) -> bytes:
        while len(self._pending) < count:
            self._recv()
        taken, self._pending = self._pending[:count], self._pending[count:]
        return taken

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def wait_closed(self, timeout: float) -> bool:
        """Whether the peer closed the connection within `timeout` (bytes read are discarded)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except OSError:
                return True
        return False


Handler = Callable[[RawConnection], None]


class RawUpstream:
    """A TCP server on loopback; each connection runs `handler` in its own thread."""

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._listener = socket.create_server((LOOPBACK, 0))
        self.port: int = self._listener.getsockname()[1]
        self.requests: list[bytes] = []  # handlers append what they read, if they wish
        self.connections = 0
        self.closed = threading.Event()  # set when any handler saw its connection closed
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._stopping = False

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def __enter__(self) -> Self:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self._stopping = True
        self._listener.close()
        with self._lock:
            for sock in self._socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._socks.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        try:
            self._handler(RawConnection(sock, number))
        except OSError:
            self.closed.set()
        except BaseException as exc:  # surfaced by tests that check `errors`
            self.errors.append(exc)
        finally:
            sock.close()


def http_exchange(
    port: int, request: bytes, method: str = "GET", timeout: float = 10.0
) -> tuple[h11.Response, bytes]:
    """Send raw request bytes, read one response with h11 (a well-kept parser); the connection
    is closed afterwards."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(request)
        return read_response(sock, method)


def read_response(sock: socket.socket, method: str = "GET") -> tuple[h11.Response, bytes]:
    """One response from `sock`, parsed by h11 as the answer to a `method` request."""
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method=method, target="/", headers=[("host", "pollguard")]))
    parser.send(h11.EndOfMessage())
    response: h11.Response | None = None
    body = b""
    while True:
        event = parser.next_event()
        if event is h11.NEED_DATA:
            parser.receive_data(sock.recv(65536))
            continue
        if isinstance(event, h11.Response):
            response = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    assert response is not None, "no response"
    return response, body


def header(response: h11.Response, name: bytes) -> bytes | None:
    for key, value in response.headers:
        if key == name:
            return bytes(value)
    return None


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)
