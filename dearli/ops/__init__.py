"""Tensor operations without compiled extensions."""

from dearli.ops.ms_deform_attn import ms_deform_attn

__all__ = ["ms_deform_attn"]
