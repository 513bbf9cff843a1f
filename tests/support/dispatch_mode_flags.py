"""torch's process-wide "a dispatch mode is active" flags, put back after a test that races two threads' modes.

Every dispatch mode saves these flags of ``torch.utils._python_dispatch`` on entry and restores them on exit,
whichever thread it runs in: modes of two threads ending out of order leave them set. graphhal's capture modes
keep off the one that stops torch.compile where torch reads it (torch 2.10 and earlier); torch 2.11 and later
read each thread's own stack for that, and their modes stay what they are, so the race is torch's there, and
its leftovers still reach later compiles (a flag set wrongly unmasks Python dispatch keys in Dynamo's guards,
and a compile under an always-on mode, as the npu simulator's, compiles again). A test that makes the race
puts the flags back, so the tests after it start from a clean process.
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch.utils._python_dispatch as python_dispatch

FLAGS = ("_is_in_torch_dispatch_mode", "_is_in_non_infra_torch_dispatch_mode", "_is_in_any_mode_without_ignore_compile_internals")


@pytest.fixture
def restored_dispatch_mode_flags() -> Iterator[None]:
    saved = {name: getattr(python_dispatch, name) for name in FLAGS if hasattr(python_dispatch, name)}
    yield
    for name, value in saved.items():
        setattr(python_dispatch, name, value)
