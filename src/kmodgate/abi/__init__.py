"""Pure functions over kernel and module ABI data: no I/O beyond the bytes given."""
