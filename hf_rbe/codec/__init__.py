"""RBE codec: rotation, shared tables, encode/decode of the bitfield format, seed64.

Plain torch, no transformers: ``config`` feeds it, ``modules`` consume what it produces.
"""
