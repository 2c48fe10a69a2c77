"""resnet_fast's version (a leaf: the tools that record it import nothing else of the package)."""

__version__ = "0.1.0"
