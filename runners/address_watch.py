"""Checking that every tensor a captured graph reads by address is still there, before each replay.

A graph reads its inputs, the weights and the KV cache at the addresses it was captured with. A static input
buffer replaced in the runner, ``param.data = new`` on a weight, a KV-cache layer rebound to a new tensor:
each leaves the graph reading the old memory, and the results are stale with no error. vLLM checks addresses
only in debug mode; graphhal checks before every replay by default (``check_addresses``), because one check
costs a few microseconds (measured in docs/bench.md) and a stale replay costs correctness.

What is watched is given as *sources*: a tensor, an ``nn.Module`` (its parameters, buffers and tensor
attributes, through every submodule), or any object, list, tuple or dict holding tensors (a KV cache). A
source is walked once, into the containers that hold each tensor; every check reads each tensor out of its
container again, so rebinding an entry (``cache.key_caches[0] = other``, ``module.weight = Parameter(...)``)
is caught as well as a tensor whose storage changed under it.
"""

from __future__ import annotations

import operator
from typing import Any, Iterator, Mapping

import torch

from hal import StaticAddressError

# How deep an object (not a module) is walked for tensors: a KV cache holds lists of tensors, a server's
# cache manager perhaps one level more. Deeper graphs of objects are a sign the wrong thing was passed.
MAX_OBJECT_DEPTH = 4

_data_ptr = torch.Tensor.data_ptr
_getitem = operator.getitem
# torch's own check for cudagraph trees, in C++ (CUDA builds): one call compares every tensor's address with
# what was recorded, where Python pays a data_ptr call per tensor. Used when present and answering right.
_native_check = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


class AddressWatch:
    """What to check, and the addresses ``snapshot`` found: the runner's own buffers plus the watched sources.

    Sources are walked when the snapshot is taken, right after the largest bucket's capture, so a tensor a
    model allocates lazily in its first forward, or a KV cache bound after the runner was built, is watched as
    the graphs read it. Besides the tensors, the containers on the way to them are checked to still be in
    place (links): a cache whose ``key_caches`` list was replaced, or a submodule swapped for another, holds
    tensors the graphs never saw.
    """

    def __init__(self) -> None:
        self._buffers: list[tuple[str, Any, Any]] = []  # (label, container, key) of the runner's own buffers
        self._sources: dict[str, Any] = {}
        self._labels: list[str] = []
        self._containers: list[Any] = []  # dicts (an object's __dict__ too), lists and tuples
        self._keys: list[Any] = []
        self._expected: list[int] = []
        self._indices: list[int] = []
        self._native: Any = None
        self._link_labels: list[str] = []
        self._link_containers: list[Any] = []
        self._link_keys: list[Any] = []
        self._link_objects: list[Any] = []

    @classmethod
    def of_runner(cls, inputs: Any, watched_tensors: Mapping[str, Any]) -> "AddressWatch":
        """A runner's watch: its input buffers (``runners.step_inputs.StepInputs``) and what it was told to watch."""
        watch = cls()
        watch.add_entries("input slot", inputs.rows.buffers, list(inputs.rows.buffers))
        watch.add_entries("input slot", inputs.requests.buffers, list(inputs.requests.buffers))
        for name, source in watched_tensors.items():
            watch.add_source(name, source)
        return watch

    def settle(self, bucket: int, largest: int, phase: str) -> None:
        """After a runner's largest bucket: record where its graphs read (what a first forward allocated lazily
        included). After every later one: refuse a tensor that moved during the capture loop, since the graphs
        captured before it read the old one."""
        if bucket == largest:
            self.snapshot()
            return
        moved = self.moved()
        if moved:
            raise StaticAddressError(
                f"{', '.join(moved)} moved while the {phase} graphs were being captured (after the largest "
                f"bucket, before bucket {bucket}); the graphs captured earlier read the old memory. Allocate "
                "these tensors before capture and keep them in place."
            )

    def add_entries(self, label: str, container: Any, keys: Any) -> None:
        """Watch ``container[key]`` for each key (the runner's own static buffers)."""
        self._buffers.extend((f"{label} {key!r}", container, key) for key in keys)

    def add_source(self, name: str, source: Any) -> None:
        """Watch every tensor ``source`` holds at snapshot time; TypeError naming ``name`` now for a value that
        can hold none (a number, a string, None)."""
        if not isinstance(name, str):
            raise TypeError(f"watched_tensors keys must be names (str), got {name!r}")
        if not isinstance(source, (torch.Tensor, torch.nn.Module, list, tuple, dict)) and (
            not hasattr(source, "__dict__") or isinstance(source, type) or callable(source)
        ):
            raise TypeError(
                f"watched_tensors[{name!r}] is a {type(source).__name__}; pass a tensor, an nn.Module (its "
                "parameters and buffers are watched), or an object, list or dict holding tensors (such as a KV cache)"
            )
        self._sources[name] = source

    def snapshot(self) -> None:
        """Walk the sources and record where every tensor is now: the addresses the graphs read.

        TypeError naming the source when it holds no tensor by now.
        """
        self._labels, self._containers, self._keys = [], [], []
        self._link_labels, self._link_containers, self._link_keys, self._link_objects = [], [], [], []
        for label, container, key in self._buffers:
            self._add_tensor(label, container, key)
        for name, source in self._sources.items():
            self._walk(name, source)
        self._expected = self._addresses()
        self._indices = list(range(len(self._expected)))
        self._native = _native_check if self._native_check_works() else None

    def _walk(self, name: str, source: Any) -> None:
        before = len(self._labels)
        if isinstance(source, torch.Tensor):
            self._add_tensor(f"watched tensor {name!r}", [source], 0)
        else:
            for kind, label, container, key in _entries(source, f"watched {name!r}", MAX_OBJECT_DEPTH, set()):
                if kind == "tensor":
                    self._add_tensor(label, container, key)
                else:
                    self._link_labels.append(label)
                    self._link_containers.append(container)
                    self._link_keys.append(key)
                    self._link_objects.append(container[key])
        if len(self._labels) == before:
            raise TypeError(
                f"watched_tensors[{name!r}] is a {type(source).__name__} holding no tensor; pass a tensor, an "
                "nn.Module (its parameters and buffers are watched), or an object, list or dict holding tensors "
                "(such as a KV cache)"
            )

    def _add_tensor(self, label: str, container: Any, key: Any) -> None:
        self._labels.append(label)
        self._containers.append(container)
        self._keys.append(key)

    def _addresses(self) -> list[int]:
        return list(map(_data_ptr, map(_getitem, self._containers, self._keys)))

    def _tensors_in_place(self) -> bool:
        tensors = list(map(_getitem, self._containers, self._keys))
        if self._native is not None:
            return bool(self._native(tensors, self._expected, self._indices))
        return list(map(_data_ptr, tensors)) == self._expected

    def _native_check_works(self) -> bool:
        """Whether torch's native check exists here and tells a moved tensor from one in place."""
        if _native_check is None or not self._expected:
            return False
        tensors = list(map(_getitem, self._containers, self._keys))
        try:
            moved = list(self._expected)
            moved[0] += 1
            return _native_check(tensors, self._expected, self._indices) is True and not _native_check(
                tensors, moved, self._indices
            )
        except Exception:  # another signature in this torch build: the Python check serves
            return False

    def _links_hold(self) -> bool:
        return all(map(operator.is_, map(_getitem, self._link_containers, self._link_keys), self._link_objects))

    def moved(self) -> list[str]:
        """What moved since ``snapshot`` (empty when everything is in place): the cheap check first."""
        if self._tensors_in_place() and self._links_hold():  # the hot path: C-level maps (or one native call)
            return []
        moved = [label for label, now, then in zip(self._labels, self._addresses(), self._expected) if now != then]
        return moved + [
            label
            for label, container, key, then in zip(
                self._link_labels, self._link_containers, self._link_keys, self._link_objects
            )
            if container[key] is not then
        ]

    def check(self, where: str) -> None:
        """Raise ``StaticAddressError`` naming every tensor that moved since ``snapshot``."""
        moved = self.moved()
        if moved:
            raise StaticAddressError(
                f"{', '.join(moved)} moved since {where} was captured: the graph would read the old memory. Keep "
                "these tensors in place (copy_ into them rather than rebinding or assigning .data), or build a new "
                "runner and capture it."
            )


