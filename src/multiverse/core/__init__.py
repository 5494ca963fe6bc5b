"""The domain: types, states, errors and the pure rules about them.

Nothing in here imports another part of Multiverse, so every other layer may import it.
"""
