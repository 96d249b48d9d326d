"""What the store's halves (`store.Store`, `chats.ChatLog`) share: one connection serves every
thread, so each method runs holding the store's lock; rows carry local time stamps."""

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
