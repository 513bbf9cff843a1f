"""The pluggy markers of project ``graphhal``: ``hookspec`` for the contract, ``hookimpl`` for device plugins."""

import pluggy

PROJECT_NAME = "graphhal"
ENTRY_POINT_GROUP = "graphhal.devices"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)
