"""Where a decoder-only model keeps its decoder layers: the one place that knows the layout
(`model.model.layers`, a ModuleList, as in Llama, Mistral, Qwen2 and most HF decoders).
Pruning, layer scaling and layer selection for training all read it from here."""

from __future__ import annotations

from torch import nn


class LayoutError(ValueError):
    """A model without the decoder-layer layout the ops rely on."""


def decoder_layers(model: nn.Module, needed_by: str = "this operation") -> nn.ModuleList:
    """model.model.layers; LayoutError (naming `needed_by`) when the model has no such list."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise LayoutError(f"{type(model).__name__} has no model.layers list; {needed_by} "
                          f"needs a Llama-style layout")
    return layers
