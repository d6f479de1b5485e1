"""box.files, upload and download: a session's files in and out through a real worker, the
bytes through Redis in chunks."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
import redis

from claudebox_pool import ClaudeBox, InvalidRequestError
from claudebox_pool.tasks import keys
from claudebox_pool.tasks.settings import get_settings

pytestmark = pytest.mark.usefixtures("pool", "clean_state")


def workspace(session_id: str) -> Path:
    return get_settings().sessions_root / session_id / "workspace"


def test_write_read_list_remove_round_trip(clean_state: redis.Redis) -> None:
    async def run() -> tuple[bytes, bytes, list[str], list[str]]:
        async with ClaudeBox(session_id="files-basic") as box:
            await box.files.write("src/deep/app.py", "print('hi')\n")
            await box.files.write("blob.bin", bytes(range(256)) * 10_000)
            result = await box.code("cat src/deep/app.py && ls -l blob.bin")
            assert result.success, result.error
            text = await box.files.read("src/deep/app.py")
            blob = await box.files.read("blob.bin")
            names = [info.path for info in await box.files.list()]
            await box.files.remove("src")
            after = [info.path for info in await box.files.list(".")]
            return text, blob, names, after

    text, blob, names, after = asyncio.run(run())

    assert text == b"print('hi')\n"
    assert blob == bytes(range(256)) * 10_000
    assert names == ["blob.bin", "src"]
    assert after == ["blob.bin"]
    assert not list(clean_state.scan_iter(keys.transfer_data("*")))
