//! Table ids and where tables live: a Lance directory namespace rooted at a
//! local path or an object-store URI, and the datasets opened from it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lance::Dataset;
use lance::dataset::builder::DatasetBuilder;
use lance::session::Session;
use lance_namespace::LanceNamespace;
use lance_namespace::models::{DescribeTableRequest, ListNamespacesRequest, ListTablesRequest};
use lance_namespace_impls::{DirectoryNamespace, DirectoryNamespaceBuilder};

use crate::model::error::{Error, Missing};

pub const DEFAULT_DELIMITER: &str = "$";
/// Namespace levels and table name of one id, at most.
const MAX_ID_PARTS: usize = 64;
/// Longest part of an id (a namespace or table name).
const MAX_ID_PART_BYTES: usize = 256;

/// A table id: namespace parts followed by the table name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TableId(pub Vec<String>);

impl TableId {
    /// Parses the `{id}` path segment (already percent-decoded) with the
    /// request's delimiter.
    pub fn parse(raw: &str, delimiter: &str) -> Result<Self, Error> {
        if delimiter.is_empty() {
            return Err(Error::invalid_input(
                "query parameter 'delimiter' must not be empty",
            ));
        }
        if raw.is_empty() || raw == delimiter {
            return Err(Error::invalid_input(format!(
                "path parameter 'id' must name a table, got '{raw}' (the root namespace)"
            )));
        }
        let parts: Vec<String> = raw.split(delimiter).map(str::to_string).collect();
        Self::from_parts(parts, "path parameter 'id'")
    }

    pub fn from_parts(parts: Vec<String>, what: &str) -> Result<Self, Error> {
        if parts.is_empty() {
            return Err(Error::invalid_input(format!("{what} must not be empty")));
        }
        if parts.len() > MAX_ID_PARTS {
            return Err(Error::invalid_input(format!(
                "{what} has {} parts; the limit is {MAX_ID_PARTS}",
                parts.len()
            )));
        }
        for (idx, part) in parts.iter().enumerate() {
            if part.is_empty() {
                return Err(Error::invalid_input(format!(
                    "{what} has an empty part at position {idx}"
                )));
            }
            if part.len() > MAX_ID_PART_BYTES {
                return Err(Error::invalid_input(format!(
                    "{what}: part {idx} is longer than {MAX_ID_PART_BYTES} bytes"
                )));
            }
            // Control characters (the unit separator among them) would make
            // two ids one key; `$` would make two ids one name in policies.
            if part.chars().any(|c| c.is_control() || c == '$') {
                return Err(Error::invalid_input(format!(
                    "{what}: part {idx} contains a control character or '$'"
                )));
            }
        }
        Ok(Self(parts))
    }

    pub fn name(&self) -> &str {
        self.0.last().map(String::as_str).unwrap_or_default()
    }

    /// A stable text form used as a key in the job store (unit separator
    /// between parts, which no part may contain, so no two ids collide).
    pub fn key(&self) -> String {
        self.0.join("\u{1f}")
    }

    pub fn from_key(key: &str) -> Self {
        Self(key.split('\u{1f}').map(str::to_string).collect())
    }

    pub fn display(&self) -> String {
        self.0.join(DEFAULT_DELIMITER)
    }
}

/// Resolves table ids through a Lance directory namespace and opens datasets,
/// sharing one Lance session (metadata and index caches) across requests.
pub struct Catalog {
    root: String,
    namespace: DirectoryNamespace,
    storage_options: HashMap<String, String>,
    session: Arc<Session>,
    /// Datasets at a fixed version never change, so workers reuse them.
    pinned: Mutex<Vec<(String, Arc<Dataset>)>>,
    loading: tokio::sync::Mutex<()>,
}

/// Datasets kept open at fixed versions (one per recent job and table).
const PINNED_CACHE_SIZE: usize = 32;

