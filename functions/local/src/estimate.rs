//! `estimate`: what jobs over a table of a given size would take on AWS
//! (wall time, Lambda, requests, dollars, the bottleneck), for every
//! combination of the functions and concurrencies asked, as a Markdown
//! table; and the estimate a dry run answers, as text.

use anyhow::{Context, bail};
use serde_json::Value;

use lance_backfill::model::estimate::{self, Bottleneck, Estimate, Function, Shape};

pub struct Projection {
    pub rows: u64,
    pub fragments: u64,
    /// `sql`, `python`, or a Python function's milliseconds per 1,000 rows.
    pub functions: Vec<String>,
    pub concurrency: Vec<u32>,
}

/// `--function`: `sql`, `python` (its own time unknown) or milliseconds
/// per 1,000 rows of a Python function.
fn function(text: &str) -> anyhow::Result<(Function, String)> {
    match text.trim() {
        "sql" => Ok((Function::Sql, "SQL (`x * 2 + 1`)".into())),
        "python" => Ok((
            Function::Python {
                ms_per_1k_rows: None,
            },
            "Python, its own time not counted".into(),
        )),
        other => {
            let ms: f64 = other
                .parse()
                .ok()
                .filter(|ms: &f64| ms.is_finite() && *ms >= 0.0)
                .with_context(|| {
                    format!("--function {other:?}: sql, python or milliseconds per 1,000 rows")
                })?;
            let function = Function::Python {
                ms_per_1k_rows: Some(ms),
            };
            Ok((function, format!("Python, {ms} ms per 1,000 rows")))
        }
    }
}

pub fn run(projection: Projection, as_json: bool) -> anyhow::Result<i32> {
    if projection.rows == 0 || projection.fragments == 0 {
        bail!("--rows and --fragments must be positive");
    }
    let mut rows = Vec::new();
    for text in &projection.functions {
        let (function, label) = function(text)?;
        for &concurrency in &projection.concurrency {
            let shape = Shape::of_table(
                projection.rows,
                projection.fragments,
                concurrency.max(1),
                function,
            );
            let estimate = estimate::estimate(&shape).map_err(anyhow::Error::msg)?;
            rows.push((label.clone(), shape, estimate));
        }
    }
    if as_json {
        let rows: Vec<Value> = rows
            .iter()
            .map(|(label, shape, estimate)| {
                serde_json::json!({"function": label, "tasks": shape.tasks,
                    "commits": shape.commits, "concurrency": shape.concurrency,
                    "estimate": estimate})
            })
            .collect();
        println!("{}", Value::Array(rows));
        return Ok(0);
    }
    print_table(&projection, &rows);
    Ok(0)
}

fn print_table(projection: &Projection, rows: &[(String, Shape, Estimate)]) {
    println!(
        "| rows / fragments | function | tasks | workers | wall time | bottleneck | Lambda GB-s | DynamoDB write / read units | SQS requests | S3 PUT / GET | Lambda | DynamoDB | SQS | S3 | total |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (label, shape, e) in rows {
        let (r, c) = (&e.requests, &e.cost_usd);
        println!(
            "| {} / {} | {label} | {} | {} | {} | {} | {} | {} / {} | {} | {} / {} | {} | {} | {} | {} | **{}** |",
            count(projection.rows as f64),
            count(projection.fragments as f64),
            count(shape.tasks as f64),
            shape.concurrency,
            duration(e.wall_seconds),
            bottleneck(e.bottleneck),
            count(e.lambda_gb_seconds),
            count(r.dynamodb_write_units),
            count(r.dynamodb_read_units),
            count(r.sqs),
            count(r.s3_puts),
            count(r.s3_gets),
            dollars(c.lambda),
            dollars(c.dynamodb),
            dollars(c.sqs),
            dollars(c.s3),
            dollars(c.total),
        );
    }
    if let Some((_, _, e)) = rows.first() {
        println!("\nMeasured: {}.", e.measured);
        for said in &e.assumptions {
            println!("Assumed: {said}.");
        }
    }
}

/// A dry run's estimate, for a person.
pub fn describe(estimate: &Value) -> Vec<String> {
    let number = |path: &[&str]| {
        path.iter()
            .fold(estimate, |value, key| &value[key])
            .as_f64()
            .unwrap_or(0.0)
    };
    let mut lines = vec![format!(
        "on AWS: about {} (bound by {}), {} Lambda GB-s, {} in all \
             (Lambda {}, DynamoDB {}, SQS {}, S3 {})",
        duration(number(&["wall_seconds"])),
        estimate["bottleneck"]
            .as_str()
            .unwrap_or("?")
            .replace('_', " "),
        count(number(&["lambda_gb_seconds"])),
        dollars(number(&["cost_usd", "total"])),
        dollars(number(&["cost_usd", "lambda"])),
        dollars(number(&["cost_usd", "dynamodb"])),
        dollars(number(&["cost_usd", "sqs"])),
        dollars(number(&["cost_usd", "s3"])),
    )];
    if let Some(said) = estimate["assumptions"].as_array() {
        lines.extend(
            said.iter()
                .filter_map(Value::as_str)
                .map(|a| format!("assumed: {a}")),
        );
    }
    lines
}

fn bottleneck(part: Bottleneck) -> &'static str {
    match part {
        Bottleneck::Workers => "workers",
        Bottleneck::HotKey => "hot key",
        Bottleneck::S3Prefix => "S3 prefix",
        Bottleneck::Manifest => "manifest",
    }
}

/// 1,234,567 as "1.23 M", 12,345 as "12.3 k".
fn count(n: f64) -> String {
    match n {
        n if n >= 1e9 => format!("{:.2} G", n / 1e9),
        n if n >= 1e6 => format!("{:.2} M", n / 1e6),
        n if n >= 1e4 => format!("{:.1} k", n / 1e3),
        n => format!("{n:.0}"),
    }
}

fn duration(seconds: f64) -> String {
    match seconds {
        s if s >= 7200.0 => format!("{:.1} h", s / 3600.0),
        s if s >= 120.0 => format!("{:.1} min", s / 60.0),
        s => format!("{s:.1} s"),
    }
}

fn dollars(amount: f64) -> String {
    match amount {
        a if a >= 100.0 => format!("${a:.0}"),
        a if a >= 0.01 => format!("${a:.2}"),
        a => format!("${a:.4}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn functions_are_read() {
        assert_eq!(function("sql").unwrap().0, Function::Sql);
        let ten = function("10").unwrap().0;
        assert_eq!(
            ten,
            Function::Python {
                ms_per_1k_rows: Some(10.0)
            }
        );
        for bad in ["-1", "fast", "NaN", "inf"] {
            assert!(function(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn figures_read_as_a_person_reads_them() {
        assert_eq!(count(1_234_567.0), "1.23 M");
        assert_eq!(count(999.0), "999");
        assert_eq!(duration(90.0), "90.0 s");
        assert_eq!(duration(3600.0), "60.0 min");
        assert_eq!(dollars(0.001234), "$0.0012");
        assert_eq!(dollars(1234.4), "$1234");
    }
}
