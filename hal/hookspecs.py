"""The device contract: every hook a graphhal device plugin implements, documented in one place.

A plugin is a module or object with functions marked ``@hal.hookimpl`` and named like the specs below
(taking any subset of a spec's parameters, as pluggy allows). It registers what it serves: the device types
it names in ``hal_device_types``. The registry decides once, at discovery, which plugin owns each device
type, and the ``Device`` facade binds that plugin's implementations when it is created; after that, a call
such as ``Device.replay`` goes straight to the owner's function, with no search over plugins. So a plugin is
only ever asked about devices of the types it serves and about graphs it made, and its hooks answer without
asking "is this mine?" (a plugin serving several types tells them apart by ``device.type``).

A hook is either required (``REQUIRED_HOOKS``, the one list of them: the registry refuses a plugin that
lacks one, and docs/device-plugins.md points here) or has a default in ``hal.default_hooks``, named in its
spec, which the facade binds when the plugin leaves the hook out; for such a hook, returning None also means
"use the default". Each spec says what None means where it means something else. The facade checks the type of
every answer (``hal.PluginContractError`` names the plugin, the hook and the type expected).

graphhal never calls these hooks through ``pm.hook``, which would ask every plugin about every device: the
per-device and per-graph hooks are ``firstresult`` only so that one answer comes back where a tool does.
Ask the registry (``DeviceRegistry.get_device``, ``is_available``, ``graph_modes_of``) instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ContextManager, Mapping, Sequence

from hal.markers import hookspec

if TYPE_CHECKING:
    import torch

    from hal.all_reducer import AllReducer
    from hal.conventions import DeviceConventions
    from hal.device_id import DeviceId
    from hal.memory_stats import MemoryStats

# The hooks a plugin must implement; every other hook has a default in hal.default_hooks.
REQUIRED_HOOKS = (
    "hal_device_types",
    "hal_is_available",
    "hal_graph_modes",
    "hal_make_graph",
    "hal_capture_session",
    "hal_replay",
    "hal_synchronize",
)


# --- discovery ------------------------------------------------------------------------------------------


@hookspec
def hal_device_types() -> Sequence[str]:
    """Return the device types this plugin serves, e.g. ``["cuda"]``.

    Called once per plugin when the registry loads it. Not firstresult: every plugin answers. A type served
    by two plugins goes to the one loaded later (entry points load after the built-in devices, so a vendor
    package can replace a built-in device); two entry-point plugins claiming one type make the second one
    broken.

    Required. Every plugin answers with a non-empty list of names (a bare string is
    refused).
    """


@hookspec(firstresult=True)
def hal_is_available(device: "DeviceId") -> bool | None:
    """Return whether ``device`` can be used on this machine right now.

    Called by ``get_device`` before it hands out a facade, and by ``available_device_types``.
    ``device.index`` is None for the bare type ("cuda"): answer for the default index. Must not raise when
    the vendor runtime is missing: answer False. None reads as False.

    Required.

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_graph_modes(device: "DeviceId") -> Sequence[str] | None:
    """Return the graph modes this device can capture, e.g. ``("full",)``.

    Called once when the facade is created. ``"disabled"`` (eager) is implicit and needs no listing, and
    ``"auto"`` is never a device's mode (a runner resolves it). None reads as no graph modes (eager only).

    Required. Also asked at discovery with ``device.index`` None: a plugin that answers with something
    other than a list of names is left out then.

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_torch_device(device: "DeviceId") -> "torch.device | None":
    """Return the torch device that tensors for ``device`` live on.

    Called once when the facade is created; runners allocate their static buffers there. The default,
    ``torch.device(device.type, device.index)``, only works for types torch knows.

    Default: ``hal.default_hooks.hal_torch_device``.

    :param device: the device asked about.
    """


# --- graphs ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def hal_make_graph(device: "DeviceId", mode: str) -> Any:
    """Return a fresh, empty graph object for ``device`` in ``mode``.

    Called once per captured shape, before ``hal_capture_session``. ``mode`` is one of the modes from
    ``hal_graph_modes`` (the facade checks that first). The object is opaque to graphhal: it is only ever
    handed back to this plugin's hooks. None breaks the contract (``hal.PluginContractError``).

    Required.

    :param device: the device the graph is for.
    :param mode: one of the device's ``hal_graph_modes``.
    """


@hookspec(firstresult=True)
def hal_capture_session(graph: Any, pool: Any, stream: Any) -> ContextManager[Any] | None:
    """Return a context manager that records the device work issued inside it into ``graph``.

    ``pool`` is a handle from ``hal_graph_pool`` (or None for a private pool): every allocation made during
    the capture must come from it, so that all graphs of one runner share memory. ``stream`` is from
    ``hal_capture_stream`` (or None: choose one). The session must never run ``gc.collect()`` or empty the
    allocator cache: runners capture dozens of shapes in a row and freeze the collector themselves.

    Work is recorded, not meant to be relied on as executed: tensors produced inside hold valid values only
    after ``hal_replay``. When the body raises, the session must end the capture (leave no stream
    capturing), drop what was partially recorded and re-raise, so the device stays usable for eager work
    and for the next capture. Capturing a graph that is already captured raises ``hal.GraphStateError``
    naming the device. Anything but a context manager breaks the contract (``hal.PluginContractError``).

    Required.

    :param graph: a graph this plugin made (``hal_make_graph``).
    :param pool: a handle from ``hal_graph_pool``, or None.
    :param stream: the device's ``hal_capture_stream``, or None.
    """


@hookspec(firstresult=True)
def hal_replay(graph: Any) -> None:
    """Launch the work recorded in ``graph``.

    This is the hot path: called on every step. Asynchronous on devices that queue work. The outputs of
    the graph live in its pool and are overwritten by the next replay of any graph of that pool. Replaying
    a graph that was never captured (or whose capture failed) raises ``hal.GraphStateError`` naming the
    device. What it returns is ignored.

    Required.

    :param graph: a graph this plugin made and captured.
    """


@hookspec(firstresult=True)
def hal_capture_executes_work(device: "DeviceId") -> bool | None:
    """Return True when work issued inside a capture also runs then (a recording device), False when it is
    only recorded (CUDA, NPU: tensors made inside hold garbage until the first replay).

    Called once when the facade is created. A breakable capture replays each finished segment before it runs
    the break eagerly on a device that answers False, so the break sees real values, not garbage.

    Default: ``hal.default_hooks.hal_capture_executes_work`` (False).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_needs_graph_update(device: "DeviceId") -> bool | None:
    """Return True when graphs of this device bake host-side values that must be refreshed by ``hal_update``.

    Called once when the facade is created. Runners call ``hal_update`` before every replay only on devices
    that answer True (Ascend NPU attention takes sequence lengths as host lists).

    Default: ``hal.default_hooks.hal_needs_graph_update`` (False).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_update(graph: Any, params: Mapping[str, Any]) -> None:
    """Refresh host-side values captured in ``graph`` for its next replay.

    ``params`` maps a parameter name (e.g. ``"seq_lens"``) to its new host value for the live batch,
    padded to the graph's shape. The update may be asynchronous, but the device must order it so that the
    next ``hal_replay`` of ``graph`` sees these values and no earlier replay does. Only called on devices
    whose ``hal_needs_graph_update`` is True. What it returns is ignored.

    Default: ``hal.default_hooks.hal_update``, which raises (a device without host parameters has
    nothing to update).

    :param graph: a graph this plugin made and captured.
    :param params: slot role (``hal.SlotRole``) -> host values of the live batch, padded.
    """


# --- plumbing -------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def hal_compiled_capture_problem(device: "DeviceId", mode: str, compiler: str) -> str | None:
    """Return why this device cannot capture ``mode`` graphs of a forward compiled with ``compiler``, or None
    when it can.

    Called when a runner checks its config against the device (``PhaseConfig.check_device``), for every
    mode but ``disabled``, ``auto`` included: asked with ``auto`` before the runner picks its mode, object
    only to what no mode could capture (the mode auto picks is asked again). The runner raises
    ``hal.UnsupportedModeError`` with the answer after naming the device, mode and compiler, so the answer
    should say what cannot be captured and which compiler (or mode) to use instead. Two kinds of limits:

    - the compiler alone: torch.compile with Inductor emits fused kernels that are launched directly, not
      as torch ops; a device whose graphs record torch ops (the cpu reference device) would replay without
      them, in every mode;
    - the pair: a device whose updates find host values by watching torch ops during capture (npu) cannot
      find them where a compiled forward hides the op inside an opaque kernel, in ``full`` only.

    Default: ``hal.default_hooks.hal_compiled_capture_problem`` (None: no objection).

    :param device: the device asked about.
    :param mode: the graph mode the runner will capture: one of ``Device.modes`` (never ``disabled``), or
        ``auto`` before the runner has picked one.
    :param compiler: how the forward is compiled first (a ``hal.Compiler``; ``runners.config.COMPILERS_BY_MODE``).
    """


@hookspec(firstresult=True)
def hal_conventions(device: "DeviceId") -> "DeviceConventions | None":
    """Return the dtypes and pad fills this device's kernels expect for role slots (``hal.SlotRole``).

    Called once when the facade is created; runners read it through ``Device.conventions`` to type and pad
    slots that declare a role (cache locations, sequence lengths) instead of hard-coding one vendor's choice.
    The default is ``DeviceConventions()`` (int64 cache locations, int32 lengths padded with 0).

    Default: ``hal.default_hooks.hal_conventions``.

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_graph_pool(device: "DeviceId") -> Any:
    """Return a new memory pool handle that several graphs can capture into.

    Called once per runner (or once per group of runners that never replay at once). None is read by
    ``hal_capture_session`` as "a private pool per graph".

    Default: ``hal.default_hooks.hal_graph_pool`` (None).

    :param device: the device the pool is for.
    """


