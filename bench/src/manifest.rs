//! The manifest's cost: every commit of a `DataReplacement` writes a whole
//! new manifest, whose size grows with the table's fragments. A job over F
//! fragments committed in fixed groups of G writes F/G manifests of F
//! fragments each, F²/G in all; the default groups grow with the table
//! (about 20 commits a job, at least 64 fragments each), so a job writes
//! about 20 manifests whatever its size: linear in F. Measured on tables of
//! 1,000, 10,000 and 100,000 fragments of 10 rows: manifest bytes the job
//! wrote, its commits and its time to DONE, with the default groups and
//! with fixed groups of 64.

use std::path::Path;

use anyhow::Context;
use lance::Dataset;
use lance_backfill::model::job::{Counter, default_commit_granularity};
use lance_backfill::submit::SubmitSettings;
use lance_backfill_tests::write_sample_table;
use serde_json::json;

use crate::measure::{ms, rows_per_second};
use crate::scenarios::{Options, backfill_job, fresh, local_stack, verify};

/// Fixed groups are run only while they would write at most this much.
const FIXED_BUDGET_BYTES: f64 = 4e9;
const FIXED_GROUP: u64 = 64;

/// Sizes of the manifests of versions after `since`.
fn manifests_after(uri: &str, since: u64) -> anyhow::Result<(u64, u64)> {
    let (mut count, mut bytes) = (0, 0);
    for entry in std::fs::read_dir(Path::new(uri).join("_versions"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".manifest") else {
            continue;
        };
        // Version files are named by version, or (V2 naming) by
        // u64::MAX - version, zero-padded to 20 digits.
        let number: u64 = stem.parse().context("a manifest's name")?;
        let version = if stem.len() == 20 {
            u64::MAX - number
        } else {
            number
        };
        if version > since {
            count += 1;
            bytes += entry.metadata()?.len();
        }
    }
    Ok((count, bytes))
}

fn mb(bytes: f64) -> String {
    format!("{:.1} MB", bytes / 1e6)
}

/// Manifest bytes per fragment of the table: what the growth is linear in.
fn per_fragment(bytes: f64, fragments: u64) -> String {
    format!("{:.0} B", bytes / fragments as f64)
}

pub async fn manifest(options: &Options) -> anyhow::Result<()> {
    let sizes: &[u64] = if options.quick {
        &[500, 2_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    println!("## The manifest: bytes a job writes as the table grows\n");
    println!(
        "One job of `x * 2 + 1` over every fragment (10 rows each), embedded store and queue. Each commit writes a whole manifest; the default groups give a job about 20 commits whatever its size (`commit_granularity` ⌈fragments / 20⌉, at least 64), fixed groups of {FIXED_GROUP} give it fragments / {FIXED_GROUP}. Fixed groups are not run where they would write more than {} (the cell shows what they would write: their commits times the default run's bytes per commit).\n",
        mb(FIXED_BUDGET_BYTES)
    );
    println!(
        "| fragments | manifest | commit groups | commits | manifest bytes written | per fragment | time to DONE | rows/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &fragments in sizes {
        let root = fresh(&options.dir, &format!("manifest-{fragments}"))?;
        let uri = format!("{}/items.lance", root.display());
        write_sample_table(&uri, fragments * 10, fragments).await?;
        let stack = local_stack(&root, SubmitSettings::default()).await;
        let manifest = Dataset::open(&uri)
            .await?
            .manifest_location()
            .size
            .context("the manifest's size")? as f64;
        let default = default_commit_granularity(fragments) as u64;
        // The adaptive run's bytes per commit, for what a fixed run not
        // made would write.
        let mut per_commit = manifest;
        for (column, group) in [("adaptive", default), ("fixed", FIXED_GROUP)] {
            let commits = fragments.div_ceil(group);
            let label = match column {
                "adaptive" => format!("{group} (default)"),
                _ => format!("{group}"),
            };
            let expected = commits as f64 * per_commit;
            if column == "fixed" && expected > FIXED_BUDGET_BYTES {
                println!(
                    "| {fragments} | {} | {label} | {commits} | about {} | {} | not run | |",
                    mb(manifest),
                    mb(expected),
                    per_fragment(expected, fragments)
                );
                continue;
            }
            stack.declare("items", &[(column, "x * 2 + 1")]).await;
            let before = Dataset::open(&uri).await?.manifest().version;
            let body = json!({"column": column, "commit_granularity": group});
            let (took, job) = backfill_job(&stack, "items", body).await?;
            let (made, bytes) = manifests_after(&uri, before)?;
            per_commit = bytes as f64 / made.max(1) as f64;
            verify(&uri, column, "x * 2 + 1").await?;
            println!(
                "| {fragments} | {} | {label} | {made} ({} counted) | {} | {} | {} | {} |",
                mb(manifest),
                job.metrics.get(Counter::CommitsDone),
                mb(bytes as f64),
                per_fragment(bytes as f64, fragments),
                ms(took),
                rows_per_second(fragments * 10, took)
            );
        }
        drop(stack);
        std::fs::remove_dir_all(&root)?;
    }
    println!();
    Ok(())
}
