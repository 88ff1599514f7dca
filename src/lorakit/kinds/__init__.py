"""Layer kinds: what lorakit knows about each kind of adapted layer (:class:`Kind`), one file per kind.

:mod:`~lorakit.kinds.base` defines the interface, the registry (:func:`register_kind`,
:func:`kind_of`) and :class:`AdapterHost`, the view of a layer that kinds read. Importing this package
registers the built-in kinds: ``nn.Linear`` and transformers' ``Conv1D`` (:mod:`.linear`),
``nn.Embedding`` (:mod:`.embedding`), ``nn.Conv1d/2d/3d`` (:mod:`.conv`), raw parameters
(:mod:`.param`), ``nn.MultiheadAttention`` (:mod:`.mha`) and bitsandbytes' quantized linear layers
(:mod:`.bitsandbytes`, registered by name: bitsandbytes is imported only when used).
"""

# isort: off  (each module registers its kinds on import; this order is the order messages list them in)
from . import bitsandbytes, conv, embedding, linear, mha, param  # noqa: F401

# isort: on
from .base import AdapterHost, Kind, autocast_dtype, kind_of, register_kind, skinny, supported
from .embedding import embed_scaled
from .linear import LinearKind
from .param import parameter_kind

__all__ = ["AdapterHost", "Kind", "LinearKind", "register_kind", "kind_of", "parameter_kind", "supported",
           "autocast_dtype", "skinny", "embed_scaled"]
