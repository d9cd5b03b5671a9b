"""gigasid: training-free single-image diffusion with the closed-form patch denoiser.

The public surface is small: :func:`generate` samples one image in memory from a reference,
:func:`load_pipeline` reads a preset into a typed :class:`JobConfig`, and :mod:`gigasid.api`
(:func:`create_job`, :func:`open_job`, :func:`resume_job`, :func:`open_output`) runs and reads
out-of-core jobs. Everything else lives in the subpackages (``core`` math, ``index`` neighbours,
``io`` formats).
"""

import os

# torch and faiss each bring their own OpenMP runtime; with the default active wait policy the
# idle threads of one spin on the cores the other is computing on (measured: a knn sample took
# 5–10× longer). Passive waiting must be chosen before either library loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


# the out-of-core jobs' Python API (gigasid.api)
_API = ("Job", "JobProgress", "create_job", "job_progress", "open_job", "open_output", "resume_job")


def __getattr__(name: str):
    # lazy, so that `import gigasid` stays cheap and the environment above is set first
    if name in ("generate", "prepare", "run"):
        from gigasid import jobs

        return getattr(jobs, name)
    if name in ("JobConfig", "load_pipeline"):
        from gigasid import config

        return getattr(config, name)
    if name in _API:
        from gigasid import api

        return getattr(api, name)
    raise AttributeError(f"module 'gigasid' has no attribute {name!r}")


__all__ = [
    "Job", "JobConfig", "JobProgress", "__version__", "create_job", "generate", "job_progress", "load_pipeline",
    "open_job", "open_output", "prepare", "resume_job", "run",
]
