"""The scheduling policy on its own: which waiting jobs run next, as a plan value. No model, no threads."""

from __future__ import annotations

from worker.costs import LaneShape
from worker.scheduling.policy import (
    BULK,
    INTERACTIVE,
    POLL_S,
    Action,
    Ending,
    Policy,
    Running,
    Waiting,
    WaitingLine,
    batch_cost,
)

NOW, WALL = 1000.0, 1_700_000_000.0


def job(job_id: str, *, length: int = 4, new: int = 4, rows: int = 1, arrived: float = NOW, priority: int = INTERACTIVE, beams: bool = False,
        **fields) -> Waiting:
    return Waiting(job_id, rows=rows, length=length, new_tokens=new, arrived=arrived, priority=priority,
                   key=("beam", rows) if beams else None, **fields)


def line_of(*jobs: Waiting) -> WaitingLine:
    line = WaitingLine()
    for order, waiting in enumerate(jobs):
        waiting.order = order
        line.add(waiting)
    return line


YIELD_S = 30.0


def policy(max_size: int = 4, wait_s: float = 0.02, max_delay_s: float = 0.5, yield_s: float = YIELD_S) -> Policy:
    return Policy(max_size=max_size, wait_s=wait_s, max_delay_s=max_delay_s, yield_s=yield_s)


def test_jobs_join_in_order_within_size_and_budget_and_the_first_that_does_not_fit_stops_the_rest():
    short = [job(f"s{i}") for i in range(6)]
    long = job("long", length=240)
    one = batch_cost([short[0]])
    line = line_of(*short[:2], long, *short[2:])
    plan = policy().plan(line, Running(), budget=one * 3, now=NOW + 1, wall=WALL)
    assert plan.action is Action.JOIN and plan.job_ids == ["s0", "s1"]  # the long prompt does not fit the budget: it stops the rest
    line.remove(plan.jobs)
    assert policy().plan(line, Running(), budget=one * 3, now=NOW + 1, wall=WALL).job_ids == ["long"], "an empty batch takes its first job"
    line.remove([long])
    full = policy().plan(line, Running(), budget=10**9, now=NOW + 1, wall=WALL)
    assert full.job_ids == ["s2", "s3", "s4", "s5"]
    assert policy().plan(line, Running(jobs=4, rows=4, lanes=(LaneShape(4, 8, 2),)), budget=10**9, now=NOW + 1, wall=WALL).job_ids == ["s2"], \
        "interactive jobs may take the batch a quarter over its size"


def test_jobs_of_several_rows_let_single_rows_go_first_and_decode_alone_for_a_while():
    # Arrived interleaved: beam jobs (4 rows each) and greedy jobs (1 row).
    line = line_of(*(job(f"b{i}", rows=4) if i % 2 else job(f"g{i}") for i in range(8)))
    plan = policy(max_size=16).plan(line, Running(), budget=10**9, now=NOW + 1, wall=WALL)
    assert plan.action is Action.JOIN and plan.job_ids == ["g0", "g2", "g4", "g6"], "the beam jobs wait while greedy jobs join"
    line.remove(plan.jobs)
    greedy_decoding = Running(jobs=4, rows=4, decoding=((INTERACTIVE, 1),) * 4, lanes=(LaneShape(4, 8, 4),))
    assert policy(max_size=16).plan(line, greedy_decoding, budget=10**9, now=NOW + 2, wall=WALL).action is Action.STEP, \
        "... and while they decode"
    assert policy(max_size=16).plan(line, Running(), budget=10**9, now=NOW + 2, wall=WALL).job_ids == ["b1", "b3", "b5", "b7"], \
        "then they join together"
    beam_decoding = Running(jobs=1, rows=4, decoding=((INTERACTIVE, 4),), lanes=(LaneShape(4, 8, 4),))
    assert policy(max_size=16).plan(line, beam_decoding, budget=10**9, now=NOW + 2, wall=WALL).job_ids == ["b1", "b3", "b5", "b7"], \
        "beside jobs of as many rows"
    # Once they have waited yield_s, they join in arrival order whatever decodes: none waits forever.
    aged = policy(max_size=16).plan(line, greedy_decoding, budget=10**9, now=NOW + YIELD_S + 1, wall=WALL)
    assert aged.job_ids == ["b1", "b3", "b5", "b7"]
    bulk_greedy = Running(jobs=4, rows=4, decoding=((BULK, 1),) * 4, lanes=(LaneShape(4, 8, 4),))
    assert policy(max_size=16).plan(line, bulk_greedy, budget=10**9, now=NOW + 2, wall=WALL).job_ids == ["b1", "b3", "b5", "b7"], \
        "an interactive beam job does not wait for bulk greedy jobs"
    mixed = line_of(*(job(f"b{i}", rows=4) if i % 2 else job(f"g{i}") for i in range(4)))
    assert policy(max_size=16).plan(mixed, greedy_decoding, budget=10**9, now=NOW + YIELD_S + 1, wall=WALL).job_ids == ["g0", "b1", "g2", "b3"]


