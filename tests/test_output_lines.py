"""Splitting a command's output into capped lines and a bounded tail, chunk by chunk."""

from __future__ import annotations

import asyncio
import threading
import time

from claudebox_pool.workers.runtimes.output import (
    LineSplitter,
    OutputLimits,
    OutputTail,
    cut_marker,
)
from claudebox_pool.workers.runtimes.supervise import LoopThread, Output, supervise
from tests.support.processes import wait_for


def test_a_line_at_the_cap_is_kept_whole_and_one_byte_more_is_marked() -> None:
    splitter = LineSplitter(5)

    assert splitter.feed(b"12345\n123456\n") == [
        "12345\n",
        "12345" + cut_marker(1, "max_line_bytes") + "\n",
    ]


def test_a_character_split_across_chunks_is_decoded_whole() -> None:
    splitter = LineSplitter(100)
    snowman = "☃".encode()

    assert splitter.feed(b"a" + snowman[:1]) == []
    assert splitter.feed(snowman[1:] + b"b\n") == ["a☃b\n"]


def test_an_unterminated_long_line_is_cut_when_flushed() -> None:
    splitter = LineSplitter(3)

    assert splitter.feed("abc") == []
    assert splitter.feed("def") == []
    assert splitter.flush() == "abc" + cut_marker(3, "max_line_bytes")
    assert splitter.flush() == ""


def test_splitting_is_linear_in_the_bytes_of_one_long_line() -> None:
    chunk = b"x" * 65_536

    def read(chunks: int) -> float:
        splitter = LineSplitter(1000)
        started = time.perf_counter()
        for _ in range(chunks):
            splitter.feed(chunk)
        splitter.feed(b"\n")
        return time.perf_counter() - started

    small, large = read(200), read(1600)  # 13 MB, then 105 MB

    # Eight times the bytes: about eight times the time, far from the 64 times of re-copying
    # the line for every chunk (a generous bound for a shared machine).
    assert large < 20 * small + 0.05


def test_the_tail_keeps_the_last_bytes_and_says_how_many_went() -> None:
    tail = OutputTail(10)
    for line in ("first\n", "second\n", "third\n"):
        tail.add(line)

    assert tail.text() == cut_marker(13, "max_output_bytes") + "\nthird\n"


def test_a_vm_command_waits_for_room_while_its_lines_are_not_taken() -> None:
    """boxlite's output queue cannot block the loop it is filled on: its reader awaits room."""
    chunk = ("y" * 99 + "\n") * 10  # 1,000 bytes a chunk
    put = 0
    release = threading.Event()
    seen_while_blocked: list[int] = []

    async def command(output: Output, stop: asyncio.Event) -> int:
        nonlocal put
        for _ in range(200):
            output.put("stdout", chunk)
            put += 1
            await output.room()
        output.end("stdout")
        output.end("stderr")
        return 0

    def slow_reader(stream: str, line: str) -> None:
        release.wait(10)

    def watch() -> None:
        wait_for(lambda: put >= 5, 10, "the command to fill the queue")
        # A window to see that it does not go on filling it (what a bound looks like).
        time.sleep(0.3)
        seen_while_blocked.append(put)
        release.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    loop = LoopThread()
    try:
        result = supervise(
            loop, command, 30, slow_reader, limits=OutputLimits(line_bytes=1000, tail_bytes=5000)
        )
    finally:
        watcher.join()
        loop.close()

    assert seen_while_blocked[0] <= 7  # 5,000 bytes of backlog, and the chunk that crossed it
    assert result.exit_code == 0
    assert result.stdout.endswith("y" * 99 + "\n")
