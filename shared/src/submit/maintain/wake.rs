//! What wakes the watcher before its next poll: a new version of a table
//! under a local root (on Linux the kernel tells at once, through inotify),
//! and the end of a job (a column's follow-up job, or one whose input was
//! that job's column, is due as soon as it ends). The poll stays, for roots
//! on an object store, other systems, and anything a notification missed;
//! on AWS, S3 and job events invoke the trigger function instead.

#[cfg(target_os = "linux")]
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tracing::{info, warn};

use crate::ports::events::{EventSink, JobChange, JobNotice};

/// Passes the wake-ups start are at least this far apart, so a job that
/// commits often does not keep the watcher passing over every table.
pub const MIN_WAKE_GAP: Duration = Duration::from_millis(50);
/// How often the notification thread looks for events and for its end.
const READ_INTERVAL: Duration = Duration::from_millis(10);
/// Directories watched at most (namespaces, tables and their `_versions`).
const MAX_WATCHED_DIRS: usize = 30_000;
/// How deep namespaces nest under the root, at most, for the watch.
const MAX_DEPTH: usize = 16;

/// Wake-ups for one watcher; cheap to clone. Wake-ups that arrive while a
/// pass runs are kept (as one) for after it.
#[derive(Clone, Default)]
pub struct Wake(Arc<Notify>);

impl Wake {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn woken(&self) {
        self.0.notified().await
    }
}

/// Watches a local root for new table versions; dropping it ends the watch.
pub struct VersionWatch {
    stop: Arc<AtomicBool>,
}

impl Drop for VersionWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl VersionWatch {
    /// Watches the tables under `root` for new versions, waking `wake` for
    /// each; `None` when the root is not a local directory or cannot be
    /// watched (then the poll alone finds new versions).
    pub fn start(root: &str, wake: Wake) -> Option<Self> {
        let dir = local_dir(root)?;
        let stop = Arc::new(AtomicBool::new(false));
        watch_in_background(root, &dir, wake, stop.clone())?;
        Some(Self { stop })
    }
}

#[cfg(target_os = "linux")]
fn watch_in_background(root: &str, dir: &Path, wake: Wake, stop: Arc<AtomicBool>) -> Option<()> {
    let watched = Watched::open(dir)
        .map_err(|err| {
            warn!(root, error = %err, "cannot watch the root; new versions are found by the poll alone")
        })
        .ok()?;
    info!(
        root,
        dirs = watched.dirs.len(),
        "watching the root for new table versions"
    );
    std::thread::Builder::new()
        .name("version-watch".into())
        .spawn(move || watched.run(&wake, &stop))
        .map_err(|err| warn!(root, error = %err, "cannot start the version watch"))
        .ok()?;
    Some(())
}

/// Elsewhere the poll alone finds new versions.
#[cfg(not(target_os = "linux"))]
fn watch_in_background(_: &str, _: &Path, _: Wake, _: Arc<AtomicBool>) -> Option<()> {
    None
}

/// The directories watched: namespaces and tables (for new tables and new
/// `_versions` directories) and each table's `_versions` (for manifests).
#[cfg(target_os = "linux")]
struct Watched {
    inotify: inotify::Inotify,
    /// Each watched directory and how deep under the root it is.
    dirs: HashMap<inotify::WatchDescriptor, (PathBuf, usize)>,
}

#[cfg(target_os = "linux")]
impl Watched {
    fn open(root: &Path) -> std::io::Result<Self> {
        let mut watched = Self {
            inotify: inotify::Inotify::init()?,
            dirs: HashMap::new(),
        };
        watched.add_tree(root, 0);
        Ok(watched)
    }

