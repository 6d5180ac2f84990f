"""Expert activations by name, with the derivatives the grouped FFN's backward uses.

Plain FFNs compute act(x W_in + b_in) W_out + b_out; gated ones (act(x W_gate + b_gate) * (x W_in + b_in)) W_out +
b_out, where the gate's act is one of the plain ones. Derivatives are aten's own, so a hand-written backward gives
exactly what autograd would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

aten = torch.ops.aten

PLAIN: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}
GATE_OF = {"swiglu": "silu", "geglu": "gelu"}  # gated activation -> the plain activation of its gate
GATED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {name: PLAIN[g] for name, g in GATE_OF.items()}
ACTIVATIONS = (*PLAIN, *GATED)

# Each writes the gradient through the activation over ``grad`` and returns it (aten's ``grad_input=`` form; an
# elementwise op may write over its own input): the FFN's backward then makes no second [rows, d_ff] buffer per segment.
DERIVATIVES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gelu": lambda grad, h: aten.gelu_backward.grad_input(grad, h, grad_input=grad),
    "gelu_tanh": lambda grad, h: aten.gelu_backward.grad_input(grad, h, approximate="tanh", grad_input=grad),
    "relu": lambda grad, h: aten.threshold_backward.grad_input(grad, h, 0, grad_input=grad),
    "silu": lambda grad, h: aten.silu_backward.grad_input(grad, h, grad_input=grad),
}


def is_gated(activation: str) -> bool:
    return activation in GATED
