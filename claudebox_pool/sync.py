"""The synchronous client, ``from claudebox_pool.sync import ClaudeBox``: the async client's API
with blocking calls (its implementation is :mod:`claudebox_pool.producer.sync`)."""

from claudebox_pool.producer.sync import ClaudeBox, Stream

__all__ = ["ClaudeBox", "Stream"]
