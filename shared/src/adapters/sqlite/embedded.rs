//! The embedded database behind the one-machine job store and queue: one
//! SQLite file (WAL journal, so a killed process loses nothing committed).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use rusqlite::Connection;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    job_id      TEXT PRIMARY KEY,
    table_key   TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    state       TEXT NOT NULL,
    spec        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    started_at  TEXT,
    finished_at TEXT,
    error       TEXT,
    events      TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_by_table ON jobs (table_key, created_ms DESC, job_id DESC);
CREATE TABLE IF NOT EXISTS events (
    seq     INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  TEXT NOT NULL,
    at      TEXT NOT NULL,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS row_failures (
    job_id      TEXT NOT NULL,
    fragment_id INTEGER NOT NULL,
    row         INTEGER NOT NULL,
    error       TEXT NOT NULL,
    PRIMARY KEY (job_id, fragment_id, row)
);
CREATE TABLE IF NOT EXISTS counters (
    job_id TEXT NOT NULL,
    name   TEXT NOT NULL,
    value  INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS idempotency (
    key         TEXT PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    job_id      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS column_locks (
    lock_key TEXT PRIMARY KEY,
    job_id   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fragments (
    job_id      TEXT NOT NULL,
    fragment_id INTEGER NOT NULL,
    status      TEXT NOT NULL DEFAULT 'OPEN',
    staged      TEXT,
    PRIMARY KEY (job_id, fragment_id)
);
CREATE TABLE IF NOT EXISTS fragment_tasks (
    job_id      TEXT NOT NULL,
    fragment_id INTEGER NOT NULL,
    task        INTEGER NOT NULL,
    PRIMARY KEY (job_id, fragment_id, task)
);
CREATE TABLE IF NOT EXISTS leases (
    job_id   TEXT NOT NULL,
    name     TEXT NOT NULL,
    owner    TEXT NOT NULL,
    until_ms INTEGER NOT NULL,
    PRIMARY KEY (job_id, name)
);
CREATE TABLE IF NOT EXISTS commit_intents (
    job_id   TEXT PRIMARY KEY,
    owner    TEXT NOT NULL,
    until_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS watermarks (
    table_key TEXT NOT NULL,
    column    TEXT NOT NULL,
    body      TEXT NOT NULL,
    revision  INTEGER NOT NULL,
    PRIMARY KEY (table_key, column)
);
CREATE TABLE IF NOT EXISTS replanned (
    job_id      TEXT NOT NULL,
    fragment_id INTEGER NOT NULL,
    body        TEXT NOT NULL,
    PRIMARY KEY (job_id, fragment_id)
);
CREATE TABLE IF NOT EXISTS messages (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    queue         TEXT NOT NULL,
    body          TEXT NOT NULL,
    sent_ms       INTEGER NOT NULL,
    visible_at_ms INTEGER NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt       TEXT,
    dead          INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_ready ON messages (queue, dead, visible_at_ms);
"#;

/// How long a statement waits for another process's write lock (a second
/// `serve` on the same state file) before it fails.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Prepared statements kept for reuse: the hot paths' statements (a task's
/// reads and writes, the queue's receive and delete) stay parsed.
const STATEMENT_CACHE: usize = 64;

/// A shared SQLite connection. Calls run on the blocking pool; short reads
/// run on the caller's thread when the connection is free.
#[derive(Clone)]
pub struct EmbeddedDb {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl EmbeddedDb {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        let conn = Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` inside one SQLite transaction.
    pub async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            in_transaction(&mut guard, f)
        })
        .await
        .context("embedded database task panicked")?
    }

    /// Runs the read-only `f` on the caller's thread when the connection is
    /// free, else as [`Self::call`]. A read never waits for a writer (WAL)
    /// nor syncs the disk, so it takes microseconds: less than the thread
    /// hop to the blocking pool, which small tasks pay several times each.
    pub async fn read<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    {
        match self.try_here(f) {
            Ok(value) => value,
            Err(f) => self.call(f).await,
        }
    }

    /// Runs `f` now if the connection is free; hands it back if not.
    fn try_here<T, F>(&self, f: F) -> Result<anyhow::Result<T>, F>
    where
        F: FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T>,
    {
        match self.conn.try_lock() {
            Ok(mut guard) => Ok(in_transaction(&mut guard, f)),
            Err(_) => Err(f),
        }
    }
}

fn in_transaction<T>(
    conn: &mut Connection,
    f: impl FnOnce(&rusqlite::Transaction<'_>) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let tx = conn.transaction()?;
    let value = f(&tx)?;
    tx.commit()?;
    Ok(value)
}
