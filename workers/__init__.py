"""Everything that runs inside a worker: store, registry, lock, runtimes, agents, task bodies."""
