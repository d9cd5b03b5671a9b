"""Pure math on torch tensors: the closed-form denoisers, patches, noise schedules, the pyramid.

Nothing in ``core`` touches files, Dask, Zarr or FAISS, and everything runs unchanged on CPU or
CUDA tensors. Compute tensors are (C, H, W) images or (M, D) patch rows; a patch row is a P×P×C
patch flattened in (channel, row, col) order. Boxes are half-open (row0, col0, row1, col1).
"""
