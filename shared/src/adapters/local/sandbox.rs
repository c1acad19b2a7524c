//! What user code runs in: a Python process of the local pool gets an
//! environment of its own (an allow-list of harmless variables, the
//! variables its function declared, a private home and working directory)
//! and bounded resources (address space, CPU time, open files). Where the
//! service may (it runs as root), the process also gets mount and network
//! namespaces of its own: the tables root, the service's state and its
//! configuration are covered by empty, unreadable mounts, the network is a
//! namespace with nothing in it (unless the function's declaration asks for
//! the network), the runtime, the interpreter and its packages are
//! read-only to it (no function can change what the next one runs), and
//! the process runs as the unprivileged user `nobody`
//! (65534) when the interpreter is readable by it, else as root without a
//! single capability; either way it can gain none (`no_new_privs`). Its
//! inputs reach it only as the Arrow batches the pool sends.

use std::ffi::CString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::model::binding::{ALLOWED_ENV, Wants};

/// Resource limits of a function process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Address space (RLIMIT_AS).
    pub address_space_bytes: u64,
    /// CPU time over the process's life (RLIMIT_CPU).
    pub cpu_seconds: u64,
    /// Open files (RLIMIT_NOFILE).
    pub open_files: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            address_space_bytes: 64 << 30,
            cpu_seconds: 24 * 3600,
            open_files: 1024,
        }
    }
}

/// How a function process is confined.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    pub limits: Limits,
    /// Directories no function may see (tables root, state, configuration).
    pub hidden: Vec<PathBuf>,
    /// Whether to use namespaces (the service may: see [`Sandbox::probe`]).
    pub namespaces: bool,
    /// The user (and group) a function runs as, with namespaces.
    pub user: Option<u32>,
    /// Directories read-only to functions, with namespaces (the runtime's,
    /// the interpreter's).
    pub read_only: Vec<PathBuf>,
}

/// The unprivileged user functions run as: `nobody`.
pub const UNPRIVILEGED_ID: u32 = 65534;

impl Sandbox {
    /// The confinement this process can give: namespaces when it runs as
    /// root (or may create them), found by starting `program` confined
    /// once; otherwise limits and a private environment only.
    pub fn probe(hidden: Vec<PathBuf>, mut read_only: Vec<PathBuf>, program: &str) -> Self {
        // SAFETY: geteuid has no preconditions.
        let root = cfg!(target_os = "linux") && unsafe { libc::geteuid() } == 0;
        read_only.extend(interpreter_prefixes(program));
        read_only.retain(|p| p.is_dir());
        read_only.sort();
        read_only.dedup();
        let mut sandbox = Self {
            limits: Limits::default(),
            hidden: outermost(hidden.into_iter().filter(|p| p.is_dir()).collect()),
            namespaces: root,
            user: root.then_some(UNPRIVILEGED_ID),
            read_only,
        };
        if sandbox.user.is_some()
            && let Err(why) = sandbox.starts(program)
        {
            tracing::warn!(
                python = program,
                %why,
                "user functions run as root without capabilities: the interpreter or its \
                 packages are not readable by the unprivileged user {UNPRIVILEGED_ID}"
            );
            sandbox.user = None;
        }
        if sandbox.namespaces
            && let Err(why) = sandbox.starts(program)
        {
            tracing::warn!(
                %why,
                "user functions run without namespaces of their own (they could not be created \
                 here): environment, working directory and resource limits only"
            );
            sandbox.namespaces = false;
        }
        sandbox
    }

