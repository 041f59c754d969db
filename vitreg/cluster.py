"""Pairs registered or evaluated on a Dask cluster: the engine behind ``--scheduler``.

Needs the optional package ``distributed`` (``pip install 'vitreg[cluster]'``). vitreg has
no scheduler of its own: :class:`DaskEngine` submits one task per pair to a Dask scheduler
that runs anywhere (``dask scheduler``, dask-jobqueue on Slurm/SGE/PBS/LSF, a
``LocalCluster``), and yields each result as it arrives; the workflow (register-batch,
evaluate) records it. The workers read the inputs and write the outputs themselves, so
they need the same file system as the client (the usual case on a cluster); the paths they
are given are absolute.

- **Model once per worker.** The workflow's :class:`vitreg.engine.PairWork` travels to
  every worker in a worker plugin (:class:`PairWorkPlugin`, also to workers that join or
  restart later); its ``load()`` (the network, read from the checkpoint's path, or nothing
  with ``--weights none``) runs once per worker process, in its first task.
- **Threads.** A worker with T task threads registers T pairs at once, and the torch
  threads of all the pairs on a set of CPUs must not outnumber them (on 2 cores that
  makes a 10-fold difference). For the workers present when the batch starts, torch gets
  ``C // S`` threads (at least 1): C is the number of CPUs the worker process may run on
  (``os.sched_getaffinity``: a Slurm job's CPUs, or the machine's), S the task threads of
  all the workers on that host that run on the same CPUs (the workers of ``local:N``, or
  of one job with several worker processes). A worker that joins later cannot see its
  siblings: it keeps the threads its environment gives torch (Dask's nanny sets
  ``OMP_NUM_THREADS=1``, Dask's convention of one task thread per core), at most
  ``C // T``. So Dask's usual worker (as many task threads as CPUs) runs one pair per CPU
  on one thread each, and a lone worker with one task thread (``local:1``, or ``dask
  worker --nthreads 1`` on a GPU node, present at the start) runs one pair at a time on
  all its CPUs. ``cpus_per_worker`` overrides all this: torch gets ``cpus_per_worker // T``.
- **Lost workers.** When a worker dies, the scheduler runs its pairs again on others (up
  to ``distributed.scheduler.allowed-failures`` times, default 3; after that the pair is a
  failed row saying so). A pair's files are written atomically, so a pair run twice leaves
  one complete copy, and its record is kept once: each task has one result, which the
  client consumes once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import threading
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from vitreg.engine import PairWork
from vitreg.errors import OptionError, VitregError
from vitreg.pairs import Pair

try:  # the plugin must subclass distributed's to be accepted; without it nothing here runs
    from distributed import WorkerPlugin
except ImportError:  # pragma: no cover - checked by _distributed() before any use
    WorkerPlugin = object  # type: ignore[misc,assignment]

LOCAL_PATTERN = re.compile(r"local:(\d+)")
CONNECT_TIMEOUT_SECONDS = 30
INSTALL_HINT = "pip install 'vitreg[cluster]' (or: pip install distributed)"


def _distributed() -> Any:
    """The ``distributed`` package, or a VitregError saying how to install it."""
    try:
        import distributed
    except ImportError:
        message = f"a Dask scheduler needs the package 'distributed': {INSTALL_HINT}"
        raise VitregError(message) from None
    return distributed


CpuPlace = tuple[str, tuple[int, ...]]
"""A host name and the CPUs a process there may run on."""


def cpu_place() -> CpuPlace:
    """This process's host and the CPUs it may run on (all the machine's, off Linux)."""
    try:
        cpus = tuple(sorted(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        cpus = tuple(range(os.cpu_count() or 1))
    return socket.gethostname(), cpus


def torch_threads_by_place(workers: dict[str, tuple[CpuPlace, int]]) -> dict[CpuPlace, int]:
    """Torch threads per task for the workers at each place, from every worker's place and
    task threads (by address): the place's CPUs shared by all their task threads."""
    sharing: Counter = Counter()
    for place, threads in workers.values():
        sharing[place] += threads
    return {place: max(1, len(place[1]) // threads) for place, threads in sharing.items()}


def _worker_place(dask_worker: Any) -> tuple[CpuPlace, int]:
    return cpu_place(), dask_worker.state.nthreads


class PairWorkPlugin(WorkerPlugin):
    """A workflow's work on each worker: loaded once (in the first task), torch threads set.

    ``threads_by_place``: :func:`torch_threads_by_place` of the workers at the start;
    ``cpus``: overrides it, torch then gets ``cpus // nthreads`` threads (see the module).
    """

    def __init__(
        self,
        work: PairWork,
        threads_by_place: dict[CpuPlace, int] | None = None,
        cpus: int | None = None,
    ) -> None:
        self.work = work
        self.threads_by_place = threads_by_place or {}
        self.cpus = cpus

    def setup(self, worker: Any) -> None:
        import torch

        place, nthreads = _worker_place(worker)
        if self.cpus is not None:
            self.torch_threads = max(1, self.cpus // nthreads)
        elif place in self.threads_by_place:
            self.torch_threads = self.threads_by_place[place]
        else:  # joined later: siblings unknown
            self.torch_threads = min(torch.get_num_threads(), max(1, len(place[1]) // nthreads))
        self._lock = threading.Lock()
        self._loaded: list = []  # [what work.load() returned] once loaded

    def run(self, pair: Pair) -> Any:
        """``work(loaded, pair)`` in this worker, loading first if no task did yet."""
        with self._lock:
            if not self._loaded:
                import torch

                torch.set_num_threads(self.torch_threads)  # for the whole process
                self._loaded.append(self.work.load())
        return self.work(self._loaded[0], pair)


def _run_on_worker(plugin_name: str, pair: Pair) -> Any:
    """The task: one pair, run by the plugin ``plugin_name`` of the worker it lands on."""
    from distributed import get_worker

    return get_worker().plugins[plugin_name].run(pair)


def _absolute(pair: Pair) -> Pair:
    """``pair`` with absolute paths: a worker may run in another folder."""
    paths = {column: path.absolute() for column, path in pair.paths().items()}
    return dataclasses.replace(pair, **paths)


class DaskEngine:
    """Run the pairs of a workflow on a Dask cluster (see the module's notes).

    ``scheduler``: ``local:N`` (a LocalCluster of N worker processes of one thread on this
    machine, started on first use and stopped by :meth:`close`), a scheduler address
    (``tcp://host:8786``), a scheduler file (``.json``, as ``dask scheduler
    --scheduler-file`` writes), or a ``distributed.Client`` (used as it is, never closed
    here). ``cpus_per_worker``: the CPUs each worker may use (default: found, as the
    module says).

    Called as ``engine(work, pairs)`` (:data:`vitreg.engine.PairEngine`): one task per pair
    with the pair's absolute paths; yields ``(pair, result)`` as results arrive. A pair whose
    workers kept dying gives ``work.failure(pair, message)``; any other error of a task is
    raised here, and leaving the loop cancels the pairs not yet done.
    """

    def __init__(self, scheduler: str | Any, cpus_per_worker: int | None = None) -> None:
        self.scheduler = scheduler
        self.cpus_per_worker = cpus_per_worker
        self.local_workers = None
        if isinstance(scheduler, str) and scheduler.startswith("local"):
            match = LOCAL_PATTERN.fullmatch(scheduler)
            if match is None or int(match[1]) < 1:
                raise OptionError("scheduler", scheduler, "expected local:N with N >= 1")
            self.local_workers = int(match[1])
        self._client: Any = None
        self._cluster: Any = None

    def client(self) -> Any:
        """The connected ``distributed.Client`` (connecting, or starting the local cluster,
        on first use)."""
        if self._client is not None:
            return self._client
        distributed = _distributed()
        if not isinstance(self.scheduler, str):
            self._client = self.scheduler
        elif self.local_workers is not None:
            self._cluster = distributed.LocalCluster(
                n_workers=self.local_workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR,
                scheduler_kwargs={"dashboard_address": ":0"},  # its HTTP server: a free port
            )  # fmt: skip
            self._client = distributed.Client(self._cluster, set_as_default=False)
        else:
            self._client = self._connect(distributed, self.scheduler)
        return self._client

    @staticmethod
    def _connect(distributed: Any, scheduler: str) -> Any:
        file = scheduler.endswith(".json")
        if file and not Path(scheduler).is_file():
            raise OptionError("scheduler", scheduler, "no such scheduler file")
        try:
            if file:
                return distributed.Client(
                    scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_SECONDS,
                    set_as_default=False,
                )  # fmt: skip
            return distributed.Client(
                scheduler, timeout=CONNECT_TIMEOUT_SECONDS, set_as_default=False
            )
        except (OSError, TimeoutError, ValueError) as error:
            raise OptionError("scheduler", scheduler, f"cannot connect ({error})") from None

    def close(self) -> None:
        """Disconnect, and stop the local cluster if this engine started one."""
        if self._cluster is not None:
            self._client.close()
            self._cluster.close()
        elif self._client is not None and isinstance(self.scheduler, str):
            self._client.close()
        self._client = self._cluster = None

    def __enter__(self) -> DaskEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __call__(self, work: PairWork, pairs: Sequence[Pair]) -> Iterator[tuple[Pair, Any]]:
        if not pairs:
            return
        distributed = _distributed()
        client = self.client()
        name = f"vitreg-{uuid.uuid4().hex[:12]}"
        threads = torch_threads_by_place(client.run(_worker_place))
        client.register_plugin(PairWorkPlugin(work, threads, self.cpus_per_worker), name=name)
        keys = [f"{name}-{pair.row}" for pair in pairs]
        futures = client.map(
            _run_on_worker, [name] * len(pairs), [_absolute(pair) for pair in pairs],
            key=keys, pure=False,
        )  # fmt: skip
        by_key = {key: pair for key, pair in zip(keys, pairs, strict=True)}
        try:
            for future in distributed.as_completed(futures, loop=client.loop):
                pair = by_key.pop(future.key)  # a KeyError here would be a pair done twice
                try:
                    result = future.result()
                except distributed.KilledWorker as error:
                    deaths = error.allowed_failures + 1
                    result = work.failure(
                        pair,
                        f"a worker died while registering it, {deaths} time(s) (out of "
                        "memory?); see the workers' logs",
                    )
                future.release()
                yield pair, result
        finally:
            client.cancel([future for future in futures if future.key in by_key])
            try:
                client.unregister_worker_plugin(name)
            except Exception:  # noqa: BLE001 - the cluster may be gone; nothing to undo then
                pass
