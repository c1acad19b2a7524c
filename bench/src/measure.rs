//! Statistics and the pylance side of the comparisons.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Runs `python` with `args` and reads its standard output as JSON;
/// `what` names the step in errors.
pub fn python_json(
    python: &str,
    args: &[&std::ffi::OsStr],
    what: &str,
) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(python)
        .args(args)
        .output()
        .with_context(|| format!("running {python} for {what}"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).with_context(|| format!("{what}: the output"))
}

/// Median and range of repeated timings.
#[derive(Debug, Clone)]
pub struct Summary {
    pub median: Duration,
    pub min: Duration,
    pub max: Duration,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let median = if sorted.is_empty() {
        Duration::ZERO
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2
    };
    Summary {
        median,
        min: sorted.first().copied().unwrap_or_default(),
        max: sorted.last().copied().unwrap_or_default(),
    }
}

/// The `p`-th percentile (0..=100), nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    let mut sorted = samples.to_vec();
    sorted.sort();
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub fn range(s: &Summary) -> String {
    format!("{} ({}–{})", ms(s.median), ms(s.min), ms(s.max))
}

pub fn rows_per_second(rows: u64, d: Duration) -> String {
    let rate = rows as f64 / d.as_secs_f64().max(1e-9);
    if rate >= 1e6 {
        format!("{:.1} M rows/s", rate / 1e6)
    } else {
        format!("{:.0} k rows/s", rate / 1e3)
    }
}

pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .next()
                .map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string())
        })
        .and_then(|kb| kb.parse::<u64>().ok())
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    format!("Machine: {cores} cores ({cpu}), {memory} RAM; local disk.")
}

/// A long-lived Python process with pylance that times `add_columns` on
/// request, so interpreter start-up and imports stay out of the figures.
pub struct Pylance {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

const WORKER: &str = r#"
import importlib.util, json, sys, time
import lance, pyarrow as pa

def batch_udf(command):
    spec = importlib.util.spec_from_file_location("udfs", command["module"])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    function, name = getattr(module, command["function"]), command["name"]
    schema = pa.schema([pa.field(name, pa.int64())])
    def batch(b):
        return pa.RecordBatch.from_arrays([function(b)], schema=schema)
    return lance.batch_udf(output_schema=schema)(batch)

for line in sys.stdin:
    command = json.loads(line)
    dataset = lance.dataset(command["uri"])
    if "function" in command:
        udf = batch_udf(command)
        began = time.perf_counter()
        dataset.add_columns(udf, read_columns=["x"])
    else:
        began = time.perf_counter()
        dataset.add_columns({command["name"]: command["expr"]})
    elapsed = time.perf_counter() - began
    print(json.dumps({"seconds": elapsed, "version": lance.dataset(command["uri"]).version}), flush=True)
"#;

impl Pylance {
    pub fn start(python: &str) -> anyhow::Result<Self> {
        let mut child = Command::new(python)
            .args(["-c", WORKER])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {python} with pylance"))?;
        let stdin = child.stdin.take().context("python stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("python stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    /// The Python process's id, for its peak RSS.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Times `LanceDataset.add_columns({name: expr})`.
    pub fn add_column(&mut self, uri: &str, name: &str, expr: &str) -> anyhow::Result<Duration> {
        self.timed(serde_json::json!({"uri": uri, "name": name, "expr": expr}))
    }

    /// Times `LanceDataset.add_columns(batch_udf(f), read_columns=["x"])`
    /// for `function` (int64 of a batch) of the Python file `module`.
    pub fn add_udf_column(
        &mut self,
        uri: &str,
        name: &str,
        module: &str,
        function: &str,
    ) -> anyhow::Result<Duration> {
        self.timed(
            serde_json::json!({"uri": uri, "name": name, "module": module, "function": function}),
        )
    }

    fn timed(&mut self, command: serde_json::Value) -> anyhow::Result<Duration> {
        writeln!(self.stdin, "{command}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        if line.is_empty() {
            bail!(
                "pylance worker exited (is pylance installed in {:?}?)",
                self.child.id()
            );
        }
        let reply: serde_json::Value = serde_json::from_str(&line)?;
        Ok(Duration::from_secs_f64(
            reply["seconds"].as_f64().context("seconds")?,
        ))
    }
}

impl Drop for Pylance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `/proc/<pid>` (`/proc/self` for `None`).
fn proc_dir(pid: Option<u32>) -> String {
    pid.map_or_else(|| "/proc/self".into(), |pid| format!("/proc/{pid}"))
}

/// Resets the process's RSS high-water mark (Linux: `5` to `clear_refs`).
pub fn reset_peak_rss(pid: Option<u32>) -> anyhow::Result<()> {
    let path = format!("{}/clear_refs", proc_dir(pid));
    std::fs::write(&path, "5").with_context(|| format!("resetting the peak RSS in {path}"))
}

/// The process's RSS high-water mark in bytes (`VmHWM`).
pub fn peak_rss(pid: Option<u32>) -> anyhow::Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// The process's resident set in bytes now (`VmRSS`).
pub fn rss(pid: Option<u32>) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS:")
}

/// A size field of `/proc/<pid>/status` (given there in KiB), in bytes.
fn status_bytes(pid: Option<u32>, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("{}/status", proc_dir(pid)))?;
    let kib = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|value| value.split_whitespace().next())
        .with_context(|| field.to_string())?;
    Ok(kib.parse::<u64>()? * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let samples: Vec<Duration> = [5, 1, 3, 2, 4]
            .iter()
            .map(|ms| Duration::from_millis(*ms))
            .collect();
        let s = summarize(&samples);
        assert_eq!(
            (s.median, s.min, s.max),
            (
                Duration::from_millis(3),
                Duration::from_millis(1),
                Duration::from_millis(5)
            )
        );
        assert_eq!(percentile(&samples, 50.0), Duration::from_millis(3));
        assert_eq!(percentile(&samples, 99.0), Duration::from_millis(5));
        assert_eq!(summarize(&samples[..4]).median, Duration::from_micros(2500));
    }
}
