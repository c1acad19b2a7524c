//! What a maintained column needs at the latest version: the fragments
//! appended since its last DONE job (their ids are above the highest it
//! covered), and the fragments whose inputs changed since the version that
//! job took it to (rows an update rewrote, columns it reads replaced in
//! place), which are filled whole.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;

use lance::Dataset;

use super::Maintained;
use crate::model::error::Error;
use crate::ports::store::ColumnWatermark;
use crate::run::live::history::{self, ChangeKind};

/// Fragments a job refills by name at most; past this many, every
/// fragment is refilled (a job's plan and record stay small).
pub const MAX_REFILL_FRAGMENTS: usize = 10_000;

/// A maintained column's job to make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    /// Fragments with this id or above (`None`: every fragment).
    pub first_fragment: Option<u64>,
    /// The highest fragment id at the latest version.
    pub last_fragment: u64,
    /// Fragments below `first_fragment` to fill whole; `refill_all`:
    /// every fragment is filled whole.
    pub refill: Vec<u64>,
    pub refill_all: bool,
}

impl Due {
    /// What the column needs at `latest`; `None`: nothing.
    pub(crate) async fn of(
        latest: &Arc<Dataset>,
        column: &Maintained,
        mark: &ColumnWatermark,
    ) -> Result<Option<Self>, Error> {
        let alive: HashSet<u64> = latest
            .get_fragments()
            .iter()
            .map(|f| f.id() as u64)
            .collect();
        let Some(last_fragment) = alive.iter().max().copied() else {
            return Ok(None);
        };
        let appended = mark.through_fragment.is_none_or(|t| last_fragment > t);
        let (mut refill, refill_all) = match mark.through_version {
            Some(version) if version < latest.manifest().version => {
                refill_since(latest, version, &column.input_fields).await?
            }
            _ => (BTreeSet::new(), false),
        };
        refill.retain(|id| alive.contains(id));
        let refill_all = refill_all || refill.len() > MAX_REFILL_FRAGMENTS;
        if !appended && refill.is_empty() && !refill_all {
            return Ok(None);
        }
        Ok(Some(Self {
            first_fragment: mark.through_fragment.filter(|_| !refill_all).map(|t| t + 1),
            last_fragment,
            refill: if refill_all {
                Vec::new()
            } else {
                refill.into_iter().collect()
            },
            refill_all,
        }))
    }
}

/// Fragments whose `inputs` changed after `version` (and whether all
/// may have): rows an update rewrote are in its new fragments; columns
/// replaced in place change theirs; a compaction moves a changed
/// fragment's rows into its new fragments.
async fn refill_since(
    latest: &Arc<Dataset>,
    version: u64,
    inputs: &[i32],
) -> Result<(BTreeSet<u64>, bool), Error> {
    let changes = history::changes_since(latest, version)
        .await
        .map_err(|err| Error::transient(format!("reading the table's history: {err:#}")))?;
    let mut refill = BTreeSet::new();
    let reads = |fields: &Option<Vec<i32>>| {
        fields
            .as_ref()
            .is_none_or(|fields| fields.iter().any(|f| inputs.contains(f)))
    };
    for change in changes {
        match change.kind {
            ChangeKind::Updated {
                touched,
                removed,
                new_fragments,
                in_place,
            } => {
                refill.extend(new_fragments.iter().map(|(id, _)| *id));
                if in_place.iter().any(|f| inputs.contains(f)) {
                    refill.extend(touched);
                }
                for id in removed {
                    refill.remove(&id);
                }
            }
            ChangeKind::Replaced { fragments, fields } if reads(&fields) => match fragments {
                Some(ids) => refill.extend(ids),
                None => return Ok((refill, true)),
            },
            ChangeKind::Rewritten { groups } => {
                for group in groups {
                    let moved = group
                        .old
                        .iter()
                        .filter(|old| refill.remove(&old.id))
                        .count();
                    if moved > 0 {
                        refill.extend(group.new.iter().map(|(id, _)| *id));
                    }
                }
            }
            ChangeKind::Deleted { removed } => {
                for id in removed {
                    refill.remove(&id);
                }
            }
            ChangeKind::Reset { .. } => return Ok((refill, true)),
            _ => {}
        }
    }
    Ok((refill, false))
}
