"""What a user imports or types: the ``ClaudeBox`` API, batches, session pools, the CLI.

Its public names are re-exported by :mod:`claudebox_pool`; import them from there.
"""
