"""``lorakit serve``: one base model, many adapters, over an OpenAI-compatible HTTP API.

* :mod:`.engine` - continuous batching across adapters on one worker thread (no HTTP);
* :mod:`.batch` - the shared left-padded KV cache of the decode batch, and sampling;
* :mod:`.adapters` - catalog, resident set with LRU eviction, path and name checks;
* :mod:`.text` - incremental detokenization with stop strings;
* :mod:`.app` / :mod:`.protocol` - the FastAPI app and OpenAI's request/response shapes;
* :mod:`.server` - ``lorakit serve`` (model loading, uvicorn); :mod:`.metrics` - Prometheus text.

The HTTP side needs ``pip install lorakit[serve]`` (FastAPI, uvicorn); the engine does not.
"""

from .adapters import AdapterError, Adapters
from .engine import Engine, EngineStopped, Event, QueueFull, Request

__all__ = ["Engine", "Request", "Event", "QueueFull", "EngineStopped", "Adapters", "AdapterError"]
