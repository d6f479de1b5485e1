"""The environment of one ``claudebox-pool code`` run: ``--env KEY=VALUE`` and ``--env-file``.

A file is read in the dotenv format (python-dotenv's parser, as ``.env`` is read for settings);
``--env`` wins over the file. A line or pair that is not ``KEY=VALUE`` is refused with its
place named, never with its value: values are secrets as often as not.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from dotenv.parser import parse_stream

from claudebox_pool.tasks.errors import InvalidRequestError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read(pairs: list[str], env_file: Path | None) -> dict[str, str]:
    """The variables named by ``env_file`` then ``pairs``; InvalidRequestError for a bad one."""
    env = _file(env_file) if env_file is not None else {}
    for number, pair in enumerate(pairs, start=1):
        name, equals, value = pair.partition("=")
        if not equals or not NAME.fullmatch(name):
            shown = name if NAME.fullmatch(name) else "its name"
            raise InvalidRequestError(
                f"--env number {number} ({shown}) is not KEY=VALUE with KEY made of letters, "
                "digits and '_'"
            )
        env[name] = value
    return env


def _file(path: Path) -> dict[str, str]:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise InvalidRequestError(f"cannot read env file {path}: {why}") from None
    env: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(content)):
        if binding.key is None and not binding.error:
            continue  # a comment
        # The parser counts a binding from the blank lines before it.
        text = binding.original.string
        line = binding.original.line + len(text) - len(text.lstrip("\n"))
        if binding.error or binding.key is None or not NAME.fullmatch(binding.key):
            raise InvalidRequestError(f"{path}:{line}: not a KEY=VALUE line")
        if binding.value is None:
            raise InvalidRequestError(f"{path}:{line}: {binding.key} has no '=' and no value")
        env[binding.key] = binding.value
    return env
