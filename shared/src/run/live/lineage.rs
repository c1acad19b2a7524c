//! Where a job's rows went while the table changed under it: a pure walk
//! of the table's changes ([`super::history`]) from the job's fragments.
//!
//! Each fragment holding rows of the job is followed. A compaction moves
//! a fragment's kept rows, in order, into the group's new fragments, so the
//! walk knows for each row of a new fragment which row of which of the
//! job's fragments it was, and values computed for that row can be put in
//! its new place. An update moves the rows it rewrites into new fragments
//! with no such record: they are computed again. A delete drops rows. What
//! the walk ends with: the job's fragments whose rows moved on before their
//! values were committed, the fragments now holding the job's rows (to
//! fill, or only to follow when their values are already in the table),
//! fragments whose files changed in place (the caller compares them), and
//! whether the table was reset or its schema changed.

use std::collections::{BTreeSet, HashMap};

use super::history::{Change, ChangeKind, Rewrite};

/// A fragment of the job, as the walk starts: the latest planning of a
/// Lance fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    /// The job's id of the fragment.
    pub key: u64,
    pub rows: u64,
    /// Its values are not in the table yet (open or staged).
    pub pending: bool,
}

/// A fragment of the latest version that now holds rows of the job.
#[derive(Debug, Clone, PartialEq)]
pub struct Added {
    pub id: u64,
    pub rows: u64,
    /// It holds rows an update rewrote: computed again whatever the
    /// default `where` says.
    pub refill: bool,
    /// Some of its rows need values (false: only followed).
    pub work: bool,
    /// Spans of its rows whose values the job already computed elsewhere.
    pub origins: Vec<Origin>,
}

/// Rows `[to, to + from.len())` of an added fragment are the rows `from`
/// of the job's fragment `unit`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub unit: u64,
    pub to: u64,
    pub from: Vec<u32>,
}

/// Which fragments may have had files replaced in place.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Replaced {
    #[default]
    None,
    Some(BTreeSet<u64>),
    All,
}

impl Replaced {
    fn add(&mut self, fragments: impl IntoIterator<Item = u64>) {
        match self {
            Self::All => {}
            Self::None => *self = Self::Some(fragments.into_iter().collect()),
            Self::Some(set) => set.extend(fragments),
        }
    }

    pub fn contains(&self, id: u64) -> bool {
        match self {
            Self::None => false,
            Self::Some(set) => set.contains(&id),
            Self::All => true,
        }
    }
}

/// What the walk found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Followed {
    /// Pending fragments of the job whose rows moved on (or were deleted).
    pub moved: Vec<u64>,
    pub added: Vec<Added>,
    pub replaced: Replaced,
    pub schema_changed: bool,
    /// The table was overwritten or restored: how.
    pub reset: Option<String>,
    /// Some change was another writer's (not the job's own commits).
    pub foreign: bool,
}

/// No value known for a row.
const NONE: u64 = u64::MAX;

/// A fragment followed during the walk.
struct Track {
    /// The job's fragment it is (`None`: a fragment the walk found).
    unit: Option<u64>,
    rows: u64,
    /// Per row, the packed (unit index, offset) its value comes from, or
    /// [`NONE`]; `None` for a unit (its own rows, if pending).
    origin: Option<Vec<u64>>,
    pending: bool,
    refill: bool,
}

struct Walk<'a> {
    tracks: HashMap<u64, Track>,
    /// Unit keys by index (packed into origins).
    keys: Vec<u64>,
    own_fields: &'a [i32],
    followed: Followed,
}

/// Follows `units` (by Lance fragment id) through `changes`. `own_fields`
/// are the fields the job fills: replacing them is the job's own commit.
pub fn follow(units: &HashMap<u64, Unit>, changes: &[Change], own_fields: &[i32]) -> Followed {
    let mut walk = Walk {
        tracks: HashMap::new(),
        keys: Vec::new(),
        own_fields,
        followed: Followed::default(),
    };
    for (id, unit) in units {
        walk.keys.push(unit.key);
        walk.tracks.insert(
            *id,
            Track {
                unit: Some(unit.key),
                rows: unit.rows,
                origin: None,
                pending: unit.pending,
                refill: false,
            },
        );
    }
    for change in changes {
        walk.apply(&change.kind);
        if walk.followed.reset.is_some() {
            break;
        }
    }
    walk.finish()
}

