"""Small tables between host and device without a host sync.

A pageable host-to-device copy waits for the device's queue to drain, and a device-to-host
read waits for the work that computes it: on the scheduler's thread either stalls a request
behind the forward in flight. Tables go down through pinned memory, asynchronously; results
come up into pinned memory and are read once their event has passed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def to_device(
    values: np.ndarray | list[int], device: torch.device, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """``values`` as a ``dtype`` tensor on ``device``, copied asynchronously (CPU: no copy)."""
    host = torch.as_tensor(np.asarray(values), dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


@dataclass(eq=False)
class HostReading:
    """A small device result read back to the host without waiting for the device: the copy
    is queued behind the work that computes it and read once it has landed (``ready``)."""

    value: torch.Tensor  # on the host; meaningful once ready
    event: object | None = None  # a CUDA event recorded after the copy

    @classmethod
    def of(cls, tensor: torch.Tensor) -> HostReading:
        if tensor.device.type != "cuda":
            return cls(tensor.detach().cpu())
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return cls(host, event)

    @property
    def ready(self) -> bool:
        return self.event is None or self.event.query()
