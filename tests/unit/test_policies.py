"""``gridqueue.policies``: what follows an attempt, for the classes of config/workloads.toml.

Pure functions, tested without Redis. Backoff is random (jitter), so the checks are
bounds that hold for every draw, and averages over many draws.
"""

from __future__ import annotations

import statistics
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gridqueue.policies import EndedAttempt, GiveUp, Retry, backoff_s, decide
from gridqueue.states import NODE_OUTCOMES, POISON_OUTCOMES, JobState, Outcome
from gridqueue.workloads import WorkloadClass, load_workloads

WORKLOADS = load_workloads()
REALTIME = WORKLOADS["realtime"]
BATCH = WORKLOADS["batch"]
EXCLUSIVE = WORKLOADS["exclusive"]
RETRYABLE = [Outcome.ERROR, *sorted(NODE_OUTCOMES)]


def lost_on(*workers: str | None, outcome: Outcome = Outcome.WORKER_LOST) -> list[EndedAttempt]:
    """A history: one attempt per worker, each ended with ``outcome``."""
    return [EndedAttempt(worker, outcome.value) for worker in workers]


def floor_s(workload: WorkloadClass, attempt: int) -> float:
    """The documented wait before jitter: min(max, initial * multiplier^(n-1))."""
    try:
        grown = workload.backoff_initial_s * workload.backoff_multiplier ** (attempt - 1)
    except OverflowError:
        return workload.backoff_max_s
    return min(workload.backoff_max_s, grown)


def ceiling_s(workload: WorkloadClass) -> float:
    return workload.backoff_max_s + workload.backoff_jitter_s


# -- the classes as configured ----------------------------------------------------------


def test_the_configured_classes_are_the_documented_ones() -> None:
    assert sorted(WORKLOADS) == ["batch", "exclusive", "realtime"]
    assert (REALTIME.idempotent, REALTIME.max_attempts, REALTIME.backoff_max_s) == (True, 3, 0)
    assert (BATCH.idempotent, BATCH.max_attempts) == (True, 8)
    assert (EXCLUSIVE.idempotent, EXCLUSIVE.max_attempts) == (False, 1)


def test_realtime_reroutes_a_lost_attempt_at_once_up_to_three_attempts() -> None:
    # The same worker lost twice: no poison, the attempt budget ends the job.
    assert decide(REALTIME, Outcome.WORKER_LOST, 1, lost_on("w1")) == Retry(0.0)
    assert decide(REALTIME, Outcome.WORKER_LOST, 2, lost_on("w1", "w2")) == Retry(0.0)
    assert decide(REALTIME, Outcome.WORKER_LOST, 3, lost_on("w1", "w2", "w1")) == GiveUp(
        "worker_lost", JobState.FAILED
    )


@pytest.mark.parametrize("outcome", RETRYABLE)
def test_realtime_never_waits(outcome: Outcome) -> None:
    for attempt in (1, 2):
        decision = decide(REALTIME, outcome, attempt, lost_on("w1", outcome=outcome))
        assert decision == Retry(0.0)
    assert backoff_s(REALTIME, 1) == 0.0


def test_batch_backs_off_exponentially_and_then_gives_up() -> None:
    for attempt in range(1, BATCH.max_attempts):
        decision = decide(BATCH, Outcome.ERROR, attempt, lost_on("w1", outcome=Outcome.ERROR))
        assert isinstance(decision, Retry)
        assert floor_s(BATCH, attempt) <= decision.after_s <= ceiling_s(BATCH)
    last = decide(BATCH, Outcome.ERROR, BATCH.max_attempts)
    assert last == GiveUp("error", JobState.FAILED)


def test_batch_backoff_grows_on_average_until_the_cap() -> None:
    means = [statistics.fmean(backoff_s(BATCH, n) for _ in range(400)) for n in range(1, 9)]
    growing = [n for n in range(1, 9) if BATCH.backoff_initial_s * 2 ** (n - 1) < 30]
    for n in growing[1:]:
        # initial 0.5 s doubling, jitter up to 0.5 s: each mean is about twice the last.
        assert means[n - 1] > 1.5 * means[n - 2]
    assert means == sorted(means)
    assert means[-1] <= ceiling_s(BATCH)
    assert statistics.pstdev(backoff_s(BATCH, 1) for _ in range(400)) > 0.05  # jittered


