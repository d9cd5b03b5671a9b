"""Tiles: the geometry of a tile and its halo, and the per-tile sampler step. No Dask, no Zarr.

A tile step reads x_t (and the finished coarser scale) over ranges this package computes from
the parameters — the receptive field of one step — and returns exactly the in-memory sampler's
x_{t-1} on the tile's core. ``graph`` schedules these steps; ``io.store`` holds the buffers.
"""
