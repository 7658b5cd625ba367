"""Which ``Trainer`` a callback belongs to, and the callback's place in that Trainer's callback list.

Callback events receive ``args, state, control`` and a few objects (model, optimizer, data loaders), never the
Trainer itself, yet the callback needs it: to log through it, to read its eval datasets, to run before the tracker
callbacks and to wrap its model-card writer. :func:`find_trainer` looks for it on the call stack of an event (events
are called from the Trainer's own methods) and accepts only a Trainer whose callback list holds the callback, so a
second Trainer alive in the process, a Trainer subclass or a callback added with ``trainer.add_callback`` after
construction are all found correctly. Code that drives callbacks from elsewhere binds explicitly.

The Trainer's ``restore_callback_states_from_checkpoint=True`` replaces every stateful callback by a new instance
built from its exported state (``type(cb)(**state["args"])``, then ``setattr`` of ``state["attributes"]``). The
user still holds the old object, so :func:`orphan_of` finds it (a callback bound to this Trainer that has left its
list) and the callback hands the restored state back to it (see ``LocalVolumeCallback.bind``).
"""
from __future__ import annotations

import inspect
import weakref
from typing import Any

# Callbacks bound to each Trainer while they were in its callback list, oldest first (weak on both sides: neither
# keeps a Trainer or a callback alive).
_MEMBERS: "weakref.WeakKeyDictionary[Any, list[weakref.ref[Any]]]" = weakref.WeakKeyDictionary()

UNBOUND_MESSAGE = (
    "{name} could not find the transformers.Trainer it belongs to (it looks on the call stack of its events for a "
    "Trainer whose callback list holds it). Bind it yourself once the Trainer exists: "
    "`trainer = Trainer(...); trainer.add_callback(callback); callback.bind(trainer)`."
)


def holds(trainer: Any, callback: Any) -> bool:
    """Whether ``callback`` (the object itself, not an equal one) is in ``trainer``'s callback list."""
    return any(cb is callback for cb in trainer.callback_handler.callbacks)


def find_trainer(callback: Any) -> Any | None:
    """The ``transformers.Trainer`` whose callback list holds ``callback``, found on the current call stack, or None.

    First the ``self`` of each frame, innermost first (the Trainer method that fired the event), then the other
    local variables of frames outside hfvolume (a driver that holds the Trainer in a variable). hfvolume's own
    frames are skipped in the second pass: they may hold the Trainer the callback served before.
    """
    from transformers import Trainer

    frames = []
    frame = inspect.currentframe()
    try:
        frame = frame.f_back if frame is not None else None
        while frame is not None:
            frames.append(frame)
            frame = frame.f_back
        for f in frames:
            candidate = f.f_locals.get("self")
            if isinstance(candidate, Trainer) and holds(candidate, callback):
                return candidate
        for f in frames:
            if str(f.f_globals.get("__name__", "")).startswith("hfvolume."):
                continue
            for name, candidate in f.f_locals.items():
                if name != "self" and isinstance(candidate, Trainer) and holds(candidate, callback):
                    return candidate
    finally:
        del frame, frames  # frames reference their locals: do not keep the stack alive
    return None


def register(trainer: Any, callback: Any) -> None:
    """Remember that ``callback`` serves ``trainer`` (only while it is in the Trainer's callback list)."""
    if not holds(trainer, callback):
        return
    members = _MEMBERS.setdefault(trainer, [])
    if not any(ref() is callback for ref in members):
        members.append(weakref.ref(callback))


def orphan_of(trainer: Any, replacement: Any) -> Any | None:
    """The oldest callback of ``replacement``'s class that served ``trainer`` and is no longer in its list (the
    object the Trainer replaced when it restored callback states from a checkpoint), or None."""
    for ref in _MEMBERS.get(trainer, []):
        cb = ref()
        if cb is not None and cb is not replacement and type(cb) is type(replacement) and not holds(trainer, cb):
            return cb
    return None


def replace_in_list(trainer: Any, old: Any, new: Any) -> None:
    """Put ``new`` where ``old`` is in the Trainer's callback list (in place: the handler may be iterating it)."""
    callbacks = trainer.callback_handler.callbacks
    for index, cb in enumerate(callbacks):
        if cb is old:
            callbacks[index] = new
            return


def move_to_front(trainer: Any, callback: Any) -> None:
    """Make ``callback`` the first of the Trainer's callbacks, so that the keys it adds to a log reach the tracker
    callbacks after it. In place: the handler may be iterating this list right now, and for a list iterator that
    is safe (the callbacks before ours shift right by one and are not visited again)."""
    callbacks = trainer.callback_handler.callbacks
    if holds(trainer, callback) and callbacks[0] is not callback:
        index = next(i for i, cb in enumerate(callbacks) if cb is callback)
        del callbacks[index]
        callbacks.insert(0, callback)


__all__ = ["UNBOUND_MESSAGE", "find_trainer", "holds", "move_to_front", "orphan_of", "register", "replace_in_list"]
