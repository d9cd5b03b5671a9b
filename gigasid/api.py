"""The Python API of out-of-core jobs: create, submit, resume and follow a job store, and read
its finished output (every pyramid level) as a ``dask.array``.

A thin re-export: the code is in :mod:`gigasid.graph.api`, because only ``gigasid.graph`` imports
Dask (DESIGN.md §3). Example (see the README, "Python API")::

    from distributed import Client
    from gigasid.api import create_job, open_output

    job = create_job("big.zarr", "photo.jpg", pipeline="gigapixel", size=(8192, 8192)).submit(Client())
    job.progress()     # JobProgress(status='running', scales=4, scales_done=1, ..., fraction=0.3)
    job.wait()
    image = open_output("big.zarr")   # uint8 (C, H, W)
"""

from gigasid.graph.api import Job, JobProgress, create_job, job_progress, open_job, open_output, resume_job

__all__ = ["Job", "JobProgress", "create_job", "job_progress", "open_job", "open_output", "resume_job"]
