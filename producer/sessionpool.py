"""``SessionPool``: N sessions working through many prompts side by side.

::

    async with SessionPool(size=8, prefix="exp-") as sessions:
        results = await sessions.map(prompts)

Each prompt goes to whichever session is free next, so a slow prompt holds up only its own
session. With a ``prefix`` the sessions are named (``exp-0`` ... ``exp-7``), persistent and
continued by the next pool of that prefix; without one they are ephemeral and removed on exit.
It is the guide's ``asyncio.gather`` over several boxes, with the boxes handed out for you:
the calls go out as fast as the gather's would.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Literal, Self, Unpack, overload

from claudebox_pool.producer.client import ClaudeBox
from claudebox_pool.producer.live import OutputCallback
from claudebox_pool.producer.options import CodeOptions
from claudebox_pool.tasks.errors import InvalidRequestError, SessionNotFoundError
from claudebox_pool.tasks.models import CodeResult
from claudebox_pool.tasks.settings import AgentName


class SessionPool:
    """``size`` sessions; :meth:`map` and :meth:`code` run prompts on whichever is free."""

    def __init__(
        self,
        size: int = 8,
        prefix: str | None = None,
        *,
        agent: AgentName | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        if size < 1:
            raise InvalidRequestError(f"a session pool needs a size of 1 or more, not {size}")
        self.size = size
        self.prefix = prefix
        self._agent = agent
        self._env = env
        self._boxes: list[ClaudeBox] = []
        self._free: asyncio.Queue[ClaudeBox] = asyncio.Queue()
        self._stack = AsyncExitStack()

    @property
    def sessions(self) -> list[ClaudeBox]:
        """The pool's boxes, once it is open."""
        return list(self._boxes)

    async def __aenter__(self) -> Self:
        try:
            self._boxes = list(
                await asyncio.gather(*(self._open(index) for index in range(self.size)))
            )
        except BaseException:
            await self._stack.aclose()
            raise
        for box in self._boxes:
            self._free.put_nowait(box)
        return self

    async def _open(self, index: int) -> ClaudeBox:
        if self.prefix is None:
            box = ClaudeBox()
        else:
            session_id = f"{self.prefix}{index}"
            try:
                box = await ClaudeBox.reconnect(session_id)
            except SessionNotFoundError:
                box = ClaudeBox(session_id=session_id)
        # Exiting removes an ephemeral session and leaves a named one as it is.
        return await self._stack.enter_async_context(box)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()
        self._boxes = []

    async def code(
        self,
        prompt: str,
        *,
        on_output: OutputCallback | None = None,
        **options: Unpack[CodeOptions],
    ) -> CodeResult:
        """Run ``prompt`` on the next free session, with the options of ``ClaudeBox.code``."""
        if not self._boxes:
            raise InvalidRequestError("the pool is not open: use `async with SessionPool(...)`")
        # Agent and env go with each call, as a reconnected box does not carry them.
        options.setdefault("agent", self._agent)
        options["env"] = {**(self._env or {}), **(options.get("env") or {})}
        box = await self._free.get()
        try:
            return await box.code(prompt, on_output=on_output, **options)
        finally:
            self._free.put_nowait(box)

    @overload
    async def map(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[False] = ...,
        on_output: OutputCallback | None = None,
        **options: Unpack[CodeOptions],
    ) -> list[CodeResult]: ...

    @overload
    async def map(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: Literal[True],
        on_output: OutputCallback | None = None,
        **options: Unpack[CodeOptions],
    ) -> list[CodeResult | BaseException]: ...

    async def map(
        self,
        prompts: Iterable[str],
        *,
        return_exceptions: bool = False,
        on_output: OutputCallback | None = None,
        **options: Unpack[CodeOptions],
    ) -> list[CodeResult] | list[CodeResult | BaseException]:
        """Run every prompt, spread over the sessions; the results in the prompts' order.

        Every prompt runs to its end even when one raises; then the first error is raised,
        unless ``return_exceptions`` asks for errors in place of their results.
        """
        outcomes = await asyncio.gather(
            *(self.code(prompt, on_output=on_output, **options) for prompt in prompts),
            return_exceptions=True,
        )
        if return_exceptions:
            return outcomes
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        return [outcome for outcome in outcomes if isinstance(outcome, CodeResult)]
