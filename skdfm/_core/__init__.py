"""Infrastructure every layer uses.

Devices, pickling, validation, atomic files, memory checks, what a model is.
"""
