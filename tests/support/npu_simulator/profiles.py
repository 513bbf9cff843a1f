"""The torch_npu release lines the SIMULATOR models, one profile each, written from torch_npu's source.

Sources (Ascend/pytorch at the tag named; op-plugin at the commit each tag pins): torch_npu/npu/graphs.py
(the capture dispatch mode, NPUGraph, torch.npu.graph), torch_npu/npu/_npugraph_handlers/*.py (26.0 on),
torch_npu/csrc/core/npu/NPUGraph.cpp, and op-plugin's op_plugin_functions.yaml and
ops/atb/PagedAttentionAtb.cpp. A release line is not one source tree: 7.2's PyTorch 2.6 cut differs from
its 2.7.1/2.8.0 cuts (it brackets ``_npu_paged_attention``), so it has a profile of its own.

What differs between the lines, and what is the same on all of them, is in the fields below; the
simulator's torch_npu dispatch modes (``auto_dispatch``, ``npugraph_handlers``), ops (``kernels``) and
namespace (``namespace``) read them. On every line: ``torch.npu.graph.__enter__`` enters the stream, pushes
the dispatch mode (with ``auto_dispatch_capture``) and only then calls ``capture_begin``; ``__exit__`` calls
``capture_end`` first, then pops the mode and leaves the stream, with no try/finally; ``NPUGraph.reset()``
keeps the dispatch records; C++ ``capture_end`` throws on a failed ``AclmdlRICaptureEnd`` before ending the
allocator's routing into the pool (master reordered that; no profile here follows master).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TorchNpuProfile:
    """One torch_npu release line as the simulator plays it.

    name:               short id, used in test ids ("7.1", "7.2", "7.2-pt2.6", "7.3", "26.0").
    tag:                the Ascend/pytorch tag the profile was written from.
    version:            ``torch_npu.__version__`` of a build of that line (version.txt at the tag).
    op_plugin:          the op-plugin commit the tag pins (schemas and helpers).
    dispatch:           how the capture dispatch mode matches and updates ops: "7.1", "7.2", "7.2-pt2.6",
                        "7.3" (string matching in graphs.py) or "registry" (26.0 on: ``_NPU_GRAPH_OP_HANDLERS``).
    infra_mode:         ``_GraphDispatchMode.is_infra_mode()`` is True (7.3 on: graphs.py L100-102 at v7.3.0).
    shared_update_stream: the dispatch mode's update stream is one class attribute made at the first
                        ``NPUGraph()`` of the process (7.3 on, ``__new__``); before, every ``NPUGraph()``
                        makes its own in ``__init__`` (L92-95 at v7.1.0). Either way on the current device.
    weak_npu_tensors_only: records keep weak aliases (``_weak_ref_tensor``) of npu tensors and deep copies of
                        host ones (7.3 on, L141-156 at v7.3.0); before, of every tensor in ``args`` (L120-135
                        at v7.1.0).
    checks_record_count: ``update_capture_record`` compares the inputs with the records (26.0, L281); before,
                        it compared the record count with itself (L108 at v7.1.0) and never raised.
    fia_v2:             op-plugin has ``npu_fused_infer_attention_score_v2`` (691bf15a on; not 480bc431).
    paged_attention_workspace: ``_npu_paged_attention`` takes ``*, Tensor? workspace`` and
                        ``_npu_paged_attention_get_workspace`` exists (PagedAttentionAtb.cpp L91-92 at 691bf15a).
    infer_output:       ``_npu_fused_infer_attention_score{,_v2}_infer_output`` exist (7.3 on).
    fia_tnd_page_attention: op-plugin's FIA document allows page attention (a block_table) in layout TND
                        (7213914d on; 480bc431 and 691bf15a list "不支持...page attention" for TND without
                        rope, and no graph mode either).
    fia_tnd_head_dims:  the head dims FIA takes in TND without rope: 192 (480bc431), 128 or 192 (691bf15a on).
    fia_tnd_dtypes:     the dtypes FIA takes in TND without rope: bfloat16 only before 7213914d.
    fia_paged_max_block_size: the largest block_size FIA's incremental branch (Q_S = 1) takes with page
                        attention: 512 from 691bf15a ("最大不超过512"); 480bc431 names none (16-aligned on all).
    """

    name: str
    tag: str
    version: str
    op_plugin: str
    dispatch: str
    infra_mode: bool
    shared_update_stream: bool
    weak_npu_tensors_only: bool
    checks_record_count: bool
    fia_v2: bool
    paged_attention_workspace: bool
    infer_output: bool
    fia_tnd_page_attention: bool
    fia_tnd_head_dims: tuple[int, ...]
    fia_tnd_dtypes: tuple[str, ...]
    fia_paged_max_block_size: int | None

    @property
    def has_handler_registry(self) -> bool:
        """``torch_npu.npu._npugraph_handlers`` exists (26.0 on)."""
        return self.dispatch == "registry"

    def __str__(self) -> str:
        return f"torch_npu {self.name} (simulated from {self.tag}, version {self.version})"


def _after(previous: TorchNpuProfile, name: str, tag: str, version: str, op_plugin: str, **changes: Any) -> TorchNpuProfile:
    """A release line as what it changed from ``previous`` (the fields are documented on TorchNpuProfile)."""
    return replace(previous, name=name, tag=tag, version=version, op_plugin=op_plugin, dispatch=changes.pop("dispatch", name), **changes)


_LINE_7_1 = TorchNpuProfile(
    name="7.1", tag="v7.1.0-pytorch2.6.0", version="2.6.0", op_plugin="480bc431", dispatch="7.1",  # pip 2.6.0, .post1, .post2
    infra_mode=False, shared_update_stream=False, weak_npu_tensors_only=False, checks_record_count=False,
    fia_v2=False, paged_attention_workspace=False, infer_output=False,
    fia_tnd_page_attention=False, fia_tnd_head_dims=(192,), fia_tnd_dtypes=("bfloat16",), fia_paged_max_block_size=None,
)
# The 2.7.1 cut, also the 2.8.0 one: pip 2.7.1, 2.7.1.post1, 2.8.0, 2.8.0.post1.
_LINE_7_2 = _after(
    _LINE_7_1, "7.2", "v7.2.0-pytorch2.7.1", "2.7.1", "691bf15a",
    fia_v2=True, paged_attention_workspace=True, fia_tnd_head_dims=(128, 192), fia_paged_max_block_size=512,
)
# The PyTorch 2.6 cut of 7.2 (pip 2.6.0.post3, .post4) brackets _npu_paged_attention itself.
_LINE_7_2_PT26 = _after(_LINE_7_2, "7.2-pt2.6", "v7.2.0-pytorch2.6.0", "2.6.0.post3", "691bf15a")
# Every 7.3.0/7.3.1 cut: 2.6.0.post5 ... 2.9.0.post1.
_LINE_7_3 = _after(
    _LINE_7_2, "7.3", "v7.3.0-pytorch2.9.0", "2.9.0", "7213914d",
    infra_mode=True, shared_update_stream=True, weak_npu_tensors_only=True, infer_output=True,
    fia_tnd_page_attention=True, fia_tnd_dtypes=("float16", "bfloat16"),
)
# The 26.0.x cuts; 26.1 and master keep the same skeleton for these ops.
_LINE_26_0 = _after(_LINE_7_3, "26.0", "v26.0.0-pytorch2.9.0", "2.9.0.post2", "dedc3167", dispatch="registry", checks_record_count=True)
PROFILES = (_LINE_7_1, _LINE_7_2, _LINE_7_2_PT26, _LINE_7_3, _LINE_26_0)
PROFILES_BY_NAME = {profile.name: profile for profile in PROFILES}
NEWEST = PROFILES[-1]
