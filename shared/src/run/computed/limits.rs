//! Bounds on the SQL a request controls: its size, its nesting, and the
//! constants planning would fold, so no request can exhaust the stack or
//! the memory of the process that plans or evaluates it.

use lance::deps::datafusion::common::ScalarValue;
use lance::deps::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use lance::deps::datafusion::prelude::Expr;
use lance::deps::datafusion::sql::sqlparser::dialect::GenericDialect;
use lance::deps::datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::model::error::Error;

/// Longest expression or `where` accepted (16 KiB of SQL).
pub const MAX_EXPRESSION_BYTES: usize = 16 * 1024;
/// Most tokens in one: planning walks the expression tree recursively, and
/// an operator chain is as deep as it is long.
pub const MAX_EXPRESSION_TOKENS: usize = 2_000;
/// Deepest nesting of parentheses.
pub const MAX_NESTING: usize = 64;
/// Largest value a constant part of an expression may fold to while it is
/// planned (`repeat('x', 2000000000)` would be 2 GB).
pub const MAX_FOLDED_BYTES: u64 = 1 << 20;
/// Largest set of values one batch may compute: beyond it the task fails
/// rather than the process.
pub const MAX_BATCH_VALUE_BYTES: usize = 1 << 30;
/// Stack of the thread that plans an expression: with the bounds above,
/// DataFusion's recursive walks need far less.
const PLANNING_STACK_BYTES: usize = 64 << 20;

/// Checks the text of an expression (`what` names it in the error).
pub fn check_text(text: &str, what: &str) -> Result<(), Error> {
    if text.len() > MAX_EXPRESSION_BYTES {
        return Err(Error::invalid_input(format!(
            "{what} is {} bytes long; the limit is {MAX_EXPRESSION_BYTES}",
            text.len()
        )));
    }
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, text).tokenize() else {
        // Not SQL at all: the planner names the problem.
        return Ok(());
    };
    let mut count = 0;
    let (mut depth, mut deepest) = (0usize, 0usize);
    for token in &tokens {
        match token {
            Token::Whitespace(_) => continue,
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            _ => {}
        }
        deepest = deepest.max(depth);
        count += 1;
    }
    if count > MAX_EXPRESSION_TOKENS {
        return Err(Error::invalid_input(format!(
            "{what} has {count} tokens; the limit is {MAX_EXPRESSION_TOKENS}"
        )));
    }
    if deepest > MAX_NESTING {
        return Err(Error::invalid_input(format!(
            "{what} nests parentheses {deepest} deep; the limit is {MAX_NESTING}"
        )));
    }
    Ok(())
}

/// Checks that no constant part of a parsed expression folds to more than
/// [`MAX_FOLDED_BYTES`]; call it before the expression is optimised (which
/// folds constants).
pub fn check_constants(expr: &Expr, what: &str) -> Result<(), Error> {
    constant_bound(expr, what).map(|_| ())
}

/// An upper bound of the bytes a constant expression folds to; `None` for an
/// expression that reads columns (it is evaluated per batch, not folded).
fn constant_bound(expr: &Expr, what: &str) -> Result<Option<u64>, Error> {
    let bound = match expr {
        Expr::Literal(value, _) => Some(value.size() as u64),
        Expr::Column(_) | Expr::ScalarVariable(..) | Expr::Placeholder(_) => None,
        Expr::ScalarFunction(call) => {
            check_expansion(call.func.name(), &call.args, what)?;
            // Every argument is checked, even after one that reads columns:
            // a constant argument further on is folded all the same.
            let mut args = Vec::with_capacity(call.args.len());
            for arg in &call.args {
                args.push(constant_bound(arg, what)?);
            }
            let args: Option<Vec<u64>> = args.into_iter().collect();
            args.map(|args| function_bound(call.func.name(), &call.args, &args))
        }
        _ => children_bound(expr, what)?,
    };
    if let Some(bound) = bound
        && bound > MAX_FOLDED_BYTES
    {
        return Err(Error::invalid_input(format!(
            "{what}: a constant part of it would take about {bound} bytes; the limit is \
             {MAX_FOLDED_BYTES}"
        )));
    }
    Ok(bound)
}

