"""Hypervisor adapters behind one port, :class:`multiverse.drivers.base.Driver`."""
