"""The PyTorch reference (oracle) of the VILA / NVILA inference path. Needs the `export` extra (torch)."""
