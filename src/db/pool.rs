//! Where blocking ODBC work runs and where connections live between uses.
//!
//! `Executor`: a fixed set of worker threads (`#threads[0]`) that run every blocking ODBC
//! call; an instance awaits the result, so its Lua coroutine yields and its thread stays free.
//! Jobs wait in one queue (mutex + condvar); a worker that finds the executor idle after its
//! job spins briefly (`WORKER_SPIN`, yielding its core to any thread that wants it) for the
//! next one, so a coroutine querying in a loop does not pay a worker wake-up per query.
//! `Pool`: one per connection string, at most `size` connections checked out at once (a
//! semaphore; waiters queue without holding a thread), idle connections evicted after
//! `IDLE_EVICT`, and a health check on checkout so that a database that went away and came
//! back is reconnected without a restart.

use super::{ConnSpec, DbError, Result};
use odbc_api::{Connection, ConnectionOptions, Environment};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// An idle connection older than this is closed instead of reused.
pub const IDLE_EVICT: Duration = Duration::from_secs(60);
/// An idle connection older than this is pinged (`SELECT 1`) before it is handed out.
pub const PING_AFTER: Duration = Duration::from_secs(1);

/// A job gets the queue to report itself finished (`Queue::done`) before it hands out its
/// result, so that the caller's next call already sees it gone.
type Job = Box<dyn FnOnce(&Queue) + Send>;

/// How long a worker that just finished a job keeps looking for the next one before it
/// parks: a query submitted meanwhile starts without a thread wake-up.
pub const WORKER_SPIN: Duration = Duration::from_micros(50);

/// The jobs waiting for a worker, and which workers are looking for one.
struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    /// Jobs in `jobs`, readable without the lock (for spinning workers).
    pending: AtomicUsize,
    /// Workers spinning for the next job (at most `max_spinners`); changed under the lock.
    spinning: AtomicUsize,
    /// Workers parked on `ready`; changed under the lock.
    sleeping: AtomicUsize,
    /// Jobs submitted and not finished yet (queued or running).
    in_flight: AtomicUsize,
    max_spinners: usize,
    spin: Duration,
    /// Idle moments left in which workers park without spinning, after a spin that found
    /// nothing (the caller takes longer than `spin` to come back, e.g. a busy machine).
    skip_spins: AtomicUsize,
}

/// After a spin that found no job, this many idle moments park without spinning; then a
/// spin is tried again.
const SKIP_AFTER_MISS: usize = 16;

