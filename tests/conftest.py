"""Test-session settings: the suite runs on pytest-xdist workers (``python -m pytest -n 2``, the README's test
command); each worker gets its share of the cores as torch threads, and the commands the tests start inherit it,
so that two workers do not run two threads each on two cores."""
import os

if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, threads)

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
