"""The node agent: serves the master over gRPC and drives this host's hypervisor."""
