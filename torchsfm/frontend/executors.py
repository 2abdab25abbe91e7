"""Executors: where the front end's work units run (`--executor local|ray`).

A stage (extraction, matching + verification) cuts its work into units and hands the executor
`Task`s: a module-level function of the unit and its arguments, pure (arrays in, arrays out,
no database access). The executor runs them and gives each result back to the stage's driver
(`on_result`), which writes it to the database (the only writer) and may answer with follow-up
tasks (a matched unit's verification batches), which run before new units. So the local and
the Ray executor run the very same unit functions on the very same units, and the database
written is the same.

- `LocalExecutor`: runs tasks in this process, one after the other, depth first (a unit is
  matched, verified and written before the next is matched), as the local path always did.
- `RayExecutor` (`ray_executor.py`, for `ExecutorOptions(kind="ray")`): tasks on a Ray cluster, a bounded number in flight; inputs
  shared by several tasks (a unit's features) go through Ray's object store once.
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable



class ExecutorError(RuntimeError):
    """The executor cannot run the work: Ray missing or unreachable, a task retried too often,
    a worker that cannot read an input."""


@dataclass
class Task:
    fn: Callable[..., Any]  # module-level (a Ray worker imports it by name), pure
    args: tuple  # plain values, or handles from `Executor.share`
    key: Any = None  # what the driver needs to handle the result
    name: str = "task"  # shown in errors and as the Ray task's name


@dataclass
class Composite:
    """A task argument made where the task runs: fn(parts, *args), with `parts` handles from
    `Executor.share` (resolved there). Lets many tasks share per-item objects (an image's
    features) and still get one compact input."""

    fn: Callable[..., Any]
    parts: list
    args: tuple = ()


@dataclass
class ExecutorStats:
    """What a stage reports about its executor: tasks run, retries, distinct workers."""

    executor: str = "local"
    num_tasks: int = 0
    num_retries: int = 0  # tasks resubmitted after their worker or node died
    workers: set = field(default_factory=set)  # (node, pid) of the processes that ran tasks
    task_seconds: float = 0.0  # summed inside the tasks (worker time)
    driver_seconds: float = 0.0  # this process's own work: planning, packing, submitting, writing
    shipped_bytes: int = 0  # inputs put in the object store (the tasks' shared arrays)

    @property
    def num_workers(self) -> int:
        return len(self.workers)


class LocalExecutor:
    """Tasks in this process, in order; follow-up tasks first (depth first)."""

    name = "local"
    ships_data = False  # tasks read the driver's arrays in place: no compact copies

    def __init__(self) -> None:
        self.stats = ExecutorStats("local")
        self.device = None  # the caller's device

    def share(self, value: Any) -> Any:
        return value

    def composite(self, fn: Callable[..., Any], parts: list, *args) -> Any:
        return fn(parts, *args)

    def run(self, tasks: Iterable[Task], on_result: Callable[[Task, Any], Iterable[Task]]) -> ExecutorStats:
        import os

        todo = iter(tasks)
        follow: collections.deque[Task] = collections.deque()
        self.stats.workers.add(("local", os.getpid()))
        t_start, t_tasks = time.perf_counter(), 0.0
        try:
            while True:
                task = follow.popleft() if follow else next(todo, None)
                if task is None:
                    return self.stats
                t0 = time.perf_counter()
                result = task.fn(*task.args)
                t_tasks += time.perf_counter() - t0
                self.stats.num_tasks += 1
                follow.extendleft(reversed(list(on_result(task, result) or ())))
        finally:
            self.stats.task_seconds += t_tasks
            self.stats.driver_seconds += time.perf_counter() - t_start - t_tasks
