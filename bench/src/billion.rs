//! A billion rows on this machine: 1,000 fragments of 1,000,000 rows
//! written once by pylance (`bench/billion_table.py`) and kept between
//! runs; `x * 2 + 1` and `length(s)` filled by lance-backfill and by pylance
//! `add_columns` in the same run, then `x * 2 + 1` as a Python function
//! (pyarrow.compute) on the local pool against pylance's batch UDF. For
//! each side: time, rows/s, peak RSS, table versions and bytes written.

use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use anyhow::ensure;
use lance::Dataset;
use serde_json::json;

use crate::measure::{
    Pylance, Summary, peak_rss, python_json, range, reset_peak_rss, rows_per_second, rss, summarize,
};
use crate::scenarios::{Options, backfill, fresh, verify, versions};
use crate::udf::{FUNCTIONS, declare, payloads, udf_stack};

/// What one side's fill of one column cost.
#[derive(Default)]
struct Cost {
    times: Vec<Duration>,
    peak_rss: u64,
    /// The RSS when the fill with the largest peak began.
    start_rss: u64,
    versions: u64,
    bytes: u64,
}

impl Cost {
    /// Records one fill; the peak and the sizes are the largest seen.
    fn add(&mut self, took: Duration, rss: (u64, u64), versions: u64, bytes: u64) {
        let (start_rss, peak_rss) = rss;
        self.times.push(took);
        if peak_rss > self.peak_rss {
            (self.start_rss, self.peak_rss) = (start_rss, peak_rss);
        }
        self.versions = self.versions.max(versions);
        self.bytes = self.bytes.max(bytes);
    }

    fn cells(&self, rows: u64) -> (Summary, String) {
        let summary = summarize(&self.times);
        let cells = format!(
            "{} | {} | {} ({}) | {} | {}",
            range(&summary),
            rows_per_second(rows, summary.median),
            mib(self.peak_rss),
            mib(self.start_rss),
            self.versions,
            mib(self.bytes)
        );
        (summary, cells)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.0} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// Bytes of every file under `path`.
fn size_on_disk(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => size_on_disk(&entry.path()),
            _ => entry.metadata().map(|m| m.len()).unwrap_or(0),
        })
        .sum()
}

/// The table, written by pylance unless an earlier run left it in place.
fn table(options: &Options, uri: &str, rows: u64, fragments: u64) -> anyhow::Result<String> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/billion_table.py");
    let (rows, fragments) = (rows.to_string(), fragments.to_string());
    let args = [
        script,
        uri,
        "--rows",
        rows.as_str(),
        "--fragments",
        fragments.as_str(),
    ]
    .map(OsStr::new);
    let report = python_json(&options.python, &args, "writing the table")?;
    let seconds = report["seconds"].as_f64().unwrap_or(0.0);
    let bytes = report["bytes"].as_u64().unwrap_or(0);
    Ok(if seconds > 0.0 {
        format!(
            "written by pylance in {seconds:.0} s, {} on disk",
            mib(bytes)
        )
    } else {
        format!("kept from an earlier run, {} on disk", mib(bytes))
    })
}

/// Drops the benchmark's columns and removes their files, so the next
/// repetition starts from the same table and the disk does not fill.
async fn drop_and_clean(uri: &str, columns: &[&str]) -> anyhow::Result<()> {
    let mut dataset = Dataset::open(uri).await?;
    dataset.drop_columns(columns).await?;
    Dataset::open(uri)
        .await?
        .cleanup_old_versions(chrono::TimeDelta::zero(), Some(true), None)
        .await?;
    Ok(())
}

/// The table and the two sides that fill it.
struct Bench {
    stack: lance_backfill_tests::Stack,
    pylance: Pylance,
    uri: String,
    rows: u64,
}

/// One repetition: the column each side fills and who goes first.
struct Rep<'a> {
    ours: &'a str,
    theirs: &'a str,
    expr: &'a str,
    pylance_first: bool,
}

impl Bench {
    /// Runs `run`, recording its time, the peak RSS of `pid` (this
    /// process when `None`), the versions it made and the bytes it wrote.
    async fn measured(
        uri: &str,
        cost: &mut Cost,
        pid: Option<u32>,
        run: impl Future<Output = anyhow::Result<Duration>>,
    ) -> anyhow::Result<()> {
        let table = Path::new(uri);
        let (versions_before, bytes_before) = (versions(uri).await, size_on_disk(table));
        reset_peak_rss(pid)?;
        let start = rss(pid)?;
        let took = run.await?;
        let peak = peak_rss(pid)?;
        let made = versions(uri).await - versions_before;
        cost.add(
            took,
            (start, peak),
            made,
            size_on_disk(table).saturating_sub(bytes_before),
        );
        Ok(())
    }

