"""A compiled forward kept on disk, so that a restarted process skips Dynamo's trace and Inductor's compile.

Inductor's caches (``runners.compile_cache``) spare a restart the code generation, but not Dynamo: every
process traces the model again and runs the compile pipeline around the cache hits, seconds for a real model.
torch's ``aot_compile`` (experimental, torch 2.10 and later) keeps Dynamo's output as well: the rewritten
bytecode and the compiled graph, which ``torch.compiler.load_compiled_function`` hands back in a new process
without tracing anything. vLLM starts its workers the same way.

A stored compile is a file per *fingerprint* (``fingerprint``): everything the compiled code was traced from
that can differ between two processes:

- the versions of torch and Triton, and the device (with its index) it compiled for;
- the forward's module tree: every module's type, its plain attributes (sizes, epsilons, configs) and its
  hooks, every parameter's and buffer's shape, stride, dtype and device, and the same for what plain objects
  hold (a KV cache's tensors); for functions, what their closures captured and their defaults;
- the inputs' dtypes, trailing shapes and strides, which of them carry the token dimension, whether that
  dimension was dynamic, and the grad, inference and autocast modes, the default dtype, deterministic mode;
- Inductor's configuration and float32 matmul precision.

Weights' *values* are not in it: the stored code reads them from the forward it is handed, like the KV cache.
Every other value is described by its content (sets sorted, objects by their attributes or slots); a value
that cannot be (an object of a C type holding no readable attributes, a compiled regex, a lock, a structure
nested deeper than the fingerprint looks) raises ``UndescribableError``, and the forward is compiled without
the store: a fingerprint that left the value out would match a forward traced with another value.

Guards, Dynamo's usual protection, are not kept: most cannot be serialized (they name objects of the
process that traced), and graphhal's runners check every input before calling (``CompiledForward`` drops
shape guards for the same reason). What the fingerprint cannot see, the source, is checked when the file is
loaded: every module Dynamo traced into must be, whole, what it was at the compile (a module-level constant
is baked into the graph too). A file that differs, that another torch wrote, or that cannot be read is
logged and ignored: the forward is compiled again and stored over it.

Not seen: a value a traced module computes when it is imported from something outside it (an environment
variable, a file, another module's constant imported by name), and a private attribute holding more than a
plain value. A server whose forward depends on such a value must change its compile cache directory (or
empty its ``forwards/``) when the value changes. The files are pickles: the directory must be writable by the
server alone.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import functools
import hashlib
import importlib
import inspect
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

logger = logging.getLogger(__name__)

FORMAT = "graphhal-stored-compile-3"  # bumped whenever what a file holds, how it is keyed, or how it compiles changes
# Values whose repr is their content, the same in every process.
_SCALARS = (
    bool, int, float, complex, str, bytes, type(None), range, slice, torch.dtype, torch.device, torch.layout,
    torch.memory_format, enum.Enum,
)
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs")
_DEPTH = 8  # how far into plain objects and containers the fingerprint looks (a KV cache's config's fields)


class UndescribableError(Exception):
    """A value the forward holds that the fingerprint cannot describe by content: if the trace read it, a key
    that left it out would hand this forward a compile traced with another value. ``CompiledForward`` then
    compiles without the store.
    The message says where the value sits (``MyModule root.gate.allowed``) and what it is."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
        self.path: list[str] = []  # innermost first: each enclosing container adds its step on the way out

    def __str__(self) -> str:
        return f"{''.join(reversed(self.path)) or 'the forward'} is {self.what}, which the fingerprint cannot describe"


def available() -> bool:
    """Whether this torch can store a compile (``aot_compile`` and ``load_compiled_function`` exist)."""
    return hasattr(torch._dynamo.config, "enable_aot_compile") and hasattr(torch.compiler, "load_compiled_function")


class CompileStore:
    """A directory of stored compiles, one file per fingerprint."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        return self.directory / f"forward-{key}.bin"

    def load(self, key: str) -> Any | None:
        """The stored compile for ``key``, or None (nothing stored, its sources changed, or unreadable)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with path.open("rb") as handle:
                compiled = torch.compiler.load_compiled_function(handle)
        except Exception as exc:  # another torch's file, a truncated one: compile again and store over it
            logger.warning("graphhal: ignoring the stored compile %s (%s: %s); compiling again", path, type(exc).__name__, exc)
            return None
        changed = changed_sources(compiled)
        if changed:
            logger.info("graphhal: the stored compile %s was traced from other source (%s); compiling again", path, changed)
            return None
        return compiled

    def save(self, key: str, compiled: Any) -> bool:
        """Write ``compiled`` under ``key`` (atomically: a concurrent reader sees the old file or the new)."""
        temporary = None
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.directory, prefix=".forward-", delete=False) as handle:
                temporary = handle.name
            compiled.save_compiled_function(temporary)
            os.chmod(temporary, 0o644)  # readable wherever the directory is shared, like the caches beside it
            os.replace(temporary, self.path(key))
        except Exception as exc:  # the compile is done: a file that cannot be written must not undo it
            logger.warning("graphhal: could not store the compiled forward in %s (%s: %s)", self.directory, type(exc).__name__, exc)
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            return False
        return True


