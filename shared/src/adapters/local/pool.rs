//! The local runtime: a pool of long-lived Python processes, each running
//! `udf-runtime/lance_backfill_udf_runtime.py pipe` (embedded in this
//! binary) and fed Arrow IPC over its pipes. A process belongs to one
//! principal and one function for its whole life: it is never handed
//! another's batch. Processes start confined ([`crate::adapters::local::sandbox`]): an
//! environment of their own, a private working directory, resource limits,
//! and where the service may, namespaces that hide the tables, the
//! service's state and the network. Idle processes are stopped after
//! [`IDLE_LIFETIME`]. A process that dies or hangs is replaced and its
//! batch tried once more; then the call fails with the reason and the tail
//! of the process's stderr.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch};
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::adapters::ipc;
use crate::adapters::local::sandbox::Sandbox;
use crate::ports::udf::{UdfError, UdfRef, UdfRuntime};
use crate::run::tasks::AbortOnDrop;

/// The runtime's source, embedded so the binary runs from anywhere.
const RUNTIME_SOURCE: &str = include_str!("../../../../udf-runtime/lance_backfill_udf_runtime.py");
/// Bytes of a process's stderr kept for error messages.
const STDERR_TAIL_BYTES: usize = 8 * 1024;
/// Tries of one batch: the first process, and one fresh process after it died.
const ATTEMPTS: usize = 2;
/// How long a process may take to start and say it is ready (imports).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest frame accepted from a process (a batch's result).
const MAX_FRAME_BYTES: usize = 1 << 31;
/// An idle process is stopped after this long without a batch.
pub const IDLE_LIFETIME: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// The interpreter (`LANCE_BACKFILL_UDF_PYTHON`): needs pyarrow,
    /// cloudpickle and what the functions import.
    pub python: String,
    /// Processes at most (`LANCE_BACKFILL_UDF_WORKERS`).
    pub size: usize,
    /// Longest one batch may take before its process is killed.
    pub call_timeout: Duration,
    /// Directories no user function may see (the tables root, the
    /// service's state).
    pub hidden: Vec<PathBuf>,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            python: "python3".to_string(),
            size: std::thread::available_parallelism().map_or(2, |n| n.get()),
            call_timeout: Duration::from_secs(900),
            hidden: Vec::new(),
        }
    }
}

pub struct LocalPool {
    config: PoolConfig,
    script: PathBuf,
    sandbox: Sandbox,
    permits: Semaphore,
    idle: Mutex<Vec<Process>>,
}

/// Whose code a process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Owner {
    principal: String,
    udf: String,
}

impl Owner {
    fn of(udf: &UdfRef) -> Self {
        Self {
            principal: udf.principal.clone(),
            udf: udf.id.clone(),
        }
    }
}

/// How a round trip with a process ended badly.
enum Trouble {
    /// The function's (or its setup's) error: the process is fine.
    Udf(UdfError),
    /// The process died, hung or spoke nonsense: it is discarded.
    Died(String),
}

struct Process {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    stderr_tail: Arc<Mutex<VecDeque<u8>>>,
    _stderr_reader: AbortOnDrop<()>,
    loaded: HashSet<String>,
    pid: u32,
    owner: Owner,
    idle_since: std::time::Instant,
    /// Its home and working directory, removed with it.
    _workdir: tempfile::TempDir,
}