impl Walk<'_> {
    fn apply(&mut self, kind: &ChangeKind) {
        match kind {
            ChangeKind::Rewritten { groups } => {
                self.followed.foreign = true;
                for group in groups {
                    self.rewrite(group);
                }
            }
            ChangeKind::Updated {
                touched,
                removed,
                new_fragments,
                in_place,
            } => {
                self.followed.foreign = true;
                self.update(touched, removed, new_fragments, in_place);
            }
            ChangeKind::Deleted { removed } => {
                self.followed.foreign = true;
                for id in removed {
                    self.drop_fragment(*id);
                }
            }
            ChangeKind::Replaced { fragments, fields } => self.replaced(fragments, fields),
            ChangeKind::SchemaChanged => {
                self.followed.foreign = true;
                self.followed.schema_changed = true;
            }
            ChangeKind::Reset { how } => {
                self.followed.foreign = true;
                self.followed.reset = Some(how.clone());
            }
            ChangeKind::Unmoved => self.followed.foreign = true,
        }
    }

    /// The value's origin of `row` of a followed fragment.
    fn origin_at(&self, track: &Track, row: u32) -> u64 {
        match (&track.origin, track.unit) {
            (Some(origin), _) => origin.get(row as usize).copied().unwrap_or(NONE),
            (None, Some(key)) if track.pending => {
                let index = self.keys.iter().position(|k| *k == key).unwrap_or(0) as u64;
                (index << 32) | row as u64
            }
            (None, _) => NONE,
        }
    }

    fn rewrite(&mut self, group: &Rewrite) {
        let mut rows: Vec<u64> = Vec::new();
        let (mut ours, mut pending, mut refill) = (false, false, false);
        for old in &group.old {
            match self.tracks.remove(&old.id) {
                Some(track) => {
                    ours = true;
                    pending |= track.pending;
                    refill |= track.refill;
                    if let (Some(key), true) = (track.unit, track.pending) {
                        self.followed.moved.push(key);
                    }
                    rows.extend(old.live_rows().map(|row| self.origin_at(&track, row)));
                }
                None => rows.extend(old.live_rows().map(|_| NONE)),
            }
        }
        if !ours {
            return;
        }
        let total: u64 = group.new.iter().map(|(_, rows)| rows).sum();
        if total != rows.len() as u64 {
            // Not a plain rewrite of the kept rows: values cannot follow.
            rows = vec![NONE; total as usize];
        }
        let mut at = 0usize;
        for (id, count) in &group.new {
            let end = at + *count as usize;
            let track = Track {
                unit: None,
                rows: *count,
                origin: Some(rows[at..end].to_vec()),
                pending,
                refill,
            };
            self.tracks.insert(*id, track);
            at = end;
        }
    }

    fn update(
        &mut self,
        touched: &[u64],
        removed: &[u64],
        new_fragments: &[(u64, u64)],
        in_place: &[i32],
    ) {
        let ours = touched
            .iter()
            .chain(removed)
            .any(|id| self.tracks.contains_key(id));
        for id in removed {
            self.drop_fragment(*id);
        }
        if !ours {
            return;
        }
        if !in_place.is_empty() {
            let touched_ours: Vec<u64> = touched
                .iter()
                .copied()
                .filter(|id| self.tracks.contains_key(id))
                .collect();
            self.followed.replaced.add(touched_ours);
        }
        for (id, rows) in new_fragments {
            let track = Track {
                unit: None,
                rows: *rows,
                origin: None,
                pending: true,
                refill: true,
            };
            self.tracks.insert(*id, track);
        }
    }

    /// A fragment whose rows are all gone.
    fn drop_fragment(&mut self, id: u64) {
        if let Some(track) = self.tracks.remove(&id)
            && let (Some(key), true) = (track.unit, track.pending)
        {
            self.followed.moved.push(key);
        }
    }

    fn replaced(&mut self, fragments: &Option<Vec<u64>>, fields: &Option<Vec<i32>>) {
        let own = fields
            .as_ref()
            .is_some_and(|fields| fields.iter().all(|f| self.own_fields.contains(f)));
        if own {
            return;
        }
        self.followed.foreign = true;
        match fragments {
            Some(ids) => {
                let ours: Vec<u64> = ids
                    .iter()
                    .copied()
                    .filter(|id| self.tracks.contains_key(id))
                    .collect();
                self.followed.replaced.add(ours);
            }
            None => self.followed.replaced = Replaced::All,
        }
    }

    fn finish(mut self) -> Followed {
        let mut added: Vec<Added> = Vec::new();
        for (id, track) in &self.tracks {
            if track.unit.is_some() {
                continue;
            }
            let origins = match &track.origin {
                Some(origin) if track.pending => spans(origin, &self.keys),
                _ => Vec::new(),
            };
            added.push(Added {
                id: *id,
                rows: track.rows,
                refill: track.refill,
                work: track.pending,
                origins,
            });
        }
        added.sort_by_key(|a| a.id);
        self.followed.moved.sort_unstable();
        self.followed.moved.dedup();
        self.followed.added = added;
        self.followed
    }
}

