"""The domain: types, states, errors and the pure rules about them; and the one writer of
private files (files.py), which every layer needs.

Nothing in here imports another part of Multiverse, so every other layer may import it.
"""
