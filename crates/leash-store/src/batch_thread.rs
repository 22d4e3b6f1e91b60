//! The store's own threads (the SQLite writer, the write-ahead log's checkpointer) run under
//! Linux's `SCHED_BATCH` policy.
//!
//! Every request hands the writer its commit and waits for the answer. Under the default
//! policy the writer, woken by that hand-off, preempts the request's runtime worker on the
//! spot when they share a core, so each commit carries about one request and costs two context
//! switches. A batch thread is never woken into preemption (it still gets its fair share of
//! the CPU): the workers go on taking requests until they all wait, and the writer then
//! commits them in one transaction. With a core to spare it runs at once, as before. Measured
//! in BENCHMARKS.md ("Gateway own cost").

/// Moves the calling thread to `SCHED_BATCH`, keeping its niceness. Where that cannot be done
/// (not Linux, a sandbox refusing it), the thread keeps its policy: only speed depends on it.
pub(crate) fn run_as_batch() {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy,
            set_thread_priority_and_policy, thread_native_id, thread_schedule_policy,
        };
        // On Linux, `PRIO_PROCESS` with no pid names the calling thread.
        let niceness = rustix::process::getpriority_process(None);
        let batch = ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Batch);
        // The crate sets the policy, then a niceness: the highest here, which an unprivileged
        // process is refused (the policy is set all the same). The thread's own is put back.
        let _ = set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Max, batch);
        if let Ok(niceness) = niceness {
            let _ = rustix::process::setpriority_process(None, niceness);
        }
        if thread_schedule_policy().ok() != Some(batch) {
            tracing::debug!("the store's thread keeps its scheduling policy");
        }
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests abort loudly on failure")]

    /// The scheduling policy (`SCHED_BATCH` is 3) and niceness of each of this process's
    /// threads named `name`, from `/proc/self/task/*/stat`.
    fn policies_of(name: &str) -> Vec<(u32, i32)> {
        let mut found = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(task.path().join("stat")).unwrap();
            // Fields after the command name start at field 3; niceness is 19, policy 41.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            found.push((
                fields[41 - 3].parse().unwrap(),
                fields[19 - 3].parse().unwrap(),
            ));
        }
        found
    }

    #[test]
    fn a_batch_thread_keeps_its_niceness() {
        let seen = std::thread::Builder::new()
            .name("batch-test".into())
            .spawn(|| {
                rustix::process::setpriority_process(None, 3).unwrap();
                super::run_as_batch();
                policies_of("batch-test")
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(seen, vec![(3, 3)]);
    }

    #[tokio::test]
    async fn the_writer_and_the_checkpointer_are_batch_threads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db").display().to_string();
        let _store = crate::SqliteStore::open(&path).await.unwrap();
        // Each thread moves itself as it starts, which may be just after `open` returns.
        let all_batch = || {
            // Thread names are cut to 15 bytes.
            let threads: Vec<_> = ["leash-writer", "leash-checkpoin"]
                .iter()
                .map(|name| policies_of(name))
                .collect();
            threads
                .iter()
                .all(|found| !found.is_empty() && found.iter().all(|(policy, _)| *policy == 3))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !all_batch() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer or the checkpointer is not SCHED_BATCH"
            );
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
