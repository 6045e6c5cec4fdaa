"""Kernel tests: the Triton kernels run compiled on a CUDA machine and in Triton's interpreter on CPU.

On CPU, TRITON_INTERPRET=1 is set for each test module here and unset after it, so `kernels.dispatch` picks
Triton only inside these tests; the rest of the session keeps the torch reference path. The kernels need the
variable only while they run, not when triton is imported (see `kernels.tree_attention.launchable`).
"""

from __future__ import annotations

import pytest

from kernel_batches import DEVICE


@pytest.fixture(autouse=True, scope="module")
def _interpret_triton_on_cpu():
    with pytest.MonkeyPatch.context() as mp:
        if DEVICE.type == "cpu":
            mp.setenv("TRITON_INTERPRET", "1")
        yield
