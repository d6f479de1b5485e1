"""Starting a worker's keeper with the worker, answering other workers, stopping it at the end.

The keeper runs in the worker's main process (see :mod:`workers.warm.keeper`) and is started
when the worker is set up, before the pool forks, so that every child inherits its address.
The worker then also consumes its own queue, ``claudebox.worker.<hostname>``, where producers
send the tasks of the sessions it keeps warm (``producer.routing``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import signals
from celery.worker.control import control_command
from redis.exceptions import RedisError

from claudebox_pool.tasks import keys, names
from claudebox_pool.tasks.app import app
from claudebox_pool.workers.context import context
from claudebox_pool.workers.runtimes.auto import choose
from claudebox_pool.workers.warm import client
from claudebox_pool.workers.warm.keeper import Keeper

log = logging.getLogger(__name__)

DROP_TIMEOUT_S = 2.0

_keeper: Keeper | None = None
_why_not = "not started"


def keeper() -> Keeper | None:
    """This worker's keeper, in its main process; None in its pool children or with it off."""
    return _keeper


def start_keeper(sender: str, instance: Any, **_: Any) -> None:
    global _keeper, _why_not
    ctx = context()
    if ctx.settings.warm_idle_s == 0:
        _why_not = "off (CLAUDEBOX_WARM_IDLE_S=0)"
        return
    runtime = choose(ctx.settings.runtime).runtime
    command = None if runtime.keeper_holds else runtime.warm_command()
    if command is None and not runtime.keeper_holds:
        _why_not = f"off: runtime {runtime.name} keeps no warm sandboxes"
        log.info("warm sandboxes: %s", _why_not)
        return
    _keeper = Keeper(
        ctx.settings,
        sender,
        ctx.redis,
        remote_drop,
        heartbeat_age,
        command=command,
        held=runtime if runtime.keeper_holds else None,
    ).start()
    client.set_address(_keeper.address)
    queue = names.worker_queue(sender)
    instance.app.amqp.queues.select_add(queue)
    ctx.redis.sadd(keys.worker_queues(), sender)
    log.info(
        "warm sandboxes: kept %ss after a task, at most %d; %s also consumes %s",
        ctx.settings.warm_idle_s,
        ctx.settings.warm_max,
        sender,
        queue,
    )


def describe() -> str:
    """One line on this worker's warm sandboxes, for `claudebox-pool doctor`."""
    if _keeper is None:
        return _why_not
    settings = _keeper.settings
    return (
        f"kept {settings.warm_idle_s} s after a task, at most {settings.warm_max}; "
        f"queue {names.worker_queue(_keeper.hostname)}"
    )


def stop_keeper(**_: Any) -> None:
    global _keeper
    if _keeper is not None:
        _keeper.close()
        _keeper = None
        client.set_address(None)


signals.celeryd_after_setup.connect(start_keeper)
signals.worker_shutdown.connect(stop_keeper)


def drop_warm(state: Any, session_id: str) -> dict[str, bool]:
    """Stop this worker's warm sandbox of a session (another worker is taking the session)."""
    return {"dropped": _keeper.drop(session_id) if _keeper is not None else False}


control_command(name=names.DROP_WARM, args=[("session_id", str)], signature="<session_id>")(
    drop_warm
)


def remote_drop(hostname: str, session_id: str) -> bool:
    replies = app.control.broadcast(
        names.DROP_WARM,
        arguments={"session_id": session_id},
        destination=[hostname],
        reply=True,
        timeout=DROP_TIMEOUT_S,
    )
    return bool(replies)


def heartbeat_age(hostname: str) -> float | None:
    """Seconds since worker ``hostname`` last announced itself; None if it never did."""
    try:
        seen = context().redis.zscore(keys.workers(), hostname)
    except RedisError:
        return None
    return None if seen is None else max(0.0, time.time() - float(seen))
