"""Reading and editing the residual stream of a Hugging Face causal LM at one layer.

Convention used everywhere in crosscoder_pl: "layer L" is the output of decoder block ``L``
(0-based, ``model.model.layers[L]``), i.e. ``output_hidden_states=True``'s ``hidden_states[L + 1]``.
For Gemma-2-2B, layer 13 is the residual stream after the 14th block, as in Minder et al.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of a causal LM (``model.model.layers`` for Gemma/Llama-style models)."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no `.model.layers` ModuleList; crosscoder_pl supports "
            "decoder-only models laid out like Gemma-2 / Llama (model.model.layers[i])."
        )
    return layers


def n_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def check_layer(model: nn.Module, layer: int, name: str = "model") -> None:
    """Raise a ValueError naming the bad layer index when it is out of range for ``model``."""
    n = n_layers(model)
    if not 0 <= layer < n:
        raise ValueError(f"layer={layer} is out of range for {name} with {n} decoder layers (valid: 0..{n - 1})")


def _hidden(output: torch.Tensor | tuple) -> torch.Tensor:
    # transformers 5 blocks return a tensor; older ones return (hidden, *extras).
    return output[0] if isinstance(output, tuple) else output


def _with_hidden(output: torch.Tensor | tuple, hidden: torch.Tensor) -> torch.Tensor | tuple:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the hooked layer has run."""


def residual_at(model: nn.Module, layer: int, **inputs: torch.Tensor) -> torch.Tensor:
    """Residual stream at the output of block ``layer``: ``[batch, seq, d_model]``.

    The forward pass is cut right after that block: no higher block and no LM head runs.
    """
    check_layer(model, layer)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> None:
        captured.append(_hidden(output))
        raise _StopForward

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        # Call the inner transformer, not the LM wrapper: the head is never needed here.
        getattr(model, "model", model)(**inputs, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"decoder block {layer} never ran during the forward pass")
    return captured[0]


@contextmanager
def edit_residual(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, the output of block ``layer`` is replaced by ``fn(hidden)``.

    ``hidden`` is ``[batch, seq, d_model]``; ``fn`` must return the same shape. Used for ablations and
    splice-in evaluation: the rest of the model runs on the edited residual stream.
    """
    check_layer(model, layer)

    def hook(_module: nn.Module, _args: tuple, output: torch.Tensor | tuple) -> torch.Tensor | tuple:
        hidden = _hidden(output)
        new = fn(hidden)
        if new.shape != hidden.shape:
            raise ValueError(f"edit_residual fn changed the shape {tuple(hidden.shape)} -> {tuple(new.shape)}")
        return _with_hidden(output, new.to(hidden.dtype))

    handle = decoder_layers(model)[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
