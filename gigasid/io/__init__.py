"""Formats only: image readers/writers, the Zarr job store, its output pyramid, the exporters
(pyramidal TIFF, DeepZoom, OME-Zarr, PNG/JPEG) and the local viewer. No Dask, no sampling."""
