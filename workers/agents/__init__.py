"""Agents: what runs in a session's sandbox for a ``code`` call, and how its output is read."""
