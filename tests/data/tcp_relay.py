"""A TCP relay between the GCS client and the emulator: it sees every request, and can
slow a download or drop its connection part-way, as a flaky network does."""

from __future__ import annotations

import contextlib
import re
import socket
import threading
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Request:
    line: str  # `GET /download/storage/v1/b/BUCKET/o/NAME?...&alt=media HTTP/1.1`
    range: str | None  # the Range header, `bytes=N-` when the client resumes

    @property
    def is_media(self) -> bool:
        return "alt=media" in self.line


class Relay:
    """Relays each connection to 127.0.0.1:`upstream`, noting its first request.

    The emulator answers in HTTP/1.0, one request per connection, so closing a
    connection after part of its answer is exactly a transfer dropped mid-way.
    """

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[Request] = []
        self.media_delay = 0.0  # seconds each download waits before its answer is relayed
        self.most_in_flight = 0  # downloads relayed at the same time, at most
        self._in_flight = 0
        self._drops: dict[str, list[int | None]] = {}  # shard -> [body bytes, times left]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self, shard: str, after: int, times: int | None = None) -> None:
        """Close the next `times` (None: all) downloads of `shard` after `after` body bytes."""
        self._drops[shard] = [after, times]

    def media(self, shard: str) -> list[Request]:
        return [r for r in self.requests if r.is_media and shard in r.line]

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as upstream:
            head = b""
            while b"\r\n\r\n" not in head:
                if not (chunk := client.recv(1 << 16)):
                    return
                head += chunk
            text = head.decode("latin-1")
            found = re.search(r"(?im)^range:\s*(\S+)", text)
            request = Request(text.split("\r\n", 1)[0], found and found[1])
            with self._lock:
                self.requests.append(request)
                budget = self._budget(request) if request.is_media else None
                self._in_flight += request.is_media
                self.most_in_flight = max(self.most_in_flight, self._in_flight)
            try:
                upstream.sendall(head)
                threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()
                if request.is_media:
                    time.sleep(self.media_delay)
                self._copy(upstream, client, budget)
            finally:
                with self._lock:
                    self._in_flight -= request.is_media
                for end in (client, upstream):  # also wakes the pump, which close() does not
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

    def _budget(self, request: Request) -> int | None:
        """Body bytes to relay before dropping the connection; None: all of them."""
        for shard, rule in self._drops.items():
            after, times = rule
            if shard in request.line and times != 0:
                rule[1] = None if times is None else times - 1
                return after
        return None

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        """The rest of the request (an upload's body), until either end is closed."""
        with contextlib.suppress(OSError):
            while chunk := source.recv(1 << 16):
                sink.sendall(chunk)

    @staticmethod
    def _copy(source: socket.socket, sink: socket.socket, budget: int | None) -> None:
        """Relay until `source` closes, or `budget` bytes after the head of its answer."""
        answer = b""
        while chunk := source.recv(1 << 16):
            if budget is None:
                sink.sendall(chunk)
                continue
            answer += chunk
            head_end = answer.find(b"\r\n\r\n")
            if head_end >= 0 and len(answer) >= head_end + 4 + budget:
                sink.sendall(answer[: head_end + 4 + budget])
                sink.shutdown(socket.SHUT_RDWR)  # the client sees the answer cut short
                while source.recv(1 << 16):  # the emulator, unaware, writes the rest
                    pass
                return
        sink.sendall(answer)  # shorter than the budget: relayed whole
