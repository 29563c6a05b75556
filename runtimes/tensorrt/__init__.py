"""The TensorRT runtime's pieces: `compat.py` checks that this device can run a bundle's engines."""
