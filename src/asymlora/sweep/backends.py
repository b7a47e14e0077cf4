"""Where the runs of a sweep execute. A backend has ``submit(job, tag) -> Future`` and
``close()``; the engine (``asymlora.sweep.engine``) waits on the futures, so every backend
serves it alike. Every run seeds its own RNGs, so a record does not depend on where it ran.

- :class:`InProcess` runs a job at once in this process (the head-only baseline on cached
  features, and every run when there is one worker);
- :class:`LocalPool` runs jobs in worker processes of this machine, each loading the task once.
  On CPUs each worker computes with one thread (two single-thread runs side by side do ~1.25x
  the work of one run on two threads: small matrices, Python overhead); with G GPUs, G
  workers, each pinned to its own GPU;
- :class:`RayBackend` runs each job as a Ray task asking for ``cpus_per_run`` CPUs and
  ``gpus_per_run`` GPUs, on a running cluster (``address``: ``auto`` or ``HOST:PORT``) or on a
  local one started for the sweep (loopback only). A Ray worker process loads the task once and
  keeps it for the jobs it is given later.

``close(abort=True)`` (an interrupted sweep) stops the workers at once instead of letting them
finish their jobs; workers also die with their parent when it is killed outright
(``asymlora.sweep.interrupt.ignore_in_worker``)."""
from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from asymlora.core.threads import torch_threads
from asymlora.startup import start_command_process
from asymlora.sweep.interrupt import ignore_in_worker

__all__ = ["Job", "InProcess", "LocalPool", "RayBackend", "BACKENDS", "adapter_backend", "describe_backend",
           "available_cpus", "set_threads", "threads_for_run", "worker_count", "release_freed_memory"]


@dataclass(frozen=True)
class Job:
    """One run to do, or one segment of it: ``spec`` the strategy (anything with ``label`` and
    ``is_adapter``); ``pilot`` runs try a rate of the grid on the first seed; ``until`` pauses
    the run at that step (a rung of the lr search) with a checkpoint; ``resume`` continues it
    from there."""

    spec: Any
    seed: int
    lr: float
    pilot: bool
    until: int | None = None
    resume: bool = False

    @property
    def key(self) -> tuple[str, int, float]:
        return (self.spec.label, self.seed, self.lr)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def _probe_threads(candidates: list[int]) -> tuple[int, dict[int, float]]:
    """Time a transformer-sized matmul at each thread count and keep the fastest.

    On a busy machine, OpenMP threads that wait for a core can make 2 threads 10-20x slower
    than 1 (measured here: 22 ms vs 1.1 ms for 256x384 @ 384x384 at load 6 on 2 cores)."""
    import torch

    x, w = torch.randn(512, 384), torch.randn(1536, 384)
    times: dict[int, float] = {}
    for n in candidates:
        torch.set_num_threads(n)
        torch.nn.functional.linear(x, w)
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            for _ in range(4):
                torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t)
        times[n] = best
    return min(times, key=times.__getitem__), times


