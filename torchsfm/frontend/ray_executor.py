"""The front end's tasks on a Ray cluster (`--executor ray`, the `torchsfm[ray]` extra).

This process (the driver) plans the units, submits them as Ray tasks and stays the only
database writer: each result comes back through Ray's object store as arrays and is committed
by the driver, unit by unit, exactly as the local executor commits it, so an interrupted Ray run
resumes like a local one. Inputs that several tasks read (each image's features) are put in
the object store once; a node fetches each of them once. At most `max_tasks_in_flight` tasks are submitted at once, so the
object store holds a bounded amount of inputs and results.

Faults: a task whose worker process or node dies is resubmitted, at most `max_retries` times
(Ray's own retry is off so that every retry is counted and reported); a task that raises (an
error of its input) is not retried: its error is raised here, as the local executor raises it.
"""
from __future__ import annotations

import collections
import logging
import os
import socket
import time
from typing import Any, Callable, Iterable

from .._version import __version__
from .executors import Composite, ExecutorError, ExecutorStats, Task
from .options import ExecutorOptions

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'torchsfm[ray]'"


def import_ray():
    """The `ray` module, or an ExecutorError naming the extra that installs it."""
    try:
        import ray
    except ImportError:
        raise ExecutorError(f"--executor ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


_started = False  # `connect` started or joined this process's Ray runtime


def disconnect() -> None:
    """Shut down the Ray runtime `connect` started or joined (its idle workers hold memory the
    mapper can use); one that the caller started itself is left alone."""
    global _started
    if _started:
        import ray

        ray.shutdown()
        _started = False


def probe_address(address: str, timeout_s: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that nothing answers at is an error now: Ray itself
    would keep retrying for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", or a form Ray parses itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ExecutorError(f"nothing answers at --ray-address {address} ({e.strerror or e}): start the cluster's "
                            f"head there (`ray start --head --port {port}`), or use --ray-address auto on a node "
                            "of a running cluster") from None


def connect(address: str = "", num_cpus: int | None = None) -> bool:
    """Start or join a Ray runtime unless this process already has one. Returns whether one was
    started or joined now. `address`: "" starts a local runtime with `num_cpus` CPUs; "auto",
    HOST:PORT or ray://HOST:PORT join a running cluster."""
    global _started
    ray = import_ray()
    if ray.is_initialized():
        return False
    common = dict(logging_level=logging.WARNING, configure_logging=True, log_to_driver=True)
    if address:
        probe_address(address)
    try:
        if address == "":
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **common)
        else:
            ray.init(address=address, **common)
    except (ConnectionError, TimeoutError, ValueError, RuntimeError) as e:
        where = "start a local Ray runtime" if address == "" else f"join the Ray cluster at --ray-address {address}"
        raise ExecutorError(f"cannot {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    _started = True
    logger.info("Ray: %s", ", ".join(f"{k} {v:g}" for k, v in sorted(ray.cluster_resources().items())
                                      if k in ("CPU", "GPU", "object_store_memory")))
    return True


def cluster_gpus() -> float:
    """GPUs of the joined cluster (0 when none)."""
    return float(import_ray().cluster_resources().get("GPU", 0))


def cluster_device(device: str) -> str:
    """The device of Ray tasks for --device auto|cpu|cuda, from the GPUs of the joined cluster:
    auto is cuda when the cluster has a GPU; cuda without one is an error, never a silent
    fallback."""
    gpus = cluster_gpus()
    if device == "cuda" and gpus == 0:
        raise ExecutorError("--device cuda was requested but the Ray cluster has no GPU; use --device cpu")
    return "cuda" if device == "cuda" or (device == "auto" and gpus > 0) else "cpu"


def _run_task(fn: Callable[..., Any], *args) -> tuple[Any, tuple]:
    """What a Ray worker runs: the unit function with as many torch threads as CPUs reserved,
    and where it ran (node, pid, torchsfm version) for the driver's report and checks."""
    import ray
    import torch

    t0 = time.perf_counter()
    ctx = ray.get_runtime_context()
    torch.set_num_threads(max(1, int(ctx.get_assigned_resources().get("CPU", 1))))
    args = tuple(a.fn(ray.get(a.parts), *a.args) if isinstance(a, Composite) else a for a in args)
    result = fn(*args)
    return result, (socket.gethostname(), os.getpid(), __version__, time.perf_counter() - t0)


class RayExecutor:
    """Tasks on a Ray cluster; see the module docstring."""

    name = "ray"
    ships_data = True  # tasks get compact copies of what they read, through the object store

    def __init__(self, options: ExecutorOptions, num_cpus: int | None = None, device: str = "auto"):
        self.options = options
        self.ray = import_ray()
        connect(options.address, num_cpus)
        self.device = device = cluster_device(device)
        self.stats = ExecutorStats("ray")
        self._remote = self.ray.remote(_run_task)
        cpus = float(self.ray.cluster_resources().get("CPU", 1))
        slots = max(1, int(cpus // options.cpus_per_task))
        if device == "cuda":
            slots = max(1, min(slots, int(cluster_gpus() // max(options.gpus_per_task, 1e-9))))
        self.slots = slots
        self.max_in_flight = options.max_tasks_in_flight or 2 * slots

    def share(self, value: Any):
        """An object-store reference to `value`, for inputs several tasks read."""
        items = vars(value).values() if hasattr(value, "__dict__") else value if isinstance(value, tuple) else (value,)
        self.stats.shipped_bytes += sum(int(getattr(v, "nbytes", 0)) for v in items)
        return self.ray.put(value)

    def composite(self, fn: Callable[..., Any], parts: list, *args) -> Composite:
        """fn(parts, *args), made in the worker from the shared `parts` (see `Composite`)."""
        return Composite(fn, list(parts), args)

    def _submit(self, task: Task):
        opts = dict(num_cpus=self.options.cpus_per_task, max_retries=0, name=f"torchsfm.{task.name}")
        if self.device == "cuda":
            opts["num_gpus"] = self.options.gpus_per_task
        return self._remote.options(**opts).remote(task.fn, *task.args)

    def run(self, tasks: Iterable[Task], on_result: Callable[[Task, Any], Iterable[Task]]) -> ExecutorStats:
        ray = self.ray
        from ray import exceptions as rex

        todo = iter(tasks)
        follow: collections.deque[Task] = collections.deque()
        running: dict = {}  # ObjectRef -> (task, attempt)
        exhausted = False
        t_start, t_wait = time.perf_counter(), 0.0
        try:
            while True:
                while len(running) < self.max_in_flight:
                    if follow:
                        task = follow.popleft()
                    elif not exhausted:
                        task = next(todo, None)
                        if task is None:
                            exhausted = True
                            continue
                    else:
                        break
                    running[self._submit(task)] = (task, 0)
                if not running:
                    return self.stats
                tw = time.perf_counter()
                (ref,), _ = ray.wait(list(running), num_returns=1)
                t_wait += time.perf_counter() - tw
                task, attempt = running.pop(ref)
                try:
                    result, where = ray.get(ref)
                except rex.RayTaskError as e:
                    cause = e.as_instanceof_cause()
                    if isinstance(cause, ModuleNotFoundError) and "torchsfm" in str(cause):
                        raise ExecutorError(f"a Ray worker cannot import torchsfm ({cause}): install torchsfm "
                                            f"{__version__} with its [ray] extra on every node") from None
                    if not isinstance(cause, rex.RayError):
                        raise cause from None  # the unit's own error, as the local executor raises it
                    self._retry(task, attempt, cause, running)
                    continue
                except (rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError, rex.OutOfMemoryError,
                        rex.LocalRayletDiedError, rex.RaySystemError) as e:
                    self._retry(task, attempt, e, running)
                    continue
                if where[2] != __version__:
                    raise ExecutorError(f"Ray node {where[0]} runs torchsfm {where[2]}, this driver {__version__}: "
                                        "install the same version on every node")
                self.stats.num_tasks += 1
                self.stats.workers.add(where[:2])
                self.stats.task_seconds += where[3]
                follow.extendleft(reversed(list(on_result(task, result) or ())))
        finally:
            self.stats.driver_seconds += time.perf_counter() - t_start - t_wait
            for ref in running:  # an error or Ctrl-C: nothing more of this run will be written
                ray.cancel(ref, force=True)

    def _retry(self, task: Task, attempt: int, error: BaseException, running: dict) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if attempt >= self.options.max_retries:
            raise ExecutorError(f"Ray task {task.name} failed {attempt + 1} times ({type(error).__name__}: {reason}); "
                                "its results were not written, rerun to resume") from None
        self.stats.num_retries += 1
        logger.warning("Ray task %s lost its worker (%s): retry %d of %d", task.name, type(error).__name__,
                       attempt + 1, self.options.max_retries)
        running[self._submit(task)] = (task, attempt + 1)
