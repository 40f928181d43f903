"""Work-unit execution: in this process, or in a pool of local processes.

A work unit is a plain function call ``fn(*args) -> dict`` whose results the unit also
writes to the run directory itself (atomically), so a crash loses at most the units in
flight. Each pool worker gets an equal share of the cores for TensorFlow and joblib.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait


def _init_worker(threads: int) -> None:
    os.environ["BLOODBENCH_TF_THREADS"] = str(threads)
    os.environ["BLOODBENCH_JOBS"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)


class LocalExecutor:
    """Run units sequentially (``workers=1``) or in ``workers`` spawned processes."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, int(workers))

    def map_unordered(self, fn, arg_list):
        """Yield ``(args, result)`` as units finish (exceptions propagate)."""
        if self.workers == 1 or len(arg_list) <= 1:
            for args in arg_list:
                yield args, fn(*args)
            return
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads,)) as pool:
            pending = {pool.submit(fn, *args): args for args in arg_list}
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    args = pending.pop(fut)
                    yield args, fut.result()
