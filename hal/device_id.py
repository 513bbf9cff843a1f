"""Device names as graphhal sees them: a type served by a plugin plus an optional index.

Not ``torch.device``: a third-party plugin may serve a device type torch has never heard of (its tensors can
still live on a torch device it names through ``hal_torch_device``).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceId:
    type: str
    index: int | None = None

    @classmethod
    def parse(cls, name: "str | DeviceId") -> "DeviceId":
        """``"cuda"`` -> (cuda, None); ``"cuda:1"`` -> (cuda, 1). Also accepts a ``torch.device``."""
        if isinstance(name, DeviceId):
            return name
        if not isinstance(name, str):  # torch.device and friends
            index = getattr(name, "index", None)
            name = f"{name.type}:{index}" if index is not None else str(name.type)
        type_, sep, index_text = name.strip().partition(":")
        if not type_ or not type_.replace("_", "").isalnum():
            raise ValueError(f"device name {name!r} is not of the form 'type' or 'type:index' (e.g. 'cuda:0')")
        if not sep:
            return cls(type_)
        if not index_text.isdigit():
            raise ValueError(f"device name {name!r}: the index after ':' must be a non-negative integer (e.g. 'cuda:0')")
        return cls(type_, int(index_text))

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"
