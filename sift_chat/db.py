"""What the store's parts (`store.Store` and its mixins: `chats`, `synced`, `vector_search`,
`lexical_search`) share: one connection serves every thread, so each method runs holding the
store's lock; rows carry local time stamps; errors are `StoreError`s."""

from __future__ import annotations

import functools
import time


def serialized(method):
    """Run `method` holding the store's lock: one connection serves every thread (the app's
    workers), and a transaction must not interleave with another thread's statements."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return locked


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


class StoreError(RuntimeError):
    """The store cannot do what was asked; the message says why and what to do."""
