"""One line for the model: every chat turn, comparison and API request of the process waits in it.

A `Turn` is one request's ticket: its place in the line (first come, first served), the switch
that stops it, and what it stored. Where messages decode together (`Engine.decode_together`), a
turn steps aside once its steps are taken: the next one gets the model's adapter while it
writes its answer, and its owner's request stays open until it is done. The line holds at most `max_waiting` turns behind the one
that has the model; one more is refused (`QueueFull`: the API answers 429). Each owner has one
request at a time: a second ticket while the first waits or runs is refused (`Busy`, 429 too).

Stopping is decided under the turn's lock, and so is storing: a turn either stores its exchange
and cannot be stopped any more, or is stopped and stores nothing. `stop()` says which happened,
so no status line has to guess.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass


TICKET_SECONDS = 120  # a ticket not yet in the line holds its owner's place this long at most


class QueueFull(RuntimeError):
    """Too many turns are waiting for the model."""


class Busy(RuntimeError):
    """The owner has a request waiting or being answered already."""

    def __init__(self):
        super().__init__("A message of yours is waiting or being answered already: one at a time "
                         "(wait for its answer, or stop it).")


@dataclass
class Kept:
    """What a finished turn stored: its chat and its answer (None: on a read-only store, nothing)."""

    chat_id: int | None
    message_id: int | None


class Turn:
    """One request for the model: its arrival number, its stop switch, what it kept."""

    def __init__(self, owner: str | None, number: int):
        self.owner = owner
        self.arrived = number  # arrival order in this process, from 1
        self.started: int | None = None  # the order in which it got the model
        self.created = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = False
        self.kept: Kept | None = None
        self.finished_at: float | None = None  # time.monotonic() when it left the line

    def stop(self) -> Kept | None:
        """Stop this turn; returns what it had stored already (None: nothing, and now nothing will be)."""
        with self.lock:
            if self.kept is None:
                self.stopped = True
            return self.kept

    def keep(self, store_it) -> Kept | None:
        """Run `store_it()` (returning a `Kept`) unless the turn was stopped; what was kept."""
        with self.lock:
            if self.stopped:
                return None
            self.kept = store_it()
            return self.kept


class TurnQueue:
    """A first-come, first-served line for the model (a fair lock that also tells each waiting
    turn how many are ahead of it)."""

    def __init__(self, max_waiting: int = 16):
        self.max_waiting = max_waiting
        self._changed = threading.Condition()
        self._line: deque[Turn] = deque()  # the first holds the model
        self._aside: set[Turn] = set()  # out of the line, still answering (`step_aside`)
        self._open: dict[int, Turn] = {}  # issued and not finished, by arrival number
        self._arrivals = itertools.count(1)
        self._starts = itertools.count(1)

    def issue(self, owner: str | None = None) -> Turn:
        """A ticket for a request that will join the line (its stop switch works from now on).
        Busy when the owner (None: nobody in particular) has one that is not stopped and is in
        the line, or was issued less than TICKET_SECONDS ago (its page may have closed before
        it could join)."""
        with self._changed:
            if owner is not None and any(t.owner == owner and not t.stopped and
                                         (t in self._line or t in self._aside
                                          or time.monotonic() - t.created < TICKET_SECONDS)
                                         for t in self._open.values()):
                raise Busy()
            turn = Turn(owner, next(self._arrivals))
            self._open[turn.arrived] = turn
            self._forget_stale()
            return turn

    def enter(self, turn: Turn) -> int:
        """Join the line; how many are ahead. QueueFull when `max_waiting` are waiting already."""
        with self._changed:
            if turn in self._line:
                return self._line.index(turn)
            if len(self._line) > self.max_waiting:
                self._open.pop(turn.arrived, None)
                raise QueueFull(f"{len(self._line) - 1} requests are waiting for the model already: try again later")
            self._line.append(turn)
            return len(self._line) - 1

    def check(self) -> None:
        """QueueFull when one more turn would not be let in now."""
        with self._changed:
            if len(self._line) > self.max_waiting:
                raise QueueFull(f"{len(self._line) - 1} requests are waiting for the model already: try again later")

    def wait(self, turn: Turn, timeout: float) -> int:
        """Wait up to `timeout` seconds for the turn to reach the model (or be stopped); how many
        are still ahead (0: it has the model)."""
        with self._changed:
            self._changed.wait_for(lambda: self._line[0] is turn or turn.stopped, timeout)
            ahead = self._line.index(turn)
            if ahead == 0 and turn.started is None:
                turn.started = next(self._starts)
            return ahead

    def step_aside(self, turn: Turn) -> None:
        """The turn leaves the head of the line and the next one gets the model, while this one
        goes on answering (its owner's request stays open until `leave`)."""
        with self._changed:
            if turn in self._line:
                self._line.remove(turn)
                self._aside.add(turn)
                self._changed.notify_all()

    def release(self, turn: Turn) -> None:
        """The request is over for whoever sent it (answered, failed, or its client went away):
        stop the turn if it has stored nothing, wake it if it waits, and free its owner's ticket
        now. A turn that has the model leaves the line at its next event; one that never joined
        the line is forgotten here (nothing else would: its answer may never have started)."""
        turn.stop()
        with self._changed:
            if turn not in self._line and turn not in self._aside:
                self._open.pop(turn.arrived, None)
                if turn.finished_at is None:
                    turn.finished_at = time.monotonic()
            self._changed.notify_all()

    def leave(self, turn: Turn) -> None:
        """Out of the line (done, failed or stopped), letting the next one in."""
        with self._changed:
            if turn in self._line:
                self._line.remove(turn)
            self._aside.discard(turn)
            turn.finished_at = time.monotonic()
            self._open.pop(turn.arrived, None)
            self._changed.notify_all()

    def open_turns(self, owner: str) -> list[Turn]:
        with self._changed:
            return [t for t in self._open.values() if t.owner == owner]

    @property
    def answering(self) -> int:
        """Turns that stepped aside and are still answering."""
        with self._changed:
            return len(self._aside)

    @property
    def waiting(self) -> int:
        with self._changed:
            return max(len(self._line) - 1, 0)

    def _forget_stale(self, seconds: float = 3600) -> None:
        """Drop tickets issued an hour ago that never joined the line (a page closed before its
        turn ran): they hold nothing but memory."""
        now = time.monotonic()
        for number, turn in list(self._open.items()):
            if turn not in self._line and now - turn.created > seconds:
                del self._open[number]
