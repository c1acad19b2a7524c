//! Live tables: a job follows its table while other writers change it.
//!
//! Before each commit (and before the job ends) its committer reconciles
//! the job with the latest version: it reads the changes made since it
//! last looked ([`history`]), follows the job's rows through them
//! ([`lineage`]), and changes the job's plan to match. Fragments whose rows
//! a compaction or an update moved are marked moved; the fragments now
//! holding those rows are added to the job at the latest version, with the
//! values already computed for moved rows carried to their new places as
//! checkpoints ([`carry`]); fragments whose inputs another writer rewrote
//! in place are planned again. Fragments that only lost rows (deletes), or
//! gained columns, stay as they are: their staged files are committed on
//! top of the latest version. A table overwritten or restored, or a column
//! of the job dropped or altered, fails the job.

pub mod carry;
pub mod history;
pub mod lineage;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Context;
use lance::Dataset;
use tracing::{info, warn};

use crate::model::job::{Counter, Job, MetricsDelta};
use crate::model::plan::{self, PlannedFragment, ReadAt, job_fragment, lance_fragment};
use crate::model::table::Catalog;
use crate::ports::queue::{Message, Outgoing, QueueSet};
use crate::ports::store::{FragmentStatus, JobStore, PlanChange, Replanned, StagedFragment};
use crate::run::checkpoint::{FragmentCheckpoints, Key};
use crate::run::computed::{Program, TargetColumn};
use crate::run::staging::{delete_data_file, describe_fragments};
use carry::{Destination, Values};
use history::{Change, ChangeKind};
use lineage::{Added, Followed, Replaced, Unit};

/// Follows jobs' tables for the committer.
#[derive(Clone)]
pub struct Reconciler {
    store: Arc<dyn JobStore>,
    catalog: Arc<Catalog>,
    queues: QueueSet,
}

/// Where a job stands with its table.
pub enum Reconciled {
    /// The job's plan matches the latest version, returned.
    Current(Arc<Dataset>),
    /// The table changed in a way the job cannot follow: why.
    Failed(String),
}

/// A fragment of the job as reconciling sees it.
#[derive(Debug, Clone)]
struct JobFragment {
    planned: PlannedFragment,
    /// Followed only (nothing to compute).
    followed: bool,
}

/// The fields a job reads: those it fills and its inputs (the `where`'s
/// columns included), by id at its read version.
struct JobFields {
    targets: Vec<i32>,
    inputs: Vec<i32>,
    /// Top-level columns read, by name, with their ids and types.
    columns: Vec<(String, i32, arrow_schema::DataType, bool)>,
}

impl Reconciler {
    pub fn new(store: Arc<dyn JobStore>, catalog: Arc<Catalog>, queues: QueueSet) -> Self {
        Self {
            store,
            catalog,
            queues,
        }
    }

    /// Brings the job's plan up to the latest version of its table.
    pub async fn reconcile(&self, job: &Job) -> anyhow::Result<Reconciled> {
        let spec = &job.spec;
        let latest = Arc::new(
            self.catalog
                .latest(&spec.table_uri, spec.branch.as_deref())
                .await
                .context("opening the latest version")?,
        );
        let seen = job
            .metrics
            .get(Counter::HistoryVersion)
            .max(spec.read_version);
        let version = latest.manifest().version;
        if version <= seen {
            return Ok(Reconciled::Current(latest));
        }
        let changes = history::changes_since(&latest, seen).await?;
        let read = spec.read_dataset(&self.catalog).await?;
        let targets = target_ids(job, &read);
        if changes.iter().all(|c| moves_nothing(&c.kind, &targets)) {
            let foreign = changes
                .iter()
                .any(|c| matches!(c.kind, ChangeKind::Unmoved));
            self.seen(job, version, foreign).await?;
            return Ok(Reconciled::Current(latest));
        }
        let fields = JobFields::of(job, &read)?;
        let fragments = self.job_fragments(job, &read).await?;
        let units = self.units(job, &fragments, &changes).await?;
        let followed = lineage::follow(&units, &changes, &fields.targets);
        if let Some(how) = &followed.reset {
            return Ok(Reconciled::Failed(format!(
                "{how}; the job's rows are no longer where it read them, so nothing more of \
                 it is committed: submit the backfill again"
            )));
        }
        if let Some(reason) = fields.gone_at(&latest, spec.read_version) {
            return Ok(Reconciled::Failed(reason));
        }
        let rewired = self
            .rewired(job, &fragments, &followed.replaced, &fields, &latest)
            .await?;
        let foreign = followed.foreign;
        self.apply(job, &latest, &fragments, followed, rewired)
            .await?;
        self.seen(job, version, foreign).await?;
        Ok(Reconciled::Current(latest))
    }

