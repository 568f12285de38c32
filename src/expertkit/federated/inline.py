"""An in-process Flower grid: clients run in turn in this process (tests and 2-core machines).

:class:`InlineGrid` implements the part of Flower's ``Grid`` that strategies use
(``get_node_ids``, ``send_and_receive``). Every message is deep-copied on the way out and on the
way back, as a network would, so a client can never mutate the server's records. Each node keeps
its ``Context`` (with ``partition-id``) across rounds. Use it inside :func:`task_identity`.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def task_identity(run_id: int = 1) -> Iterator[None]:
    """Set Flower's process task identity (needed to create messages outside a Flower runtime)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, 0, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


class InlineGrid:
    """``num_nodes`` nodes (ids 1..n, partition ids 0..n-1) running ``client_app`` in this process."""

    def __init__(self, client_app: Any, num_nodes: int, run_id: int = 1) -> None:
        from flwr.app import Context, RecordDict

        self.client_app = client_app
        self.run_id = run_id
        self.contexts = {
            i + 1: Context(run_id=run_id, node_id=i + 1, node_config={"partition-id": i, "num-partitions": num_nodes},
                           state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        """The connected node ids."""
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> list[Any]:
        """Deliver each message to its node and collect the replies (in sending order)."""
        from flwr.app import Message

        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            incoming = Message(content=copy.deepcopy(m.content), dst_node_id=node,
                               message_type=m.metadata.message_type)
            reply = self.client_app(incoming, self.contexts[node])
            out = copy.deepcopy(reply.content) if reply.has_content() else reply.error
            replies.append(Message(out, reply_to=incoming))
        return replies
