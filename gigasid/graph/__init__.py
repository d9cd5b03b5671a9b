"""Execution: the only package that imports Dask. Stages of per-tile tasks over the job store,
execution profiles (sync, threads, processes, a local cluster, a remote one), resume, progress."""