    /// Records that the job has taken the table's changes up to `version`
    /// into account (and that another writer made some, if `foreign`).
    async fn seen(&self, job: &Job, version: u64, foreign: bool) -> anyhow::Result<()> {
        let set = |counter: Counter| version as i64 - job.metrics.get(counter) as i64;
        let mut delta =
            MetricsDelta::new().add(Counter::HistoryVersion, set(Counter::HistoryVersion));
        if foreign {
            delta = delta.add(Counter::ForeignVersion, set(Counter::ForeignVersion));
        }
        self.store.add_metrics(&job.job_id, &delta).await?;
        Ok(())
    }

    /// The job's fragments by Lance id: its latest planning of each.
    async fn job_fragments(
        &self,
        job: &Job,
        read: &Dataset,
    ) -> anyhow::Result<HashMap<u64, JobFragment>> {
        let mut fragments: HashMap<u64, JobFragment> = plan::fragments(read, job.spec.selection())
            .await?
            .into_iter()
            .map(|planned| {
                let followed = false;
                (planned.lance_id(), JobFragment { planned, followed })
            })
            .collect();
        for replanned in self.store.replanned_fragments(&job.job_id).await? {
            let planned = replanned.fragment;
            let later = fragments
                .get(&planned.lance_id())
                .is_none_or(|known| planned.id > known.planned.id);
            if later {
                let followed = !replanned.work;
                fragments.insert(planned.lance_id(), JobFragment { planned, followed });
            }
        }
        Ok(fragments)
    }

    /// The walk's view of the job's fragments: whether the values of those
    /// the changes touch are in the table yet.
    async fn units(
        &self,
        job: &Job,
        fragments: &HashMap<u64, JobFragment>,
        changes: &[Change],
    ) -> anyhow::Result<HashMap<u64, Unit>> {
        let touched: Vec<u64> = moved_ids(changes)
            .into_iter()
            .filter_map(|id| fragments.get(&id))
            .filter(|f| !f.followed)
            .map(|f| f.planned.id)
            .collect();
        let statuses = self.store.fragment_statuses(&job.job_id, &touched).await?;
        Ok(fragments
            .iter()
            .map(|(id, f)| {
                let pending = statuses
                    .get(&f.planned.id)
                    .is_some_and(|s| matches!(s, FragmentStatus::Open | FragmentStatus::Staged));
                let unit = Unit {
                    key: f.planned.id,
                    rows: f.planned.physical_rows,
                    pending,
                };
                (*id, unit)
            })
            .collect())
    }

    /// The job's fragments whose files another writer replaced in place:
    /// planned again, whole when their inputs changed. Returns them with
    /// whether they were pending (their staged file is then no longer
    /// the job's to commit) and whether their inputs changed.
    async fn rewired(
        &self,
        job: &Job,
        fragments: &HashMap<u64, JobFragment>,
        replaced: &Replaced,
        fields: &JobFields,
        latest: &Dataset,
    ) -> anyhow::Result<Vec<(PlannedFragment, bool, bool)>> {
        let mut changed = Vec::new();
        for (id, fragment) in fragments {
            if !replaced.contains(*id) || fragment.followed {
                continue;
            }
            let Some(now) = latest.get_fragment(*id as usize) else {
                continue;
            };
            let base = self.dataset_at(job, &fragment.planned.at).await?;
            let Some(then) = base.get_fragment(*id as usize) else {
                continue;
            };
            let inputs = files_of(&then, &fields.inputs) != files_of(&now, &fields.inputs);
            let targets = files_of(&then, &fields.targets) != files_of(&now, &fields.targets);
            if inputs || targets {
                changed.push((fragment.planned, inputs, targets));
            }
        }
        let keys: Vec<u64> = changed.iter().map(|(p, ..)| p.id).collect();
        let statuses = self.store.fragment_statuses(&job.job_id, &keys).await?;
        Ok(changed
            .into_iter()
            .filter_map(|(planned, inputs, targets)| {
                let status = statuses
                    .get(&planned.id)
                    .copied()
                    .unwrap_or(FragmentStatus::Open);
                let pending = !status.is_finished() && status != FragmentStatus::Moved;
                // A finished fragment's own commit changed its target files.
                (inputs || (pending && targets)).then_some((planned, pending, inputs))
            })
            .collect())
    }

