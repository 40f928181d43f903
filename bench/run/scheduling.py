"""Work-unit execution: in this process, in a pool of local processes, or on a Dask cluster.

A work unit is a plain function call ``fn(*args) -> dict`` whose results the unit also
writes to the run directory itself (atomically), so a crash loses at most the units in
flight. Every backend speaks one interface, ``map_unordered(fn, arg_list)``, which yields
``(args, result)`` as units finish; the runner does not know which backend runs them.

Failures
--------
* A :class:`~core.errors.BenchError` (bad input, bad setting) is never retried: it stops
  the run with its one-line message.
* Any other exception is retried ``retries`` times, then re-raised.
* A worker process that dies (killed, out of memory) loses only the units it was running:
  the local pool is started again and those units are resubmitted (each may be lost
  ``retries`` times); a Dask scheduler moves them to another worker by itself (up to
  ``distributed.scheduler.allowed-failures`` deaths per unit, default 3).

Backends
--------
* :class:`LocalExecutor` — ``workers=1`` runs in this process; ``workers=N`` in ``N``
  spawned processes, each with an equal share of the cores for joblib and OpenMP.
* :class:`DaskExecutor` — a ``dask.distributed`` scheduler address (``tcp://HOST:8786``),
  a ``LocalCluster`` or a ``Client``. Workers must import this package and see the run
  directory at the same path (a shared file system).

Reproducibility
---------------
A unit's result depends on its arguments, never on the backend: a CNN unit runs with the
TensorFlow thread layout of ``$BLOODBENCH_TF_THREADS`` (default 1; give every worker the
same value), op determinism and seeds of its own (:mod:`cnn.runtime`), so ``workers=1``,
``workers=N`` and Dask (one thread per worker process: ``--nthreads 1``) give
bit-identical out-of-fold probabilities on one machine and software stack.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import uuid
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from core.errors import BenchError

DEFAULT_RETRIES = 2


def init_worker(threads: int) -> None:
    """A spawned worker's share of the cores for joblib and OpenMP/BLAS. TensorFlow's
    threads are not set here: a CNN unit takes ``$BLOODBENCH_TF_THREADS`` (inherited from
    this process; default 1, see :mod:`cnn.runtime`) whichever backend runs it, so that
    its result does not depend on the backend or on the number of workers."""
    os.environ["BLOODBENCH_JOBS"] = "1"
    os.environ["OMP_NUM_THREADS"] = str(threads)


def _label(fn, args) -> str:
    return f"{getattr(fn, '__name__', 'unit')}{tuple(args[1:]) if len(args) > 1 else tuple(args)}"


def _guarded(fn, *args):
    """Run ``fn(*args)``; a ``BenchError`` comes back as a value so that it is not retried."""
    try:
        return True, fn(*args)
    except BenchError as exc:
        return False, str(exc)


def _unwrap(ok_result):
    ok, result = ok_result
    if not ok:
        raise BenchError(result)
    return result


class LocalExecutor:
    """Run units sequentially (``workers=1``) or in ``workers`` spawned processes.

    Parameters
    ----------
    workers : int
        Processes; 1 runs every unit in this process.
    retries : int
        How often a unit that raised (other than ``BenchError``) or whose process died is
        run again before the run stops.
    """

    def __init__(self, workers: int = 1, retries: int = DEFAULT_RETRIES):
        self.workers = max(1, int(workers))
        self.retries = max(0, int(retries))

    def map_unordered(self, fn, arg_list):
        """Yield ``(args, result)`` as units finish."""
        arg_list = [tuple(a) for a in arg_list]
        if self.workers == 1 or len(arg_list) <= 1:
            yield from self._sequential(fn, arg_list)
        else:
            yield from self._pool(fn, arg_list)

    def _sequential(self, fn, arg_list):
        for args in arg_list:
            for attempt in range(self.retries + 1):
                try:
                    result = _unwrap(_guarded(fn, *args))
                    break
                except BenchError:
                    raise
                except Exception:
                    if attempt == self.retries:
                        raise
            yield args, result

    def _pool(self, fn, arg_list):
        # One single-process pool per slot: a process that dies breaks only its own pool,
        # so only the unit it was running is lost (and run again in a fresh process).
        threads = max(1, (os.cpu_count() or 1) // self.workers)
        ctx = mp.get_context("spawn")

        def new_pool():
            return ProcessPoolExecutor(
                1, mp_context=ctx, initializer=init_worker, initargs=(threads,)
            )

        queue = list(reversed(arg_list))  # pop() takes them in the given order
        failures: dict[tuple, int] = {}
        slots = [new_pool() for _ in range(min(self.workers, len(arg_list)))]
        running = {}  # future -> (slot index, args)
        try:
            while queue or running:
                busy = {s for s, _ in running.values()}
                for s in range(len(slots)):
                    if queue and s not in busy:
                        args = queue.pop()
                        running[slots[s].submit(_guarded, fn, *args)] = (s, args)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    s, args = running.pop(fut)
                    try:
                        result = _unwrap(fut.result())
                    except BrokenProcessPool:
                        slots[s].shutdown(wait=False)
                        slots[s] = new_pool()
                        self._count(failures, args, "its worker process died", fn)
                        queue.append(args)
                        continue
                    except BenchError:
                        raise
                    except Exception:
                        if self._count(failures, args, None, fn):
                            raise
                        queue.append(args)
                        continue
                    yield args, result
        finally:
            for pool in slots:
                pool.shutdown(wait=True, cancel_futures=True)

    def _count(self, failures, args, why, fn) -> bool:
        """Record one failure of ``args``; True when its retries are spent."""
        failures[args] = failures.get(args, 0) + 1
        spent = failures[args] > self.retries
        if spent and why:
            raise BenchError(f"work unit {_label(fn, args)} failed {failures[args]} times: {why}")
        return spent


class DaskExecutor:
    """Run units as tasks on a ``dask.distributed`` cluster.

    Parameters
    ----------
    scheduler : str or distributed.Client or cluster
        ``tcp://HOST:PORT`` of a running ``dask scheduler``, a ``Client``, or a cluster
        object such as ``distributed.LocalCluster`` (tests).
    retries : int
        Dask ``retries=`` of each task: how often a unit that raised is run again.
        A unit whose worker died is moved to another worker by the scheduler itself.
    """

    def __init__(self, scheduler, retries: int = DEFAULT_RETRIES):
        self.scheduler = scheduler
        self.retries = max(0, int(retries))

    def _client(self):
        from distributed import Client

        if isinstance(self.scheduler, Client):
            return self.scheduler, False
        try:
            return Client(self.scheduler, timeout="30s"), True
        except (OSError, TimeoutError) as exc:
            raise BenchError(
                f"cannot reach the Dask scheduler {self.scheduler}: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None

    def map_unordered(self, fn, arg_list):
        """Yield ``(args, result)`` as units finish on the cluster."""
        from distributed import as_completed
        from distributed.scheduler import KilledWorker

        arg_list = [tuple(a) for a in arg_list]
        if not arg_list:
            return
        client, own = self._client()
        futures = {}
        try:
            name = getattr(fn, "__name__", "unit")
            for args in arg_list:
                fut = client.submit(
                    _guarded,
                    fn,
                    *args,
                    retries=self.retries,
                    pure=False,
                    key=f"{name}-{uuid.uuid4().hex}",
                )
                futures[fut.key] = (fut, args)
            for fut in as_completed([f for f, _ in futures.values()]):
                args = futures.pop(fut.key)[1]
                try:
                    result = _unwrap(fut.result())
                except KilledWorker as exc:
                    raise BenchError(
                        f"work unit {_label(fn, args)} killed its Dask workers "
                        f"too often ({exc}); see the worker logs"
                    ) from None
                fut.release()
                yield args, result
        finally:
            for fut, _ in futures.values():
                fut.cancel()
            if own:
                client.close()


def make_executor(workers: int | None = 1, scheduler=None, retries: int = DEFAULT_RETRIES):
    """The executor for ``--workers N`` (local processes) or ``--scheduler ADDRESS`` (Dask)."""
    if scheduler:
        return DaskExecutor(scheduler, retries=retries)
    return LocalExecutor(workers or 1, retries=retries)