    /// Whether `program` starts confined and imports what the runtime needs.
    fn starts(&self, program: &str) -> Result<(), String> {
        let workdir = tempfile::tempdir().map_err(|err| err.to_string())?;
        self.prepare(workdir.path())
            .map_err(|err| err.to_string())?;
        let mut command = Command::new(program);
        command
            .args(["-c", "import pyarrow, cloudpickle"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        self.confine(&mut command, workdir.path(), &Wants::default());
        let output = command.output().map_err(|err| err.to_string())?;
        match output.status.success() {
            true => Ok(()),
            false => {
                let stderr = String::from_utf8_lossy(&output.stderr);
                let last = stderr.lines().last().unwrap_or_default();
                Err(format!("{}: {last}", output.status))
            }
        }
    }

    /// Makes `workdir` the function's own: owned by the user it runs as.
    pub fn prepare(&self, workdir: &Path) -> std::io::Result<()> {
        match self.user.filter(|_| self.namespaces) {
            Some(id) => std::os::unix::fs::chown(workdir, Some(id), Some(id)),
            None => Ok(()),
        }
    }

    /// Sets up `command` to start confined, in `workdir` (private to it,
    /// made so by [`Sandbox::prepare`]).
    pub fn confine(&self, command: &mut Command, workdir: &Path, wants: &Wants) {
        command.env_clear();
        for name in ALLOWED_ENV {
            if let Ok(value) = std::env::var(name) {
                command.env(name, value);
            }
        }
        command
            .env("HOME", workdir)
            .env("TMPDIR", workdir)
            .current_dir(workdir)
            .envs(&wants.env);
        let limits = self.limits;
        #[cfg(target_os = "linux")]
        let plan = self.namespaces.then(|| Isolation::new(self, wants.network));
        // SAFETY: the closure runs in the forked child before exec and
        // calls only async-signal-safe functions (setrlimit, unshare,
        // mount, prctl, capset) on data prepared before the fork.
        unsafe {
            command.pre_exec(move || {
                set_limits(&limits)?;
                #[cfg(target_os = "linux")]
                if let Some(plan) = &plan {
                    plan.enter()?;
                }
                Ok(())
            });
        }
    }
}

/// The directories not inside another of them (once a directory is
/// covered, what was inside it cannot be reached to be covered again).
fn outermost(mut paths: Vec<PathBuf>) -> Vec<PathBuf> {
    paths.sort();
    paths.dedup();
    let mut kept: Vec<PathBuf> = Vec::new();
    for path in paths {
        if !kept.iter().any(|outer| path.starts_with(outer)) {
            kept.push(path);
        }
    }
    kept
}

/// The interpreter's installation (`sys.prefix`, `sys.base_prefix`).
fn interpreter_prefixes(program: &str) -> Vec<PathBuf> {
    let output = Command::new(program)
        .args([
            "-c",
            "import sys; print(sys.prefix); print(sys.base_prefix)",
        ])
        .stderr(std::process::Stdio::null())
        .output();
    match output {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(|line| PathBuf::from(line.trim()))
            .collect(),
        _ => Vec::new(),
    }
}

fn set_limits(limits: &Limits) -> std::io::Result<()> {
    for (resource, value) in [
        (libc::RLIMIT_AS, limits.address_space_bytes),
        (libc::RLIMIT_CPU, limits.cpu_seconds),
        (libc::RLIMIT_NOFILE, limits.open_files),
    ] {
        let limit = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        // SAFETY: setrlimit reads the struct it is given.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Namespaces and mounts prepared before the fork.
#[cfg(target_os = "linux")]
struct Isolation {
    hidden: Vec<CString>,
    read_only: Vec<CString>,
    network: bool,
    user: Option<u32>,
}

#[cfg(target_os = "linux")]
impl Isolation {
    fn new(sandbox: &Sandbox, network: bool) -> Self {
        let c_paths = |paths: &[PathBuf]| -> Vec<CString> {
            paths
                .iter()
                .filter_map(|p| CString::new(p.as_os_str().as_encoded_bytes()).ok())
                .collect()
        };
        Self {
            hidden: c_paths(&sandbox.hidden),
            read_only: c_paths(&sandbox.read_only),
            network,
            user: sandbox.user,
        }
    }

    fn enter(&self) -> std::io::Result<()> {
        let mut flags = libc::CLONE_NEWNS;
        if !self.network {
            flags |= libc::CLONE_NEWNET;
        }
        check(unsafe { libc::unshare(flags) })?;
        let root = c"/";
        let none: *const libc::c_char = std::ptr::null();
        check(unsafe {
            libc::mount(
                none,
                root.as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
        })?;
        for path in &self.read_only {
            // A bind mount of its own, then made read-only.
            check(unsafe {
                libc::mount(
                    path.as_ptr(),
                    path.as_ptr(),
                    none,
                    libc::MS_BIND | libc::MS_REC,
                    std::ptr::null(),
                )
            })?;
            check(unsafe {
                libc::mount(
                    none,
                    path.as_ptr(),
                    none,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                )
            })?;
        }
        let tmpfs = c"tmpfs";
        let options = c"size=4k,mode=000";
        for path in &self.hidden {
            check(unsafe {
                libc::mount(
                    tmpfs.as_ptr(),
                    path.as_ptr(),
                    tmpfs.as_ptr(),
                    libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                    options.as_ptr().cast(),
                )
            })?;
        }
        drop_privileges(self.user)
    }
}

/// No capability left, none to gain; the unprivileged user, if given.
#[cfg(target_os = "linux")]
fn drop_privileges(user: Option<u32>) -> std::io::Result<()> {
    for cap in 0..=libc::c_ulong::from(63u8) {
        // Capabilities the kernel does not know fail with EINVAL: the end.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            break;
        }
    }
    if let Some(id) = user {
        check(unsafe { libc::setgroups(0, std::ptr::null()) })?;
        check(unsafe { libc::setgid(id) })?;
        check(unsafe { libc::setuid(id) })?;
    }
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    check(unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } as i32)
}

#[cfg(target_os = "linux")]
const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[cfg(target_os = "linux")]
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Keeps this process's memory and environment from other processes of
/// its user (`/proc/<pid>/environ`, ptrace): user functions run as that
/// user when the service cannot give them one of their own.
pub fn keep_private() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
}

#[cfg(target_os = "linux")]
fn check(result: i32) -> std::io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(all(test, target_os = "linux"))]
mod probe_tests {
    use super::*;

    /// As root, a function process starts in namespaces of its own, with
    /// the directories `serve` hides (the root, its state inside it). The
    /// interpreter is LANCE_BACKFILL_UDF_PYTHON's, as the tests run it.
    #[test]
    fn as_root_functions_start_in_namespaces() {
        let Ok(python) = std::env::var("LANCE_BACKFILL_UDF_PYTHON") else {
            return;
        };
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let hidden = tempfile::tempdir().unwrap();
        std::fs::create_dir(hidden.path().join("_lance_backfill")).unwrap();
        keep_private();
        let mut all = vec![
            hidden.path().to_path_buf(),
            hidden.path().join("_lance_backfill"),
        ];
        if let Some(home) = std::env::var_os("HOME") {
            all.push(std::path::Path::new(&home).join(".aws"));
        }
        let runtime = std::env::temp_dir().join("lance-backfill");
        let sandbox = Sandbox::probe(all, vec![runtime], &python);
        assert!(sandbox.namespaces, "{sandbox:?}");
        assert_eq!(sandbox.hidden, vec![hidden.path().to_path_buf()]);
        assert_eq!(sandbox.starts(&python), Ok(()));
    }
}