    async fn dataset_at(&self, job: &Job, at: &ReadAt) -> anyhow::Result<Arc<Dataset>> {
        let spec = &job.spec;
        self.catalog
            .at_version(
                &spec.table_uri,
                spec.branch.as_deref(),
                at.version_or(spec.read_version),
            )
            .await
            .context("opening a version the job read")
    }

    /// Records the change of plan, carries computed values, removes files
    /// no longer to be committed and queues the new fragments' tasks.
    async fn apply(
        &self,
        job: &Job,
        latest: &Arc<Dataset>,
        fragments: &HashMap<u64, JobFragment>,
        followed: Followed,
        rewired: Vec<(PlannedFragment, bool, bool)>,
    ) -> anyhow::Result<()> {
        let version = latest.manifest().version;
        let mut change = self.plan_change(job, latest, &followed, &rewired);
        change
            .moved
            .extend(rewired.iter().filter(|(_, p, _)| *p).map(|(f, ..)| f.id));
        if !followed.added.is_empty() || !change.moved.is_empty() {
            let carried = self
                .carry_values(job, latest, fragments, &followed.added, &change.added)
                .await?;
            let changed = self.store.change_plan(&job.job_id, &change).await?;
            let read = job.spec.read_dataset(&self.catalog).await?;
            for (_, staged) in &changed.moved {
                if let Some(staged) = staged {
                    delete_data_file(&read, staged).await;
                }
            }
            self.queue(job, &change.added).await?;
            self.note(job, version, &change, carried).await?;
        }
        Ok(())
    }

    /// The fragments to add: those now holding the job's rows, and those
    /// planned again in place (the next generation of their id).
    fn plan_change(
        &self,
        job: &Job,
        latest: &Dataset,
        followed: &Followed,
        rewired: &[(PlannedFragment, bool, bool)],
    ) -> PlanChange {
        let version = Some(latest.manifest().version);
        let mut planned: Vec<(PlannedFragment, bool)> = Vec::new();
        for added in &followed.added {
            match latest.get_fragment(added.id as usize) {
                Some(fragment)
                    if fragment.metadata().physical_rows == Some(added.rows as usize) =>
                {
                    let at = ReadAt {
                        version,
                        refill: added.refill,
                    };
                    let id = job_fragment(added.id, 0);
                    planned.push((fragment_at(id, added.rows, at), added.work));
                }
                _ => warn!(
                    fragment = added.id,
                    "a fragment the changes made is not in the latest version"
                ),
            }
        }
        for (fragment, _, inputs) in rewired {
            let lance = fragment.lance_id();
            let Some(now) = latest.get_fragment(lance as usize) else {
                continue;
            };
            let rows = now.metadata().physical_rows.unwrap_or(0) as u64;
            let at = ReadAt {
                version,
                refill: *inputs,
            };
            let id = job_fragment(lance, plan::generation(fragment.id) + 1);
            planned.push((fragment_at(id, rows, at), true));
        }
        PlanChange {
            added: with_task_counts(planned, job.spec.params.task_size),
            moved: followed.moved.clone(),
        }
    }

