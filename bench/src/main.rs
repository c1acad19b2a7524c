//! Benchmarks, each side by side with its reference in the same run:
//! lance-backfill end to end (submit -> DONE, values verified) against
//! pylance `add_columns` on the same freshly written table; small-task
//! overheads; planning a 10,000-fragment table; API latency against moto;
//! cold start, binary sizes and peak memory. `bench/run` builds and runs it.

mod billion;
mod calls;
mod live;
mod maintain;
mod manifest;
mod measure;
mod model;
mod scenarios;
mod udf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "lance-backfill-bench")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Repetitions per measurement (the 10M-row run uses fewer).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Smaller tables and fewer repetitions: a smoke run.
    #[arg(long)]
    quick: bool,
    /// Where tables are written.
    #[arg(long, default_value = "bench-data")]
    dir: std::path::PathBuf,
    /// The Python with pylance (bench/run passes the project's venv).
    #[arg(long, default_value = "python3")]
    python: String,
    /// Only these table shapes in the throughput section, as rows/fragments
    /// (`--shapes 100000/10000,1000000/16`).
    #[arg(long, value_delimiter = ',')]
    shapes: Vec<String>,
    /// Only these sections (throughput, udf, overheads, calls, live, maintain, planning, latency, startup, manifest, model;
    /// `billion` runs only when named: it writes a 1,000,000,000-row table).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Internal: one 1M-row task in this process, reporting peak RSS.
    OneTask {
        #[arg(long)]
        rows: u64,
        #[arg(long)]
        dir: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if let Some(Command::OneTask { rows, dir }) = cli.command {
            return scenarios::one_task(rows, &dir).await;
        }
        let options = scenarios::Options {
            reps: if cli.quick { 2 } else { cli.reps.max(1) },
            quick: cli.quick,
            dir: std::path::absolute(&cli.dir)?,
            python: cli.python,
            shapes: cli.shapes,
        };
        let wants = |name: &str| cli.only.is_empty() || cli.only.iter().any(|o| o == name);
        println!("# lance-backfill benchmarks\n");
        println!("{}\n", measure::machine());
        if wants("throughput") {
            scenarios::throughput(&options).await?;
        }
        if wants("udf") {
            udf::udf(&options).await?;
        }
        if wants("overheads") {
            scenarios::overheads(&options).await?;
        }
        if wants("calls") {
            calls::calls(&options).await?;
        }
        if wants("live") {
            live::live(&options).await?;
        }
        if wants("maintain") {
            maintain::maintained(&options).await?;
        }
        if wants("planning") {
            scenarios::planning(&options).await?;
        }
        if wants("latency") {
            scenarios::api_latency(&options).await?;
        }
        if wants("startup") {
            scenarios::startup(&options).await?;
        }
        if wants("manifest") {
            manifest::manifest(&options).await?;
        }
        if wants("model") {
            model::model(&options).await?;
        }
        if cli.only.iter().any(|o| o == "billion") {
            billion::billion(&options).await?;
        }
        Ok(())
    })
}
