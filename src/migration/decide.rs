//! The decisions of the migration driver and the cutover, as pure functions of what is known (no I/O), so each
//! rule has a table of tests: what the driver does next in a state, what a failing step leads to, when an
//! automatic cutover goes ahead, and whether a cutover attempt swaps the route or falls back.

use std::time::Duration;

use super::record::{CutoverMode, Record, State};
use super::MigrateError;

/// Tries of a failing copy/capture step before the migration is marked `failed`.
pub const STEP_TRIES: u32 = 3;
/// Automatic cutover waits for the backlog to be this small.
pub const AUTO_CUTOVER_LAG: u64 = 100;
/// Automatic cutover gives up after this many attempts (an operator looks then).
pub const AUTO_CUTOVER_ATTEMPTS: u64 = 20;

/// What the driver does with a migration in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Install capture on the source (and the change-log objects on the target).
    InstallCapture,
    /// Copy the tables not yet checkpointed.
    Copy,
    /// Keep the tee running (and verify, or cut over automatically, in dual_write).
    Run,
    /// Nothing to do but look again later (paused, failed, or a command holds it).
    Wait,
}

/// The driver's step for `rec`.
pub fn step_for(rec: &Record) -> Step {
    if rec.paused {
        return Step::Wait;
    }
    match rec.state {
        State::Pending => Step::InstallCapture,
        State::BulkCopy => Step::Copy,
        State::DualWrite | State::Migrated => Step::Run,
        State::CutoverPaused | State::Failed | State::Completed | State::RolledBack => Step::Wait,
    }
}

/// What a failed step leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Try again after this long.
    Retry(Duration),
    /// Mark the migration `failed`: an operator must look (`resume` retries).
    Fail,
}

/// After `failures` failures in a row of the step of `state`: copy and capture steps fail the migration after
/// [`STEP_TRIES`]; the running states (whose tee retries by itself) back off and keep going.
pub fn after_failure(state: State, failures: u32) -> AfterFailure {
    if failures >= STEP_TRIES && matches!(state, State::Pending | State::BulkCopy) {
        return AfterFailure::Fail;
    }
    AfterFailure::Retry(Duration::from_millis(500 << failures.min(4)))
}

/// Whether an automatic cutover goes ahead at `now` (unix seconds): asked for, verified, caught up, inside
/// the move's cutover window, and not given up on.
pub fn should_auto_cutover(rec: &Record, lag: u64, now: u64) -> bool {
    rec.state == State::DualWrite
        && !rec.paused
        && rec.cutover == CutoverMode::Auto
        && rec.verification.as_ref().is_some_and(|v| v.passed)
        && lag <= AUTO_CUTOVER_LAG
        && rec.cutover_attempts < AUTO_CUTOVER_ATTEMPTS
        && in_window(rec, now)
}

/// Whether a cutover may happen at `now`: always without a window, else inside it.
pub fn in_window(rec: &Record, now: u64) -> bool {
    rec.cutover_window.as_ref().is_none_or(|w| w.contains(now))
}

/// How the steps before the swap (with the tenant held) ended.
#[derive(Debug)]
pub enum BeforeSwap {
    Done,
    Failed(MigrateError),
    /// The cutover's time limit passed while they ran.
    TimedOut,
}

/// What the cutover does after the steps before the swap.
#[derive(Debug)]
pub enum SwapDecision {
    /// Swap the route: the point of no return.
    Swap,
    /// Open the gate onto the source again and stay in dual_write, with this reason.
    FallBack(MigrateError),
}