def set_threads(threads: int | None) -> tuple[int, dict[int, float]]:
    """``threads`` or, when None, the faster of all available CPUs and 1 (see ``_probe_threads``)."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        return threads, {}
    avail = available_cpus()
    if avail == 1:
        torch.set_num_threads(1)
        return 1, {}
    n, times = _probe_threads([avail, 1])
    torch.set_num_threads(n)
    return n, times


@contextlib.contextmanager
def threads_for_run(threads: int | None) -> Iterator[tuple[int, dict[int, float]]]:
    """``set_threads(threads)`` for the duration of a protocol run; the caller's thread count is
    put back afterwards, whatever happens."""
    with torch_threads():
        yield set_threads(threads)


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def worker_count(cfg: Any, specs: list[Any]) -> int:
    """Worker processes for the adapter runs: ``cfg.workers``, or one per GPU (each pinned to
    its own, ``CUDA_VISIBLE_DEVICES``), or on a CPU-only machine one per available core up to 2
    (the setting measured on the 2-core machine; larger pools were not measured)."""
    if cfg.workers is not None:
        return cfg.workers
    if not any(s.is_adapter for s in specs):
        return 1
    gpus = _cuda_count()
    if gpus:
        return gpus
    return max(1, min(2, available_cpus()))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, looked up once (``find_library`` may start a subprocess); None
    where the C library is not glibc (musl, macOS)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``); returns whether
    it could. A training step frees its activations, but glibc keeps freed chunks below its
    (self-raising, up to 32 MB) mmap threshold in the heap, so a worker's RSS stays at the highest
    it ever reached and creeps up with fragmentation from job to job (docs/memory.md). Called
    after each job; it changes no number of a run."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class InProcess:
    """Runs each job at once in this process; ``submit`` returns a finished future.
    ``execute(state, cfg, job, tag)`` does one job on the task ``state`` loaded here, at
    ``threads`` torch threads (None: this process's count)."""

    def __init__(self, state: Any, cfg: Any, execute: Callable[..., Any], threads: int | None = None) -> None:
        self.state, self.cfg, self.execute, self.threads = state, cfg, execute, threads

    def submit(self, job: Any, tag: str) -> Future:
        from asymlora.core.threads import torch_threads

        fut: Future = Future()
        try:
            with torch_threads(self.threads):
                fut.set_result(self.execute(self.state, self.cfg, job, tag))
        except Exception as err:  # noqa: BLE001 - handed to the caller through the future
            fut.set_exception(err)
        finally:
            release_freed_memory()
        return fut

    def close(self, abort: bool = False) -> None:
        pass


_WORKER: dict[str, Any] = {}


def _worker_init(cfg: Any, prepare: Callable[[Any], Any], threads: int, env: dict[str, str],
                 gpus: Any = None) -> None:
    """Each worker process loads the task once with ``prepare(cfg)``; with ``gpus`` (a queue of
    GPU indices, one per worker) it takes one and sees only that GPU."""
    ignore_in_worker()
    start_command_process()
    os.environ.update(env)
    if gpus is not None:  # before anything initialises CUDA in this process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(gpus.get())
    import torch

    torch.set_num_threads(threads)
    _WORKER["state"], _WORKER["cfg"] = prepare(cfg), cfg


def _worker_job(execute: Callable[..., Any], job: Any, tag: str) -> Any:
    try:
        return execute(_WORKER["state"], _WORKER["cfg"], job, tag)
    finally:
        release_freed_memory()


class LocalPool:
    """``workers`` processes of this machine (spawned: no state shared with this one), each
    loading the task with ``prepare(cfg)`` and running jobs with ``execute`` — both module-level
    functions, which is what a spawned process can receive."""

    def __init__(self, cfg: Any, workers: int, prepare: Callable[[Any], Any], execute: Callable[..., Any],
                 threads: int = 1, env: dict[str, str] | None = None) -> None:
        self.execute = execute
        self._before = {p.pid for p in multiprocessing.active_children()}
        ctx = multiprocessing.get_context("spawn")
        gpus = None
        if _cuda_count() > 1:  # one worker per GPU, each pinned to its own
            gpus = ctx.Queue()
            for i in range(workers):
                gpus.put(i % _cuda_count())
        self.pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                                        initargs=(cfg, prepare, threads, env or {}, gpus))

    def submit(self, job: Any, tag: str) -> Future:
        return self.pool.submit(_worker_job, self.execute, job, tag)

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to finish (``abort``: stop them now — SIGTERM, then SIGKILL
        for any still alive after 3 s)."""
        if not abort:
            self.pool.shutdown(wait=True, cancel_futures=True)
            return
        mine = [p for p in multiprocessing.active_children() if p.pid not in self._before]
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in mine:
            p.terminate()
        for p in mine:
            p.join(3)
            if p.is_alive():
                p.kill()
                p.join(1)


_RAY_STATE: dict[Any, Any] = {}


def _ray_job(prepare: Callable[[Any], Any], execute: Callable[..., Any], cfg: Any, key: str, threads: int,
             job: Any, tag: str) -> Any:
    """One job in a Ray worker process: the task is loaded on its first job of this sweep."""
    start_command_process()
    import torch

    torch.set_num_threads(threads)
    if key not in _RAY_STATE:
        _RAY_STATE.clear()  # a worker kept from another sweep: free its task first
        _RAY_STATE[key] = prepare(cfg)
    try:
        return execute(_RAY_STATE[key], cfg, job, tag)
    finally:
        release_freed_memory()


def _child_pids() -> set[int]:
    """This process's direct children (from /proc; empty where there is none)."""
    me, out = str(os.getpid()), set[int]()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    if fh.read().rsplit(")", 1)[1].split()[1] == me:
                        out.add(int(name))
            except (OSError, IndexError):
                continue
    return out


def _stop_pids(pids: set[int]) -> None:
    import signal

    for pid in pids:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


