//! Group commit: one thread writes every batch committed from the async
//! runtime.
//!
//! A commit hands its batch to the committer and waits for the answer.
//! The committer takes every batch waiting when it wakes, writes the plain
//! ones as one durable write (one log sync for all of them), and answers
//! each. Many writers then cost one thread's wake-up and one sync per
//! group, not a thread and a wake-up each.
//!
//! A batch that rewrites rows the archive mover may be moving, or that
//! commits only if rows still hold what was read, is written alone, after
//! the group before it, as [`Batch::write_to`] says. Such a write also
//! advances the rewrite generation ([`Rewrites`]) before and after it.
//!
//! The committer holds the backend only while it writes, so that a store
//! whose last handle is dropped closes at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::{Backend, Batch, Cf, CommitStats, RawBatch, StorageError};

/// Most batches written as one group.
const MAX_GROUP: usize = 256;

/// Counts the commits that may have changed or removed rows written
/// before: it is odd while such a commit is being written, and moves on
/// by two with each. A reader that remembers what it read, stamped with
/// the generation seen before reading, may trust it while the generation
/// is still that one.
///
/// It also counts, for each table, the commits that wrote to it: a table's
/// count moves on once such a commit has been applied, before its writer
/// hears back. A reader that remembers what it read from a table, with
/// the table's count read before reading, may trust it while the count is
/// still that one, whoever wrote.
pub struct Rewrites {
    generation: AtomicU64,
    /// By table, in the order of [`Cf::ALL`].
    tables: [AtomicU64; Cf::ALL.len()],
}

