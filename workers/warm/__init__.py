"""Warm sandboxes: a session's sandbox kept running between its tasks, in the worker's main process.

See :mod:`workers.warm.keeper` for the design.
"""
