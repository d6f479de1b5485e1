"""A byte stream between a producer and a worker, through Redis, in bounded chunks.

One side sends, the other receives, under a token both know (it travels in the task's
payload). The sender appends chunks to ``claudebox:transfer:<token>``; the receiver pops them
and appends one credit a chunk to ``...:credit``. The sender may be ``window`` chunks ahead and
then waits for a credit, so a transfer never holds more than ``window`` chunks in Redis, and
neither side more than a chunk or two in memory, whatever the file's size. Both keys carry a
TTL that each side renews while it waits, so an abandoned transfer leaves nothing behind.

Each chunk starts with a kind byte and its sequence number: a task delivered again after its
worker died starts its stream over, and the receiver refuses it instead of splicing two
streams into one file. Both sides are blocking (``redis.Redis``): the worker runs them in its
task, the producer in a thread (tarfile, shutil and file objects are synchronous).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import cast

import redis

from claudebox_pool.tasks import keys
from claudebox_pool.tasks.errors import TaskFailedError

DATA, END, ABORT = b"d", b"e", b"x"
_HEADER = struct.Struct(">cQ")
POLL_S = 1
"""Each blocking pop waits this long, then checks the other side (``alive``, also called once
a chunk) and renews the TTLs."""

Check = Callable[[], None]
"""Raises if the transfer must stop: the other side's task failed, the lock was lost."""


class TransferStalled(TaskFailedError):
    """The other side of a transfer sent or took nothing for too long."""


class _Channel:
    def __init__(self, client: redis.Redis, token: str, idle_s: float, alive: Check) -> None:
        self._client = client
        self._data = keys.transfer_data(token)
        self._credit = keys.transfer_credit(token)
        self._ttl_s = max(int(idle_s) + 60, 120)
        self._idle_s = idle_s
        self._alive = alive

    def _pop(self, key: str, waiting_for: str) -> bytes:
        """The next item of ``key``, waiting up to the idle limit for it."""
        give_up_at = time.monotonic() + self._idle_s
        while True:
            popped = self._client.blpop([key], timeout=POLL_S)
            if popped is not None:
                return cast(bytes, popped[1])
            self._alive()
            pipe = self._client.pipeline(transaction=False)
            pipe.expire(self._data, self._ttl_s)
            pipe.expire(self._credit, self._ttl_s)
            pipe.execute()
            if time.monotonic() >= give_up_at:
                raise TransferStalled(
                    f"a file transfer got no {waiting_for} for {self._idle_s:.0f}s; the other "
                    "side stopped (was the producer interrupted?); try again"
                )

    def _push(self, key: str, item: bytes) -> None:
        pipe = self._client.pipeline(transaction=False)
        pipe.rpush(key, item)
        pipe.expire(key, self._ttl_s)
        pipe.execute()

    def forget(self) -> None:
        self._client.delete(self._data, self._credit)

    @contextmanager
    def forgotten_on_error(self) -> Iterator[None]:
        """Delete the transfer's keys if the block fails: the other side learns of the
        failure from the task's outcome, and nothing is left in Redis."""
        try:
            yield
        except BaseException:
            with suppress(redis.RedisError):
                self.forget()
            raise


class Sender(_Channel):
    """A write-only file object whose bytes go to the receiver in chunks of ``chunk_bytes``."""

    def __init__(
        self,
        client: redis.Redis,
        token: str,
        *,
        chunk_bytes: int,
        window: int,
        idle_s: float,
        alive: Check,
    ) -> None:
        super().__init__(client, token, idle_s, alive)
        self._chunk_bytes = chunk_bytes
        self._window = window
        self._buffer = bytearray()
        self._sent = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buffer += data
        while len(self._buffer) >= self._chunk_bytes:
            chunk = bytes(self._buffer[: self._chunk_bytes])
            del self._buffer[: self._chunk_bytes]
            self._send(DATA, chunk)
        return len(data)

    def flush(self) -> None:
        """Chunks go out when full; tarfile and shutil call this, and it has nothing to do."""

    def finish(self) -> None:
        """Send what is buffered and the end of the stream."""
        if self._buffer:
            self._send(DATA, bytes(self._buffer))
            self._buffer.clear()
        self._send(END, b"")

    def abort(self, why: str) -> None:
        """Tell the receiver the stream stops here (best effort: it also times out)."""
        self._push(self._data, _HEADER.pack(ABORT, self._sent) + why.encode()[:1000])

    def _send(self, kind: bytes, payload: bytes) -> None:
        self._alive()
        if self._sent >= self._window:
            credit = self._pop(self._credit, "room to send")
            if credit.startswith(ABORT):
                why = credit[len(ABORT) :].decode(errors="replace")
                raise TaskFailedError(f"the receiver stopped the file transfer: {why}")
        self._push(self._data, _HEADER.pack(kind, self._sent) + payload)
        self._sent += 1


class Receiver(_Channel):
    """A read-only file object over the sender's chunks; ``read`` returns b"" at the end."""

    def __init__(self, client: redis.Redis, token: str, *, idle_s: float, alive: Check) -> None:
        super().__init__(client, token, idle_s, alive)
        self._chunk = memoryview(b"")
        self._taken = 0
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            parts = []
            while part := self.read(1 << 20):
                parts.append(part)
            return b"".join(parts)
        while not self._chunk and not self._ended:
            self._next()
        piece = bytes(self._chunk[:size])
        self._chunk = self._chunk[len(piece) :]
        return piece

    def _next(self) -> None:
        self._alive()
        item = self._pop(self._data, "data")
        kind, number = _HEADER.unpack_from(item)
        if number != self._taken:
            raise TaskFailedError(
                f"a file transfer's chunk {number} came where chunk {self._taken} was due: its "
                "sender started over (a worker died and its task was delivered again); try again"
            )
        self._taken += 1
        self._push(self._credit, b"1")
        if kind == END:
            self._ended = True
            self.forget()
        elif kind == ABORT:
            why = item[_HEADER.size :].decode(errors="replace")
            raise TaskFailedError(f"the sender stopped the file transfer: {why}")
        else:
            self._chunk = memoryview(item)[_HEADER.size :]

    def abort(self, why: str) -> None:
        """Tell the sender to stop (it reads this in place of its next credit)."""
        self._push(self._credit, ABORT + why.encode()[:1000])

    @property
    def ended(self) -> bool:
        return self._ended