impl Queue {
    fn push(&self, job: Job) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.push_back(job);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let pending = self.pending.fetch_add(1, Ordering::SeqCst) + 1;
        // A spinning worker takes one job; wake a parked one only for jobs beyond that.
        let wake = pending > self.spinning.load(Ordering::SeqCst) && self.sleeping.load(Ordering::SeqCst) > 0;
        drop(jobs);
        if wake {
            self.ready.notify_one();
        }
    }

    /// Whether this idle moment should park at once (counts down the skips after a miss).
    fn skip_spin(&self) -> bool {
        self.skip_spins
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    fn done(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn try_pop(&self, jobs: &mut VecDeque<Job>) -> Option<Job> {
        let job = jobs.pop_front()?;
        self.pending.fetch_sub(1, Ordering::SeqCst);
        Some(job)
    }

    /// The next job: spins for `spin` when no other worker is spinning, then parks.
    fn next(&self) -> Job {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = self.try_pop(&mut jobs) {
            return job;
        }
        // Spin only while the executor is otherwise idle: then a core is likely free (one
        // coroutine querying in a loop); when other jobs run, their threads (and the
        // database server's) need the CPU more than this worker needs a fast start.
        if !self.spin.is_zero()
            && self.in_flight.load(Ordering::SeqCst) == 0
            && self.spinning.load(Ordering::SeqCst) < self.max_spinners
            && !self.skip_spin()
        {
            self.spinning.fetch_add(1, Ordering::SeqCst);
            drop(jobs);
            let deadline = Instant::now() + self.spin;
            loop {
                for _ in 0..64 {
                    if self.pending.load(Ordering::SeqCst) > 0 {
                        break;
                    }
                    std::hint::spin_loop();
                }
                if self.pending.load(Ordering::SeqCst) > 0 || Instant::now() >= deadline {
                    break;
                }
                // Gives the core away when another thread wants it (a busy machine).
                std::thread::yield_now();
            }
            jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
            self.spinning.fetch_sub(1, Ordering::SeqCst);
            if jobs.is_empty() {
                // Spinning wasted the core: do without it for a while.
                self.skip_spins.store(SKIP_AFTER_MISS, Ordering::SeqCst);
            }
        }
        loop {
            if let Some(job) = self.try_pop(&mut jobs) {
                return job;
            }
            self.sleeping.fetch_add(1, Ordering::SeqCst);
            jobs = self.ready.wait(jobs).unwrap_or_else(|e| e.into_inner());
            self.sleeping.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The bounded pool of threads that run blocking ODBC calls.
pub struct Executor {
    queue: Arc<Queue>,
    threads: usize,
}

impl Executor {
    pub fn new(threads: usize) -> Executor {
        Executor::with_spin(threads, WORKER_SPIN)
    }

    /// An executor whose idle workers spin for `spin` before parking (zero: park at once).
    pub fn with_spin(threads: usize, spin: Duration) -> Executor {
        let threads = threads.max(1);
        let queue = Arc::new(Queue {
            jobs: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            pending: AtomicUsize::new(0),
            spinning: AtomicUsize::new(0),
            sleeping: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            // One spinner is enough to pick up the next job at once; more would take CPU
            // from the threads running queries (and from a local database server).
            max_spinners: 1,
            spin,
            skip_spins: AtomicUsize::new(0),
        });
        for i in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("odbc-{i}"))
                .spawn(move || loop {
                    (queue.next())(&queue);
                })
                .expect("spawn an odbc worker thread");
        }
        Executor { queue, threads }
    }

    /// The process-wide executor; the first caller's size wins (`#threads[0]`).
    pub fn global(threads: usize) -> &'static Executor {
        static EXEC: OnceLock<Executor> = OnceLock::new();
        EXEC.get_or_init(|| Executor::new(threads))
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on a worker thread and waits for it without blocking the caller's thread.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.queue.push(Box::new(move |q: &Queue| {
            // A panic in a driver call must not take the worker thread with it.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            q.done();
            if let Ok(v) = r {
                let _ = tx.send(v);
            }
        }));
        rx.await
            .map_err(|_| DbError::other("an odbc worker thread failed while running the call"))
    }

    /// Runs `f` on a worker thread without waiting for it.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        self.queue.push(Box::new(move |q: &Queue| {
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            q.done();
        }));
    }
}

/// The ODBC environment, created once per process.
pub fn environment() -> Result<&'static Environment> {
    static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| Environment::new().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| DbError::other(format!("cannot create the odbc environment: {e}")))
}

struct Idle {
    conn: Connection<'static>,
    since: Instant,
}

/// The connections of one connection string.
pub struct Pool {
    pub spec: ConnSpec,
    pub size: usize,
    permits: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// Connections opened so far (for tests, the benchmark and the metrics).
    opened: std::sync::atomic::AtomicUsize,
    /// Checkouts waiting for a free slot now (`stage_odbc_pool_waiting`).
    waiting: AtomicUsize,
    /// Query latency and errors (`stage_odbc_query_*`, docs/metrics.md).
    pub queries: crate::metrics::QueryStats,
}

/// Every pool of the process, by pool key.
fn pools() -> &'static Mutex<HashMap<String, Arc<Pool>>> {
    static POOLS: OnceLock<Mutex<HashMap<String, Arc<Pool>>>> = OnceLock::new();
    POOLS.get_or_init(Default::default)
}