impl LocalPool {
    pub fn new(config: PoolConfig) -> anyhow::Result<Self> {
        let script = write_script()?;
        crate::adapters::local::sandbox::keep_private();
        let runtime_dir = script.parent().map(Path::to_path_buf);
        let sandbox = Sandbox::probe(
            config.hidden.clone(),
            runtime_dir.into_iter().collect(),
            &config.python,
        );
        Ok(Self {
            permits: Semaphore::new(config.size.max(1)),
            config,
            script,
            sandbox,
            idle: Mutex::new(Vec::new()),
        })
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Process>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// An idle process of this owner; processes idle too long are let go.
    fn take_idle(&self, owner: &Owner) -> Option<Process> {
        let mut idle = self.idle();
        idle.retain(|p| p.idle_since.elapsed() < IDLE_LIFETIME);
        let at = idle.iter().rposition(|p| p.owner == *owner)?;
        Some(idle.swap_remove(at))
    }

    /// Keeps a process for its owner's next batch; past the pool's size,
    /// the longest idle one goes.
    fn give_back(&self, mut process: Process) {
        process.idle_since = std::time::Instant::now();
        let mut idle = self.idle();
        idle.push(process);
        while idle.len() > self.config.size.max(1) {
            let oldest = (0..idle.len())
                .min_by_key(|i| idle[*i].idle_since)
                .unwrap_or(0);
            idle.swap_remove(oldest);
        }
    }

    async fn spawn(&self, udf: &UdfRef) -> Result<Process, UdfError> {
        let workdir = tempfile::Builder::new()
            .prefix("lance-backfill-udf-")
            .tempdir()
            .map_err(|err| UdfError::Setup(format!("a directory for the function: {err}")))?;
        self.sandbox
            .prepare(workdir.path())
            .map_err(|err| UdfError::Setup(format!("a directory for the function: {err}")))?;
        let mut command = Command::new(&self.config.python);
        command
            .arg(&self.script)
            .arg("pipe")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        self.sandbox
            .confine(command.as_std_mut(), workdir.path(), &udf.wants);
        let mut child = command.spawn().map_err(|err| {
            UdfError::Setup(format!(
                "could not start '{}' for user functions: {err} (set LANCE_BACKFILL_UDF_PYTHON)",
                self.config.python
            ))
        })?;
        let pid = child.id().unwrap_or_default();
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(UdfError::Setup("the Python process has no pipes".into()));
        };
        let stderr_tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader = AbortOnDrop::spawn(keep_tail(stderr, stderr_tail.clone(), pid));
        let mut process = Process {
            child,
            stdin,
            stdout: BufReader::new(stdout),
            stderr_tail,
            _stderr_reader: reader,
            loaded: HashSet::new(),
            pid,
            owner: Owner::of(udf),
            idle_since: std::time::Instant::now(),
            _workdir: workdir,
        };
        match tokio::time::timeout(START_TIMEOUT, process.read()).await {
            Ok(Ok((header, _))) if header["status"] == "ready" => {
                info!(pid, python = %header["python"], pyarrow = %header["pyarrow"], "UDF process ready");
                Ok(process)
            }
            Ok(Ok((header, _))) => Err(UdfError::Setup(format!(
                "the Python process answered {header} instead of ready"
            ))),
            Ok(Err(reason)) => Err(UdfError::Setup(process.death(&reason).await)),
            Err(_) => Err(UdfError::Setup(
                process
                    .death(&format!("not ready after {START_TIMEOUT:?}"))
                    .await,
            )),
        }
    }
}

/// Writes the embedded runtime where Python can run it (content-addressed,
/// so processes of every version agree on what they run).
fn write_script() -> anyhow::Result<PathBuf> {
    let digest = hex::encode(&Sha256::digest(RUNTIME_SOURCE.as_bytes())[..8]);
    let dir = std::env::temp_dir().join("lance-backfill");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("udf_runtime_{digest}.py"));
    if !path.exists() {
        let partial = dir.join(format!("udf_runtime_{digest}.{}.tmp", std::process::id()));
        std::fs::write(&partial, RUNTIME_SOURCE)?;
        std::fs::rename(&partial, &path)?;
    }
    Ok(path)
}

/// Keeps the last bytes a process wrote to stderr (user prints included).
async fn keep_tail(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<u8>>>, pid: u32) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        debug!(pid, "udf stderr: {line}");
        let mut tail = tail.lock().unwrap_or_else(|p| p.into_inner());
        tail.extend(line.as_bytes());
        tail.push_back(b'\n');
        while tail.len() > STDERR_TAIL_BYTES {
            tail.pop_front();
        }
    }
}

impl Process {
    async fn write(&mut self, header: &serde_json::Value, body: &[u8]) -> Result<(), String> {
        let header = header.to_string();
        let mut frame = Vec::with_capacity(header.len() + body.len() + 8);
        frame.extend((header.len() as u32).to_le_bytes());
        frame.extend(header.as_bytes());
        frame.extend((body.len() as u32).to_le_bytes());
        frame.extend(body);
        self.stdin
            .write_all(&frame)
            .await
            .map_err(|err| format!("writing to the process: {err}"))?;
        self.stdin
            .flush()
            .await
            .map_err(|err| format!("writing to the process: {err}"))
    }

