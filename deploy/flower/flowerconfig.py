"""Flower's configuration for a Flower started by hand rather than by `claudebox-pool flower`:

    FLOWER_BASIC_AUTH=ops:secret celery -A claudebox_pool.tasks.app flower \
        --conf=deploy/flower/flowerconfig.py

The settings themselves live in the package (``producer/flowerconfig.py``), so that both ways
of starting Flower show the same; override any of them below this line.
"""

from claudebox_pool.producer.flowerconfig import *  # noqa: F403