/// Takes one off a counter when dropped (a checkout that stopped waiting, however).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// The pool for `spec`, created with `size` connections at most on first use.
    pub fn get(spec: &ConnSpec, size: usize) -> Arc<Pool> {
        let mut pools = pools().lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(spec.pool_key())
            .or_insert_with(|| {
                let pool = Arc::new(Pool {
                    spec: spec.clone(),
                    size: size.max(1),
                    permits: Arc::new(Semaphore::new(size.max(1))),
                    idle: Mutex::new(Vec::new()),
                    opened: Default::default(),
                    waiting: Default::default(),
                    queries: Default::default(),
                });
                pool.start_sweeper();
                pool
            })
            .clone()
    }

    /// Closes idle connections older than `IDLE_EVICT` even when nobody checks out, from a
    /// thread of its own (closing may block); it ends when the pool is gone.
    fn start_sweeper(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let _ = std::thread::Builder::new()
            .name("odbc-sweep".into())
            .spawn(move || loop {
                std::thread::sleep(IDLE_EVICT / 4);
                let Some(pool) = weak.upgrade() else { return };
                let stale = pool.take_stale();
                drop(pool);
                drop(stale);
            });
    }

    /// Removes and returns the idle connections older than `IDLE_EVICT`.
    fn take_stale(&self) -> Vec<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (fresh, stale): (Vec<Idle>, Vec<Idle>) = idle
            .drain(..)
            .partition(|i| now.duration_since(i.since) < IDLE_EVICT);
        *idle = fresh;
        stale
    }

    pub fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Connections checked out now (slots taken).
    pub fn in_use(&self) -> usize {
        self.size.saturating_sub(self.permits.available_permits())
    }

    /// Checkouts waiting for a free slot now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Every pool of the process (what the metrics read at scrape time), by label.
    pub fn all() -> Vec<Arc<Pool>> {
        let mut v: Vec<Arc<Pool>> = pools()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by(|a, b| a.spec.label.cmp(&b.spec.label));
        v
    }

    /// Waits (without blocking the thread) for a free slot, then hands out a healthy idle
    /// connection or opens a new one on the executor.
    pub async fn checkout(self: &Arc<Self>, exec: &'static Executor, wait: Duration) -> Result<PooledConn> {
        let started = Instant::now();
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let waiting = Waiting(&self.waiting);
        let acquired = tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await;
        drop(waiting);
        let permit = match acquired {
            Ok(Ok(p)) => p,
            _ => {
                return Err(DbError::PoolTimeout {
                    name: self.spec.label.clone(),
                    waited_ms: started.elapsed().as_millis() as u64,
                    size: self.size,
                })
            }
        };
        let stale = self.take_stale();
        let candidate = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        if !stale.is_empty() {
            exec.spawn(move || drop(stale));
        }
        let pool = self.clone();
        let conn = exec
            .run(move || -> Result<Connection<'static>> {
                if let Some(idle) = candidate {
                    if healthy(&idle) {
                        return Ok(idle.conn);
                    }
                    drop(idle);
                }
                pool.connect()
            })
            .await??;
        Ok(PooledConn {
            conn: Some(conn),
            pool: self.clone(),
            exec,
            _permit: permit,
            broken: false,
            in_transaction: false,
        })
    }

    /// Opens a connection (blocking).
    pub fn connect(&self) -> Result<Connection<'static>> {
        let env = environment()?;
        let options = ConnectionOptions {
            login_timeout_sec: self.spec.login_timeout.map(|d| d.as_secs_f64().ceil() as u32),
            ..Default::default()
        };
        let conn = env.connect_with_connection_string(&self.spec.conn_str, options)?;
        self.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(conn)
    }

    fn put_back(&self, conn: Connection<'static>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
    }
}

/// The health check on checkout: the driver's dead flag always, a round trip after a pause.
fn healthy(idle: &Idle) -> bool {
    if idle.conn.is_dead().unwrap_or(true) {
        return false;
    }
    if idle.since.elapsed() < PING_AFTER {
        return true;
    }
    match idle.conn.execute("SELECT 1", (), None) {
        Ok(Some(mut cursor)) => {
            use odbc_api::Cursor;
            cursor.next_row().is_ok()
        }
        Ok(None) => true,
        Err(_) => false,
    }
}

/// A checked-out connection. Dropping it returns the connection to its pool, or closes it
/// when it broke or was left inside a transaction (closing happens on the executor).
pub struct PooledConn {
    conn: Option<Connection<'static>>,
    pool: Arc<Pool>,
    exec: &'static Executor,
    _permit: OwnedSemaphorePermit,
    /// Set after an error that lost the connection; the pool will not reuse it.
    pub broken: bool,
    /// Set while autocommit is off; such a connection is rolled back before reuse.
    pub in_transaction: bool,
}