@hookspec(firstresult=True)
def hal_capture_stream(device: "DeviceId") -> Any:
    """Return the stream captures run on: a side stream, never the default one (CUDA forbids capturing the
    legacy default stream).

    Called once when the facade is created. None: the device has no streams.

    Default: ``hal.default_hooks.hal_capture_stream`` (None).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_synchronize(device: "DeviceId") -> None:
    """Block the host until all work queued on ``device`` has finished.

    Called after warm-up runs and around captures. What it returns is ignored.

    Required.

    :param device: the device to wait for.
    """


@hookspec(firstresult=True)
def hal_event(device: "DeviceId") -> Any:
    """Return a new event of ``device``: an object with ``record()`` (mark the point the work queued so far on
    the current stream has reached), ``query()`` (True once that work has finished, without blocking) and
    ``synchronize()`` (block the host until it has finished), as ``torch.cuda.Event`` has them.

    Called once per step a runner hands back without waiting (``submit``), right after the step's work is
    queued: a server waits on the event, or feeds the step's device outputs into the next step without the
    host ever waiting. Never called inside a capture.

    Default: ``hal.default_hooks.hal_event`` (None: the device runs work as it is issued, like the cpu
    device, so a step is complete when ``submit`` returns).

    :param device: the device the event is for.
    """


@hookspec(firstresult=True)
def hal_distributed_backend(device: "DeviceId") -> str | None:
    """Return the ``torch.distributed`` backend whose collectives this device's graphs can capture
    (``"nccl"`` for CUDA, ``"hccl"`` for Ascend, ``"gloo"`` for the cpu reference device), or None.

    Called when a runner is given a process group (tensor or data parallel): the group's backend must be
    this one, or the captured collectives would not be the device's own work (a gloo all-reduce of CUDA
    tensors cannot live in a CUDA graph). What the device needs around capturing collectives (stream
    ordering, communicator limits) belongs in its capture session and its errors, not in the runners.

    Default: ``hal.default_hooks.hal_distributed_backend`` (None: graphs of this device hold no collectives).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_all_reducer(device: "DeviceId", group: Any) -> "AllReducer | None":
    """Return this device's own all-reduce for the messages of ``group`` it serves faster than the group's
    ``torch.distributed`` backend (``hal.AllReducer``), or None.

    Called once per process group and device, when a tensor-parallel model is built on it, before anything is
    captured: on every rank of ``group`` at the same point, so a plugin may allocate and exchange buffers over
    the group, and must make every rank give the same kind of answer (agree over the group before it answers;
    one rank with and one without would hang the next collective). The reducer's buffers must stay where they
    are for as long as it lives: captured graphs hold their addresses.

    Default: ``hal.default_hooks.hal_all_reducer`` (None: ``torch.distributed.all_reduce`` for every message).

    :param device: the device of this rank.
    :param group: a ``torch.distributed`` process group of ``hal_distributed_backend``'s backend.
    """


