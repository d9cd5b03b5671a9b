"""Formats only: image readers/writers, later the Zarr job store and exporters."""
