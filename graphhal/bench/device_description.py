"""One line naming the hardware behind a ``hal.Device``, for the headers of the bench and ``graphhal demo``."""

from __future__ import annotations

import torch

import hal


def describe_device(device: hal.Device) -> str:
    if device.torch_device.type == "cuda":
        properties = torch.cuda.get_device_properties(device.torch_device)
        return f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB"
    if device.torch_device.type == "cpu":
        threads = torch.get_num_threads()
        return f"{device.plugin_name}, {threads} thread{'' if threads == 1 else 's'}"
    return device.plugin_name