@hookspec(firstresult=True)
def hal_graph_budget(device: "DeviceId") -> int | None:
    """Return how many more of its own graphs (``hal_make_graph``) ``device`` can hold now, or None for no limit.

    Called by a runner before it captures its largest bucket; with the graphs that bucket took (one for
    ``full``, one per segment or piece for ``breakable`` and ``piecewise``) it fits its buckets to the budget:
    fewer default buckets, or a refusal with the numbers (``runners.graph_budget``). A device whose graphs hold
    a scarce resource (an Ascend ACL graph holds one of the device's streams) answers with what is left of it.

    Default: ``hal.default_hooks.hal_graph_budget`` (None: no limit).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_stack_checks(device: "DeviceId") -> Sequence[str] | None:
    """Return one line per prerequisite of the vendor stack under the device (driver, runtime libraries,
    environment), each saying what was checked, what was found and, where it fails, what to change.

    Shown by ``graphhal info``, for a first look at a machine and for bug reports; asked through
    ``DeviceRegistry.stack_checks_of`` whether or not the device is available, so it must answer without a
    working device where it can. A plugin refuses a failing prerequisite itself (in ``hal_graph_modes`` or
    ``hal_make_graph``, with a ``hal.DeviceUnavailableError`` saying what to change); this hook only reports.

    Default: ``hal.default_hooks.hal_stack_checks`` (no lines: nothing to check).

    :param device: the device asked about.
    """


@hookspec(firstresult=True)
def hal_memory_stats(device: "DeviceId", pool: Any) -> "MemoryStats | None":
    """Return the memory in use on ``device``; with ``pool`` given, also the bytes held by that graph pool.
    Where the device can tell, also its free and total memory device-wide (``device_free_bytes``,
    ``device_total_bytes``: CUDA's ``mem_get_info``, torch_npu's): what a capture takes outside the pool
    (graph objects, the driver's executable graphs, communicators' buffers) shows only there.

    Called before and after each bucket's capture, for the capture report and a runner's memory plan
    (``runners.memory_plan``).

    Default: ``hal.default_hooks.hal_memory_stats``.

    :param device: the device asked about.
    :param pool: a handle from ``hal_graph_pool``, or None.
    """


@hookspec(firstresult=True)
def hal_release_cached_memory(device: "DeviceId") -> None:
    """Give memory the device's allocator keeps cached but unused back to the device (CUDA's
    ``torch.cuda.empty_cache``), so that its free memory (``hal_memory_stats``) counts it.

    Called once after a memory plan's stand-in runners are closed (``runners.memory_plan``), before the server
    reads what is free to size its KV cache; never per capture (DESIGN.md: emptying the cache per bucket
    breaks the pool's reuse).

    Default: ``hal.default_hooks.hal_release_cached_memory`` (nothing: an allocator that caches nothing).

    :param device: the device whose cache to release.
    """
