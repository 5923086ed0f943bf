"""When a model gains or loses a copy, from its batcher's cumulative counters.

Pure decisions: no I/O, no clock (time comes in as ``now_s``, seconds on a
monotonic clock). The controller feeds ``observe`` the counters it polls from
each model's batcher, asks ``decide`` every ``interval_s`` (a question with
no side effects: it may be asked again on fresher counters) and reports what
it did with ``acted``, which starts the cooldown.

Signals, per observed interval (between two ``observe`` calls):

- queue wait: the mean queue wait of the requests dispatched in the interval.
  The wait is *high* when that mean is above ``queue_wait_high_ms``, or when
  nothing was dispatched while the queue is not empty; an interval at or
  below the threshold, or with no dispatches and an empty queue, resets it.
- use: the model was last used when its arrivals last increased or its queue
  was last seen non-empty; a model never used has been idle since it was
  first observed.
- a counter going down means the batcher restarted: the new values become
  the baseline and the interval yields no wait (no spike), only its queue
  depth counts.

``decide`` applies these rules in order, first match wins:

1. a load for the model is under way -> none;
2. fewer copies than ``min_copies`` -> add (no cooldown);
3. ``min_copies`` 0, some copies, idle ``scale_to_zero_idle_s`` -> zero;
4. less than ``cooldown_s`` since the last add/remove/zero ``acted`` on for
   the model -> none;
5. wait high in every observation for ``scale_up_window_s`` -> add, or none
   at ``max_copies``;
6. idle ``scale_down_idle_s`` and more than ``max(min_copies, 1)`` copies ->
   remove;
7. otherwise none.
"""

from __future__ import annotations

from dataclasses import dataclass

from flotilla.config import AutoscaleSettings

ADD = "add"
REMOVE = "remove"
ZERO = "zero"
NONE = "none"


@dataclass(frozen=True)
class Decision:
    """What to do with a model's copies, and why, in words an operator reads in ``models status``."""

    action: str
    """``add``, ``remove``, ``zero`` (unload every copy) or ``none``."""
    reason: str


@dataclass
class _ModelSignals:
    """What the autoscaler has seen of one model."""

    first_seen_s: float
    arrivals_total: int
    dispatched_total: int
    queue_wait_s_total: float
    queue_depth: int
    last_used_s: float | None = None
    queue_wait_ms: float | None = None
    """Mean queue wait of the last interval's dispatched requests; None when none were dispatched."""
    high_since_s: float | None = None
    """Time of the first observation of the current run of high-wait intervals; None when not high."""


