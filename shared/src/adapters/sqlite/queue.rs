//! The embedded queue: messages in a SQLite table, with the SQS contract
//! (visibility timeout, receive count, redrive to a dead-letter state).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::params;
use tokio::sync::Notify;

use crate::adapters::sqlite::embedded::EmbeddedDb;
use crate::model::job::now_millis;
use crate::ports::queue::{Outgoing, Received, TaskQueue};

/// `messages.dead`: 0 live, [`DEAD`] moved to the dead-letter state (as SQS
/// redrives to a DLQ), [`DEAD_HANDLED`] seen by a dead-letter handler and
/// kept for operators.
const LIVE: i64 = 0;
/// A waiting receive looks again this often for messages whose delay or
/// visibility timeout ran out (sends wake it at once).
const VISIBILITY_POLL: Duration = Duration::from_millis(100);
const DEAD: i64 = 1;
const DEAD_HANDLED: i64 = 2;

/// Hides up to `max` visible messages of `queue` in the `dead` state for
/// `visibility` under fresh receipts; a receive counts toward the redrive
/// limit, taking a dead letter does not.
fn take_visible(
    tx: &rusqlite::Transaction<'_>,
    queue: &str,
    dead: i64,
    now: i64,
    max: usize,
    visibility: Duration,
    counts_as_receive: bool,
) -> anyhow::Result<Vec<Received>> {
    let mut stmt = tx.prepare_cached(
        "SELECT id, body, receive_count FROM messages
         WHERE queue = ?1 AND dead = ?2 AND visible_at_ms <= ?3
         ORDER BY visible_at_ms, id LIMIT ?4",
    )?;
    let rows: Vec<(i64, String, u32)> = stmt
        .query_map(params![queue, dead, now, max as i64], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<Result<_, _>>()?;
    let added = u32::from(counts_as_receive);
    let mut taken = Vec::with_capacity(rows.len());
    for (id, body, count) in rows {
        let receipt = format!("{id}:{}", uuid::Uuid::new_v4().simple());
        tx.prepare_cached(
            "UPDATE messages SET receive_count = receive_count + ?4, visible_at_ms = ?2, receipt = ?3
             WHERE id = ?1",
        )?
        .execute(params![id, now + visibility.as_millis() as i64, receipt, added])?;
        taken.push(Received {
            message_id: id.to_string(),
            receipt,
            body,
            receive_count: count + added,
        });
    }
    Ok(taken)
}

#[derive(Clone)]
pub struct SqliteQueue {
    db: EmbeddedDb,
    name: String,
    max_receive_count: u32,
    arrivals: Arc<Notify>,
}

impl SqliteQueue {
    pub fn new(db: EmbeddedDb, name: impl Into<String>, max_receive_count: u32) -> Self {
        Self {
            db,
            name: name.into(),
            max_receive_count: max_receive_count.max(1),
            arrivals: Arc::new(Notify::new()),
        }
    }

    /// Messages waiting or in flight (not dead).
    pub async fn depth(&self) -> anyhow::Result<u64> {
        let name = self.name.clone();
        self.db
            .call(move |tx| {
                Ok(tx.query_row(
                    "SELECT COUNT(*) FROM messages WHERE queue = ?1 AND dead = ?2",
                    params![name, LIVE],
                    |r| r.get::<_, i64>(0),
                )? as u64)
            })
            .await
    }

    /// Drops every message of this queue, dead ones included (operators,
    /// benchmarks).
    pub async fn purge(&self) -> anyhow::Result<u64> {
        let name = self.name.clone();
        self.db
            .call(move |tx| {
                Ok(tx.execute("DELETE FROM messages WHERE queue = ?1", params![name])? as u64)
            })
            .await
    }

    async fn receive_now(&self, max: usize, visibility: Duration) -> anyhow::Result<Vec<Received>> {
        let name = self.name.clone();
        let max_receive = self.max_receive_count;
        self.db
            .call(move |tx| {
                let now = now_millis();
                // As SQS redrives: a message received too often goes to the DLQ
                // instead of being delivered again.
                tx.prepare_cached(
                    "UPDATE messages SET dead = ?4
                     WHERE queue = ?1 AND dead = ?5 AND visible_at_ms <= ?2 AND receive_count >= ?3",
                )?
                .execute(params![name, now, max_receive, DEAD, LIVE])?;
                take_visible(tx, &name, LIVE, now, max, visibility, true)
            })
            .await
    }
}

#[async_trait]
impl TaskQueue for SqliteQueue {
    async fn send_many(&self, messages: Vec<Outgoing>) -> anyhow::Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let name = self.name.clone();
        self.db
            .call(move |tx| {
                let now = now_millis();
                let mut stmt = tx.prepare_cached(
                    "INSERT INTO messages (queue, body, sent_ms, visible_at_ms) VALUES (?1, ?2, ?3, ?4)",
                )?;
                for message in messages {
                    stmt.execute(params![
                        name,
                        message.body,
                        now,
                        now + message.delay.min(crate::ports::queue::MAX_DELAY).as_millis() as i64
                    ])?;
                }
                Ok(())
            })
            .await?;
        self.arrivals.notify_waiters();
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let notified = self.arrivals.notified();
            let received = self.receive_now(max, visibility).await?;
            if !received.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(received);
            }
            // Woken by a send, or re-check soon for messages becoming visible.
            let _ = tokio::time::timeout(VISIBILITY_POLL, notified).await;
        }
    }

    async fn delete(&self, receipt: &str) -> anyhow::Result<()> {
        self.delete_many(&[receipt.to_string()]).await
    }

    async fn delete_many(&self, receipts: &[String]) -> anyhow::Result<()> {
        let receipts = receipts.to_vec();
        self.db
            .call(move |tx| {
                let mut delete = tx.prepare_cached("DELETE FROM messages WHERE receipt = ?1")?;
                for receipt in &receipts {
                    delete.execute(params![receipt])?;
                }
                Ok(())
            })
            .await
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> anyhow::Result<()> {
        let receipt = receipt.to_string();
        self.db
            .call(move |tx| {
                tx.execute(
                    "UPDATE messages SET visible_at_ms = ?2 WHERE receipt = ?1 AND dead = ?3",
                    params![receipt, now_millis() + timeout.as_millis() as i64, LIVE],
                )?;
                Ok(())
            })
            .await?;
        if timeout.is_zero() {
            self.arrivals.notify_waiters();
        }
        Ok(())
    }

    async fn take_dead_letters(
        &self,
        max: usize,
        visibility: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let name = self.name.clone();
        self.db
            .call(move |tx| take_visible(tx, &name, DEAD, now_millis(), max, visibility, false))
            .await
    }

    async fn settle_dead_letter(&self, receipt: &str) -> anyhow::Result<()> {
        let receipt = receipt.to_string();
        self.db
            .call(move |tx| {
                tx.execute(
                    "UPDATE messages SET dead = ?2 WHERE receipt = ?1 AND dead = ?3",
                    params![receipt, DEAD_HANDLED, DEAD],
                )?;
                Ok(())
            })
            .await
    }

    async fn dead_letters(&self) -> anyhow::Result<Vec<String>> {
        let name = self.name.clone();
        self.db
            .call(move |tx| {
                let mut stmt = tx.prepare(
                    "SELECT body FROM messages WHERE queue = ?1 AND dead != ?2 ORDER BY id",
                )?;
                let bodies = stmt
                    .query_map(params![name, LIVE], |r| r.get::<_, String>(0))?
                    .collect::<Result<_, _>>()?;
                Ok(bodies)
            })
            .await
    }
}