impl Default for Rewrites {
    fn default() -> Self {
        Rewrites {
            generation: AtomicU64::new(0),
            tables: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl Rewrites {
    /// The generation now.
    pub fn current(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// How many commits have written to `table` so far.
    pub fn table_writes(&self, table: Cf) -> u64 {
        self.tables[table.index()].load(Ordering::Acquire)
    }

    /// Counts a commit that wrote to the tables of `tables` (see
    /// [`RawBatch::tables`]); called once it is applied.
    fn written(&self, tables: u64) {
        // Only the set bits: a commit writes a few of the tables.
        let mut left = tables;
        while left != 0 {
            let index = left.trailing_zeros() as usize;
            self.tables[index].fetch_add(1, Ordering::AcqRel);
            left &= left - 1;
        }
    }

    /// Writes `batch` as a rewrite: the generation is odd meanwhile.
    fn around<T>(&self, write: impl FnOnce() -> T) -> T {
        self.generation.fetch_add(1, Ordering::AcqRel);
        let result = write();
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Writes a batch under the rules of [`Batch::write_to`], as a rewrite
    /// when it is one.
    pub fn write(
        &self,
        batch: Batch,
        backend: &dyn Backend,
        tier_lock: &Mutex<()>,
    ) -> Result<bool, StorageError> {
        let tables = batch.raw.tables();
        let result = if batch.rewrites() {
            // Under the tier lock, so that rewrites do not overlap.
            let _guard = tier_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            self.around(|| batch.write_to(backend))
        } else {
            batch.write_to(backend)
        };
        self.written(tables);
        result
    }
}

/// One batch waiting for the committer, and where its answer goes.
struct Job {
    batch: Batch,
    answer: tokio::sync::oneshot::Sender<Result<bool, StorageError>>,
}

/// The sending side of the committer thread.
pub struct Committer {
    jobs: mpsc::Sender<Job>,
}

impl Committer {
    /// Starts the committer thread for `backend`; it ends when this
    /// handle is dropped.
    pub fn start(
        backend: &Arc<dyn Backend>,
        tier_lock: Arc<Mutex<()>>,
        rewrites: Arc<Rewrites>,
        commits: Arc<CommitStats>,
    ) -> Self {
        let (sender, receiver) = mpsc::channel();
        let backend = Arc::downgrade(backend);
        std::thread::Builder::new()
            .name("myelin-commit".to_owned())
            .spawn(move || run(receiver, backend, &tier_lock, &rewrites, &commits))
            .expect("the committer thread starts");
        Committer { jobs: sender }
    }

    /// Commits `batch` durably; `false` when one of its expectations no
    /// longer held and nothing was written.
    pub async fn commit(&self, batch: Batch) -> Result<bool, StorageError> {
        let (answer, answered) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job { batch, answer })
            .map_err(|_| StorageError::Task("the committer has ended".to_owned()))?;
        answered
            .await
            .map_err(|_| StorageError::Task("the committer dropped a commit".to_owned()))?
    }
}

fn run(
    receiver: mpsc::Receiver<Job>,
    backend: Weak<dyn Backend>,
    tier_lock: &Mutex<()>,
    rewrites: &Rewrites,
    commits: &CommitStats,
) {
    while let Ok(first) = receiver.recv() {
        // Let the threads that are running finish what they are building:
        // their batches join this group rather than wait for the next sync.
        std::thread::yield_now();
        let mut jobs = vec![first];
        while jobs.len() < MAX_GROUP {
            match receiver.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let answers = match backend.upgrade() {
            Some(backend) => write_all(jobs, backend.as_ref(), tier_lock, rewrites, commits),
            None => jobs
                .into_iter()
                .map(|job| (job.answer, Err(closed())))
                .collect(),
        };
        // The backend is released before anyone hears back.
        for (answer, result) in answers {
            let _ = answer.send(result);
        }
    }
}

type Answer = (
    tokio::sync::oneshot::Sender<Result<bool, StorageError>>,
    Result<bool, StorageError>,
);

/// Writes the jobs in order: runs of plain batches as one write each,
/// rewrites and checked batches alone.
fn write_all(
    jobs: Vec<Job>,
    backend: &dyn Backend,
    tier_lock: &Mutex<()>,
    rewrites: &Rewrites,
    commits: &CommitStats,
) -> Vec<Answer> {
    let mut answers = Vec::with_capacity(jobs.len());
    let mut group: Vec<Job> = Vec::new();
    for job in jobs {
        if job.batch.rewrites() {
            write_group(
                std::mem::take(&mut group),
                backend,
                rewrites,
                commits,
                &mut answers,
            );
            let operations = job.batch.raw.ops.len();
            let started = Instant::now();
            let result = rewrites.write(job.batch, backend, tier_lock);
            observe(commits, started, operations);
            answers.push((job.answer, result));
        } else {
            group.push(job);
        }
    }
    write_group(group, backend, rewrites, commits, &mut answers);
    answers
}

/// Writes plain batches as one durable write, and sets their commit flags
/// once it is done.
fn write_group(
    group: Vec<Job>,
    backend: &dyn Backend,
    rewrites: &Rewrites,
    commits: &CommitStats,
    answers: &mut Vec<Answer>,
) {
    if group.is_empty() {
        return;
    }
    let mut raw = RawBatch::default();
    let mut sizes = Vec::with_capacity(group.len());
    let mut flags = Vec::new();
    let mut waiting = Vec::with_capacity(group.len());
    for job in group {
        sizes.push(job.batch.raw.ops.len());
        raw.ops.extend(job.batch.raw.ops);
        flags.extend(job.batch.committed);
        waiting.push(job.answer);
    }
    let started = Instant::now();
    let tables = raw.tables();
    let written = backend.write(raw);
    rewrites.written(tables);
    for operations in sizes {
        observe(commits, started, operations);
    }
    match written {
        Ok(()) => {
            for flag in flags {
                flag.store(true, Ordering::Release);
            }
            answers.extend(waiting.into_iter().map(|answer| (answer, Ok(true))));
        }
        Err(error) => {
            let message = error.to_string();
            answers.extend(
                waiting
                    .into_iter()
                    .map(|answer| (answer, Err(StorageError::Backend(message.clone())))),
            );
        }
    }
}

fn observe(commits: &CommitStats, started: Instant, operations: usize) {
    commits.seconds.observe(started.elapsed().as_secs_f64());
    commits.operations.observe(operations as f64);
}

fn closed() -> StorageError {
    StorageError::Task("the store was closed".to_owned())
}

#[cfg(test)]
mod tests {
    use crate::storage::{tables, Batch, Storage};

    #[tokio::test]
    async fn a_table_count_moves_with_each_commit_that_writes_to_the_table() {
        let storage = Storage::in_memory();
        let (rooms, pdus) = (
            storage.table_writes(tables::USER_ROOMS),
            storage.table_writes(tables::PDUS),
        );
        let record = tables::UserRoom {
            membership: "join".to_owned(),
            event_id: "$a".to_owned(),
            stream: 1,
            forgotten: false,
        };
        let row = ("@a:x".to_owned(), "!r:x".to_owned());

        // A plain commit, through the committer's group.
        let mut batch = Batch::new();
        batch.put(tables::USER_ROOMS, &row, &record);
        storage.commit(batch).await.unwrap();
        assert_eq!(storage.table_writes(tables::USER_ROOMS), rooms + 1);
        assert_eq!(storage.table_writes(tables::PDUS), pdus);

        // A rewrite, written alone.
        let mut batch = Batch::new();
        batch.delete(tables::USER_ROOMS, &row);
        batch.mark_rewrite();
        storage.commit(batch).await.unwrap();
        assert_eq!(storage.table_writes(tables::USER_ROOMS), rooms + 2);

        // A write on the calling thread.
        let mut batch = Batch::new();
        batch.put(tables::USER_ROOMS, &row, &record);
        storage.write_blocking(batch).unwrap();
        assert_eq!(storage.table_writes(tables::USER_ROOMS), rooms + 3);
        assert_eq!(storage.table_writes(tables::PDUS), pdus);
        assert!(storage.get(tables::USER_ROOMS, &row).unwrap().is_some());
    }
}
