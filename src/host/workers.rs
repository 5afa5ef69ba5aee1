//! The blocking-work pool of `thread.new`: `#threads[0]` worker threads taking jobs from
//! one queue of `#threads[1]` entries. A job is any `FnOnce` that may block; whatever
//! per-worker state it needs (a worker's Lua state, for `thread.new`) is the job's own
//! business, kept in a thread-local by the binding that submits it.
//!
//! ODBC does not share these threads: its executor (`db::pool::Executor`) has its own
//! `#threads[0]` workers, because a database call must never wait behind a long-running
//! `thread.new` job (and a job must never wait behind a slow query). Both are sized by the
//! same setting, so `#threads[0]` reads "how many blocking calls of each kind at once".

use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

/// One unit of blocking work.
pub type Job = Box<dyn FnOnce() + Send>;

/// Why a job was not queued.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SubmitError {
    #[error("the blocking pool's queue is full ({0} jobs waiting, #threads[1])")]
    Full(usize),
    #[error("the blocking pool has stopped")]
    Stopped,
}

/// A fixed set of worker threads and their job queue.
pub struct Pool {
    jobs: SyncSender<Job>,
    queue: usize,
}

impl Pool {
    /// Starts `workers` threads named `{name}#{i}` over a queue of `queue` jobs.
    pub fn start(name: &str, workers: usize, queue: usize) -> Pool {
        let (tx, rx) = sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..workers.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}#{i}"))
                .spawn(move || worker(&rx));
            if let Err(e) = spawned {
                log::error!("{name}: cannot start worker thread {i}: {e}");
            }
        }
        Pool {
            jobs: tx,
            queue: queue.max(1),
        }
    }

    /// Queues `job` without waiting; a full queue is an error, never a wait.
    pub fn try_submit(&self, job: Job) -> Result<(), SubmitError> {
        match self.jobs.try_send(job) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(SubmitError::Full(self.queue)),
            Err(TrySendError::Disconnected(_)) => Err(SubmitError::Stopped),
        }
    }
}

fn worker(rx: &Mutex<Receiver<Job>>) {
    loop {
        // The lock is held only while waiting for the next job, never while running one.
        let job = match rx.lock().expect("job queue").recv() {
            Ok(j) => j,
            Err(_) => return,
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    #[test]
    fn runs_jobs_on_its_workers() {
        let pool = Pool::start("test", 2, 8);
        let done = Arc::new(AtomicUsize::new(0));
        for _ in 0..8 {
            let d = done.clone();
            pool.try_submit(Box::new(move || {
                d.fetch_add(1, Ordering::SeqCst);
            }))
            .unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.load(Ordering::SeqCst) < 8 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(done.load(Ordering::SeqCst), 8);
    }

    #[test]
    fn a_full_queue_is_an_error_not_a_wait() {
        let pool = Pool::start("test", 1, 1);
        let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        pool.try_submit(Box::new(move || {
            started_tx.send(()).unwrap();
            let _ = hold_rx.recv();
        }))
        .unwrap();
        started_rx.recv().unwrap();
        pool.try_submit(Box::new(|| {})).unwrap();
        assert_eq!(pool.try_submit(Box::new(|| {})), Err(SubmitError::Full(1)));
        drop(hold_tx);
    }
}
