"""Splitting a command's output into capped lines and a bounded tail, chunk by chunk."""

from __future__ import annotations

import time

from claudebox_pool.workers.runtimes.output import LineSplitter, OutputTail, cut_marker


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
