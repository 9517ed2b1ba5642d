"""Progress for long jobs (model conversion, benchmarks) that also shows in a log.

rich draws a live bar on a terminal; on anything else (a CI log, `docker logs`, output piped
to a file) it draws only the bar's final state, once the job has ended. `Progress` is rich's,
plus, when its console is not a terminal, a plain line per task as it starts, whenever its
description changes, each time it gains a further tenth of its total, and at least every
`LOG_EVERY_S` while it moves. On a terminal it is rich's, unchanged. It does not time or
estimate anything of its own.
"""

from __future__ import annotations

import time
from typing import Any

from rich.progress import Progress as RichProgress
from rich.progress import Task, TaskID

LOG_EVERY_S = 30.0
STEPS = 10  # a line at each further tenth of a task's total


class Progress(RichProgress):
    def __init__(self, *columns: Any, **kwargs: Any) -> None:
        super().__init__(*columns, **kwargs)
        self._logged: dict[TaskID, tuple[str, float, float]] = {}  # description, completed, when

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        self._log(task_id)
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._log(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._log(task_id)

    def _log(self, task_id: TaskID) -> None:
        if self.console.is_terminal:
            return
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return
            now = time.monotonic()
            seen = self._logged.get(task_id)
            if seen is not None:
                description, completed, when = seen
                if not (
                    task.description != description
                    or _step(task, task.completed) > _step(task, completed)
                    or (task.completed > completed and now - when >= LOG_EVERY_S)
                ):
                    return
            self._logged[task_id] = (task.description, task.completed, now)
            line = _line(task)
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)


def _step(task: Task, completed: float) -> int:
    """Which tenth of its total `completed` reaches (the last one is the whole)."""
    return int(completed * STEPS // task.total) if task.total else 0


def _line(task: Task) -> str:
    fields = " ".join(f"{k}={v}" for k, v in task.fields.items() if isinstance(v, (str, int, float)))
    done = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
    elapsed = task.elapsed or 0.0
    return " ".join(p for p in (fields, task.description, done, f"{elapsed:.0f} s") if p)
