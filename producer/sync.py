"""The synchronous client: ``from claudebox_pool.sync import ClaudeBox``, for scripts, notebooks
and cron jobs.

The same API as :class:`producer.client.ClaudeBox`, every call blocking until done. The async
client does the work, on one event loop that runs in a background thread of this process
(started on first use, shared by every box, as httpx's and Modal's sync clients do): a call
hands its coroutine to that loop and waits for the outcome. So Redis connections, lease
renewals and result subscriptions live on one loop whichever thread calls, and a caller
whose own thread runs an event loop (Jupyter) blocks that loop for the call's length instead
of deadlocking. The one thing that cannot work, a blocking call from the client's own loop
(an ``on_output`` callback calling the sync API), raises RuntimeError at once.

The main API has typed methods here. Anything else the async box offers (``box.files``:
``box.files.read(path)``...) is reached through :meth:`ClaudeBox.__getattr__`: coroutine functions
become blocking functions, async iterators iterators, and other objects are wrapped the
same way, so additions to the async client appear here without edits.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar, Unpack

from claudebox_pool.producer.client import ClaudeBox as AsyncClaudeBox
from claudebox_pool.producer.live import CodeStream, OutputCallback
from claudebox_pool.producer.options import BoxOptions, CallOptions, SessionOptions
from claudebox_pool.tasks.lifecycle import Checkpoint
from claudebox_pool.tasks.models import (
    CleanupResult,
    CodeResult,
    HistoryEntry,
    SessionRecord,
    SessionStatus,
    TrajectoryTurn,
)
from claudebox_pool.tasks.streaming import StreamEvent
from claudebox_pool.tasks.workspace_files import TransferResult

T = TypeVar("T")


class _Loop:
    """The background event loop every sync call runs on, started on first use."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()

    def run(self, work: Coroutine[Any, Any, T]) -> T:
        loop = self._started()
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError(
                "a claudebox_pool.sync call was made from the sync client's own event loop "
                "(an on_output callback?); it would wait for itself. Use the async client "
                "(claudebox_pool.ClaudeBox) there"
            )
        future = asyncio.run_coroutine_threadsafe(work, loop)
        try:
            return future.result()
        except BaseException:
            # Ctrl-C while waiting: the call is abandoned on the loop too, which cancels its
            # task in the pool as the async client does (a no-op when the call itself raised).
            future.cancel()
            raise

    def _started(self) -> asyncio.AbstractEventLoop:
        with self._starting:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                # A daemon: a script that ends without closing its boxes is not kept alive;
                # their leases expire as a killed producer's do.
                thread = threading.Thread(
                    target=loop.run_forever, name="claudebox-sync-loop", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop


_LOOP = _Loop()


def _blocking(value: Any) -> Any:
    """``value`` as the sync client shows it: a coroutine function blocks, an async iterator
    iterates, an object of the async client is wrapped alike; anything else is unchanged."""
    if inspect.iscoroutinefunction(value):

        @functools.wraps(value)
        def call(*args: Any, **kwargs: Any) -> Any:
            return _blocking(_LOOP.run(value(*args, **kwargs)))

        return call
    if callable(value) and not isinstance(value, type):

        @functools.wraps(value)
        def plain(*args: Any, **kwargs: Any) -> Any:
            return _blocking(value(*args, **kwargs))

        return plain
    if inspect.iscoroutine(value):
        return _blocking(_LOOP.run(value))
    if isinstance(value, AsyncIterator) or hasattr(value, "__aiter__"):
        return _Iterated(value)
    if type(value).__module__.startswith("claudebox_pool.producer"):
        return _Wrapped(value)
    return value


class _Wrapped:
    """An object of the async client (``box.files``) with its methods made blocking."""

    def __init__(self, inner: object) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return _blocking(getattr(self._inner, name))

    def __repr__(self) -> str:
        return f"<sync {self._inner!r}>"


class _Iterated(Iterator[Any]):
    """An async iterable run one item at a time on the background loop."""

    def __init__(self, iterable: Any) -> None:
        self._iterable = iterable
        self._iterator: Any = None

    def __next__(self) -> Any:
        if self._iterator is None:
            self._iterator = aiter(self._iterable)
        try:
            return _LOOP.run(anext(self._iterator))
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        """Leave the loop early: the async iterator's cleanup runs (a stream cancels its call)."""
        if self._iterator is not None and hasattr(self._iterator, "aclose"):
            _LOOP.run(self._iterator.aclose())


class Stream(_Iterated):
    """``for event in box.stream(prompt)``: the run's events, then its :attr:`result`; leaving
    the loop early and calling :meth:`close` (or ``with closing(...)``) cancels the call."""

    def __init__(self, stream: CodeStream) -> None:
        super().__init__(stream)
        self._stream = stream

    def __next__(self) -> StreamEvent:
        event: StreamEvent = super().__next__()
        return event

    @property
    def result(self) -> CodeResult | None:
        """The run's result, once the loop has ended."""
        return self._stream.result


class ClaudeBox:
    """A coding-agent session, run by the pool's workers: :class:`producer.client.ClaudeBox`
    with blocking calls. ``with ClaudeBox(session_id="x") as box: box.code("...")``."""

    def __init__(self, session_id: str | None = None, **options: Unpack[BoxOptions]) -> None:
        self._box = AsyncClaudeBox(session_id, **options)

    @classmethod
    def _of(cls, box: AsyncClaudeBox) -> Self:
        synced = cls.__new__(cls)
        synced._box = box
        return synced

    @property
    def aio(self) -> AsyncClaudeBox:
        """The async box underneath (its calls must run on the sync client's loop)."""
        return self._box

    @property
    def session_id(self) -> str:
        return self._box.session_id

    @property
    def is_ephemeral(self) -> bool:
        return self._box.is_ephemeral

    @property
    def workspace_path(self) -> str:
        return self._box.workspace_path

    @property
    def running_task_id(self) -> str | None:
        return self._box.running_task_id

    def __enter__(self) -> Self:
        _LOOP.run(self._box.__aenter__())
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _LOOP.run(self._box.__aexit__(exc_type, exc, tb))

    def close(self) -> None:
        """What leaving ``with`` does, for a box opened by ``reconnect``/``get_or_create``."""
        self.__exit__(None, None, None)

    def code(
        self,
        prompt: str,
        max_turns: int | None = None,
        allowed_tools: list[str] | None = None,
        disallowed_tools: list[str] | None = None,
        *,
        on_output: OutputCallback | None = None,
        **options: Unpack[CallOptions],
    ) -> CodeResult:
        """Run ``prompt`` in the session. ``on_output`` is called on the client's loop thread."""
        return _LOOP.run(
            self._box.code(
                prompt,
                max_turns,
                allowed_tools,
                disallowed_tools,
                on_output=on_output,
                **options,
            )
        )

    def stream(
        self,
        prompt: str,
        max_turns: int | None = None,
        allowed_tools: list[str] | None = None,
        disallowed_tools: list[str] | None = None,
        **options: Unpack[CallOptions],
    ) -> Stream:
        return Stream(
            self._box.stream(prompt, max_turns, allowed_tools, disallowed_tools, **options)
        )

    def cancel(self) -> str | None:
        """Stop this box's running call (from another thread than the one waiting in it)."""
        return _LOOP.run(self._box.cancel())

    @classmethod
    def reconnect(cls, session_id: str) -> Self:
        """Continue an existing session, opened: ``with ClaudeBox.reconnect(id) as box``."""
        return cls._of(_LOOP.run(_opened(AsyncClaudeBox.reconnect(session_id))))

    @classmethod
    def get_or_create(cls, session_id: str, **options: Unpack[SessionOptions]) -> Self:
        """The session, created with these options if it does not exist; opened."""
        opening = AsyncClaudeBox.get_or_create(session_id, **options)
        return cls._of(_LOOP.run(_opened(opening)))

    @staticmethod
    def list_sessions() -> list[SessionRecord]:
        """Every session, oldest first (the guide's ``list_sessions``)."""
        return AsyncClaudeBox.list_sessions()

    @staticmethod
    def list_sessions_paged(
        prefix: str | None = None,
        status: SessionStatus | None = None,
        older_than: float | timedelta | None = None,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[SessionRecord]:
        """``alist_sessions``: filtered and paged by Redis, in session-id order; ``after`` is
        the last session id of the previous page."""
        return _LOOP.run(AsyncClaudeBox.alist_sessions(prefix, status, older_than, limit, after))

    @staticmethod
    def cleanup_session(
        session_id: str, remove_workspace: bool = False, archive: bool = False
    ) -> CleanupResult:
        return _LOOP.run(AsyncClaudeBox.cleanup_session(session_id, remove_workspace, archive))

    def checkpoint(self, name: str, *, replace: bool = False) -> Checkpoint:
        return _LOOP.run(self._box.checkpoint(name, replace=replace))

    def restore(self, name: str) -> Checkpoint:
        return _LOOP.run(self._box.restore(name))

    def upload(self, local_dir: str | Path, to: str = ".") -> TransferResult:
        return _LOOP.run(self._box.upload(local_dir, to))

    def download(self, to: str | Path, path: str = ".") -> TransferResult:
        return _LOOP.run(self._box.download(to, path))

    def history(self, limit: int | None = None) -> list[HistoryEntry]:
        return _LOOP.run(self._box.history(limit))

    def metadata(self) -> SessionRecord:
        return _LOOP.run(self._box.metadata())

    def checkpoints(self) -> list[str]:
        return self._box.checkpoints()

    def trajectory(self) -> list[TrajectoryTurn]:
        return _LOOP.run(self._box.trajectory())

    @classmethod
    def fork(cls, source_session_id: str, new_session_id: str) -> Self:
        """Copy a session into a new persistent one, and return that one open."""
        return cls._of(_LOOP.run(AsyncClaudeBox.fork(source_session_id, new_session_id)))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not defined here: the async box's other API (``files``...).
        if name.startswith("_"):
            raise AttributeError(name)
        return _blocking(getattr(self._box, name))

    def __repr__(self) -> str:
        return repr(self._box).replace("<ClaudeBox", "<sync ClaudeBox", 1)


async def _opened(opening: Any) -> AsyncClaudeBox:
    box: AsyncClaudeBox = await opening
    return box
