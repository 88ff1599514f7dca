"""The mixed-batch routing state that every adapted layer reads (the bottom of :func:`lorakit.mixed`).

:data:`ROUTING` holds the routing of the current thread or task inside a ``lorakit.mixed(...)`` block
(a :class:`contextvars.ContextVar`: two threads serving different batches never see each other's).
:data:`MIXED_OPEN` says whether any such block is open in the process: ``torch.compile`` cannot read a
ContextVar, but it guards on this module attribute, so code compiled while it was False is recompiled
when a block opens and then leaves the graph at each adapted layer. Read it as ``routing.MIXED_OPEN``
(an imported copy of the bool would be stale). The routing object itself (``lorakit.batching.mixed.Routing``)
is reached only through the variable: this module imports nothing of lorakit.
"""

from __future__ import annotations

import threading
from contextvars import ContextVar, Token

__all__ = ["ROUTING", "MIXED_OPEN", "enter", "leave"]

#: The routing of the current thread/task; set only inside a ``lorakit.mixed(...)`` block.
ROUTING: ContextVar = ContextVar("lorakit_routing", default=None)

#: Whether any ``lorakit.mixed`` block is open in this process (any thread); guarded by torch.compile.
MIXED_OPEN = False

_LOCK = threading.Lock()
_open_blocks = 0


def enter(routing: object) -> Token:
    """Make ``routing`` the current thread's routing and count an open block; returns the token for :func:`leave`."""
    global _open_blocks, MIXED_OPEN
    token = ROUTING.set(routing)
    with _LOCK:
        _open_blocks += 1
        MIXED_OPEN = True
    return token


def leave(token: Token) -> None:
    """Undo :func:`enter` (always call it, also when the block raised)."""
    global _open_blocks, MIXED_OPEN
    ROUTING.reset(token)
    with _LOCK:
        _open_blocks -= 1
        MIXED_OPEN = _open_blocks > 0
