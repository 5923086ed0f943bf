"""FleetStatistics: a model's request totals over every shard process that held its queue only grow
while it is registered, whatever the shards do (restart, die, lose the model, report on in their grace)."""

from __future__ import annotations

from flotilla.common.request_totals import BatchSizeTotals, RequestTotals
from flotilla.config import ShardSettings
from flotilla.services.controller.shards import QueueCounts, ShardBook
from flotilla.services.controller.statistics import FleetStatistics


def totals(succeeded: int, batches: int = 1, success_s: float = 0.0) -> RequestTotals:
    return RequestTotals(arrivals=succeeded, dispatched=succeeded, batches=batches, succeeded=succeeded,
                         success_s=success_s)


def test_shards_are_summed_and_a_repeated_report_is_not_counted_twice() -> None:
    stats = FleetStatistics()
    stats.report("a:1", {"m": totals(5, success_s=0.5)})
    stats.report("b:1", {"m": totals(3, success_s=0.25), "other": totals(1)})
    stats.report("a:1", {"m": totals(7, batches=2, success_s=0.75)})  # cumulative: replaces a's last
    assert stats.totals("m") == RequestTotals(10, 10, 0.0, 3, 10, 1.0, 0.0, 0, 0.0)
    assert stats.totals("other").succeeded == 1
    assert stats.totals("never") == RequestTotals()


def test_a_restarted_or_dead_shard_keeps_what_its_process_counted() -> None:
    stats = FleetStatistics()
    stats.report("a:1", {"m": totals(5)})
    stats.restarted("a:1")  # its heartbeat says it started again: counters from zero
    stats.report("a:1", {"m": totals(2)})
    assert stats.totals("m").succeeded == 7
    stats.report("a:1", {"m": totals(1)})  # went back without saying so: a restart too
    assert stats.totals("m").succeeded == 8
    stats.gone("a:1")
    assert stats.totals("m").succeeded == 8
    stats.report("b:1", {"m": totals(4)})
    assert stats.totals("m").succeeded == 12
    stats.report("b:1", {}, {"m": 7.0})
    stats.report("a:1", {}, {"m": 5.0, "other": None})  # an older arrival, and none yet
    assert (stats.last_arrival_s("m"), stats.last_arrival_s("other")) == (7.0, None)
    stats.forget("m")  # undeployed: gone with it
    assert stats.totals("m") == RequestTotals() and stats.last_arrival_s("m") is None


def test_the_shard_book_feeds_them_through_moves_restarts_and_dead_shards() -> None:
    book = ShardBook(ShardSettings(heartbeat_timeout_s=10.0))
    book.heartbeat("a:1", 0.0, started=True)
    book.add("m", 0.0)
    book.heartbeat("a:1", 1.0, counters={"m": QueueCounts(5, 5, 0.1)}, requests={"m": totals(5)})
    book.heartbeat("a:1", 2.0, counters={"m": QueueCounts(6, 6, 0.1)}, requests={"m": totals(6, batches=2)},
                   started=True)  # restarted
    assert book.statistics.totals("m").succeeded == 11
    book.heartbeat("b:1", 3.0, started=True)
    book.heartbeat("b:1", 15.0)  # a:1 silent past the timeout: dead, its model moves to b:1
    book.expire(15.0)
    book.heartbeat("b:1", 16.0, counters={"m": QueueCounts(2, 2, 0.0)}, requests={"m": totals(2)})
    assert book.statistics.totals("m").succeeded == 13
    book.remove("m")
    assert book.statistics.totals("m").succeeded == 0


def test_the_record_travels_as_either_messages_fields() -> None:
    from flotilla.api.v1 import controller_pb2

    record = RequestTotals(9, 8, 0.5, 2, 7, 1.5, 0.75, 1, 0.25, {8: BatchSizeTotals(1, 0.5), 1: BatchSizeTotals(1, 0.25)})
    assert RequestTotals.from_pb(controller_pb2.QueueCounters(model="m", **record.pb_fields())) == record
    assert RequestTotals.from_pb(controller_pb2.ModelRequestStatistics(name="m", **record.pb_fields())) == record


def test_batch_sizes_add_up_by_size_and_a_lost_size_is_a_restart() -> None:
    a = RequestTotals(batches=3, batch_sizes={8: BatchSizeTotals(2, 0.5), 3: BatchSizeTotals(1, 0.125)})
    b = RequestTotals(batches=2, batch_sizes={8: BatchSizeTotals(1, 0.25), 5: BatchSizeTotals(1, 0.0625)})
    assert (a + b).batch_sizes == {8: BatchSizeTotals(3, 0.75), 3: BatchSizeTotals(1, 0.125), 5: BatchSizeTotals(1, 0.0625)}
    assert (a + b).batches == 5 and a.batch_sizes[8] == BatchSizeTotals(2, 0.5)  # neither side changed
    grown = RequestTotals(batches=4, batch_sizes={8: BatchSizeTotals(3, 0.75), 3: BatchSizeTotals(1, 0.125)})
    assert not grown.went_back(a)
    # The scalar counters kept growing, but a size counted before is gone or lower: a new process.
    assert RequestTotals(batches=4, batch_sizes={8: BatchSizeTotals(4, 1.0)}).went_back(a)
    assert RequestTotals(batches=4, batch_sizes={8: BatchSizeTotals(1, 1.0), 3: BatchSizeTotals(3, 0.5)}).went_back(a)
    stats = FleetStatistics()
    stats.report("a:1", {"m": a})
    stats.report("b:1", {"m": b})
    assert stats.totals("m").batch_sizes[8] == BatchSizeTotals(3, 0.75)
    stats.gone("a:1")  # what a dead shard's process counted stays
    assert stats.totals("m").batch_sizes[3] == BatchSizeTotals(1, 0.125)
