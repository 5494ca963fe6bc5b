"""Inside the guest: the test image we build and SSH access to running guests.

This layer imports only :mod:`multiverse.core`; the drivers adapt it to their port.
"""
