"""The device plugins that ship with graphhal: cpu (reference), cuda, npu. Each implements ``hal.hookspecs``."""