    /// One repetition, both sides, values checked, columns dropped after.
    async fn rep(
        &mut self,
        rep: Rep<'_>,
        costs: (&mut Cost, &mut Cost),
        theirs: impl Fn(&mut Pylance, &str, &str) -> anyhow::Result<Duration>,
    ) -> anyhow::Result<()> {
        let (ours_cost, theirs_cost) = costs;
        let pid = Some(self.pylance.pid());
        for pylance_turn in [rep.pylance_first, !rep.pylance_first] {
            if pylance_turn {
                let (pylance, uri) = (&mut self.pylance, self.uri.as_str());
                let run = async { theirs(pylance, uri, rep.theirs) };
                Self::measured(&self.uri, theirs_cost, pid, run).await?;
            } else {
                let run = backfill(&self.stack, "items", json!({"column": rep.ours}));
                Self::measured(&self.uri, ours_cost, None, run).await?;
            }
        }
        for column in [rep.ours, rep.theirs] {
            let checked = verify(&self.uri, column, rep.expr).await?;
            ensure!(
                checked == self.rows,
                "{column}: verified {checked} of {} rows",
                self.rows
            );
        }
        drop_and_clean(&self.uri, &[rep.ours, rep.theirs]).await
    }

    /// An SQL column: declared for us, `add_columns({name: expr})` for pylance.
    async fn sql(&mut self, tag: &str, expr: &str, reps: usize) -> anyhow::Result<()> {
        let (mut ours, mut theirs) = (Cost::default(), Cost::default());
        for rep in 0..reps {
            let (column, theirs_column) = (format!("ours_{tag}_{rep}"), format!("py_{tag}_{rep}"));
            self.stack.declare("items", &[(&column, expr)]).await;
            let rep = Rep {
                ours: &column,
                theirs: &theirs_column,
                expr,
                pylance_first: rep % 2 == 1,
            };
            let call = |p: &mut Pylance, uri: &str, name: &str| p.add_column(uri, name, expr);
            self.rep(rep, (&mut ours, &mut theirs), call).await?;
        }
        print_row(&format!("`{expr}`"), self.rows, &ours, &theirs);
        Ok(())
    }

    /// `x * 2 + 1` with pyarrow.compute: a `virtual_column` on the local
    /// pool (2 processes) for us, a batch UDF in pylance's process.
    async fn udf(&mut self, payload: &str) -> anyhow::Result<()> {
        let (mut ours, mut theirs) = (Cost::default(), Cost::default());
        declare(&self.stack, "ours_udf", payload, "double_plus_one").await?;
        let rep = Rep {
            ours: "ours_udf",
            theirs: "py_udf",
            expr: "x * 2 + 1",
            pylance_first: false,
        };
        let call = |p: &mut Pylance, uri: &str, name: &str| {
            p.add_udf_column(uri, name, FUNCTIONS, "double_plus_one")
        };
        self.rep(rep, (&mut ours, &mut theirs), call).await?;
        print_row(
            "`x * 2 + 1`, Python (pyarrow.compute)",
            self.rows,
            &ours,
            &theirs,
        );
        Ok(())
    }
}

pub async fn billion(options: &Options) -> anyhow::Result<()> {
    let (rows, fragments) = if options.quick {
        (10_000_000, 10)
    } else {
        (1_000_000_000, 1_000)
    };
    let root = options.dir.join("billion");
    std::fs::create_dir_all(&root)?;
    let uri = format!("{}/items.lance", root.display());
    let written = table(options, &uri, rows, fragments)?;
    // The service's own state starts empty: jobs of an earlier run are gone.
    let _ = std::fs::remove_dir_all(root.join("_lance_backfill"));
    let functions = payloads(&options.python, &fresh(&options.dir, "billion-state")?)?;
    let mut bench = Bench {
        stack: udf_stack(&root, 2).await,
        pylance: Pylance::start(&options.python)?,
        uri,
        rows,
    };
    println!("## A billion rows\n");
    println!(
        "{rows} rows in {fragments} fragments of `x` (int64) and `s` (a short string), {written}. Each repetition fills a new column both ways (alternating who goes first), checks every value, then drops both columns and removes their files. Peak RSS (RSS at start): the process's high-water mark (`VmHWM`, reset before each fill), and in brackets its resident set when the fill began: ours is the whole service (API, embedded store and queue, 2 pollers; the Python pool's processes not included), pylance's its Python process. Bytes written: the table folder's growth during the fill.\n"
    );
    println!(
        "| column | lance-backfill median (min–max) | rows/s | peak RSS (at start) | versions | bytes written | pylance median (min–max) | rows/s | peak RSS (at start) | versions | bytes written | ratio (pylance time / ours) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|");
    let reps = options.reps.min(3);
    bench.sql("x2", "x * 2 + 1", reps).await?;
    bench.sql("len", "length(s)", reps).await?;
    bench.udf(&functions["double_plus_one"]).await?;
    println!();
    Ok(())
}

fn print_row(label: &str, rows: u64, ours: &Cost, theirs: &Cost) {
    let (o, ours) = ours.cells(rows);
    let (p, theirs) = theirs.cells(rows);
    println!(
        "| {label} | {ours} | {theirs} | {:.2} |",
        p.median.as_secs_f64() / o.median.as_secs_f64()
    );
}
