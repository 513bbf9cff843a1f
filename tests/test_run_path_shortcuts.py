"""The run path's shortcuts against the general code they stand in for, case by case.

A step's outputs skip pytree's walk when they are a flat dict of tensors (``runners.output_tree.map_tensors``),
and a batch's slots are checked in one expression per slot before the loop whose errors name the problem
(``StaticInputs.count_rows``). A shortcut that drifted from its general twin would hand back another structure,
or let a batch through that the named checks refuse; these tests hold each pair together.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch.utils import _pytree as pytree

from runners import InputSlot
from runners.output_tree import map_tensors
from runners.static_inputs import StaticInputs


def _same_tree(got, want) -> bool:
    got_leaves, got_spec = pytree.tree_flatten(got)
    want_leaves, want_spec = pytree.tree_flatten(want)
    if got_spec != want_spec or type(got) is not type(want):
        return False
    return all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(got_leaves, want_leaves, strict=True)
    )


@pytest.mark.cpu
@pytest.mark.parametrize(
    "outputs",
    [
        torch.arange(3),
        {"tokens": torch.arange(3), "logprobs": torch.zeros(3)},
        {"tokens": torch.arange(3), "logprobs": None},
        {},
        {"tokens": torch.arange(3), "nested": {"counts": torch.ones(2)}},
        {"tokens": torch.arange(3), "steps": 4},
        OrderedDict(tokens=torch.arange(3)),
        [torch.arange(3), None, (torch.ones(2),)],
        (torch.arange(3), {"x": torch.ones(1)}),
    ],
    ids=["tensor", "flat", "flat-none", "empty", "nested", "int-leaf", "ordereddict", "list", "tuple"],
)
def test_map_tensors_gives_what_pytree_gives_and_maps_each_tensor_once(outputs):
    calls = []

    def doubled(tensor):
        calls.append(tensor)
        return tensor * 2

    got = map_tensors(doubled, outputs)
    want = pytree.tree_map_only(torch.Tensor, lambda t: t * 2, outputs)
    assert _same_tree(got, want)
    assert len(calls) == sum(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves(outputs))


SLOTS = [InputSlot("ids", torch.int64), InputSlot("tables", torch.int32, row_shape=(3,)), InputSlot("scale", torch.float32)]
GOOD = {"ids": torch.arange(4), "tables": torch.zeros(4, 3, dtype=torch.int32), "scale": torch.ones(4)}
BAD_BATCHES = {
    "not a tensor": {**GOOD, "ids": [0, 1, 2, 3]},
    "dtype": {**GOOD, "ids": GOOD["ids"].int()},
    "requires grad": {**GOOD, "scale": torch.ones(4, requires_grad=True)},
    "row shape": {**GOOD, "tables": torch.zeros(4, 2, dtype=torch.int32)},
    "dimensions": {**GOOD, "ids": torch.arange(4).reshape(4, 1)},
    "row counts": {**GOOD, "tables": torch.zeros(3, 3, dtype=torch.int32)},
    "no rows": {"ids": torch.arange(0), "tables": torch.zeros(0, 3, dtype=torch.int32), "scale": torch.ones(0)},
    "meta device": {**GOOD, "ids": torch.arange(4, device="meta")},
}


@pytest.mark.cpu
@pytest.mark.parametrize("problem", list(BAD_BATCHES))
def test_count_rows_refuses_each_bad_batch_by_its_named_checks(problem):
    inputs = StaticInputs(SLOTS, 8, torch.device("cpu"))
    batch = BAD_BATCHES[problem]
    with pytest.raises(ValueError, match=r"input slot '(ids|tables|scale)'|batch has no rows"):
        inputs.count_rows(batch)
    assert inputs._rows_if_valid(batch) is None or problem == "no rows"  # the shortcut never passes it


@pytest.mark.cpu
def test_count_rows_shortcut_agrees_on_good_batches_and_empty_ones_where_allowed():
    inputs = StaticInputs(SLOTS, 8, torch.device("cpu"))
    assert inputs._rows_if_valid(GOOD) == inputs.count_rows(GOOD) == 4
    empty = BAD_BATCHES["no rows"]
    assert inputs.count_rows(empty, allow_empty=True) == 0
    assert StaticInputs([], 8, torch.device("cpu")).count_rows({}) == 0
