"""Places in training where an injected observer may act.

    remove = events.add_observer(lambda point, step, before: ...)

- `after_step`: right after a training step (`before`: waits for the asynchronous saves of
  earlier steps, so that what is on disk does not depend on timing when the observer needs it);
- `during_save`: inside the background commit of a step's asynchronous checkpoint save, while
  its tmp folder exists and before it is finalized (`before` is None).

The library only notifies; with no observer a notification costs one list check. Tests inject
an observer that kills the process at an exact place (`isic_jax.testing.hooks`).
"""

from __future__ import annotations

from collections.abc import Callable

# (point, step, before) -> None
Observer = Callable[[str, int, Callable[[], None] | None], None]

_OBSERVERS: list[Observer] = []


def add_observer(observer: Observer) -> Callable[[], None]:
    """Registers an observer for this process; returns the function that removes it."""
    _OBSERVERS.append(observer)
    return lambda: _OBSERVERS.remove(observer) if observer in _OBSERVERS else None


def active() -> bool:
    """Whether any observer is registered (the checkpointer then wraps its save for
    `during_save`)."""
    return bool(_OBSERVERS)


def notify(point: str, step: int, before: Callable[[], None] | None = None) -> None:
    """Calls every observer with (point, step, before)."""
    for observer in list(_OBSERVERS):
        observer(point, int(step), before)
