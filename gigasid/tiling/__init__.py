"""Tiles: the geometry of a tile and its halo, and the sampler step on a box. No Dask, no Zarr.

``step`` is the one implementation of the sampler's step (DESIGN.md §2), for a tile core or a
whole image; ``geometry`` computes what a core reads — the receptive field of one step — from
the parameters. ``graph`` schedules the steps; ``io.store`` holds the buffers.
"""
