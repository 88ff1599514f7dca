"""Mixed-adapter batches: :func:`mixed` (:mod:`.mixed`, the routing and its plans) and the per-row C++
kernel it uses on CPU (:mod:`.rowlora`)."""

from .mixed import Routing, mixed

__all__ = ["mixed", "Routing"]