    async fn read_frame(&mut self) -> Result<Vec<u8>, String> {
        let mut length = [0u8; 4];
        self.stdout
            .read_exact(&mut length)
            .await
            .map_err(|err| format!("reading from the process: {err}"))?;
        let length = u32::from_le_bytes(length) as usize;
        if length > MAX_FRAME_BYTES {
            return Err(format!("the process sent a frame of {length} bytes"));
        }
        let mut frame = vec![0u8; length];
        self.stdout
            .read_exact(&mut frame)
            .await
            .map_err(|err| format!("reading from the process: {err}"))?;
        Ok(frame)
    }

    /// One answer: a JSON header and a body.
    async fn read(&mut self) -> Result<(serde_json::Value, Vec<u8>), String> {
        let header = self.read_frame().await?;
        let header = serde_json::from_slice(&header)
            .map_err(|err| format!("the process answered something that is not JSON: {err}"))?;
        let body = self.read_frame().await?;
        Ok((header, body))
    }

    /// Why the process is gone: its exit status and the tail of its stderr.
    async fn death(&mut self, reason: &str) -> String {
        let _ = self.child.start_kill();
        let status = tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|status| status.to_string())
            .unwrap_or_else(|| "unknown exit".to_string());
        // Let the stderr reader take what the process wrote last.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let tail: Vec<u8> = self
            .stderr_tail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        format!(
            "the Python process {} ended ({reason}; {status}); its stderr ended with:\n{}",
            self.pid,
            String::from_utf8_lossy(&tail).trim_end()
        )
    }

    async fn ensure_loaded(&mut self, udf: &UdfRef) -> Result<(), Trouble> {
        if self.loaded.contains(&udf.id) {
            return Ok(());
        }
        let header = serde_json::json!({
            "op": "load", "udf": udf.id, "name": udf.name, "outputs": udf.outputs,
            "workspace_zips": udf.workspace_zips,
        });
        self.write(&header, &udf.pickle)
            .await
            .map_err(Trouble::Died)?;
        let (answer, _) = self.read().await.map_err(Trouble::Died)?;
        if answer["status"] != "ok" {
            return Err(Trouble::Udf(match UdfError::from_answer(&answer) {
                UdfError::Raised {
                    error_type,
                    message,
                    ..
                } => UdfError::Setup(format!("{error_type}: {message}")),
                other => other,
            }));
        }
        self.loaded.insert(udf.id.clone());
        Ok(())
    }

    async fn call(&mut self, udf: &UdfRef, input: &[u8]) -> Result<ArrayRef, Trouble> {
        self.ensure_loaded(udf).await?;
        let header = serde_json::json!({"op": "call", "udf": udf.id});
        self.write(&header, input).await.map_err(Trouble::Died)?;
        let (answer, body) = self.read().await.map_err(Trouble::Died)?;
        match answer["status"].as_str() {
            Some("ok") => ipc::decode_result(&body)
                .map_err(|err| Trouble::Died(format!("the process's answer is not Arrow: {err}"))),
            Some("unknown_udf") => {
                self.loaded.remove(&udf.id);
                Err(Trouble::Died("the process forgot the function".into()))
            }
            _ => Err(Trouble::Udf(UdfError::from_answer(&answer))),
        }
    }
}

#[async_trait]
impl UdfRuntime for LocalPool {
    async fn call(&self, udf: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
        let body = ipc::encode(input).map_err(|err| UdfError::Setup(format!("{err:#}")))?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| UdfError::Unavailable("the UDF pool is closed".into()))?;
        let mut last = String::new();
        let owner = Owner::of(udf);
        for attempt in 0..ATTEMPTS {
            let mut process = match self.take_idle(&owner) {
                Some(process) => process,
                None => self.spawn(udf).await?,
            };
            let timeout = self.config.call_timeout;
            match tokio::time::timeout(timeout, process.call(udf, &body)).await {
                Ok(Ok(values)) => {
                    self.give_back(process);
                    return Ok(values);
                }
                Ok(Err(Trouble::Udf(err))) => {
                    self.give_back(process);
                    return Err(err);
                }
                Ok(Err(Trouble::Died(reason))) => last = process.death(&reason).await,
                Err(_) => last = process.death(&format!("no answer after {timeout:?}")).await,
            }
            warn!(attempt, udf = %udf.name, "{last}");
        }
        Err(UdfError::Crashed(format!(
            "user function '{}': the batch was tried on {ATTEMPTS} processes and each ended: {last}",
            udf.name
        )))
    }

    fn describe(&self) -> String {
        format!(
            "up to {} local '{}' processes",
            self.config.size, self.config.python
        )
    }
}
