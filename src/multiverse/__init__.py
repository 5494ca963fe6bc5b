"""Multiverse: one control plane for virtual machines on many hosts."""

__version__ = "0.1.0"
