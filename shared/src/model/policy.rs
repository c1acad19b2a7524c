//! Who may do what where: `LANCE_BACKFILL_POLICY` maps a principal
//! (`key:<name>` for an API key, `<name>` alone meaning the same;
//! `jwt:<issuer>:<sub>` for a bearer token) to the tables it may touch
//! (globs over the table id joined with `$`) and the actions it may take
//! there. Without a policy every authenticated caller may do everything.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::model::table::TableId;

/// What a request does to a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Read jobs and describe tables.
    Read,
    /// Start backfills.
    Submit,
    /// Declare columns (`add_columns`).
    Declare,
    /// Declare user-function columns: running the caller's code.
    Udf,
    /// Cancel jobs.
    Cancel,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Submit => "submit",
            Self::Declare => "declare",
            Self::Udf => "udf",
            Self::Cancel => "cancel",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    tables: Vec<String>,
    actions: BTreeSet<Action>,
}

/// The access rules of a deployment.
#[derive(Debug, Clone, Default)]
pub enum Access {
    /// No policy: every authenticated principal may do everything.
    #[default]
    Open,
    Policy(BTreeMap<String, Grant>),
}

/// The answer for one principal, table and action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// Why not (names the principal, the table and the action).
    Denied(String),
}

/// Policies are small documents; a bigger one is a mistake.
const MAX_POLICY_BYTES: usize = 1 << 20;

impl Access {
    /// Parses a policy: a JSON object, or `@path` naming a file holding one.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let text = match spec.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path)
                .map_err(|err| format!("reading the policy file {path}: {err}"))?,
            None => spec.to_string(),
        };
        if text.len() > MAX_POLICY_BYTES {
            return Err(format!(
                "the policy is larger than {MAX_POLICY_BYTES} bytes"
            ));
        }
        let written: BTreeMap<String, Grant> =
            serde_json::from_str(&text).map_err(|err| format!("the policy is not valid: {err}"))?;
        let mut grants = BTreeMap::new();
        for (name, grant) in written {
            grants.insert(principal_named(&name)?, grant);
        }
        Ok(Self::Policy(grants))
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open)
    }

    pub fn decide(&self, principal: &str, table: &TableId, action: Action) -> Decision {
        let Self::Policy(grants) = self else {
            return Decision::Allowed;
        };
        let Some(grant) = grants.get(principal) else {
            return Decision::Denied(format!(
                "principal '{principal}' has no access to this service"
            ));
        };
        let id = table.0.join("$");
        if !grant
            .tables
            .iter()
            .any(|pattern| glob_matches(pattern, &id))
        {
            return Decision::Denied(format!("principal '{principal}' may not use table '{id}'"));
        }
        if !grant.actions.contains(&action) {
            return Decision::Denied(format!(
                "principal '{principal}' may not {} on table '{id}'",
                action.as_str()
            ));
        }
        Decision::Allowed
    }
}

/// The principal a policy entry names: `key:<name>` and
/// `jwt:<issuer>:<sub>` as written, a bare name as an API key's.
fn principal_named(name: &str) -> Result<String, String> {
    let name = name.trim();
    if name.starts_with("key:") || name.starts_with("jwt:") {
        return Ok(name.to_string());
    }
    if name.is_empty()
        || name.contains(':')
        || crate::model::principal::RESERVED_NAMES.contains(&name)
    {
        return Err(format!(
            "policy principal '{name}': write 'key:<name>', 'jwt:<issuer>:<sub>' or an API key's \
             name (not one of {:?})",
            crate::model::principal::RESERVED_NAMES
        ));
    }
    Ok(crate::model::principal::key_principal(name))
}

/// `*` matches any run of characters (`$` included), `?` any one character.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let pattern: Vec<char> = pattern.chars().collect();
    let text: Vec<char> = text.chars().collect();
    // Iterative matching with backtracking to the last `*`: linear in
    // practice, never recursive.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && (pattern[p] == '?' || pattern[p] == text[t]) {
            p += 1;
            t += 1;
        } else if p < pattern.len() && pattern[p] == '*' {
            star = Some((p, t));
            p += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(text: &str) -> TableId {
        TableId(text.split('$').map(str::to_string).collect())
    }

    #[test]
    fn globs() {
        assert!(glob_matches("*", "a$b"));
        assert!(glob_matches("sales$*", "sales$orders"));
        assert!(!glob_matches("sales$*", "salesx$orders"));
        assert!(glob_matches("items", "items"));
        assert!(!glob_matches("items", "items2"));
        assert!(glob_matches("item?", "items"));
        assert!(glob_matches("a*b*c", "axxbyyc"));
        assert!(!glob_matches("a*b*c", "axxbyy"));
    }

    #[test]
    fn decisions() {
        let access = Access::parse(
            r#"{"ops": {"tables": ["*"], "actions": ["read", "submit", "declare", "udf", "cancel"]},
                "reader": {"tables": ["sales$*"], "actions": ["read"]}}"#,
        )
        .unwrap();
        assert_eq!(
            access.decide("key:ops", &id("x"), Action::Udf),
            Decision::Allowed
        );
        assert_eq!(
            access.decide("key:reader", &id("sales$orders"), Action::Read),
            Decision::Allowed
        );
        assert!(matches!(
            access.decide("key:reader", &id("sales$orders"), Action::Submit),
            Decision::Denied(_)
        ));
        assert!(matches!(
            access.decide("key:reader", &id("hr$people"), Action::Read),
            Decision::Denied(_)
        ));
        assert!(matches!(
            access.decide("key:stranger", &id("sales$orders"), Action::Read),
            Decision::Denied(_)
        ));
        assert!(
            matches!(
                access.decide("jwt:iss:ops", &id("x"), Action::Read),
                Decision::Denied(_)
            ),
            "a token whose subject is a key's name is not that key"
        );
        assert_eq!(
            Access::Open.decide("anyone", &id("t"), Action::Cancel),
            Decision::Allowed
        );
    }

    #[test]
    fn bad_policies_are_refused() {
        assert!(Access::parse("[").is_err());
        assert!(Access::parse(r#"{"a": {"tables": ["*"], "actions": ["fly"]}}"#).is_err());
        assert!(Access::parse(r#"{"a": {"tables": ["*"]}}"#).is_err());
        assert!(Access::parse("@/nonexistent/policy.json").is_err());
        for reserved in ["maintainer", "anonymous", "a:b"] {
            let policy = format!(r#"{{"{reserved}": {{"tables": ["*"], "actions": ["read"]}}}}"#);
            assert!(Access::parse(&policy).is_err(), "{reserved}");
        }
    }
}