    /// Writes the values of moved fragments' rows as checkpoints of the
    /// fragments holding those rows now; returns the rows carried.
    async fn carry_values(
        &self,
        job: &Job,
        latest: &Arc<Dataset>,
        fragments: &HashMap<u64, JobFragment>,
        added: &[Added],
        replanned: &[Replanned],
    ) -> anyhow::Result<u64> {
        let origins: HashSet<u64> = added
            .iter()
            .flat_map(|a| a.origins.iter().map(|o| o.unit))
            .collect();
        if origins.is_empty() {
            return Ok(0);
        }
        let sources = self.sources(job, fragments, &origins).await?;
        let mut carried = 0;
        for (added, replanned) in added
            .iter()
            .filter(|a| !a.origins.is_empty())
            .filter_map(|a| {
                let id = job_fragment(a.id, 0);
                replanned
                    .iter()
                    .find(|r| r.fragment.id == id)
                    .map(|r| (a, r))
            })
        {
            let Some(fragment) = latest.get_fragment(added.id as usize) else {
                continue;
            };
            let (key, fields) = Key::for_fragment(&job.spec, latest, &replanned.fragment.at)?;
            let destination = Destination {
                checkpoints: FragmentCheckpoints::open(latest, &fragment, &key, fields).await?,
                columns: job.spec.columns(),
            };
            carried += carry::carry(&added.origins, &sources, &destination).await;
        }
        Ok(carried)
    }

    /// Where the values of the moved fragments `keys` are: a staged file,
    /// or checkpoints of the ranges computed so far.
    async fn sources(
        &self,
        job: &Job,
        fragments: &HashMap<u64, JobFragment>,
        keys: &HashSet<u64>,
    ) -> anyhow::Result<HashMap<u64, Values>> {
        let staged: HashMap<u64, StagedFragment> = self
            .store
            .staged_fragments(&job.job_id)
            .await?
            .into_iter()
            .filter(|s| keys.contains(&s.fragment_id))
            .map(|s| (s.fragment_id, s))
            .collect();
        let mut sources = HashMap::new();
        for fragment in fragments.values().filter(|f| keys.contains(&f.planned.id)) {
            let planned = fragment.planned;
            let dataset = self.dataset_at(job, &planned.at).await?;
            let values = match staged.get(&planned.id) {
                Some(staged) => Values::Staged {
                    dataset,
                    staged: staged.clone(),
                },
                None => {
                    let Some(at_base) = dataset.get_fragment(planned.lance_id() as usize) else {
                        continue;
                    };
                    let (key, fields) = Key::for_fragment(&job.spec, &dataset, &planned.at)?;
                    Values::Checkpoints(
                        FragmentCheckpoints::open(&dataset, &at_base, &key, fields).await?,
                    )
                }
            };
            sources.insert(planned.id, values);
        }
        Ok(sources)
    }

    /// Queues the tasks of the added fragments that need work.
    async fn queue(&self, job: &Job, added: &[Replanned]) -> anyhow::Result<()> {
        let work: Vec<PlannedFragment> = added
            .iter()
            .filter(|a| a.work)
            .map(|a| a.fragment)
            .collect();
        if work.is_empty() {
            return Ok(());
        }
        let cluster = job.spec.params.cluster.as_deref();
        let queue = self
            .queues
            .for_cluster(cluster)
            .with_context(|| format!("cluster {cluster:?} has no queue"))?;
        let messages: Vec<Outgoing> = plan::tasks(&work, job.spec.params.task_size)
            .into_iter()
            .map(|work| Outgoing::message(&Message::work(&job.job_id, work)))
            .collect();
        queue.send_many(messages).await
    }

    /// The job's event saying how its plan changed.
    async fn note(
        &self,
        job: &Job,
        version: u64,
        change: &PlanChange,
        carried: u64,
    ) -> anyhow::Result<()> {
        let work: Vec<&Replanned> = change.added.iter().filter(|a| a.work).collect();
        let rows: u64 = work.iter().map(|a| a.fragment.physical_rows).sum();
        let ids = |ids: Vec<u64>| describe_fragments(&ids);
        let message = format!(
            "the table changed under the job (up to version {version}): fragments {} moved on or \
             were rewritten before their values were committed; fragments {} ({rows} rows) \
             planned at version {version}, {carried} computed values carried to their rows' new \
             places",
            or_none(ids(change
                .moved
                .iter()
                .map(|id| lance_fragment(*id))
                .collect())),
            or_none(ids(work.iter().map(|a| a.fragment.lance_id()).collect())),
        );
        info!(job_id = %job.job_id, %message);
        self.store.add_event(&job.job_id, &message).await?;
        Ok(())
    }
}

fn or_none(text: String) -> String {
    if text.is_empty() {
        "none".to_string()
    } else {
        text
    }
}

fn fragment_at(id: u64, rows: u64, at: ReadAt) -> PlannedFragment {
    PlannedFragment {
        id,
        physical_rows: rows,
        at,
    }
}

