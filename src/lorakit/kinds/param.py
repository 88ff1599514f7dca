"""Raw parameters (``target_parameters``): 2-D weights, PEFT's 3-D stacked experts, and ≥4-D weights."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Kind

__all__ = ["parameter_kind"]


class _Param(Kind):
    """A raw parameter (``target_parameters``); forward runs the base module with W + ΔW.

    2-D W (out, in): A (r, in), B (out, r), ΔW = s·B·A, as for a Linear. 3-D W (stacked experts,
    E × d1 × d2) follows PEFT's ``ParamWrapper``: A (E·r, d_in), B (d_out, E·r), expert e's
    factors are A's rows e·r … e·r+r-1 and B's columns e, E+e, …, (r-1)·E+e, and
    ΔW[e] = s·B_e·A_e. W[e] is (d_out=d1, d_in=d2) unless the module says ``is_transposed = True``
    (then W[e] is (d_in=d1, d_out=d2) and ΔW[e] = s·(B_e·A_e)ᵀ). W with more than 3 dims: A (r, Π rest),
    B (out, r) on W viewed as (out, rest), a lorakit-only layout (PEFT refuses such weights).
    """

    name = "param"
    selected_by = "target_parameters"

    @staticmethod
    def _experts(base: nn.Module, weight: Tensor) -> tuple[int, int, int] | None:
        """(E, d_in, d_out) of a 3-D weight in PEFT's reading, else None."""
        if weight.dim() != 3:
            return None
        e, d1, d2 = weight.shape
        return (e, d1, d2) if getattr(base, "is_transposed", False) else (e, d2, d1)

    def shapes(self, base, weight, r):
        experts = self._experts(base, weight)
        if experts is None:
            return super().shapes(base, weight, r)
        e, d_in, d_out = experts
        return (e * r, d_in), (d_out, e * r)

    def rank(self, weight, a):
        return a.shape[0] // weight.shape[0] if weight.dim() == 3 else a.shape[0]

    def matrices(self, base, weight, a, b):
        if weight.dim() != 3:
            return super().matrices(base, weight, a, b)
        e = weight.shape[0]
        a_e = a.reshape(e, -1, a.shape[-1])  # (E, r, d_in)
        b_e = b.reshape(b.shape[0], -1, e).permute(2, 0, 1)  # (E, d_out, r)
        if getattr(base, "is_transposed", False):
            return a_e.transpose(1, 2), b_e.transpose(1, 2)  # (B_e·A_e)ᵀ = A_eᵀ·B_eᵀ
        return b_e, a_e


_PARAM = _Param()


def parameter_kind(module: nn.Module, name: str) -> Kind:
    """The kind of a raw parameter ``name`` of ``module`` targeted by ``target_parameters``."""
    return _PARAM