class RayBackend:
    """Each job a Ray task with ``num_cpus=cpus_per_run`` and ``num_gpus=gpus_per_run``; the
    run computes with ``cpus_per_run`` threads (1 by default, as a local worker does, so the
    records are the same)."""

    def __init__(self, cfg: Any, prepare: Callable[[Any], Any], execute: Callable[..., Any], *,
                 address: str | None = None, cpus_per_run: float = 1, gpus_per_run: float = 0,
                 key: str = "") -> None:
        import ray

        self.ray = ray
        self.started = not ray.is_initialized()
        if self.started:
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a local cluster of this machine, reachable only from it; its workers inherit our environment
                for attempt in range(3):  # Ray gives a new node 30 s to register: too little on a busy machine
                    before = _child_pids()
                    try:
                        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
                        break
                    except Exception:  # noqa: BLE001 - ray raises a bare Exception for this timeout
                        ray.shutdown()
                        _stop_pids(_child_pids() - before)  # the failed node's processes (its GCS outlives shutdown)
                        if attempt == 2:
                            raise
        self.remote = ray.remote(_ray_job).options(num_cpus=cpus_per_run, num_gpus=gpus_per_run, max_retries=0)
        self.args = (prepare, execute, cfg, key, max(1, int(cpus_per_run)))
        self.refs: list[Any] = []

    def submit(self, job: Any, tag: str) -> Future:
        ref = self.remote.remote(*self.args, job, tag)
        self.refs.append(ref)
        return ref.future()

    def close(self, abort: bool = False) -> None:
        if abort:
            for ref in self.refs:
                try:
                    self.ray.cancel(ref, force=True)
                except Exception:  # noqa: BLE001 - finished already, or its worker is gone
                    pass
        if self.started:
            self.ray.shutdown()


@dataclass(frozen=True)
class Backend:
    """One place runs can execute (``--backend NAME``): ``make(cfg, workers, prepare, execute,
    key)`` gives the executor of a sweep's adapter runs (None: this process), ``describe(cfg,
    workers, threads)`` says how for the sweep's first line, ``problems(cfg)`` lists what is
    wrong with the settings for it."""

    name: str
    help: str
    make: Callable[[Any, int, Callable[[Any], Any], Callable[..., Any], str], Any]
    describe: Callable[[Any, int, int], str]
    problems: Callable[[Any], list[str]]


def _make_local(cfg: Any, workers: int, prepare: Callable[[Any], Any], execute: Callable[..., Any],
                key: str) -> Any:
    return LocalPool(cfg, workers, prepare, execute) if workers > 1 else None


def _describe_local(cfg: Any, workers: int, threads: int) -> str:
    from asymlora.text import plural

    return f"{workers} worker processes × 1 thread" if workers > 1 else plural(threads, "thread")


def _local_problems(cfg: Any) -> list[str]:
    if getattr(cfg, "ray_address", None) is not None:
        return [f"--ray-address {cfg.ray_address!r} goes with --backend ray"]
    return []


def _make_ray(cfg: Any, workers: int, prepare: Callable[[Any], Any], execute: Callable[..., Any], key: str) -> Any:
    return RayBackend(cfg, prepare, execute, address=cfg.ray_address, cpus_per_run=cfg.cpus_per_run,
                      gpus_per_run=cfg.gpus_per_run, key=key)


def _describe_ray(cfg: Any, workers: int, threads: int) -> str:
    where = cfg.ray_address or "a local cluster"
    return (f"Ray tasks on {where}, {cfg.cpus_per_run:g} CPU"
            + (f" and {cfg.gpus_per_run:g} GPU" if cfg.gpus_per_run else "") + " each")


def _ray_problems(cfg: Any) -> list[str]:
    from asymlora.bundled import installed

    return [] if installed("ray") else ["--backend ray needs the ray package (pip install 'asymlora[ray]')"]


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("local", "worker processes of this machine (one per GPU, each pinned to it)", _make_local,
            _describe_local, _local_problems),
    Backend("ray", "each run a Ray task", _make_ray, _describe_ray, _ray_problems),
)}


def backend_problems(cfg: Any) -> list[str]:
    """What is wrong with ``cfg.backend`` and its settings (empty: nothing)."""
    kind = BACKENDS.get(cfg.backend)
    if kind is None:
        return [f"--backend {cfg.backend!r}: use {' or '.join(BACKENDS)}"]
    return kind.problems(cfg)


def adapter_backend(cfg: Any, workers: int, prepare: Callable[[Any], Any], execute: Callable[..., Any],
                    phase: str = "runs") -> Any:
    """Where the jobs of a sweep's ``phase`` go (``BACKENDS[cfg.backend]``): an executor, or None
    for this process. A Ray worker keeps the task of one phase at a time (the key)."""
    from dataclasses import replace

    from asymlora.sweep.resume import settings_fingerprint

    quiet = replace(cfg, progress=False)
    return BACKENDS[cfg.backend].make(quiet, workers, prepare, execute, f"{phase}:{settings_fingerprint(quiet)}")


def describe_backend(cfg: Any, workers: int, threads: int) -> str:
    """How the adapter runs execute, for the sweep's first line."""
    return BACKENDS[cfg.backend].describe(cfg, workers, threads)
