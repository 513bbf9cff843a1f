"""When an eager call may run a graphhal custom op's kernel itself instead of calling the op.

Calling a ``torch.library.custom_op`` eagerly walks several Python frames before its kernel runs (the op
object, the autograd wrapper, the ADInplaceOrView wrapper that bumps version counters, the backend wrapper
with its argument checks): about 25 us a call, against 7 us for the kernel body of ``write_kv_cache``
(2-core CPU host, torch 2.13). The model calls two such ops per layer, so a default 8-layer decode step paid
about 0.4 ms for the wrappers alone, and a runner pays every eager step twice per captured bucket (warm-up,
then the capture, which executes the Python again).

The op is still what tracing and recording see; the model skips it only where nothing can tell the
difference, that is when none of these watches the call:
- torch.compile tracing (the op must stay one opaque node: piecewise graphs split at it);
- a dispatch mode (the CPU recorded graph records the op as a unit and replays it; fake tensors, make_fx,
  the npu capture modes) or a torch function mode (either may intercept the op);
- autograd (an input that requires grad: autograd records the op as one node, as before) or a tensor
  subclass.
The kernels the model runs directly are exactly the ones the op would dispatch to, so results are identical.
"""

from __future__ import annotations

import torch


def unobserved_eager_call(tensor: torch.Tensor) -> bool:
    """Whether an op call with ``tensor`` (its first tensor argument, which shares the call's device and
    grad requirement) may run the op's kernel directly: nothing listed in the module docstring watches it."""
    # is_compiling first: torch.compile folds it to True and never traces the private queries after it.
    return (
        not torch.compiler.is_compiling()
        and type(tensor) is torch.Tensor
        and not tensor.requires_grad
        and torch._C._len_torch_dispatch_stack() == 0
        and not torch._C._is_torch_function_mode_enabled()
    )
