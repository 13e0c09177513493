//! What a store's handle and its writer thread share, the same for SQLite
//! and PostgreSQL: the jobs sent to the writer, the batches waiting for
//! their commits, the message ids still on their way, and the counters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::{Commit, Committed, StoreError, Write};
use crate::lock;

/// Most writes committed in one transaction; a single larger batch is still
/// committed whole.
pub const MAX_GROUP_WRITES: usize = 4096;

/// What the writer thread has done since the store was opened (for metrics
/// and benchmarks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Transactions committed, each holding one group of batches.
    pub commits: u64,
    /// Batches committed (a batch that failed alone is not counted).
    pub batches: u64,
    /// Writes in those batches.
    pub writes: u64,
    /// Groups whose transaction failed as a whole.
    pub failed_commits: u64,
    /// Messages deleted by retention.
    pub pruned: u64,
}

/// What the writer thread is asked to do.
pub(super) enum Job {
    /// Commit these writes and resolve the commit.
    Batch(Pending),
    /// Run a full retention pass and report how many messages it deleted.
    Prune(oneshot::Sender<Result<u64, StoreError>>),
    /// Commit what is queued and stop.
    Shutdown,
}

/// A batch waiting for its commit.
pub(super) struct Pending {
    pub(super) writes: Vec<Write>,
    pub(super) reply: oneshot::Sender<Committed>,
}

impl Pending {
    /// A batch of `writes` and the commit its reply resolves.
    pub(super) fn new(writes: Vec<Write>) -> (Pending, Commit) {
        let (reply, commit) = Commit::pending();
        (Pending { writes, reply }, commit)
    }
}

/// A group to commit: `first` and the batches queued right behind it, up to
/// [`MAX_GROUP_WRITES`] writes; and the job that is not a batch that ended
/// the group, if one did.
pub(super) fn gather(first: Pending, jobs: &Receiver<Job>) -> (Vec<Pending>, Option<Job>) {
    let mut writes = first.writes.len();
    let mut group = vec![first];
    while writes < MAX_GROUP_WRITES {
        match jobs.try_recv() {
            Ok(Job::Batch(pending)) => {
                writes += pending.writes.len();
                group.push(pending);
            }
            Ok(other) => return (group, Some(other)),
            Err(_) => break,
        }
    }
    (group, None)
}

/// The error of a write or request made after the store was closed.
pub(super) fn unavailable() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// The queue's side of a store's shared state.
#[derive(Debug, Default)]
pub(super) struct Queue {
    /// The store was closed: writes and retention requests are refused.
    pub(super) closed: AtomicBool,
    commits: AtomicU64,
    batches: AtomicU64,
    writes: AtomicU64,
    failed_commits: AtomicU64,
    pruned: AtomicU64,
    /// Highest message id per room among writes queued but not yet
    /// resolved, so that `last_message_id` counts them (a room recreated
    /// right after its last member left must not reuse an id).
    queued_ids: Mutex<HashMap<Arc<str>, u64>>,
}

impl Queue {
    /// Queues `writes` for the writer thread behind `jobs`; resolved at once
    /// with `unavailable` when the store is closed or its writer stopped.
    pub(super) fn write(&self, jobs: &Sender<Job>, writes: Vec<Write>) -> Commit {
        if self.closed.load(Ordering::SeqCst) {
            return Commit::ready(Err(unavailable()));
        }
        {
            let mut queued = lock(&self.queued_ids);
            for write in &writes {
                if let Write::Message(m) = write {
                    let id = queued.entry(m.room.clone()).or_insert(0);
                    *id = (*id).max(m.id);
                }
            }
        }
        let (pending, commit) = Pending::new(writes);
        match jobs.send(Job::Batch(pending)) {
            Ok(()) => commit,
            Err(_) => Commit::ready(Err(unavailable())),
        }
    }

    /// Asks the writer thread for a retention pass and waits for its count
    /// of deleted messages. Blocks: call it outside async code.
    pub(super) fn run_retention(&self, jobs: &Sender<Job>) -> Result<u64, StoreError> {
        let (reply, result) = oneshot::channel();
        if self.closed.load(Ordering::SeqCst) || jobs.send(Job::Prune(reply)).is_err() {
            return Err(unavailable());
        }
        result.blocking_recv().unwrap_or_else(|_| Err(unavailable()))
    }

    /// The highest message id queued for `room` and not yet resolved (0 if
    /// none).
    pub(super) fn queued_id(&self, room: &str) -> u64 {
        lock(&self.queued_ids).get(room).copied().unwrap_or(0)
    }

    /// Counts a committed group and forgets its queued ids; returns how many
    /// writes committed. Call before resolving the batches, so that a
    /// caller woken by one sees the database, not the queue.
    pub(super) fn committed(&self, group: &[Pending], results: &[Committed]) -> u64 {
        let (batches, writes) = group
            .iter()
            .zip(results)
            .filter(|(_, result)| result.is_ok())
            .fold((0, 0), |(b, w), (pending, _)| (b + 1, w + pending.writes.len() as u64));
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.batches.fetch_add(batches, Ordering::Relaxed);
        self.writes.fetch_add(writes, Ordering::Relaxed);
        self.forget(group);
        writes
    }

    /// Counts a group whose transaction failed and forgets its queued ids
    /// (they will never be in the database).
    pub(super) fn failed(&self, group: &[Pending]) {
        self.failed_commits.fetch_add(1, Ordering::Relaxed);
        self.forget(group);
    }

    /// Counts messages deleted by retention.
    pub(super) fn pruned(&self, deleted: u64) {
        self.pruned.fetch_add(deleted, Ordering::Relaxed);
    }

    /// The counters so far.
    pub(super) fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.commits.load(Ordering::Relaxed),
            batches: self.batches.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            failed_commits: self.failed_commits.load(Ordering::Relaxed),
            pruned: self.pruned.load(Ordering::Relaxed),
        }
    }

    /// Forgets the queued message ids of a resolved group.
    fn forget(&self, group: &[Pending]) {
        let mut queued = lock(&self.queued_ids);
        for write in group.iter().flat_map(|p| &p.writes) {
            if let Write::Message(m) = write
                && queued.get(&m.room).is_some_and(|q| *q <= m.id)
            {
                queued.remove(&m.room);
            }
        }
    }
}