/// The swap happens only if every step before it finished within the limit: steps that finished late fall
/// back too, since the tenant has been held past what the operator allowed.
pub fn decide_swap(outcome: BeforeSwap, past_deadline: bool, limit: Duration) -> SwapDecision {
    let over =
        || MigrateError::Timeout(format!("cutover passed its {} ms limit", limit.as_millis()));
    match outcome {
        BeforeSwap::Done if !past_deadline => SwapDecision::Swap,
        BeforeSwap::Done | BeforeSwap::TimedOut => SwapDecision::FallBack(over()),
        BeforeSwap::Failed(e) => SwapDecision::FallBack(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::record::VerifyReport;

    fn rec(state: State) -> Record {
        Record {
            state,
            ..Record::for_tests("acme")
        }
    }

    #[test]
    fn each_state_has_its_step() {
        let table = [
            (State::Pending, Step::InstallCapture),
            (State::BulkCopy, Step::Copy),
            (State::DualWrite, Step::Run),
            (State::Migrated, Step::Run),
            (State::CutoverPaused, Step::Wait),
            (State::Failed, Step::Wait),
            (State::Completed, Step::Wait),
            (State::RolledBack, Step::Wait),
        ];
        for (state, step) in table {
            assert_eq!(step_for(&rec(state)), step, "{state:?}");
        }
        let paused = Record {
            paused: true,
            ..rec(State::BulkCopy)
        };
        assert_eq!(step_for(&paused), Step::Wait);
    }

    #[test]
    fn copy_steps_fail_after_their_tries_and_running_ones_back_off() {
        let table = [
            (
                State::Pending,
                1,
                AfterFailure::Retry(Duration::from_millis(1000)),
            ),
            (
                State::BulkCopy,
                2,
                AfterFailure::Retry(Duration::from_millis(2000)),
            ),
            (State::BulkCopy, 3, AfterFailure::Fail),
            (State::Pending, 9, AfterFailure::Fail),
            (
                State::DualWrite,
                3,
                AfterFailure::Retry(Duration::from_millis(4000)),
            ),
            (
                State::Migrated,
                50,
                AfterFailure::Retry(Duration::from_millis(8000)),
            ),
        ];
        for (state, failures, expected) in table {
            assert_eq!(
                after_failure(state, failures),
                expected,
                "{state:?} x{failures}"
            );
        }
    }

    #[test]
    fn automatic_cutover_needs_every_condition() {
        let passed = Some(VerifyReport {
            passed: true,
            ..VerifyReport::default()
        });
        let ready = Record {
            cutover: CutoverMode::Auto,
            verification: passed.clone(),
            ..rec(State::DualWrite)
        };
        // 03:00 UTC on some day.
        let now = 20_000 * 86_400 + 3 * 3600;
        assert!(should_auto_cutover(&ready, 0, now));
        assert!(should_auto_cutover(&ready, AUTO_CUTOVER_LAG, now));
        let windowed = |w: &str| Record {
            cutover_window: Some(w.parse().unwrap()),
            ..ready.clone()
        };
        assert!(should_auto_cutover(&windowed("02:00-04:00"), 0, now));
        let not = [
            (
                Record {
                    cutover: CutoverMode::Manual,
                    ..ready.clone()
                },
                0,
            ),
            (
                Record {
                    verification: None,
                    ..ready.clone()
                },
                0,
            ),
            (
                Record {
                    verification: Some(VerifyReport::default()),
                    ..ready.clone()
                },
                0,
            ),
            (ready.clone(), AUTO_CUTOVER_LAG + 1),
            (
                Record {
                    paused: true,
                    ..ready.clone()
                },
                0,
            ),
            (
                Record {
                    cutover_attempts: AUTO_CUTOVER_ATTEMPTS,
                    ..ready.clone()
                },
                0,
            ),
            (
                Record {
                    state: State::Migrated,
                    ..ready.clone()
                },
                0,
            ),
            (windowed("04:00-05:00"), 0),
        ];
        for (r, lag) in not {
            assert!(!should_auto_cutover(&r, lag, now), "{r:?} lag {lag}");
        }
    }

    #[test]
    fn the_route_swaps_only_when_everything_before_finished_in_time() {
        let limit = Duration::from_millis(5000);
        assert!(matches!(
            decide_swap(BeforeSwap::Done, false, limit),
            SwapDecision::Swap
        ));
        let late = decide_swap(BeforeSwap::Done, true, limit);
        assert!(
            matches!(late, SwapDecision::FallBack(MigrateError::Timeout(ref m)) if m.contains("5000 ms"))
        );
        assert!(matches!(
            decide_swap(BeforeSwap::TimedOut, true, limit),
            SwapDecision::FallBack(MigrateError::Timeout(_))
        ));
        let failed = decide_swap(BeforeSwap::Failed(MigrateError::Cancelled), false, limit);
        assert!(matches!(
            failed,
            SwapDecision::FallBack(MigrateError::Cancelled)
        ));
    }
}
