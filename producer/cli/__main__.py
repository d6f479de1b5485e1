"""``python -m claudebox_pool.producer.cli``: the ``claudebox-pool`` command."""

from claudebox_pool.producer.cli.app import main

if __name__ == "__main__":
    main()
