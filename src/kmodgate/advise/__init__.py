"""Turn real-world module data into kABI policy: which symbols a stablelist
should protect, how fast the ABI churns, and how many modules survive updates."""
