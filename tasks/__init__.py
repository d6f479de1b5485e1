"""The contract between producers and workers: app, settings, names, keys, models, errors."""
