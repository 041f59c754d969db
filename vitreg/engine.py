"""Where the pairs of a batch are worked on: the contract between a workflow and an engine.

A workflow (:func:`vitreg.batch.register_batch`, :func:`vitreg.evaluate.evaluate_csv`)
describes the work on one pair as a :class:`PairWork`: ``load()`` gives what every pair
needs and is worth loading once per process (the network); ``work(loaded, pair)`` does one
pair and returns its result. Both must be picklable, with module-level classes and plain
fields, because an engine may run them in other processes or on other machines.

An engine is any callable ``engine(work, pairs)`` that yields ``(pair, result)`` once per
pair, in the order the results come (not the CSV's). :func:`in_this_process` is the plain
one; :class:`vitreg.cluster.DaskEngine` runs the pairs on a Dask cluster. The workflow alone
records the results, so resuming and the summary do not depend on the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from vitreg.frame import ModelFrame
from vitreg.nets.vitvnet import VitVNet
from vitreg.pairs import Pair
from vitreg.weights import load_model, resolve

Result = TypeVar("Result", covariant=True)


class PairWork(Protocol[Result]):
    """The work on one pair of a workflow, runnable in any process (picklable)."""

    def load(self) -> Any:
        """What every pair needs, loaded once per process (e.g. the network, or None)."""
        ...

    def __call__(self, loaded: Any, pair: Pair) -> Result:
        """One pair's result, given what :meth:`load` returned in this process."""
        ...


PairEngine = Callable[[PairWork, Sequence[Pair]], Iterator[tuple[Pair, Any]]]
"""``engine(work, pairs)`` yields ``(pair, work(loaded, pair))`` once per pair, as they come."""


def in_this_process(work: PairWork, pairs: Sequence[Pair]) -> Iterator[tuple[Pair, Any]]:
    """The plain engine: load once, then work on the pairs one after another, in order."""
    loaded = work.load()
    for pair in pairs:
        yield pair, work(loaded, pair)


def model_source(
    model: VitVNet | str | Path | None, network: VitVNet | None, offline: bool | None = None
) -> VitVNet | Path | None:
    """What a worker process loads to get ``network`` (the model the client loaded from
    ``model``): the checkpoint's resolved path when it came from a name or a path (each worker
    reads the file, as on a shared file system), the network itself when it was given as one
    (it travels pickled), None without a network."""
    if network is None:
        return None
    if isinstance(model, str | Path):
        return resolve(model, offline=offline).absolute()
    return network


def load_source(source: VitVNet | Path | None, frame: ModelFrame) -> VitVNet | None:
    """The network a worker registers with, from :func:`model_source`'s answer."""
    if isinstance(source, Path):
        network, _ = load_model(source, frame, offline=True)
        return network
    return source
