"""Which device a model's inputs arrive on, without running the model (the ``meta`` device stands in for a GPU:
a meta model refuses CPU inputs the way a CUDA model does)."""

from __future__ import annotations

import pytest


class _Seen(Exception):
    """Raised by a forward pre-hook once it has recorded the devices of the model's inputs."""


def input_devices(model, run) -> list[str]:
    """Device types of the positional inputs ``run()`` feeds ``model`` first (the forward stops there)."""
    seen = []

    def hook(module, args):
        seen.append([a.device.type for a in args])
        raise _Seen

    handle = model.register_forward_pre_hook(hook)
    try:
        with pytest.raises(_Seen):
            run()
    finally:
        handle.remove()
    return seen[0]