def changed_sources(compiled: Any) -> str | None:
    """The first module Dynamo traced into whose source differs from what it was at the compile, or None.

    The whole module, not only the traced function: a module-level constant the function reads is baked into
    the graph as well."""
    for source in compiled.source_info().inlined_sources:
        try:
            current = inspect.getsource(importlib.import_module(source.module))
        except (ImportError, OSError, TypeError):
            return f"{source.module} (not importable)"
        if current != source.content:
            return source.module
    return None


def fingerprint(forward: Any, inputs: Mapping[str, torch.Tensor], token_inputs: tuple[str, ...], dynamic: bool, backend: str) -> str:
    """The key a compile of ``forward`` at ``inputs`` is stored under (see the module docstring);
    ``UndescribableError`` when the forward holds a value it cannot describe."""
    device_types = sorted({tensor.device.type for tensor in inputs.values()})
    parts: list[Any] = [
        FORMAT, torch.__version__, _triton_version(), backend, [_device_name(kind) for kind in device_types],
        _describe(forward, {}),
        [(name, _input(tensor, dynamic and name in token_inputs)) for name, tensor in sorted(inputs.items())],
        token_inputs, dynamic, torch.is_grad_enabled(), torch.is_inference_mode_enabled(),
        [_autocast(kind) for kind in device_types],
        str(torch.get_default_dtype()), torch.are_deterministic_algorithms_enabled(),
        torch.get_float32_matmul_precision(), _inductor_config(),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def _autocast(kind: str) -> Any:
    try:
        return (kind, torch.is_autocast_enabled(kind), str(torch.get_autocast_dtype(kind)))
    except RuntimeError:  # a device type without autocast (meta)
        return kind


def _triton_version() -> str:
    try:
        import triton
    except ImportError:  # a device without Triton (npu): Inductor compiles without it there
        return "none"
    return triton.__version__


def _device_name(kind: str) -> str:
    module = getattr(torch, kind, None)
    name = getattr(module, "get_device_name", None)
    try:
        return f"{kind}: {name()}" if callable(name) and module.is_available() else kind
    except Exception:  # a device module that cannot answer: its kind must do
        return kind


def _inductor_config() -> str:
    from torch._inductor import config

    return repr(sorted(config.save_config_portable().items()))


def _describe(value: Any, memo: dict[int, tuple[Any, Any]], depth: int = _DEPTH) -> Any:
    """What of ``value`` a compile can depend on, as plain data that is the same in every process.

    ``memo`` holds each object described so far (and the object, so that its id stays its own): an object
    reached twice (a config every layer holds) is described once, and a cycle ends."""
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if value is None or isinstance(value, _SCALARS):
        return repr(value)
    if isinstance(value, torch.nn.Module):
        return _module(value, memo)
    if depth == 0:
        raise UndescribableError(f"a {type(value).__qualname__} nested deeper than {_DEPTH} levels")
    if isinstance(value, (list, tuple, collections.deque)):
        if all(isinstance(item, _SCALARS) for item in value):
            return [type(value).__qualname__, repr(list(value))]  # a long list of numbers (a table in a config) at C speed
        return [type(value).__qualname__, [_step(f"[{index}]", item, memo, depth - 1) for index, item in enumerate(value)]]
    if isinstance(value, (set, frozenset)):  # by content: a set's order differs between processes
        if all(isinstance(item, _SCALARS) for item in value):
            return [type(value).__qualname__, sorted(repr(item) for item in value)]
        return [type(value).__qualname__, sorted(repr(_step("{...}", item, memo, depth - 1)) for item in value)]
    if isinstance(value, dict):
        items = sorted(value.items(), key=lambda item: repr(item[0]))
        return [(repr(key), _step(_key_step(key), item, memo, depth - 1)) for key, item in items]
    if id(value) in memo:
        return memo[id(value)][1]
    memo[id(value)] = (value, type(value).__qualname__)  # what a cycle back to it sees
    memo[id(value)] = (value, _describe_object(value, memo, depth))
    return memo[id(value)][1]


def _describe_object(value: Any, memo: dict[int, tuple[Any, Any]], depth: int) -> Any:
    if inspect.ismethod(value):
        return [value.__func__.__qualname__, _describe(value.__self__, memo, depth - 1)]
    if isinstance(value, functools.partial):
        return ["partial", _describe([value.func, value.args, value.keywords], memo, depth - 1)]
    if inspect.isfunction(value):  # what a closure captured, and its defaults, are baked in like constants
        cells = [cell.cell_contents for cell in value.__closure__ or () if _filled(cell)]
        captured = [cells, value.__defaults__, value.__kwdefaults__]
        return [f"{value.__module__}.{value.__qualname__}", _describe(captured, memo, depth - 1)]
    if callable(value) and hasattr(value, "__qualname__"):  # a builtin, a class
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if dataclasses.is_dataclass(value):
        fields = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
        return [type(value).__qualname__, _describe(fields, memo, depth - 1)]
    to_dict = getattr(value, "to_dict", None)  # a transformers config
    if callable(to_dict):
        return [type(value).__qualname__, _describe(to_dict(), memo, depth - 1)]
    if hasattr(value, "__dict__") or _slots(value):  # a plain object the forward reads: a KV cache, a group
        return [type(value).__qualname__, _describe(_public(value), memo, depth - 1)]
    if all(hasattr(value, name) for name in ("dtype", "shape", "tobytes")):  # a numpy array: its values
        content = hashlib.sha256(value.tobytes()).hexdigest()
        return [type(value).__qualname__, str(value.dtype), tuple(value.shape), content]
    if torch.distributed.is_available() and isinstance(value, torch.distributed.ProcessGroup):
        # A tensor-parallel forward's group: its collectives are traced with its name, this rank and the size.
        return [type(value).__qualname__, getattr(value, "group_name", ""), value.rank(), value.size()]
    raise UndescribableError(f"a {type(value).__module__}.{type(value).__qualname__} (no attributes to read)")


def _step(step: str, value: Any, memo: dict[int, tuple[Any, Any]], depth: int) -> Any:
    """``_describe(value)``, naming ``step`` in the path of a value it cannot describe."""
    try:
        return _describe(value, memo, depth)
    except UndescribableError as exc:
        exc.path.append(step)
        raise


def _key_step(key: Any) -> str:
    return f".{key}" if isinstance(key, str) and key.isidentifier() else f"[{key!r}]"


def _module(module: torch.nn.Module, memo: dict[int, tuple[Any, Any]]) -> Any:
    if id(module) in memo:  # a module inside a tree described already (or this one, reached again)
        return memo[id(module)][1]
    described = []
    for name, submodule in module.named_modules():
        memo[id(submodule)] = (submodule, f"{type(submodule).__qualname__} {name or 'root'}")
    for name, submodule in module.named_modules():
        plain = {key: item for key, item in _public(submodule).items() if not isinstance(item, torch.nn.Module)}
        described.append((name, type(submodule).__qualname__, _step(f"{type(submodule).__qualname__} {name or 'root'}", plain, memo, _DEPTH)))
    tensors = [(name, _tensor(tensor)) for name, tensor in module.named_parameters(remove_duplicate=False)]
    tensors += [(name, _tensor(tensor)) for name, tensor in module.named_buffers(remove_duplicate=False)]
    return [described, tensors]


def _public(value: Any) -> dict[str, Any]:
    """An object's attributes, but of its private ones only the plain values (``self._eps``): the others hold
    state that changes as a server runs (a block allocator's free list) and that a forward does not bake into
    its graph, or (in a module) the parameters and submodules, described apart. A module's hooks are kept:
    they run inside the forward."""
    kept = {}
    for key, item in {**_slots(value), **getattr(value, "__dict__", {})}.items():
        if not key.startswith("_") or isinstance(item, _SCALARS):
            kept[key] = item
        elif key in _MODULE_HOOKS and item:
            kept[key] = list(item.values())  # not the handles' ids: a process-wide counter
    return kept


def _slots(value: Any) -> dict[str, Any]:
    """The attributes an object keeps in ``__slots__`` rather than in its ``__dict__``."""
    found = {}
    for cls in type(value).__mro__:
        names = getattr(cls, "__slots__", ())
        for name in [names] if isinstance(names, str) else names:
            if name in ("__dict__", "__weakref__"):
                continue
            stored = f"_{cls.__name__.lstrip('_')}{name}" if name.startswith("__") and not name.endswith("__") else name
            try:
                found[name] = getattr(value, stored)
            except AttributeError:  # a slot not assigned
                continue
    return found


def _filled(cell: Any) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # a closure variable not assigned yet
        return False
    return True


def _input(tensor: torch.Tensor, dynamic: bool) -> tuple[Any, ...]:
    # A dynamic dim 0 is the bucket, which one compile serves at every size: not part of the key.
    shape, stride = (tensor.shape[1:], tensor.stride()[1:]) if dynamic else (tensor.shape, tensor.stride())
    return (tuple(shape), stride, str(tensor.dtype), str(tensor.device))


def _tensor(tensor: torch.Tensor) -> tuple[Any, ...]:
    # The device with its index: compiled code is bound to the device it was compiled on (a rank's GPU).
    return (tuple(tensor.shape), tensor.stride(), str(tensor.dtype), str(tensor.device), tensor.requires_grad)