def test_exclusive_fails_a_lost_attempt_explicitly() -> None:
    for outcome in NODE_OUTCOMES:
        decision = decide(EXCLUSIVE, outcome, 1, lost_on("w1", outcome=outcome))
        # A dead node and a dead child both mean "outcome unknown": FAILED/worker_lost.
        reason = "worker_lost" if outcome is Outcome.NODE_LOST else outcome.value
        assert decision == GiveUp(reason, JobState.FAILED)
    assert decide(EXCLUSIVE, Outcome.WORKER_LOST, 1, lost_on("w1")) == GiveUp(
        "worker_lost", JobState.FAILED
    )


def test_nodes_that_died_under_a_job_are_no_evidence_of_poison() -> None:
    """Three whole nodes dying under a job (each declared dead on a stale heartbeat) is
    bad luck for the job, not its fault: it is retried, not dead-lettered. Three children
    dying under it while their nodes lived is poison."""
    nodes = [EndedAttempt(f"w{k}", Outcome.NODE_LOST.value) for k in range(1, 4)]
    assert isinstance(decide(BATCH, Outcome.NODE_LOST, 3, nodes), Retry)
    children = [EndedAttempt(f"w{k}", Outcome.WORKER_LOST.value) for k in range(1, 4)]
    assert decide(BATCH, Outcome.WORKER_LOST, 3, children) == GiveUp(
        "poison", JobState.DEAD_LETTERED
    )


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("attempt", [1, 2])
def test_invalid_input_is_never_retried(workload: str, attempt: int) -> None:
    decision = decide(WORKLOADS[workload], Outcome.INVALID_INPUT, attempt, remaining_s=1e9)
    assert decision == GiveUp("invalid_input", JobState.FAILED)


@pytest.mark.parametrize(
    ("outcome", "state"),
    [(Outcome.EXPIRED, JobState.EXPIRED), (Outcome.CANCELLED, JobState.CANCELLED)],
)
def test_an_attempt_ended_from_outside_ends_the_job_the_same_way(
    outcome: Outcome, state: JobState
) -> None:
    assert decide(BATCH, outcome, 1) == GiveUp(outcome.value, state)


def test_a_succeeded_attempt_needs_no_decision() -> None:
    with pytest.raises(ValueError, match="succeeded"):
        decide(BATCH, Outcome.SUCCEEDED, 1)


# -- poison -----------------------------------------------------------------------------


def test_a_job_that_took_down_three_distinct_workers_is_dead_lettered() -> None:
    history = [*lost_on("w1", "w2"), *lost_on("w3", outcome=Outcome.STALLED)]
    assert decide(BATCH, Outcome.STALLED, 3, history) == GiveUp("poison", JobState.DEAD_LETTERED)
    assert decide(REALTIME, Outcome.WORKER_LOST, 3, lost_on("w1", "w2", "w3")) == GiveUp(
        "poison", JobState.DEAD_LETTERED
    )


def test_the_same_worker_lost_again_is_not_a_distinct_failure() -> None:
    decision = decide(BATCH, Outcome.WORKER_LOST, 4, lost_on("w1", "w1", "w2", "w1"))
    assert isinstance(decision, Retry)


def test_only_node_failures_count_toward_poison() -> None:
    history = [*lost_on("w1", "w2", outcome=Outcome.ERROR), *lost_on("w3")]
    assert isinstance(decide(BATCH, Outcome.WORKER_LOST, 3, history), Retry)
    # An attempt that never ran anywhere names no worker and counts for none.
    assert isinstance(decide(BATCH, Outcome.WORKER_LOST, 3, lost_on(None, "w1", "w2")), Retry)


