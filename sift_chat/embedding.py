"""The embedder shared by the chat (one prompt) and the ingest (many passages), in one process.

Hugging Face does not promise that a model and its fast tokenizer may be used from two threads at
once, so every call into them holds one lock: an encode call per batch (not per ingest) and a
tokenizer call per block of text. The lock is first come, first served: the ingest releases it
between two batches and takes it again at once, and a plain `threading.Lock` would let it win
every time; here a prompt's embedding waits for at most the batch that is running. In a server
the encode runs on the models' thread (`torch_thread`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from . import torch_thread


class FairLock:
    """A lock handed out in the order it was asked for (a ticket lock)."""

    def __init__(self):
        self._condition = threading.Condition(threading.Lock())
        self._next = 0  # the next ticket to hand out
        self._serving = 0  # the ticket that holds the lock

    @property
    def waiting(self) -> int:
        """Threads waiting for the lock (not counting the holder)."""
        with self._condition:
            return max(self._next - self._serving - 1, 0)

    def __enter__(self) -> "FairLock":
        with self._condition:
            ticket = self._next
            self._next += 1
            self._condition.wait_for(lambda: self._serving == ticket)
        return self

    def __exit__(self, *exc) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class SharedEmbedder:
    """A sentence-transformers model behind a `FairLock`: `encode` in batches of `batch_size`,
    each one under the lock; `tokenizer` calls under it too. Everything else is the model's."""

    def __init__(self, model):
        self.model = model
        self.lock = FairLock()
        self.tokenizer = _LockedTokenizer(model.tokenizer, self.lock)

    def __getattr__(self, name):  # get_embedding_dimension, max_seq_length, device, …
        return getattr(self.model, name)

    def encode(self, texts: str | Sequence[str], batch_size: int = 32, **options):
        """As `SentenceTransformer.encode`. A list is cut into batches as the model cuts it
        (longest texts first, `batch_size` at a time), each encoded holding the lock, and the
        vectors are put back in the order of `texts`."""
        if isinstance(texts, str) or len(texts) <= batch_size:
            with self.lock:
                return torch_thread.run(self.model.encode, texts, batch_size=batch_size, **options)
        order = np.argsort([-len(text) for text in texts])  # the model's own order (its _text_length)
        parts = []
        for start in range(0, len(order), batch_size):
            batch = [texts[i] for i in order[start : start + batch_size]]
            with self.lock:
                parts.append(torch_thread.run(self.model.encode, batch, batch_size=batch_size, **options))
        back = np.argsort(order)
        if options.get("convert_to_tensor"):
            import torch

            return torch.cat(list(parts))[torch.from_numpy(back)]
        return np.concatenate(parts)[back]


class _LockedTokenizer:
    """A tokenizer whose calls hold the embedder's lock; its attributes are the tokenizer's."""

    def __init__(self, tokenizer, lock: FairLock):
        self._tokenizer, self._lock = tokenizer, lock

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        with self._lock:
            return self._tokenizer(*args, **kwargs)


def shared(embedder) -> SharedEmbedder:
    """`embedder` behind a lock (itself when it is one already)."""
    return embedder if isinstance(embedder, SharedEmbedder) else SharedEmbedder(embedder)