/// The sum of the children's bounds, or `None` if one of them reads columns.
fn children_bound(expr: &Expr, what: &str) -> Result<Option<u64>, Error> {
    let mut total = Some(0u64);
    let mut failure = None;
    let _ = expr.apply_children(|child| {
        match constant_bound(child, what) {
            Ok(Some(bound)) => total = total.map(|t| t.saturating_add(bound)),
            Ok(None) => total = None,
            Err(err) => failure = Some(err),
        }
        Ok(if failure.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    match failure {
        Some(err) => Err(err),
        None => Ok(total),
    }
}

/// Functions that build a value as large as one of their arguments asks,
/// and the index of that argument.
const EXPANDING: [(&str, usize); 5] = [
    ("repeat", 1),
    ("array_repeat", 1),
    ("lpad", 1),
    ("rpad", 1),
    ("generate_series", 1),
];

/// A literal asking an expanding function for more than
/// [`MAX_FOLDED_BYTES`] per row is refused whatever the other arguments:
/// `lpad(s, 2000000000)` builds 2 GB for every row it is evaluated on.
fn check_expansion(name: &str, args: &[Expr], what: &str) -> Result<(), Error> {
    let Some((_, index)) = EXPANDING.iter().find(|(n, _)| *n == name) else {
        return Ok(());
    };
    let asked = args.get(*index).map(literal_count).unwrap_or(0);
    if asked > MAX_FOLDED_BYTES {
        return Err(Error::invalid_input(format!(
            "{what}: {name}(..., {asked}) would build values of about {asked} elements per \
             row; the limit is {MAX_FOLDED_BYTES}"
        )));
    }
    Ok(())
}

fn literal_count(expr: &Expr) -> u64 {
    match expr {
        Expr::Literal(value, _) => value
            .cast_to(&arrow_schema::DataType::Int64)
            .ok()
            .and_then(|v| match v {
                ScalarValue::Int64(Some(n)) => Some(n.max(0) as u64),
                _ => None,
            })
            .unwrap_or(0),
        _ => 0,
    }
}

/// How large a function of constants can get, from its arguments' bounds.
fn function_bound(name: &str, args: &[Expr], bounds: &[u64]) -> u64 {
    let arg = |i: usize| bounds.get(i).copied().unwrap_or(0);
    let count = |i: usize| args.get(i).map(literal_count).unwrap_or(0);
    let sum = bounds.iter().fold(0u64, |t, b| t.saturating_add(*b));
    match name {
        "repeat" | "array_repeat" => arg(0).max(1).saturating_mul(count(1)),
        // Characters up to 4 bytes each.
        "lpad" | "rpad" => count(1).saturating_mul(4).saturating_add(arg(0)),
        "replace" | "regexp_replace" | "translate" => arg(0).saturating_mul(arg(2).max(1)),
        "range" | "generate_series" => {
            let (start, stop) = (count(0), count(1));
            let step = if args.len() > 2 { count(2).max(1) } else { 1 };
            stop.saturating_sub(start) / step * 8
        }
        _ => sum,
    }
}

/// Runs `plan` on a thread with a large stack: DataFusion walks expression
/// trees recursively, and a bounded expression still deserves headroom.
pub fn on_planning_stack<T: Send>(plan: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("plan-expression".into())
            .stack_size(PLANNING_STACK_BYTES)
            .spawn_scoped(scope, plan)
            .map(|thread| thread.join())
            .unwrap_or_else(|_| Err(Box::new("could not start a planning thread")))
    })
    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_deep_and_many_token_expressions_are_refused() {
        assert!(check_text("x * 2 + 1", "e").is_ok());
        let long = "x".repeat(MAX_EXPRESSION_BYTES + 1);
        assert!(check_text(&long, "e").is_err());
        let many = (0..1500)
            .map(|i| format!("x = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ");
        assert!(check_text(&many, "e").is_err());
        let deep = format!("{}x{}", "(".repeat(100), ")".repeat(100));
        assert!(check_text(&deep, "e").is_err());
        let fine = format!("{}x{}", "(".repeat(10), ")".repeat(10));
        assert!(check_text(&fine, "e").is_ok());
    }
}

#[cfg(test)]
mod constant_tests {
    use std::sync::Arc;

    use arrow_schema::{DataType, Field, Schema};
    use lance::io::exec::Planner;

    use super::*;

    #[test]
    fn folded_constants_are_bounded() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("x", DataType::Int64, true),
            Field::new("s", DataType::Utf8, true),
        ]));
        let planner = Planner::new(schema);
        for text in [
            "repeat('x', 2000000000)",
            "lpad(s, 2000000000)",
            "repeat(repeat('ab', 1000), 1000)",
            // A constant behind an argument that reads a column is folded too.
            "replace(rpad(s, 0, s), 'a', rpad(s, 0, rpad('ab', 2000000000, 'é')))",
            "concat(s, repeat(repeat('ab', 1000), 1000))",
        ] {
            let expr = planner.parse_expr(text).unwrap();
            assert!(check_constants(&expr, "e").is_err(), "{text}");
        }
        for text in ["repeat('x', 10)", "repeat(s, 1000000)", "x * 2 + 1"] {
            let expr = planner.parse_expr(text).unwrap();
            assert!(check_constants(&expr, "e").is_ok(), "{text}");
        }
    }
}
