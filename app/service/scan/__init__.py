"""Stray files: the scan-host job that finds what a host holds that no record names, and the host's stray list."""
