"""Kernel tests: the Triton kernels run compiled on a CUDA machine and in Triton's interpreter on CPU.

Triton reads TRITON_INTERPRET when it is first imported and again while kernels run, and the variable would
also switch `kernels.dispatch` to Triton for every other test directory in the session. So it is set per test
module here rather than at import, and test modules import the Triton kernel modules lazily (`triton_ops()`),
inside tests, after the variable is set.
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