/// Runs of consecutive rows whose values come from one unit.
fn spans(origin: &[u64], keys: &[u64]) -> Vec<Origin> {
    let mut spans: Vec<Origin> = Vec::new();
    for (row, packed) in origin.iter().enumerate() {
        if *packed == NONE {
            continue;
        }
        let unit = keys[(*packed >> 32) as usize];
        let offset = (*packed & u32::MAX as u64) as u32;
        match spans.last_mut() {
            Some(last) if last.unit == unit && last.to + last.from.len() as u64 == row as u64 => {
                last.from.push(offset)
            }
            _ => spans.push(Origin {
                unit,
                to: row as u64,
                from: vec![offset],
            }),
        }
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::super::history::OldFragment;
    use super::*;

    fn unit(key: u64, rows: u64, pending: bool) -> Unit {
        Unit { key, rows, pending }
    }

    fn old(id: u64, rows: u64, deleted: &[u32]) -> OldFragment {
        OldFragment {
            id,
            physical_rows: rows,
            deleted: deleted.iter().copied().collect(),
        }
    }

    fn at(version: u64, kind: ChangeKind) -> Change {
        Change { version, kind }
    }

    #[test]
    fn a_compaction_moves_pending_rows_with_their_values_and_follows_finished_ones() {
        // Fragments 0 (staged, 4 rows, row 1 deleted) and 1 (committed, 3
        // rows) and 2 (not the job's, 2 rows) compacted into 7 (5 rows)
        // and 8 (3 rows).
        let units = HashMap::from([(0, unit(0, 4, true)), (1, unit(1, 3, false))]);
        let compaction = ChangeKind::Rewritten {
            groups: vec![Rewrite {
                old: vec![old(0, 4, &[1]), old(1, 3, &[]), old(2, 2, &[])],
                new: vec![(7, 5), (8, 3)],
            }],
        };
        let followed = follow(&units, &[at(3, compaction)], &[9]);
        assert_eq!(followed.moved, vec![0]);
        assert!(followed.foreign);
        assert_eq!(followed.added.len(), 2);
        let seven = &followed.added[0];
        assert_eq!(
            (seven.id, seven.rows, seven.work, seven.refill),
            (7, 5, true, false)
        );
        assert_eq!(
            seven.origins,
            vec![Origin {
                unit: 0,
                to: 0,
                from: vec![0, 2, 3]
            }],
            "the kept rows of fragment 0, in order; fragment 1's are in the table"
        );
        assert_eq!((followed.added[1].id, followed.added[1].work), (8, true));
        assert!(followed.added[1].origins.is_empty());
    }

    #[test]
    fn a_compaction_of_finished_fragments_is_only_followed_and_an_update_then_refills() {
        let units = HashMap::from([(0, unit(0, 2, false)), (1, unit(1, 2, false))]);
        let changes = [
            at(
                4,
                ChangeKind::Rewritten {
                    groups: vec![Rewrite {
                        old: vec![old(0, 2, &[]), old(1, 2, &[])],
                        new: vec![(5, 4)],
                    }],
                },
            ),
            at(
                6,
                ChangeKind::Updated {
                    touched: vec![5],
                    removed: vec![],
                    new_fragments: vec![(6, 1)],
                    in_place: vec![],
                },
            ),
        ];
        let followed = follow(&units, &changes, &[9]);
        assert!(
            followed.moved.is_empty(),
            "committed values are in the table"
        );
        let by_id: HashMap<u64, &Added> = followed.added.iter().map(|a| (a.id, a)).collect();
        assert!(!by_id[&5].work, "compacted finished rows are only followed");
        assert!(
            by_id[&6].work && by_id[&6].refill,
            "updated rows are computed again"
        );
    }

    #[test]
    fn values_follow_two_compactions_in_a_row() {
        let units = HashMap::from([(3, unit(30, 3, true))]);
        let changes = [
            at(
                2,
                ChangeKind::Rewritten {
                    groups: vec![Rewrite {
                        old: vec![old(1, 2, &[]), old(3, 3, &[0])],
                        new: vec![(4, 4)],
                    }],
                },
            ),
            at(3, ChangeKind::Deleted { removed: vec![] }),
            at(
                4,
                ChangeKind::Rewritten {
                    groups: vec![Rewrite {
                        old: vec![old(4, 4, &[0])],
                        new: vec![(5, 3)],
                    }],
                },
            ),
        ];
        let followed = follow(&units, &changes, &[]);
        assert_eq!(followed.moved, vec![30]);
        assert_eq!(followed.added.len(), 1);
        assert_eq!(followed.added[0].id, 5);
        assert_eq!(
            followed.added[0].origins,
            vec![Origin {
                unit: 30,
                to: 1,
                from: vec![1, 2]
            }]
        );
    }

    #[test]
    fn deletes_updates_and_other_writers_columns() {
        let units = HashMap::from([
            (0, unit(0, 5, true)),
            (1, unit(1, 5, true)),
            (2, unit(2, 5, false)),
        ]);
        let changes = [
            at(2, ChangeKind::Deleted { removed: vec![0] }),
            at(
                3,
                ChangeKind::Updated {
                    touched: vec![1],
                    removed: vec![],
                    new_fragments: vec![(9, 2)],
                    in_place: vec![],
                },
            ),
            at(
                4,
                ChangeKind::Replaced {
                    fragments: Some(vec![2]),
                    fields: Some(vec![7]),
                },
            ),
            at(
                5,
                ChangeKind::Replaced {
                    fragments: Some(vec![1]),
                    fields: Some(vec![3]),
                },
            ),
        ];
        let followed = follow(&units, &changes, &[3]);
        assert_eq!(followed.moved, vec![0], "a fragment deleted whole moves on");
        assert_eq!(followed.added.len(), 1);
        assert!(followed.added[0].refill && followed.added[0].work);
        assert!(
            followed.replaced.contains(2),
            "another writer replaced field 7"
        );
        assert!(!followed.replaced.contains(1), "field 3 is the job's own");
    }

    #[test]
    fn a_reset_stops_the_walk_and_changes_of_other_fragments_are_ignored() {
        let units = HashMap::from([(0, unit(0, 5, true))]);
        let changes = [
            at(
                2,
                ChangeKind::Rewritten {
                    groups: vec![Rewrite {
                        old: vec![old(4, 2, &[])],
                        new: vec![(6, 2)],
                    }],
                },
            ),
            at(
                3,
                ChangeKind::Reset {
                    how: "overwritten".into(),
                },
            ),
        ];
        let followed = follow(&units, &changes, &[]);
        assert!(followed.added.is_empty(), "fragment 4 was not the job's");
        assert_eq!(followed.reset.as_deref(), Some("overwritten"));
    }

    #[test]
    fn a_rewrite_that_does_not_keep_the_rows_loses_their_values_not_the_rows() {
        let units = HashMap::from([(0, unit(0, 4, true))]);
        let odd = ChangeKind::Rewritten {
            groups: vec![Rewrite {
                old: vec![old(0, 4, &[])],
                new: vec![(5, 3)],
            }],
        };
        let followed = follow(&units, &[at(2, odd)], &[]);
        assert_eq!(followed.added[0].rows, 3);
        assert!(followed.added[0].work && followed.added[0].origins.is_empty());
    }
}
