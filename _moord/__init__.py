"""moord: containerd rebuilt in Python as a supervised multi-process actor system."""

__version__ = "0.1.0"