class Autoscaler:
    """Scaling decisions for every model, from counters observed over time (see the module docstring)."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self._settings = settings
        self._models: dict[str, _ModelSignals] = {}
        self._last_action: dict[str, tuple[float, str]] = {}
        """Model -> (time, action) of the last add/remove/zero acted on, for the cooldown."""

    def observe(
        self,
        model: str,
        now_s: float,
        *,
        arrivals_total: int,
        dispatched_total: int,
        queue_wait_s_total: float,
        queue_depth: int,
        last_arrival_s: float | None = None,
    ) -> None:
        """Record the batcher's cumulative counters for ``model`` as of ``now_s``; ``last_arrival_s``,
        when known, is when its latest request arrived (counters may reach the controller late: the
        model was last used then, not when they arrived)."""
        seen = self._models.get(model)
        if seen is None:
            seen = _ModelSignals(now_s, arrivals_total, dispatched_total, queue_wait_s_total, queue_depth)
            self._models[model] = seen
            if queue_depth > 0:
                seen.last_used_s = now_s
                seen.high_since_s = now_s  # queued with nothing dispatched yet
            return

        restarted = (
            arrivals_total < seen.arrivals_total
            or dispatched_total < seen.dispatched_total
            or queue_wait_s_total < seen.queue_wait_s_total
        )
        dispatched = 0 if restarted else dispatched_total - seen.dispatched_total
        if not restarted and arrivals_total > seen.arrivals_total:
            used_s = now_s if last_arrival_s is None else min(last_arrival_s, now_s)
            seen.last_used_s = max(seen.last_used_s or used_s, used_s)
        if queue_depth > 0:
            seen.last_used_s = now_s

        if dispatched > 0:
            seen.queue_wait_ms = (queue_wait_s_total - seen.queue_wait_s_total) / dispatched * 1000.0
            high = seen.queue_wait_ms > self._settings.queue_wait_high_ms
        else:
            seen.queue_wait_ms = None
            high = queue_depth > 0
        if not high:
            seen.high_since_s = None
        elif seen.high_since_s is None:
            seen.high_since_s = now_s

        seen.arrivals_total = arrivals_total
        seen.dispatched_total = dispatched_total
        seen.queue_wait_s_total = queue_wait_s_total
        seen.queue_depth = queue_depth

    def touch(self, model: str, now_s: float) -> None:
        """A request for ``model`` is known to be waiting now (a cold start): it counts as used now."""
        seen = self._models.get(model)
        if seen is None:
            self._models[model] = seen = _ModelSignals(now_s, 0, 0, 0.0, 0)
        seen.last_used_s = now_s

    def last_used_s(self, model: str) -> float | None:
        """When arrivals last increased or the queue was seen non-empty; None if never (or never observed)."""
        seen = self._models.get(model)
        return None if seen is None else seen.last_used_s

    def queue_wait_ms(self, model: str) -> float | None:
        """Mean queue wait of the requests dispatched in the last observed interval; None if none were."""
        seen = self._models.get(model)
        return None if seen is None else seen.queue_wait_ms

    def forget(self, model: str) -> None:
        """Drop everything known about ``model`` (it was undeployed)."""
        self._models.pop(model, None)
        self._last_action.pop(model, None)

    def decide(
        self, model: str, now_s: float, *, copies: int, min_copies: int, max_copies: int, loading: bool
    ) -> Decision:
        """Whether ``model`` should gain a copy, lose one, go to zero, or stay (rules in the module docstring).

        ``copies`` counts loading and ready copies; ``loading`` says a load for the model is under way.
        """
        s = self._settings
        seen = self._models.get(model)
        if loading:
            return Decision(NONE, "a copy is loading; waiting for it before deciding again")
        if copies < min_copies:
            return Decision(ADD, f"{copies} copies is below min_copies {min_copies}")

        idle_s = self._idle_s(seen, now_s)
        if min_copies == 0 and copies > 0 and idle_s is not None and idle_s >= s.scale_to_zero_idle_s:
            idle_text = self._idle_text(seen, idle_s)
            return Decision(ZERO, f"{idle_text}; unloading every copy after {s.scale_to_zero_idle_s:.1f} s idle")

        if model in self._last_action:
            acted_s, action = self._last_action[model]
            left_s = s.cooldown_s - (now_s - acted_s)
            if left_s > 0:
                return Decision(NONE, f"in cooldown after the last {action}: {left_s:.1f} s left")

        if seen is not None and seen.high_since_s is not None:
            high_for_s = now_s - seen.high_since_s
            wait = self._wait_text(seen)
            if high_for_s >= s.scale_up_window_s:
                why = f"{wait} for {high_for_s:.1f} s (window {s.scale_up_window_s:.1f} s)"
                if copies < max_copies:
                    return Decision(ADD, why)
                return Decision(NONE, f"{why}, but already at max_copies {max_copies}")
            return Decision(NONE, f"{wait} for {high_for_s:.1f} s of the {s.scale_up_window_s:.1f} s window")

        floor = max(min_copies, 1)
        if idle_s is not None and idle_s >= s.scale_down_idle_s and copies > floor:
            idle_text = self._idle_text(seen, idle_s)
            return Decision(REMOVE, f"{idle_text}; {copies} copies, scaling down after {s.scale_down_idle_s:.1f} s idle")

        if seen is None:
            return Decision(NONE, f"no usage observed yet; {copies} copies")
        if seen.queue_wait_ms is not None:
            return Decision(
                NONE,
                f"queue wait {seen.queue_wait_ms:.0f} ms is within {s.queue_wait_high_ms:.0f} ms; {copies} copies",
            )
        return Decision(NONE, f"{self._idle_text(seen, idle_s)}; {copies} copies")

    def acted(self, model: str, now_s: float, action: str) -> None:
        """The controller carried out ``action`` (add, remove or zero) for ``model`` at ``now_s``: start its cooldown."""
        if action != NONE:
            self._last_action[model] = (now_s, action)

    def _idle_s(self, seen: _ModelSignals | None, now_s: float) -> float | None:
        """Seconds since last use (or since first observed, if never used); None if never observed."""
        if seen is None:
            return None
        return now_s - (seen.first_seen_s if seen.last_used_s is None else seen.last_used_s)

    def _idle_text(self, seen: _ModelSignals | None, idle_s: float | None) -> str:
        if seen is None or idle_s is None:
            return "no usage observed yet"
        if seen.last_used_s is None:
            return f"no request in the {idle_s:.1f} s since it was first observed"
        return f"no request for {idle_s:.1f} s"

    def _wait_text(self, seen: _ModelSignals) -> str:
        s = self._settings
        if seen.queue_wait_ms is None:
            return f"{seen.queue_depth} requests queued with none dispatched (threshold {s.queue_wait_high_ms:.0f} ms)"
        return f"queue wait {seen.queue_wait_ms:.0f} ms > {s.queue_wait_high_ms:.0f} ms"
