"""The client side: a typed HTTP client of the REST API and the CLI on top of it.

It speaks HTTP only; nothing here imports the master, the worker or the drivers.
"""