def test_bulk_jobs_do_not_take_the_batch_over_its_size_and_interactive_ones_wait_ahead_of_them():
    line = line_of(*(job(f"j{i}", priority=p) for i, p in enumerate([BULK, BULK, INTERACTIVE, BULK, INTERACTIVE])))
    assert [w.job_id for w in line] == ["j2", "j4", "j0", "j1", "j3"]
    line.put_back([job("aside", resumed=True)])
    line.add(job("j5", priority=INTERACTIVE, order=10))
    assert [w.job_id for w in line][:4] == ["aside", "j2", "j4", "j5"], "a job set aside goes first; a new interactive one behind the others"
    bulk = line_of(*(job(f"b{i}", priority=BULK) for i in range(3)))
    assert policy().plan(bulk, Running(jobs=4, rows=4, lanes=(LaneShape(4, 8, 2),)), budget=10**9, now=NOW + 1, wall=WALL).action is Action.STEP


def test_an_idle_batcher_waits_for_a_burst_only_as_long_as_the_rules_say():
    p = policy(max_size=4, wait_s=0.02, max_delay_s=0.5)
    line = line_of(job("a", arrived=NOW), job("b", arrived=NOW + 0.01))
    plan = p.plan(line, Running(), budget=10**9, now=NOW + 0.015, wall=WALL)
    assert plan.action is Action.WAIT and abs(plan.wait_s - 0.015) < 1e-9, "20 ms after the last arrival"
    assert p.plan(line, Running(), budget=10**9, now=NOW + 0.03, wall=WALL).job_ids == ["a", "b"]
    trickle = line_of(*(job(f"t{i}", arrived=NOW + 0.015 * i) for i in range(3)))
    assert p.until_due(trickle, Running(), NOW + 0.04) > 0
    assert p.until_due(line_of(job("old", arrived=NOW), job("new", arrived=NOW + 0.6)), Running(), NOW + 0.6) <= 0, "the first job waited 0.5 s"
    full = line_of(*(job(f"f{i}") for i in range(4)))
    assert p.plan(full, Running(), budget=10**9, now=NOW, wall=WALL).action is Action.JOIN, "a full batch starts at once"
    assert p.plan(line_of(job("x")), Running(jobs=1, rows=1, lanes=(LaneShape(1, 5),)), budget=10**9, now=NOW, wall=WALL).action is Action.STEP, \
        "a running batch steps on while a newcomer is not due"
    assert p.plan(WaitingLine(), Running(), budget=10**9, now=NOW, wall=WALL) == p.plan(WaitingLine(), Running(), budget=1, now=NOW, wall=WALL)
    assert p.plan(WaitingLine(), Running(), budget=10**9, now=NOW, wall=WALL).wait_s is None, "nothing to do: wait for an arrival"