@given(
    workers=st.lists(st.sampled_from(["w1", "w2", "w3", "w4", "w5"]), min_size=1, max_size=7),
    outcome=st.sampled_from(sorted(POISON_OUTCOMES)),
)
def test_poison_is_decided_by_distinct_workers(workers: list[str], outcome: Outcome) -> None:
    attempt = len(workers)
    decision = decide(BATCH, outcome, attempt, lost_on(*workers, outcome=outcome))
    if len(set(workers)) >= BATCH.poison_after_workers:
        assert decision == GiveUp("poison", JobState.DEAD_LETTERED)
    elif attempt >= BATCH.max_attempts:
        assert decision == GiveUp(outcome.value, JobState.FAILED)
    else:
        assert isinstance(decision, Retry)


def test_gpu_faults_on_many_workers_do_not_make_a_job_poison() -> None:
    # A sick GPU is the node's fault: the job moves on and is not dead-lettered for it.
    history = lost_on("w1", "w2", "w3", outcome=Outcome.GPU_FAULT)
    assert isinstance(decide(BATCH, Outcome.GPU_FAULT, 3, history), Retry)


# -- deadlines --------------------------------------------------------------------------


def test_a_retry_that_would_land_past_the_deadline_expires_the_job() -> None:
    # Batch attempt 1 waits 0.5-1.0 s: a deadline 0.4 s away cannot be met.
    assert decide(BATCH, Outcome.ERROR, 1, remaining_s=0.4) == GiveUp("deadline", JobState.EXPIRED)
    assert isinstance(decide(BATCH, Outcome.ERROR, 1, remaining_s=1.01), Retry)
    # Realtime retries at once, so only a deadline already reached stops it.
    assert decide(REALTIME, Outcome.WORKER_LOST, 1, lost_on("w1"), remaining_s=0.0) == GiveUp(
        "deadline", JobState.EXPIRED
    )
    assert decide(REALTIME, Outcome.WORKER_LOST, 1, lost_on("w1"), remaining_s=0.01) == Retry(0.0)


@given(attempt=st.integers(1, 7), remaining_s=st.floats(-10.0, 60.0))
def test_batch_retries_only_when_the_wait_fits_before_the_deadline(
    attempt: int, remaining_s: float
) -> None:
    decision = decide(BATCH, Outcome.ERROR, attempt, remaining_s=remaining_s)
    if isinstance(decision, Retry):
        assert decision.after_s < remaining_s
    else:
        assert decision == GiveUp("deadline", JobState.EXPIRED)
        assert remaining_s <= ceiling_s(BATCH)  # some wait in the jitter window lands late
    if remaining_s <= floor_s(BATCH, attempt):
        assert isinstance(decision, GiveUp)
    if remaining_s > floor_s(BATCH, attempt) + BATCH.backoff_jitter_s:
        assert isinstance(decision, Retry)


# -- backoff, for any class -------------------------------------------------------------


@st.composite
def workload_classes(draw: st.DrawFn) -> WorkloadClass:
    initial = draw(st.floats(0.0, 100.0))
    return WorkloadClass(
        name="generated",
        idempotent=True,
        max_attempts=draw(st.integers(1, 20)),
        backoff_initial_s=initial,
        backoff_max_s=draw(st.floats(initial, 1000.0)),
        backoff_multiplier=draw(st.floats(1.0, 10.0)),
        backoff_jitter_s=draw(st.floats(0.0, 10.0)),
    )


@given(workload=workload_classes(), attempt=st.integers(1, 2000))
def test_backoff_is_always_within_zero_and_max_plus_jitter(
    workload: WorkloadClass, attempt: int
) -> None:
    wait_s = backoff_s(workload, attempt)
    assert 0.0 <= wait_s <= ceiling_s(workload)
    assert wait_s >= floor_s(workload, attempt)


@given(workload=workload_classes(), attempt=st.integers(1, 50))
def test_a_retry_waits_the_backoff(workload: WorkloadClass, attempt: int) -> None:
    decision = decide(workload, Outcome.ERROR, attempt)
    if attempt >= workload.max_attempts:
        assert decision == GiveUp("error", JobState.FAILED)
    else:
        assert isinstance(decision, Retry)
        assert floor_s(workload, attempt) <= decision.after_s <= ceiling_s(workload)


def test_backoff_uses_no_deprecated_tenacity_api() -> None:
    # tenacity 9.2.1 deprecated wait_exponential_jitter(initial=...) for multiplier=.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backoff_s(BATCH, 1)
