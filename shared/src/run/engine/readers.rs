//! Fragments opened for computing, kept for the next task of the same
//! fragment: a fragment split into range tasks is opened once per process,
//! not once per task (each opening is file opens and metadata reads on the
//! blocking pool, a good part of a small task's cost).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use lance::dataset::fragment::FileFragment;

use super::compute::FragmentComputer;
use crate::run::computed::Program;

/// Fragments kept open per process: a few jobs' current fragments. Each
/// holds its data files open, nothing else.
const KEPT: usize = 8;

/// What an opened fragment was opened for: the job's fragment, read for
/// that compiled program (a program compiled anew opens it anew).
#[derive(PartialEq, Eq)]
struct Opened {
    job_id: String,
    fragment_id: u64,
    /// The program's address: while the entry's computer holds the
    /// program, no other program can have it.
    program: usize,
}

impl Opened {
    fn new(job_id: &str, fragment_id: u64, program: &Arc<Program>) -> Self {
        Self {
            job_id: job_id.to_string(),
            fragment_id,
            program: Arc::as_ptr(program) as usize,
        }
    }
}

/// The fragments opened most recently, the latest last.
#[derive(Default)]
pub(super) struct OpenFragments {
    recent: Mutex<VecDeque<(Opened, FragmentComputer)>>,
}

impl OpenFragments {
    /// The fragment opened for `program`, opened now (and kept) unless it
    /// is kept already.
    pub(super) async fn open(
        &self,
        job_id: &str,
        fragment_id: u64,
        fragment: &FileFragment,
        program: &Arc<Program>,
        max_batch_bytes: usize,
    ) -> lance::Result<FragmentComputer> {
        let key = Opened::new(job_id, fragment_id, program);
        if let Some((_, kept)) = self.lock().iter().find(|(opened, _)| *opened == key) {
            return Ok(kept.clone());
        }
        let computer = FragmentComputer::open(fragment, program.clone(), max_batch_bytes).await?;
        let mut recent = self.lock();
        recent.retain(|(opened, _)| *opened != key);
        recent.push_back((key, computer.clone()));
        while recent.len() > KEPT {
            recent.pop_front();
        }
        Ok(computer)
    }

    /// The fragment for writing its file: the kept opening, no longer kept
    /// (no task reads the fragment after its file is written), or one
    /// opened now and not kept, so a fragment filled whole (a pack's) never
    /// pushes out the fragments range tasks still read.
    pub(super) async fn take(
        &self,
        job_id: &str,
        fragment_id: u64,
        fragment: &FileFragment,
        program: &Arc<Program>,
        max_batch_bytes: usize,
    ) -> lance::Result<FragmentComputer> {
        let key = Opened::new(job_id, fragment_id, program);
        let kept = {
            let mut recent = self.lock();
            let at = recent.iter().position(|(opened, _)| *opened == key);
            at.and_then(|at| recent.remove(at))
        };
        match kept {
            Some((_, computer)) => Ok(computer),
            None => FragmentComputer::open(fragment, program.clone(), max_batch_bytes).await,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(Opened, FragmentComputer)>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use arrow_array::{Int64Array, RecordBatch, RecordBatchIterator};
    use arrow_schema::{DataType, Field, Schema};
    use lance::Dataset;
    use lance::dataset::WriteParams;

    use super::*;
    use crate::run::computed::TargetColumn;

    /// A table of `fragments` fragments of 10 rows of `x`.
    async fn table(uri: &str, fragments: usize) -> Dataset {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, true)]));
        let x = Int64Array::from_iter_values(0..fragments as i64 * 10);
        let batch = RecordBatch::try_new(schema.clone(), vec![Arc::new(x)]).unwrap();
        let params = WriteParams {
            max_rows_per_file: 10,
            ..Default::default()
        };
        let batches = RecordBatchIterator::new([Ok(batch)], schema);
        Dataset::write(batches, uri, Some(params)).await.unwrap()
    }

    fn compiled(dataset: &Dataset) -> Arc<Program> {
        let target = TargetColumn {
            name: "x".to_string(),
            expression: "x * 2 + 1".to_string(),
            data_type: DataType::Int64,
            udf: None,
        };
        Arc::new(Program::compile(dataset.schema(), &target, None).unwrap())
    }

    #[tokio::test]
    async fn a_fragment_is_opened_once_until_taken_or_pushed_out() {
        let root = tempfile::tempdir().unwrap();
        let uri = root.path().join("items.lance");
        let dataset = table(uri.to_str().unwrap(), KEPT + 2).await;
        let fragments = dataset.get_fragments();
        assert_eq!(fragments.len(), KEPT + 2);
        let (program, recompiled) = (compiled(&dataset), compiled(&dataset));
        let open = OpenFragments::default();
        let opened = |job: &'static str, index: usize, program: Arc<Program>| {
            let (open, fragment) = (&open, &fragments[index]);
            let id = fragment.id() as u64;
            async move {
                open.open(job, id, fragment, &program, 1 << 20)
                    .await
                    .unwrap()
            }
        };
        let taken = |index: usize, program: Arc<Program>| {
            let (open, fragment) = (&open, &fragments[index]);
            let id = fragment.id() as u64;
            async move {
                open.take("job", id, fragment, &program, 1 << 20)
                    .await
                    .unwrap()
            }
        };
        let first = opened("job", 0, program.clone()).await;
        assert!(first.is_same_open(&opened("job", 0, program.clone()).await));
        assert!(!first.is_same_open(&opened("job", 0, recompiled.clone()).await));
        assert!(!first.is_same_open(&opened("other job", 0, program.clone()).await));
        assert!(!first.is_same_open(&opened("job", 1, program.clone()).await));

        assert!(
            first.is_same_open(&taken(0, program.clone()).await),
            "the kept one"
        );
        let reopened = opened("job", 0, program.clone()).await;
        assert!(!first.is_same_open(&reopened), "taken, so opened anew");
        // Taking fragments that are not kept keeps none of them.
        let kept = open.lock().len();
        for index in 2..KEPT + 2 {
            taken(index, program.clone()).await;
        }
        assert_eq!(open.lock().len(), kept, "nothing kept, nothing pushed out");
        assert!(reopened.is_same_open(&opened("job", 0, program.clone()).await));
        // Fragment 1 is kept already: these are KEPT new ones.
        for index in 2..KEPT + 2 {
            opened("job", index, program.clone()).await;
        }
        assert!(
            !reopened.is_same_open(&opened("job", 0, program.clone()).await),
            "pushed out by {KEPT} fragments opened since"
        );
        assert!(open.lock().len() <= KEPT);
    }
}
