//! Fuzzing that runs on stable Rust in `cargo test`: each target is a proptest property run for
//! a time budget instead of a fixed number of cases, with fresh random seeds every run, so CI
//! explores new inputs each time. `cargo fuzz` would need a nightly toolchain, which the build
//! machines do not have; proptest's shrinking turns a failure into a minimal input, which then
//! goes into the target's regression list.
//!
//! The budget per target is `LEASH_FUZZ_SECONDS` (CI: 60), or 2 seconds in an ordinary test run.

use std::fmt::Debug;
use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseResult, TestRunner};

/// Seconds each target runs when `LEASH_FUZZ_SECONDS` is not set.
const DEFAULT_SECONDS: u64 = 2;

/// The time each target gets.
pub fn budget() -> Duration {
    let seconds = std::env::var("LEASH_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECONDS);
    Duration::from_secs(seconds)
}

/// Runs `property` on inputs from `strategy` until the budget is spent; on a failure, panics
/// with the shrunk input. Returns the number of cases run.
pub fn fuzz<S>(target: &str, strategy: S, property: impl Fn(S::Value) -> TestCaseResult) -> u64
where
    S: Strategy,
    S::Value: Debug,
{
    const BATCH: u32 = 256;
    let deadline = Instant::now() + budget();
    let config = Config {
        cases: BATCH,
        failure_persistence: None,
        ..Config::default()
    };
    let mut cases = 0u64;
    while cases == 0 || Instant::now() < deadline {
        // A runner runs its configured cases once; each batch gets a new one with a fresh
        // random seed. No persistence file: the targets' regression lists are the memory.
        let mut runner = TestRunner::new(config.clone());
        if let Err(failure) = runner.run(&strategy, &property) {
            panic!("fuzz target {target} failed: {failure}");
        }
        cases += u64::from(BATCH);
    }
    eprintln!("fuzz target {target}: {cases} cases");
    cases
}
