"""Virtual token counters inside an LLM replica: ranks that keep a heavy tenant from starving a light one."""

from __future__ import annotations

from aimass.tenancy.fair_share import VirtualTokenCounters


def test_a_flooding_tenant_ranks_its_own_backlog_behind_a_newcomer() -> None:
    vtc = VirtualTokenCounters()
    heavy = [vtc.admit("heavy", 1.0, 10, 40) for _ in range(8)]
    assert [rank for rank, _ in heavy] == [i * 90 for i in range(8)]  # 10 prompt + 2 x 40 completion each
    light_rank, _ = vtc.admit("light", 1.0, 10, 40)
    # The newcomer is lifted to the least service among active tenants (0), not behind heavy's backlog.
    assert light_rank == 0
    assert sum(1 for rank, _ in heavy if rank > light_rank) == 7


def test_idle_tenants_bank_no_credit_and_weights_scale_service() -> None:
    vtc = VirtualTokenCounters()
    _, estimate = vtc.admit("a", 1.0, 100, 0)
    vtc.finish("a", estimate, 100, 0)  # a received 100
    _, busy_estimate = vtc.admit("b", 1.0, 0, 50)  # b is active at 0
    vtc.finish("b", busy_estimate, 0, 50)  # b received 100 and went idle
    # c arrives while nobody is active: it keeps its own (zero) counter.
    assert vtc.admit("c", 1.0, 1, 1)[0] == 0
    # a returns while c is active at 0: a keeps the 100 it already received (never lowered).
    assert vtc.admit("a", 1.0, 1, 1)[0] == 100
    gold_rank, gold_estimate = vtc.admit("gold", 2.0, 100, 50)
    assert gold_estimate == (100 + 100) / 2
    assert gold_rank == 0  # lifted to the least active counter (c's 0)


def test_cancelled_requests_are_charged_for_what_they_computed() -> None:
    vtc = VirtualTokenCounters()
    _, estimate = vtc.admit("t", 1.0, 10, 100)
    vtc.finish("t", estimate, 10, 3)
    assert vtc.service.served("t") == 16 and vtc.pending["t"] == 0 and not vtc.in_flight


def test_idle_tenants_beyond_the_bound_are_let_go() -> None:
    vtc = VirtualTokenCounters(max_tracked=3)
    vtc.admit("busy", 1.0, 1, 1)  # stays in flight throughout
    for index in range(50):
        _, estimate = vtc.admit(f"made-up-{index}", 1.0, 10, 10)
        vtc.finish(f"made-up-{index}", estimate, 10, 10)
    assert vtc.service.tracked <= 4 and set(vtc.in_flight) == {"busy"}


def test_one_tenants_requests_keep_their_order_when_earlier_ones_end_early() -> None:
    vtc = VirtualTokenCounters()
    first, first_estimate = vtc.admit("t", 1.0, 10, 500)  # estimated 1,010
    second, _ = vtc.admit("t", 1.0, 10, 10)  # ranked behind the first's estimate
    # The first ends far under its estimate (end of sequence after 2 tokens): the projection drops by ~1,000 ...
    vtc.finish("t", first_estimate, 10, 2)
    third, _ = vtc.admit("t", 1.0, 10, 10)
    # ... but the third still ranks behind the second, which is still waiting or running.
    assert first < second <= third
