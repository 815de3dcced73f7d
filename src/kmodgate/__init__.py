"""kmodgate: gate kernel updates on the out-of-tree modules people depend on."""

__version__ = "0.1.0"
