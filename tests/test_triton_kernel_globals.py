"""Every module global a Triton kernel reads is one a compiled kernel may read.

Compiled Triton refuses a plain module global inside ``@triton.jit`` (``x = 42``; it takes ``x =
tl.constexpr(42)``), but Triton's interpreter, which is how CI runs the kernels on CPU, reads it like Python
does. One such global (the padding key of the Triton top-k candidates, branch topk) passed every CPU test
and failed every sampler test on their first GPU run. This check reads the kernels' source instead of
running them, so it needs no GPU.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import sys
import textwrap
import types

import pytest
import triton
import triton.language as tl

KERNEL_MODULES = [
    "graphhal.paged_attention.triton_decode_attention",
    "graphhal.paged_attention.triton_prefill_attention",
    "graphhal.sampling.triton_random",
    "graphhal.sampling.triton_sample",
]


def jitted_functions(module: types.ModuleType) -> dict[str, types.FunctionType]:
    """The module's own ``@triton.jit`` functions, through any wrappers around them (``@triton.autotune`` and
    ``@triton.heuristics`` wrap the JITFunction, which wraps the function; each keeps the next in ``.fn``)."""
    found = {}
    for name, value in vars(module).items():
        if not type(value).__module__.startswith("triton."):
            continue
        wrapped = value
        while not inspect.isfunction(wrapped) and hasattr(wrapped, "fn"):
            wrapped = wrapped.fn
        if inspect.isfunction(wrapped) and wrapped.__module__ == module.__name__:
            found[name] = wrapped
    return found


def read_globals(function: types.FunctionType) -> set[str]:
    """Names the function's body loads that it neither takes nor assigns: module globals or builtins."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    definition = tree.body[0]
    arguments = definition.args
    local = {a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs}
    loaded = set()
    # The body only: decorators and argument defaults are evaluated by Python when the module loads, where any
    # global is allowed, not by Triton's code generator.
    for node in (inner for statement in definition.body for inner in ast.walk(statement)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else local).add(node.id)
    return loaded - local


def compiled_kernel_may_read(value: object) -> bool:
    """What Triton's code generator accepts as a global: constexprs, other jitted functions, modules,
    triton.language's own objects (dtypes, builtins)."""
    if isinstance(value, (tl.constexpr, tl.dtype, types.ModuleType)):
        return True
    if type(value).__module__.startswith("triton.") and inspect.isfunction(getattr(value, "fn", None)):
        return True
    return getattr(value, "__module__", "").startswith("triton.language")


def forbidden_globals(function: types.FunctionType) -> dict[str, str]:
    forbidden = {}
    for name in sorted(read_globals(function)):
        if name not in function.__globals__:
            if not hasattr(builtins, name):
                forbidden[name] = "undefined"
            continue
        value = function.__globals__[name]
        if not compiled_kernel_may_read(value):
            forbidden[name] = f"{type(value).__name__} {value!r}"
    return forbidden


@pytest.mark.parametrize("module_name", KERNEL_MODULES)
def test_kernels_read_only_globals_a_compiled_kernel_may(module_name):
    module = importlib.import_module(module_name)
    kernels = jitted_functions(module)
    assert kernels, f"{module_name} has no @triton.jit functions: KERNEL_MODULES is stale"
    bad = {name: forbidden for name, fn in kernels.items() if (forbidden := forbidden_globals(fn))}
    assert not bad, (
        f"{module_name}: kernels read module globals compiled Triton refuses (make them tl.constexpr): {bad}"
    )


def test_every_module_with_kernels_is_checked():
    import pathlib

    import graphhal

    root = pathlib.Path(graphhal.__file__).parent
    with_kernels = {
        "graphhal." + ".".join(path.relative_to(root).with_suffix("").parts)
        for path in root.rglob("*.py")
        if "triton.jit" in path.read_text()
    }
    assert with_kernels == set(KERNEL_MODULES)


# A planted bug: the padding key as a plain int, as the candidates' merge kernel first had it.
_PLAIN_KEY = -(2**63)
_CONSTEXPR_KEY = tl.constexpr(-(2**63))


def _kernel_with_plain_global(ptr):
    tl.store(ptr, _PLAIN_KEY + _CONSTEXPR_KEY + abs(0))


def test_the_check_names_a_plain_global():
    assert forbidden_globals(_kernel_with_plain_global) == {"_PLAIN_KEY": f"int {-(2**63)}"}


_DEFAULT_SCALE = 3  # a plain global in an argument default: Python reads it when the module loads, not Triton


@triton.heuristics({})  # a wrapper around the JITFunction, as @triton.autotune is (which needs a driver to build)
@triton.jit
def _wrapped_kernel_with_plain_global(ptr, scale=_DEFAULT_SCALE):
    tl.store(ptr, _PLAIN_KEY + scale)


def test_a_wrapped_kernel_is_found_through_its_wrappers_and_its_argument_defaults_are_not_flagged():
    kernels = jitted_functions(sys.modules[__name__])
    assert set(kernels) == {"_wrapped_kernel_with_plain_global"}
    assert forbidden_globals(kernels["_wrapped_kernel_with_plain_global"]) == {"_PLAIN_KEY": f"int {-(2**63)}"}
