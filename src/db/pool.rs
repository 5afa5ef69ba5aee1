//! Where blocking ODBC work runs and where connections live between uses.
//!
//! `Executor`: a fixed set of worker threads (`#threads[0]`) that run every blocking ODBC
//! call; an instance awaits the result, so its Lua coroutine yields and its thread stays free.
//! `Pool`: one per connection string, at most `size` connections checked out at once (a
//! semaphore; waiters queue without holding a thread), idle connections evicted after
//! `IDLE_EVICT`, and a health check on checkout so that a database that went away and came
//! back is reconnected without a restart.

use super::{ConnSpec, DbError, Result};
use odbc_api::{Connection, ConnectionOptions, Environment};
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// An idle connection older than this is closed instead of reused.
pub const IDLE_EVICT: Duration = Duration::from_secs(60);
/// An idle connection older than this is pinged (`SELECT 1`) before it is handed out.
pub const PING_AFTER: Duration = Duration::from_secs(1);

type Job = Box<dyn FnOnce() + Send>;

/// The bounded pool of threads that run blocking ODBC calls.
pub struct Executor {
    // The sender is behind a mutex only to make the executor `Sync`; sending never blocks.
    tx: Mutex<mpsc::Sender<Job>>,
    threads: usize,
}

impl Executor {
    pub fn new(threads: usize) -> Executor {
        let threads = threads.max(1);
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("odbc-{i}"))
                .spawn(move || loop {
                    // The lock is held only while taking the next job, never while running it.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                })
                .expect("spawn an odbc worker thread");
        }
        Executor {
            tx: Mutex::new(tx),
            threads,
        }
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
        self.spawn(move || {
            let _ = tx.send(f());
        });
        rx.await
            .map_err(|_| DbError::other("an odbc worker thread failed while running the call"))
    }

    /// Runs `f` on a worker thread without waiting for it.
    pub fn spawn(&self, f: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(move || {
            // A panic in a driver call must not take the worker thread with it.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        });
        if let Ok(tx) = self.tx.lock() {
            let _ = tx.send(job);
        }
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
    /// Connections opened so far (for tests and the benchmark).
    opened: std::sync::atomic::AtomicUsize,
}

impl Pool {
    /// The pool for `spec`, created with `size` connections at most on first use.
    pub fn get(spec: &ConnSpec, size: usize) -> Arc<Pool> {
        static POOLS: OnceLock<Mutex<HashMap<String, Arc<Pool>>>> = OnceLock::new();
        let pools = POOLS.get_or_init(Default::default);
        let mut pools = pools.lock().unwrap_or_else(|e| e.into_inner());
        pools
            .entry(spec.pool_key())
            .or_insert_with(|| {
                let pool = Arc::new(Pool {
                    spec: spec.clone(),
                    size: size.max(1),
                    permits: Arc::new(Semaphore::new(size.max(1))),
                    idle: Mutex::new(Vec::new()),
                    opened: Default::default(),
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

    /// Waits (without blocking the thread) for a free slot, then hands out a healthy idle
    /// connection or opens a new one on the executor.
    pub async fn checkout(self: &Arc<Self>, exec: &'static Executor, wait: Duration) -> Result<PooledConn> {
        let started = Instant::now();
        let permit = match tokio::time::timeout(wait, self.permits.clone().acquire_owned()).await {
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
