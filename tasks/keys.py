"""Every Redis key claudebox-pool writes, built here and nowhere else.

The whole keyspace, under one prefix so that it can be listed or cleared without touching
Celery's own keys (``celery-task-meta-*``, ``_kombu.*``, the queue lists)::

    claudebox:sessions                hash   session id -> SessionRecord JSON, defaults left out
    claudebox:sessions:updated        zset   session id scored by updated_at (epoch seconds)
    claudebox:sessions:ids            zset   every registered session id, score 0 (lex order)
    claudebox:sessions:status:<st>    zset   the ids of status <st>, score 0 (lex order)
    claudebox:lock:<session>          string lock owner token, with a TTL
    claudebox:fence:<session>         int    fencing counter, bumped at each lock acquisition
    claudebox:attempts:<task id>      int    deliveries of one task, against redelivery loops
    claudebox:workers                 zset   worker hostname scored by last heartbeat
    claudebox:workers:info            hash   worker hostname -> WorkerInfo JSON
    claudebox:workers:queues          set    hostnames of workers with a queue of their own
    claudebox:deliveries:<hostname>   hash   delivery tag -> task id of what a worker took
    claudebox:nodes                   zset   node name scored by the last heartbeat of its workers
    claudebox:lease:<session>         string the producer holding the session open, with a TTL
    claudebox:sweep:<sweep>:<node>    string when a node last ran a sweep, for most of its interval
    claudebox:output:<task id>        stream a code task's live output (StreamEvent JSON), TTL
    claudebox:cancel:<task id>        string set to ask a queued or running task to stop, TTL
    claudebox:warm:<session>          string the worker keeping the session's sandbox warm, TTL
    claudebox:env:<token>             string a queued code task's env values (JSON), TTL
    claudebox:tasks                   zset   task id scored by when it was sent (recent tasks)
    claudebox:task:<task id>          string what a sent task is (TaskRecord JSON), TTL
    claudebox:transfer:<token>        list   a file transfer's chunks in order (tasks.transfer), TTL
    claudebox:transfer:<token>:credit list   one item a chunk the receiver took: room to send, TTL

Two keys of kombu's Redis transport are read too (its defaults, which tasks/app.py keeps)::

    unacked                           hash   delivery tag -> [message, exchange, routing key]
    unacked_index                     zset   delivery tag scored by delivery time
"""

from typing import Final

PREFIX: Final = "claudebox:"


def registry() -> str:
    return f"{PREFIX}sessions"


def registry_by_updated() -> str:
    return f"{PREFIX}sessions:updated"


def registry_ids() -> str:
    return f"{PREFIX}sessions:ids"


def registry_status(status: str) -> str:
    return f"{PREFIX}sessions:status:{status}"


def session_lock(session_id: str) -> str:
    return f"{PREFIX}lock:{session_id}"


def session_fence(session_id: str) -> str:
    return f"{PREFIX}fence:{session_id}"


def task_attempts(task_id: str) -> str:
    return f"{PREFIX}attempts:{task_id}"


def workers() -> str:
    return f"{PREFIX}workers"


def worker_info() -> str:
    return f"{PREFIX}workers:info"


def worker_queues() -> str:
    return f"{PREFIX}workers:queues"


def worker_deliveries(hostname: str) -> str:
    return f"{PREFIX}deliveries:{hostname}"


def broker_unacked() -> str:
    return "unacked"


def broker_unacked_index() -> str:
    return "unacked_index"


def nodes() -> str:
    return f"{PREFIX}nodes"


def task_output(task_id: str) -> str:
    return f"{PREFIX}output:{task_id}"


def task_cancel(task_id: str) -> str:
    return f"{PREFIX}cancel:{task_id}"


def session_lease(session_id: str) -> str:
    return f"{PREFIX}lease:{session_id}"


def sweep_claim(sweep: str, node: str) -> str:
    return f"{PREFIX}sweep:{sweep}:{node}"


def warm(session_id: str) -> str:
    return f"{PREFIX}warm:{session_id}"


def task_env(token: str) -> str:
    return f"{PREFIX}env:{token}"


def recent_tasks() -> str:
    return f"{PREFIX}tasks"


def task_record(task_id: str) -> str:
    return f"{PREFIX}task:{task_id}"


def transfer_data(token: str) -> str:
    return f"{PREFIX}transfer:{token}"


def transfer_credit(token: str) -> str:
    return f"{PREFIX}transfer:{token}:credit"