def test_beam_jobs_run_in_generate_calls_of_their_nearest_lengths_within_size_and_padding():
    beams = [job(f"k{i}", beams=True, rows=2) for i in range(6)] + [job("klong", beams=True, rows=2, length=240)]
    line = line_of(*beams)
    calls = []
    for _ in range(3):
        plan = policy().plan(line, Running(), budget=10**9, now=NOW + 1, wall=WALL)
        calls.append((plan.action, plan.job_ids))
        line.remove(plan.jobs)
    assert calls == [(Action.GENERATE, ["k0", "k1", "k2", "k3"]), (Action.GENERATE, ["k4", "k5"]), (Action.GENERATE, ["klong"])]
    anchored = line_of(*(job(f"m{i}", beams=True, rows=2, length=2 * (i + 1)) for i in [5, 0, 1, 2, 3, 4, 6, 7, 8, 9]))
    plan = policy().plan(anchored, Running(), budget=10**9, now=NOW + 1, wall=WALL)
    assert plan.action is Action.GENERATE and plan.job_ids[0] == "m5" and len(plan.jobs) <= 4, "never over the batch size, whatever the anchor"


def test_a_job_that_runs_alone_waits_for_the_batch_to_drain_and_its_outcomes_to_be_recorded_then_nothing_joins_it():
    last = job("last", priority=BULK, alone=True)
    line = line_of(job("t0"), last, job("t1"))
    p = policy()
    assert p.plan(line, Running(jobs=1, rows=1, lanes=(LaneShape(1, 5, 3),)), budget=10**9, now=NOW + 1, wall=WALL).action is Action.STEP, \
        "interactive jobs behind it do not join the decoding batch"
    waiting = p.plan(line, Running(outcomes_unrecorded=True), budget=10**9, now=NOW + 1, wall=WALL)
    assert waiting.action is Action.WAIT and waiting.wait_s == POLL_S
    assert p.plan(line, Running(), budget=10**9, now=NOW + 1, wall=WALL).job_ids == ["last"]
    line.remove([last])
    assert p.plan(line, Running(jobs=1, rows=1, lanes=(LaneShape(1, 5, 3),), alone=True), budget=10**9, now=NOW + 1, wall=WALL).action is Action.STEP


def test_waiting_jobs_past_their_deadline_or_cancelled_end_and_at_shutdown_the_unstarted_are_turned_away():
    line = line_of(job("late", deadline=WALL - 1), job("gone"), job("fine", deadline=WALL + 60), job("aside", resumed=True, deadline=WALL - 1))
    plan = policy().plan(line, Running(), budget=10**9, now=NOW, wall=WALL, is_cancelled=lambda job_id: job_id in {"gone", "aside"})
    assert plan.action is Action.END and plan.job_ids == ["late", "gone"] and plan.endings == (Ending.EXPIRED, Ending.CANCELLED), \
        "a job set aside has started: it is not ended here (its cancellation stops it inside the batch)"
    stopping = policy().plan(line, Running(jobs=1, rows=1, lanes=(LaneShape(1, 5, 3),)), budget=10**9, now=NOW, wall=WALL, stopping=True)
    assert stopping.action is Action.END and set(stopping.job_ids) == {"late", "gone", "fine"} and set(stopping.endings) == {Ending.SHUTDOWN}
    line.remove(stopping.jobs)
    assert policy().plan(line, Running(jobs=1, rows=1, lanes=(LaneShape(1, 5, 3),)), budget=10**9, now=NOW, wall=WALL, stopping=True).job_ids == ["aside"], \
        "jobs set aside finish at shutdown"
    assert policy().plan(WaitingLine(), Running(), budget=10**9, now=NOW, wall=WALL, stopping=True).action is Action.STOP


def test_by_default_nobody_waits_for_company_a_lone_job_starts_at_once_and_newcomers_join_at_the_next_step():
    p = policy(wait_s=0.0, max_delay_s=0.2)
    assert p.plan(line_of(job("lone", arrived=NOW)), Running(), budget=10**9, now=NOW, wall=WALL).job_ids == ["lone"]
    assert p.plan(line_of(job("new", arrived=NOW)), Running(jobs=3, rows=3, lanes=(LaneShape(4, 9, 20),)), budget=10**9, now=NOW,
                  wall=WALL).job_ids == ["new"], "a running batch takes a newcomer in before its next step"
    burst = line_of(*(job(f"b{i}", arrived=NOW + 0.001 * i) for i in range(3)))
    assert p.plan(burst, Running(jobs=1, rows=1, lanes=(LaneShape(4, 5, 20),)), budget=10**9, now=NOW + 0.003, wall=WALL).job_ids == ["b0", "b1", "b2"], \
        "what arrived during a step joins together"