    /// Watches `dir` and what it holds that may hold versions.
    fn add_tree(&mut self, dir: &Path, depth: usize) {
        if depth > MAX_DEPTH || self.dirs.len() >= MAX_WATCHED_DIRS {
            return;
        }
        let mask = inotify::WatchMask::CREATE | inotify::WatchMask::MOVED_TO;
        match self.inotify.watches().add(dir, mask) {
            Ok(descriptor) => {
                self.dirs.insert(descriptor, (dir.to_path_buf(), depth));
            }
            Err(err) => {
                warn!(dir = %dir.display(), error = %err, "cannot watch a directory");
                return;
            }
        }
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        let in_table = is_table(dir);
        for entry in entries.flatten() {
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            // In a table only `_versions` matters; its data files do not.
            if is_dir && (!in_table || is_versions(&path)) {
                self.add_tree(&path, depth + 1);
            }
        }
    }

    fn run(mut self, wake: &Wake, stop: &AtomicBool) {
        let mut buffer = [0u8; 4096];
        while !stop.load(Ordering::Relaxed) {
            let mut new_dirs = Vec::new();
            match self.inotify.read_events(&mut buffer) {
                Ok(events) => {
                    for event in events {
                        let Some((dir, depth)) = self.dirs.get(&event.wd) else {
                            continue;
                        };
                        let Some(name) = event.name else { continue };
                        let path = dir.join(name);
                        if event.mask.contains(inotify::EventMask::ISDIR) {
                            // In a table only `_versions` matters.
                            if !is_table(dir) || is_versions(&path) {
                                new_dirs.push((path, depth + 1));
                            }
                        } else if is_manifest(&path) {
                            wake.wake();
                        }
                    }
                }
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(READ_INTERVAL)
                }
                Err(err) => {
                    warn!(error = %err, "the version watch failed; the poll carries on alone");
                    return;
                }
            }
            for (dir, depth) in new_dirs {
                self.add_tree(&dir, depth);
                // A new table may already hold its first version.
                wake.wake();
            }
        }
    }
}

/// The root's directory, when it is on the local filesystem.
fn local_dir(root: &str) -> Option<PathBuf> {
    let path = match root.strip_prefix("file://") {
        Some(path) => path,
        None if root.contains("://") => return None,
        None => root,
    };
    let path = Path::new(path);
    path.is_dir().then(|| path.to_path_buf())
}

fn is_table(dir: &Path) -> bool {
    dir.extension().is_some_and(|ext| ext == "lance")
}

fn is_versions(dir: &Path) -> bool {
    dir.file_name().is_some_and(|name| name == "_versions")
}

/// A manifest in a table's `_versions`.
fn is_manifest(path: &Path) -> bool {
    path.parent().is_some_and(is_versions) && path.extension().is_some_and(|ext| ext == "manifest")
}

/// An event sink that wakes the watcher when a job ends.
pub struct WakeOnJobEnd(pub Wake);

#[async_trait]
impl EventSink for WakeOnJobEnd {
    async fn publish(&self, notice: &JobNotice) {
        if matches!(
            notice.change,
            JobChange::Done | JobChange::Failed | JobChange::Cancelled
        ) {
            self.0.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_in_versions_count_and_nothing_else() {
        assert!(is_manifest(Path::new(
            "/r/items.lance/_versions/3.manifest"
        )));
        assert!(is_manifest(Path::new(
            "/r/items.lance/_versions/18446744073709551612.manifest"
        )));
        assert!(!is_manifest(Path::new("/r/items.lance/data/abc.lance")));
        assert!(!is_manifest(Path::new("/r/items.lance/_versions/.tmp-3")));
        assert!(!is_manifest(Path::new(
            "/r/items.lance/_transactions/3-x.txn"
        )));
    }

    #[test]
    fn only_local_roots_are_watched() {
        let dir = tempfile_dir();
        let path = dir.to_str().unwrap();
        assert_eq!(local_dir(path), Some(dir.clone()));
        assert_eq!(local_dir(&format!("file://{path}")), Some(dir.clone()));
        assert_eq!(local_dir("s3://bucket/root"), None);
        assert_eq!(local_dir(&format!("{path}/missing")), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wake-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
