"""Suite-wide settings: one torch thread for every test (the tiny models run ~10x faster on one thread
than on two contended cores; restored after each test, since the demo and DSO runs set their own) and
quiet library logging and progress bars."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="session")
def _quiet_libraries():
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        from datasets.utils import logging as dslog

        dslog.disable_progress_bar()
        dslog.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass
