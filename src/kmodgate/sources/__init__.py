"""Getting artifacts: kernels and modules from the Debian archive, RPMs, files."""
