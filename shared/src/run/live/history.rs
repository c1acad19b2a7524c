//! What happened to a table between two versions, read from the
//! transaction file each version recorded: which fragments a compaction
//! rewrote into which (with the rows each had deleted, so moved rows can be
//! followed), which rows an update rewrote into new fragments, which
//! fragments a delete removed, which had files replaced in place, and
//! whether the table was overwritten.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use anyhow::Context;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use lance::dataset::transaction::{Operation, UpdateMode};
use lance::table::format::Fragment;

/// One version's change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub version: u64,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    /// Fragments rewritten into others with their rows in the same order,
    /// deleted rows dropped (compaction).
    Rewritten { groups: Vec<Rewrite> },
    /// Rows rewritten by an update: `touched` fragments lost them (the
    /// fragments in `removed` all of their rows), and they are in
    /// `new_fragments` (id, physical rows) now. `in_place` lists fields the
    /// update rewrote inside `touched` fragments instead (their files
    /// changed).
    Updated {
        touched: Vec<u64>,
        removed: Vec<u64>,
        new_fragments: Vec<(u64, u64)>,
        in_place: Vec<i32>,
    },
    /// Rows deleted; the fragments in `removed` lost all of theirs.
    Deleted { removed: Vec<u64> },
    /// The files (or overlaid values) of `fields` changed in place in
    /// `fragments` (`None`: in any fragment).
    Replaced {
        fragments: Option<Vec<u64>>,
        fields: Option<Vec<i32>>,
    },
    /// The schema changed (columns dropped, renamed, altered or added).
    SchemaChanged,
    /// The table was overwritten, or restored to an earlier version: no
    /// row stayed where it was.
    Reset { how: String },
    /// Rows appended, an index built, settings changed: nothing moved.
    Unmoved,
}

/// Old fragments rewritten, in order, into new ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Rewrite {
    pub old: Vec<OldFragment>,
    /// (id, physical rows) of each new fragment, in order.
    pub new: Vec<(u64, u64)>,
}

/// A fragment as a rewrite read it.
#[derive(Debug, Clone, PartialEq)]
pub struct OldFragment {
    pub id: u64,
    pub physical_rows: u64,
    /// Offsets of its rows deleted then: the rewrite dropped them.
    pub deleted: BTreeSet<u32>,
}

impl OldFragment {
    /// Its rows the rewrite kept, in order.
    pub fn live_rows(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.physical_rows as u32).filter(|row| !self.deleted.contains(row))
    }
}

/// The changes of the versions after `after` up to `latest`'s, in order.
pub async fn changes_since(latest: &Arc<Dataset>, after: u64) -> anyhow::Result<Vec<Change>> {
    let mut changes = Vec::new();
    for version in after + 1..=latest.manifest().version {
        let transaction = latest
            .read_transaction_by_version(version)
            .await
            .with_context(|| format!("reading the transaction of version {version}"))?;
        let kind = match transaction {
            Some(transaction) => kind_of(latest, version, transaction.operation).await?,
            // No transaction file (very old writers): what changed is what
            // differs from the version before.
            None => files_replaced(latest, version).await?,
        };
        changes.push(Change { version, kind });
    }
    Ok(changes)
}

async fn kind_of(
    latest: &Arc<Dataset>,
    version: u64,
    operation: Operation,
) -> anyhow::Result<ChangeKind> {
    Ok(match operation {
        Operation::Rewrite { groups, .. } => rewritten(latest, groups).await?,
        operation @ Operation::Update { .. } => updated(latest, version, operation).await?,
        Operation::Delete {
            deleted_fragment_ids,
            ..
        } => ChangeKind::Deleted {
            removed: deleted_fragment_ids,
        },
        Operation::DataReplacement { replacements } => ChangeKind::Replaced {
            fields: Some(
                replacements
                    .iter()
                    .flat_map(|r| r.1.fields.iter().copied())
                    .collect(),
            ),
            fragments: Some(replacements.iter().map(|r| r.0).collect()),
        },
        Operation::DataOverlay { groups } => ChangeKind::Replaced {
            fragments: Some(groups.iter().map(|g| g.fragment_id).collect()),
            fields: None,
        },
        // A merge carries the whole fragment list: existing fragments may
        // have had files rewritten (most often they only gained one).
        Operation::Merge { .. } | Operation::Unknown { .. } => {
            files_replaced(latest, version).await?
        }
        Operation::Project { .. } => ChangeKind::SchemaChanged,
        Operation::Overwrite { .. } => ChangeKind::Reset {
            how: format!("the table was overwritten at version {version}"),
        },
        Operation::Restore { version: to } => ChangeKind::Reset {
            how: format!("the table was restored to version {to} at version {version}"),
        },
        Operation::Clone { .. } => ChangeKind::Reset {
            how: format!("the table was replaced by a clone at version {version}"),
        },
        Operation::Append { .. }
        | Operation::CreateIndex { .. }
        | Operation::ReserveFragments { .. }
        | Operation::UpdateConfig { .. }
        | Operation::UpdateMemWalState { .. }
        | Operation::UpdateBases { .. } => ChangeKind::Unmoved,
    })
}