impl PooledConn {
    pub fn conn(&self) -> &Connection<'static> {
        self.conn
            .as_ref()
            .expect("a pooled connection is present until dropped")
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// Notes an error: a lost connection is not returned to the pool.
    pub fn note_error(&mut self, e: &DbError) {
        if e.is_connection_lost() || self.conn().is_dead().unwrap_or(true) {
            self.broken = true;
        }
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else { return };
        if self.broken {
            self.exec.spawn(move || drop(conn));
        } else if self.in_transaction {
            let pool = self.pool.clone();
            self.exec.spawn(move || {
                if conn.rollback().is_ok() && conn.set_autocommit(true).is_ok() {
                    pool.put_back(conn);
                }
            });
        } else {
            self.pool.put_back(conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_executor_runs_calls_and_survives_panics() {
        let exec: &'static Executor = Box::leak(Box::new(Executor::new(2)));
        assert_eq!(exec.run(|| 6 * 7).await.unwrap(), 42);
        let e = exec.run(|| -> i32 { panic!("driver bug") }).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "odbc: an odbc worker thread failed while running the call"
        );
        assert_eq!(
            exec.run(|| 1).await.unwrap(),
            1,
            "the worker thread is still there"
        );
    }

    #[tokio::test]
    async fn jobs_beyond_the_spinning_worker_wake_parked_workers() {
        // Two workers, one of them spinning at most: four slow jobs at once must still run
        // two at a time (no job waits for the spinner when a parked worker is free).
        let exec: &'static Executor = Box::leak(Box::new(Executor::with_spin(2, Duration::from_millis(20))));
        let started = Instant::now();
        let slow = || exec.run(|| std::thread::sleep(Duration::from_millis(100)));
        let (a, b, c, d) = tokio::join!(slow(), slow(), slow(), slow());
        for r in [a, b, c, d] {
            r.unwrap();
        }
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(
            took < Duration::from_millis(390),
            "two workers ran in parallel: {took:?}"
        );
        assert_eq!(exec.queue.in_flight.load(Ordering::SeqCst), 0);
        assert_eq!(exec.queue.pending.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_spinning_worker_takes_the_next_job_and_the_results_are_right() {
        let exec: &'static Executor = Box::leak(Box::new(Executor::with_spin(1, Duration::from_millis(5))));
        for i in 0..2000u64 {
            assert_eq!(exec.run(move || i * 2).await.unwrap(), i * 2);
        }
        let e = exec.run(|| -> i32 { panic!("driver bug") }).await.unwrap_err();
        assert!(e.to_string().contains("worker thread failed"), "{e}");
        assert_eq!(exec.queue.in_flight.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_spin_that_finds_nothing_turns_spinning_off_for_a_while() {
        let exec: &'static Executor = Box::leak(Box::new(Executor::with_spin(1, Duration::from_micros(200))));
        let q = &exec.queue;
        // A new worker is idle too: let it spin, miss and park, then start from no skips.
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.sleeping.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        q.skip_spins.store(0, Ordering::SeqCst);
        exec.run(|| ()).await.unwrap();
        // The worker spins for 200 us after the job, finds nothing and parks.
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.sleeping.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(q.skip_spins.load(Ordering::SeqCst), SKIP_AFTER_MISS);
        // The next idle moments park without spinning, counting the skips down.
        exec.run(|| ()).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while q.skip_spins.load(Ordering::SeqCst) == SKIP_AFTER_MISS && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(q.skip_spins.load(Ordering::SeqCst), SKIP_AFTER_MISS - 1);
        for _ in 0..SKIP_AFTER_MISS * 2 {
            q.skip_spin();
        }
        assert_eq!(q.skip_spins.load(Ordering::SeqCst), 0, "the count stops at zero");
    }

    /// Needs the SQLite ODBC driver (scripts/setup installs it).
    #[tokio::test]
    async fn the_pool_bounds_checkouts_and_reuses_connections() {
        let exec: &'static Executor = Box::leak(Box::new(Executor::new(2)));
        let spec = ConnSpec::from_string("DRIVER={SQLite3};DATABASE=:memory:;stage_test=pool");
        let pool = Pool::get(&spec, 2);
        let a = pool
            .checkout(exec, Duration::from_secs(5))
            .await
            .expect("sqlite odbc driver");
        let b = pool.checkout(exec, Duration::from_secs(5)).await.unwrap();
        let e = pool
            .checkout(exec, Duration::from_millis(50))
            .await
            .err()
            .expect("a third checkout waits");
        assert!(
            e.to_string().starts_with(
                "odbc: no free connection for DRIVER={SQLite3};DATABASE=:memory:;stage_test=pool within"
            ),
            "{e}"
        );
        assert!(e.to_string().ends_with("(pool of 2)"), "{e}");
        drop(a);
        let c = pool.checkout(exec, Duration::from_secs(5)).await.unwrap();
        assert_eq!(pool.opened(), 2, "the returned connection was reused");
        drop((b, c));
        assert_eq!(pool.idle_count(), 2);
        // A connection that lost its link is not returned to the pool.
        let mut d = pool.checkout(exec, Duration::from_secs(5)).await.unwrap();
        d.note_error(&DbError::Driver {
            state: "08S01".into(),
            native: 0,
            message: "link failure".into(),
        });
        drop(d);
        assert_eq!(pool.idle_count(), 1);
        // Idle eviction: a connection idle for longer than IDLE_EVICT is closed.
        for i in pool.idle.lock().unwrap().iter_mut() {
            i.since -= IDLE_EVICT + Duration::from_secs(1);
        }
        assert_eq!(pool.take_stale().len(), 1);
        assert_eq!(pool.idle_count(), 0);
    }
}
