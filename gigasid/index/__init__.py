"""Nearest-neighbour candidates for the ``knn`` denoiser: vector indexes and the reference's
patch features. Depends on ``core`` (for patch geometry) and FAISS; knows nothing of Dask or files.
"""