def _entries(value: Any, label: str, depth: int, seen: set[int]) -> Iterator[tuple[str, str, Any, Any]]:
    """("tensor" or "link", label, container, key) for every tensor reachable from ``value`` and every
    container on the way to one."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.nn.Module):
        yield from _module_entries(value, label, seen)
        return
    if depth == 0:
        return
    if isinstance(value, dict):
        items, container, attribute_style = list(value.items()), value, False
    elif isinstance(value, (list, tuple)):
        items, container, attribute_style = list(enumerate(value)), value, False
    elif hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value):
        items, container, attribute_style = list(vars(value).items()), vars(value), True
    else:
        return
    for key, item in items:
        item_label = f"{label}.{key}" if attribute_style else f"{label}[{key!r}]"
        if isinstance(item, torch.Tensor):
            yield "tensor", item_label, container, key
            continue
        inside = list(_entries(item, item_label, depth - 1, seen))
        if inside:  # only containers that lead to a tensor are worth checking
            yield "link", item_label, container, key
            yield from inside


def _module_entries(module: torch.nn.Module, label: str, seen: set[int]) -> Iterator[tuple[str, str, Any, Any]]:
    # Read through the dicts nn.Module keeps: ``module.weight = Parameter(...)`` rebinds an entry of
    # ``_parameters``, and a submodule swapped in ``_modules`` brings tensors the graph never saw.
    for name, parameter in module._parameters.items():
        if parameter is not None:
            yield "tensor", f"{label}.{name}", module._parameters, name
    for name, buffer in module._buffers.items():
        if buffer is not None:
            yield "tensor", f"{label}.{name}", module._buffers, name
    for name, attribute in vars(module).items():  # plain tensor attributes (tables a module keeps unregistered)
        if isinstance(attribute, torch.Tensor):
            yield "tensor", f"{label}.{name}", vars(module), name
    for name, child in module._modules.items():
        if child is None:
            continue
        inside = list(_entries(child, f"{label}.{name}", MAX_OBJECT_DEPTH, seen))
        if inside:
            yield "link", f"{label}.{name}", module._modules, name
            yield from inside