/// Fragments with the tasks each is split into (a pack counts once, with
/// its last fragment); followed ones have none.
fn with_task_counts(
    planned: Vec<(PlannedFragment, bool)>,
    task_size: Option<u64>,
) -> Vec<Replanned> {
    let work: Vec<PlannedFragment> = planned
        .iter()
        .filter(|(_, w)| *w)
        .map(|(f, _)| *f)
        .collect();
    let mut counts: HashMap<u64, u64> = HashMap::new();
    for task in plan::tasks(&work, task_size) {
        let id = match &task {
            plan::Work::Range(task) => task.fragment_id,
            plan::Work::Pack(pack) => pack.fragments.last().map(|f| f.id).unwrap_or_default(),
        };
        *counts.entry(id).or_default() += 1;
    }
    planned
        .into_iter()
        .map(|(fragment, work)| Replanned {
            tasks: counts.get(&fragment.id).copied().unwrap_or(0),
            fragment,
            work,
        })
        .collect()
}

/// Ids of the fields the job fills (children included) at its read version.
fn target_ids(job: &Job, read: &Dataset) -> Vec<i32> {
    job.spec
        .columns()
        .iter()
        .filter_map(|column| read.schema().field(column))
        .flat_map(crate::run::computed::field_ids)
        .collect()
}

/// A change that moves no row of any job and changes no file but the
/// job's own (its commits, appends, indexes, settings).
fn moves_nothing(kind: &ChangeKind, targets: &[i32]) -> bool {
    match kind {
        ChangeKind::Unmoved => true,
        ChangeKind::Replaced {
            fields: Some(fields),
            ..
        } => fields.iter().all(|f| targets.contains(f)),
        _ => false,
    }
}

/// Fragments whose rows the changes may have moved or removed.
fn moved_ids(changes: &[Change]) -> HashSet<u64> {
    let mut ids = HashSet::new();
    for change in changes {
        match &change.kind {
            ChangeKind::Rewritten { groups } => {
                ids.extend(groups.iter().flat_map(|g| g.old.iter().map(|o| o.id)));
            }
            ChangeKind::Updated {
                touched, removed, ..
            } => ids.extend(touched.iter().chain(removed)),
            ChangeKind::Deleted { removed } => ids.extend(removed),
            _ => {}
        }
    }
    ids
}

/// The paths of a fragment's files holding any of `fields`, sorted.
fn files_of(fragment: &lance::dataset::fragment::FileFragment, fields: &[i32]) -> Vec<String> {
    let mut paths: Vec<String> = fragment
        .metadata()
        .files
        .iter()
        .filter(|file| file.fields.iter().any(|id| fields.contains(id)))
        .map(|file| file.path.clone())
        .collect();
    paths.sort();
    paths
}

impl JobFields {
    fn of(job: &Job, read: &Dataset) -> anyhow::Result<Self> {
        let spec = &job.spec;
        let schema = read.schema();
        let target = TargetColumn::of_job(spec, schema)
            .with_context(|| format!("column '{}' at the read version", spec.column))?;
        let program = Program::compile(schema, &target, Some(&spec.filter))?;
        let (targets, inputs) = program.field_ids();
        let columns = program
            .read_schema
            .fields
            .iter()
            .map(|f| {
                let filled = program.columns.contains(&f.name);
                (f.name.clone(), f.id, f.data_type(), filled)
            })
            .collect();
        Ok(Self {
            targets,
            inputs,
            columns,
        })
    }

    /// Why the job cannot go on, when a column it reads or fills is no
    /// longer in the table as it was at the read version.
    fn gone_at(&self, latest: &Dataset, read_version: u64) -> Option<String> {
        let schema = latest.schema();
        let (name, _, _, filled) = self.columns.iter().find(|(name, id, data_type, _)| {
            schema
                .field(name)
                .is_none_or(|f| f.id != *id || f.data_type() != *data_type)
        })?;
        let role = if *filled {
            "the column the job fills"
        } else {
            "an input column of the job"
        };
        Some(format!(
            "column '{name}' ({role}) was dropped or altered after version {read_version} (it is \
             not the same at version {}); nothing more of the job is committed",
            latest.manifest().version
        ))
    }
}