impl Catalog {
    pub async fn open(
        root: &str,
        storage_options: HashMap<String, String>,
    ) -> Result<Self, lance::Error> {
        let root = normalize_root(root);
        let session = Arc::new(Session::default());
        let namespace = DirectoryNamespaceBuilder::new(root.clone())
            .storage_options(storage_options.clone())
            .session(session.clone())
            .build()
            .await?;
        Ok(Self {
            root,
            namespace,
            storage_options,
            session,
            pinned: Mutex::new(Vec::new()),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn root(&self) -> &str {
        &self.root
    }

    pub fn storage_options(&self) -> &HashMap<String, String> {
        &self.storage_options
    }

    pub fn session(&self) -> Arc<Session> {
        self.session.clone()
    }

    /// The tables of the namespace and its child namespaces (at most
    /// `limit`), for watchers; a namespace that cannot be listed is skipped.
    pub async fn list_tables(&self, limit: usize) -> Vec<TableId> {
        let mut tables = Vec::new();
        let mut namespaces = vec![Vec::<String>::new()];
        while let Some(namespace) = namespaces.pop() {
            if tables.len() >= limit {
                break;
            }
            self.list_in(&namespace, limit, &mut tables).await;
            let mut request = ListNamespacesRequest::new();
            request.id = Some(namespace.clone());
            if let Ok(children) = self.namespace.list_namespaces(request).await {
                for child in children.namespaces {
                    let mut id = namespace.clone();
                    id.push(child);
                    namespaces.push(id);
                }
            }
        }
        tables.truncate(limit);
        tables
    }

    async fn list_in(&self, namespace: &[String], limit: usize, tables: &mut Vec<TableId>) {
        let mut token = None;
        loop {
            let mut request = ListTablesRequest::new();
            request.id = Some(namespace.to_vec());
            request.page_token = token.take();
            let Ok(page) = self.namespace.list_tables(request).await else {
                return;
            };
            for name in page.tables {
                let mut id = namespace.to_vec();
                id.push(name);
                tables.push(TableId(id));
            }
            match page.page_token.filter(|t| !t.is_empty()) {
                Some(next) if tables.len() < limit => token = Some(next),
                _ => return,
            }
        }
    }

    /// The table's location (URI), or why it cannot be found.
    pub async fn locate(&self, id: &TableId) -> Result<String, Error> {
        let mut request = DescribeTableRequest::new();
        request.id = Some(id.0.clone());
        request.vend_credentials = Some(false);
        let response = self
            .namespace
            .describe_table(request)
            .await
            .map_err(|err| {
                let err = Error::from_lance(err, &format!("table '{}'", id.display()));
                if matches!(err, Error::Internal(_)) {
                    tracing::warn!(table = %id.display(), error = %err, "describe_table failed");
                }
                err
            })?;
        response
            .location
            .or(response.table_uri)
            .ok_or_else(|| Error::not_found(Missing::Table, format!("table '{}'", id.display())))
    }

    fn builder(&self, uri: &str) -> DatasetBuilder {
        DatasetBuilder::from_uri(uri)
            .with_storage_options(self.storage_options.clone())
            .with_session(self.session.clone())
    }

    /// The latest version of a table, on `branch` (None or "main" = main).
    pub async fn latest(&self, uri: &str, branch: Option<&str>) -> lance::Result<Dataset> {
        match branch_name(branch) {
            Some(branch) => self.builder(uri).with_branch(branch, None).load().await,
            None => self.builder(uri).load().await,
        }
    }

    /// A table at a fixed version; cached, since it can never change.
    pub async fn at_version(
        &self,
        uri: &str,
        branch: Option<&str>,
        version: u64,
    ) -> lance::Result<Arc<Dataset>> {
        let key = pin_key(uri, branch, version);
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        // One load per key at a time: the tasks of a job all start together
        // and would otherwise each read the same manifest.
        let _loading = self.loading.lock().await;
        if let Some(found) = self.cached(&key) {
            return Ok(found);
        }
        let dataset = match branch_name(branch) {
            Some(branch) => {
                self.builder(uri)
                    .with_branch(branch, Some(version))
                    .load()
                    .await?
            }
            None => self.builder(uri).with_version(version).load().await?,
        };
        let dataset = Arc::new(dataset);
        self.remember(key, dataset.clone());
        Ok(dataset)
    }

    /// Keeps a dataset just opened at its version (the API's read of the
    /// latest version is the version its job's tasks read).
    pub fn pin(&self, uri: &str, branch: Option<&str>, dataset: Arc<Dataset>) {
        let key = pin_key(uri, branch, dataset.manifest().version);
        self.remember(key, dataset);
    }

    fn remember(&self, key: String, dataset: Arc<Dataset>) {
        let mut pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned.retain(|(k, _)| k != &key);
        pinned.push((key, dataset));
        if pinned.len() > PINNED_CACHE_SIZE {
            pinned.remove(0);
        }
    }

    fn cached(&self, key: &str) -> Option<Arc<Dataset>> {
        let pinned = self.pinned.lock().unwrap_or_else(|p| p.into_inner());
        pinned
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, dataset)| dataset.clone())
    }
}

fn pin_key(uri: &str, branch: Option<&str>, version: u64) -> String {
    format!(
        "{uri}\u{1f}{}\u{1f}{version}",
        branch_name(branch).unwrap_or("")
    )
}

/// "main" and no branch are the same thing.
pub fn branch_name(branch: Option<&str>) -> Option<&str> {
    branch.filter(|b| !b.is_empty() && *b != "main")
}

fn normalize_root(root: &str) -> String {
    let trimmed = root.trim_end_matches('/');
    if trimmed.contains("://") {
        return trimmed.to_string();
    }
    // Relative paths are resolved now so every process agrees on the location.
    match std::path::absolute(trimmed) {
        Ok(path) => path.to_string_lossy().into_owned(),
        Err(_) => trimmed.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ids_with_any_delimiter() {
        assert_eq!(
            TableId::parse("ns$items", "$").unwrap().0,
            vec!["ns", "items"]
        );
        assert_eq!(TableId::parse("items", "$").unwrap().0, vec!["items"]);
        assert_eq!(TableId::parse("a.b.c", ".").unwrap().0, vec!["a", "b", "c"]);
        assert!(matches!(
            TableId::parse("$", "$"),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            TableId::parse("a$$b", "$"),
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            TableId::parse("a", ""),
            Err(Error::InvalidInput(_))
        ));
    }

    #[test]
    fn keys_round_trip() {
        let id = TableId(vec!["a$b".into(), "c".into()]);
        assert_eq!(TableId::from_key(&id.key()), id);
    }

    #[test]
    fn no_two_ids_share_a_key() {
        let joined = TableId::from_parts(vec!["a\u{1f}b".into()], "id");
        assert!(matches!(joined, Err(Error::InvalidInput(_))));
        assert!(TableId::from_parts(vec!["a".into(), "b".into()], "id").is_ok());
        assert!(TableId::from_parts(vec!["x".repeat(300)], "id").is_err());
        assert!(TableId::from_parts(vec!["p".into(); 65], "id").is_err());
    }
}