/// A compaction's groups, with the rows each old fragment had deleted.
async fn rewritten(
    latest: &Arc<Dataset>,
    groups: Vec<lance::dataset::transaction::RewriteGroup>,
) -> anyhow::Result<ChangeKind> {
    let mut rewrites = Vec::with_capacity(groups.len());
    for group in groups {
        rewrites.push(Rewrite {
            old: old_fragments(latest, group.old_fragments).await?,
            new: group
                .new_fragments
                .iter()
                .map(|f| (f.id, f.physical_rows.unwrap_or(0) as u64))
                .collect(),
        });
    }
    Ok(ChangeKind::Rewritten { groups: rewrites })
}

/// An update: rows rewritten into new fragments (their final ids looked
/// up in the version it made), or columns rewritten in place.
async fn updated(
    latest: &Arc<Dataset>,
    version: u64,
    operation: Operation,
) -> anyhow::Result<ChangeKind> {
    let Operation::Update {
        removed_fragment_ids,
        updated_fragments,
        new_fragments,
        fields_modified,
        update_mode,
        ..
    } = operation
    else {
        return Ok(ChangeKind::Unmoved);
    };
    let in_place_mode = matches!(update_mode, Some(UpdateMode::RewriteColumns));
    let in_place = match in_place_mode {
        true => fields_modified.iter().map(|f| *f as i32).collect(),
        false => Vec::new(),
    };
    let new_fragments = if !in_place_mode && !new_fragments.is_empty() {
        final_ids(latest, version, &new_fragments).await?
    } else {
        Vec::new()
    };
    Ok(ChangeKind::Updated {
        touched: updated_fragments.iter().map(|f| f.id).collect(),
        removed: removed_fragment_ids,
        new_fragments,
        in_place,
    })
}

/// The fragments whose files `version` replaced (or removed), and the
/// fields of those files, from the version before.
async fn files_replaced(latest: &Arc<Dataset>, version: u64) -> anyhow::Result<ChangeKind> {
    if version <= 1 {
        return Ok(ChangeKind::Unmoved);
    }
    let before = latest
        .checkout_version(version - 1)
        .await
        .with_context(|| format!("opening version {}", version - 1))?;
    let after = latest
        .checkout_version(version)
        .await
        .with_context(|| format!("opening version {version}"))?;
    let earlier: HashMap<u64, &Fragment> = before.fragments().iter().map(|f| (f.id, f)).collect();
    let (mut fragments, mut fields) = (Vec::new(), BTreeSet::new());
    for fragment in after.fragments().iter() {
        let Some(old) = earlier.get(&fragment.id) else {
            continue;
        };
        let now: HashMap<&str, &[i32]> = fragment
            .files
            .iter()
            .map(|f| (f.path.as_str(), &f.fields[..]))
            .collect();
        let gone: Vec<&[i32]> = old
            .files
            .iter()
            .filter(|f| !now.contains_key(f.path.as_str()))
            .map(|f| &f.fields[..])
            .collect();
        if !gone.is_empty() {
            fragments.push(fragment.id);
            fields.extend(gone.into_iter().flatten().copied());
        }
    }
    Ok(if fragments.is_empty() {
        ChangeKind::Unmoved
    } else {
        ChangeKind::Replaced {
            fragments: Some(fragments),
            fields: Some(fields.into_iter().collect()),
        }
    })
}

/// The rewritten fragments with the rows each had deleted.
async fn old_fragments(
    latest: &Arc<Dataset>,
    fragments: Vec<Fragment>,
) -> anyhow::Result<Vec<OldFragment>> {
    let mut old = Vec::with_capacity(fragments.len());
    for fragment in fragments {
        let id = fragment.id;
        let physical_rows = fragment.physical_rows.unwrap_or(0) as u64;
        let deleted = match fragment.deletion_file {
            None => BTreeSet::new(),
            Some(_) => FileFragment::new(latest.clone(), fragment)
                .get_deletion_vector()
                .await
                .with_context(|| format!("reading the deletions of fragment {id}"))?
                .map(|dv| dv.to_sorted_iter().collect())
                .unwrap_or_default(),
        };
        old.push(OldFragment {
            id,
            physical_rows,
            deleted,
        });
    }
    Ok(old)
}

/// The ids the fragments an update wrote were given at commit (the
/// fragments of that version holding their files), with their rows.
async fn final_ids(
    latest: &Arc<Dataset>,
    version: u64,
    written: &[Fragment],
) -> anyhow::Result<Vec<(u64, u64)>> {
    let at = latest
        .checkout_version(version)
        .await
        .with_context(|| format!("opening version {version}"))?;
    let by_file: HashMap<&str, (u64, u64)> = at
        .fragments()
        .iter()
        .filter_map(|f| {
            let rows = f.physical_rows.unwrap_or(0) as u64;
            Some((f.files.first()?.path.as_str(), (f.id, rows)))
        })
        .collect();
    Ok(written
        .iter()
        .filter_map(|f| by_file.get(f.files.first()?.path.as_str()).copied())
        .collect())
}
