//! Policies: the config and the pipeline built from it, swapped as one
//! snapshot, and the one reload path that produces them.
//!
//! Reload: read the file → parse → validate everything → read the files the
//! config names → build every filter → swap the snapshot atomically. When
//! the text and those files are as they were, nothing is rebuilt. Any
//! problem keeps the running policies and is reported (logs,
//! `/admin/reload`). The file watcher, SIGHUP and `POST /admin/reload` all
//! go through [`Reloader::reload`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::mpsc;
use wardroom_plugin_api::Registry;

use crate::config::{self, Config, Problem, Problems};
use crate::identity::Authenticator;
use crate::lock;
use crate::logging::LogLevel;
use crate::pipeline::{FilterStates, Pipeline};

/// One consistent set of policies: a config and what is built from it.
#[derive(Debug)]
pub struct Policies {
    /// The configuration.
    pub config: Config,
    /// The filters of `config.filters`, built.
    pub pipeline: Pipeline,
    /// Token verification and role grants from `[auth]`.
    pub auth: Authenticator,
    /// The files the config names, as read just before building: a reload
    /// of the same text still rebuilds when one of them has changed.
    files: Vec<FileStamp>,
}

/// The contents of one file a config names (or why it could not be read).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    /// The file, as the config names it.
    path: PathBuf,
    /// Its bytes, or the kind of error reading it gave.
    content: Result<Vec<u8>, std::io::ErrorKind>,
}

/// Reads every file `config` names. Done before building, so a file that
/// changes during the build is seen as changed by the next reload.
fn stamp(config: &Config) -> Vec<FileStamp> {
    config
        .referenced_files()
        .into_iter()
        .map(|path| FileStamp { path: path.to_owned(), content: std::fs::read(path).map_err(|e| e.kind()) })
        .collect()
}

impl Policies {
    /// Builds the pipeline for `config`, reusing the filter state in
    /// `states`; returns the policies and the state to keep.
    pub fn build(text: &str, registry: &Registry, states: &FilterStates) -> Result<(Self, FilterStates), Vec<Problem>> {
        let (config, ((pipeline, auth, kept), files)) = config::parse_then(text, |config| {
            let files = stamp(config);
            build_parts(config, registry, states).map(|parts| (parts, files))
        })?;
        Ok((Policies { config, pipeline, auth, files }, kept))
    }

    /// Policies from a config that is already parsed (for embedding and tests).
    pub fn from_config(config: Config, registry: &Registry) -> Result<(Self, FilterStates), Vec<Problem>> {
        let files = stamp(&config);
        let (pipeline, auth, kept) = build_parts(&config, registry, &FilterStates::new()).map_err(|problems| {
            problems
                .into_iter()
                .map(|(key, message)| Problem { line: 0, column: 0, key: Some(key), message })
                .collect::<Vec<_>>()
        })?;
        Ok((Policies { config, pipeline, auth, files }, kept))
    }

    /// Whether a file the config names has changed since these policies
    /// were built from it.
    fn files_changed(&self) -> bool {
        self.files.iter().any(|file| std::fs::read(&file.path).map_err(|e| e.kind()) != file.content)
    }
}

/// Builds what a config describes, reporting every problem.
fn build_parts(
    config: &Config,
    registry: &Registry,
    states: &FilterStates,
) -> Result<(Pipeline, Authenticator, FilterStates), Vec<(String, String)>> {
    let pipeline = Pipeline::build(&config.filters, registry, states);
    let auth = Authenticator::from_config(&config.auth);
    match (pipeline, auth) {
        (Ok((pipeline, kept)), Ok(auth)) => Ok((pipeline, auth, kept)),
        (pipeline, auth) => Err(pipeline.err().into_iter().flatten().chain(auth.err().into_iter().flatten()).collect()),
    }
}

fn read(path: &Path) -> Result<String, Problems> {
    std::fs::read_to_string(path).map_err(|e| Problems {
        path: path.to_owned(),
        problems: vec![Problem { line: 1, column: 1, key: None, message: format!("cannot read the file: {e}") }],
    })
}

/// What the last reload attempt did, for `/admin/reload` and logs.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReloadStatus {
    /// When it happened, in milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// `applied`, `rejected` or `unchanged`.
    pub outcome: ReloadOutcome,
    /// One line for people.
    pub message: String,
    /// Every problem found, `line:column: key: message`.
    pub problems: Vec<String>,
    /// Changed settings that take effect only after a restart.
    pub restart_required: Vec<String>,
}

/// The result of a reload.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReloadOutcome {
    /// The new policies are running.
    Applied,
    /// The file has problems; the previous policies keep running.
    Rejected,
    /// Nothing changed.
    Unchanged,
}

impl ReloadOutcome {
    /// Every outcome, in declaration order.
    pub const ALL: [ReloadOutcome; 3] = [ReloadOutcome::Applied, ReloadOutcome::Rejected, ReloadOutcome::Unchanged];

    /// Label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ReloadOutcome::Applied => "applied",
            ReloadOutcome::Rejected => "rejected",
            ReloadOutcome::Unchanged => "unchanged",
        }
    }
}

/// Owns the running policies and reloads them from the config file.
pub struct Reloader {
    /// The running policies; readers load a snapshot per operation.
    current: ArcSwap<Policies>,
    /// Filter kinds, for rebuilding.
    registry: Registry,
    /// The config file, when the policies came from one.
    path: Option<PathBuf>,
    /// The text of the running config, to skip reloads that change nothing
    /// (with the contents of the files it names, kept in the policies).
    text: Mutex<String>,
    /// Filter state kept across reloads.
    states: Mutex<FilterStates>,
    /// The last reload attempt.
    status: Mutex<Option<ReloadStatus>>,
    /// Reload attempts by outcome (indexed by [`ReloadOutcome`]).
    counts: [crate::metrics::Counter; 3],
    /// How many reloads were applied: the cluster tells the other nodes.
    applied: tokio::sync::watch::Sender<u64>,
    /// The log output's level, when the binary installed one to reload.
    log_level: OnceLock<LogLevel>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader").field("path", &self.path).field("registry", &self.registry).finish()
    }
}

impl Reloader {
    /// A reloader running `policies`, read from `path` (with `text`).
    pub fn new(
        policies: Policies,
        states: FilterStates,
        registry: Registry,
        path: Option<PathBuf>,
        text: String,
    ) -> Self {
        Reloader {
            current: ArcSwap::from_pointee(policies),
            registry,
            path,
            text: Mutex::new(text),
            states: Mutex::new(states),
            status: Mutex::new(None),
            counts: Default::default(),
            applied: tokio::sync::watch::Sender::new(0),
            log_level: OnceLock::new(),
        }
    }

    /// Lets reloads change the level of the installed log output (`[log]
    /// level`); only the first call counts.
    pub fn control_log_level(&self, level: LogLevel) {
        let _ = self.log_level.set(level);
    }

    /// Counts applied reloads; changes each time new policies start running.
    pub fn applied(&self) -> tokio::sync::watch::Receiver<u64> {
        self.applied.subscribe()
    }

    /// The running policies.
    pub fn current(&self) -> arc_swap::Guard<Arc<Policies>> {
        self.current.load()
    }

    /// The last reload attempt, if any.
    pub fn status(&self) -> Option<ReloadStatus> {
        lock(&self.status).clone()
    }

    /// Reload attempts by outcome.
    pub fn counts(&self) -> impl Iterator<Item = (ReloadOutcome, u64)> + '_ {
        ReloadOutcome::ALL.iter().map(|o| (*o, self.counts[*o as usize].get()))
    }

    /// Reloads the config file: on success the new policies replace the old
    /// ones at once; on any problem the old ones keep running.
    pub fn reload(&self) -> ReloadStatus {
        let status = self.try_reload();
        self.counts[status.outcome as usize].inc();
        match status.outcome {
            ReloadOutcome::Applied => {
                tracing::info!(restart_required = ?status.restart_required, "{}", status.message)
            }
            ReloadOutcome::Unchanged => tracing::debug!("{}", status.message),
            ReloadOutcome::Rejected => {
                tracing::error!(problems = ?status.problems, "{}", status.message)
            }
        }
        *lock(&self.status) = Some(status.clone());
        if status.outcome == ReloadOutcome::Applied {
            self.applied.send_modify(|n| *n += 1);
        }
        status
    }

    fn try_reload(&self) -> ReloadStatus {
        let at_ms = crate::protocol::now_ms();
        let status = |outcome, message: String, problems: Vec<String>| ReloadStatus {
            at_ms,
            outcome,
            message,
            problems,
            restart_required: Vec::new(),
        };
        let Some(path) = &self.path else {
            return status(ReloadOutcome::Unchanged, "no config file to reload".into(), Vec::new());
        };
        let text = match read(path) {
            Ok(text) => text,
            Err(problems) => {
                let lines = problems.problems.iter().map(|p| p.message.clone()).collect();
                return status(
                    ReloadOutcome::Rejected,
                    format!("cannot read {}; keeping the current policies", path.display()),
                    lines,
                );
            }
        };
        if text.trim().is_empty() {
            // An editor that truncates before writing leaves an empty file for
            // a moment; applying it would drop every policy.
            return status(
                ReloadOutcome::Rejected,
                format!("{} is empty; keeping the current policies", path.display()),
                Vec::new(),
            );
        }
        if *lock(&self.text) == text && !self.current.load().files_changed() {
            return status(
                ReloadOutcome::Unchanged,
                format!("{} and the files it names have not changed", path.display()),
                Vec::new(),
            );
        }
        let mut states = lock(&self.states);
        match Policies::build(&text, &self.registry, &states) {
            Err(problems) => status(
                ReloadOutcome::Rejected,
                format!("{} has {} problem(s); keeping the current policies", path.display(), problems.len()),
                problems.iter().map(ToString::to_string).collect(),
            ),
            Ok((mut policies, kept)) => {
                let running = self.current.load();
                let restart_required = restart_required(&running.config, &policies.config);
                // Settings read only at start-up keep their running values, so
                // the snapshot always describes what the server does.
                policies.config.server = running.config.server.clone();
                policies.config.reload = running.config.reload.clone();
                policies.config.store = running.config.store.clone();
                policies.config.cluster = running.config.cluster.clone();
                policies.config.log.format = running.config.log.format;
                let new_level =
                    (policies.config.log.level != running.config.log.level).then(|| policies.config.log.level.clone());
                self.current.store(Arc::new(policies));
                if let (Some(level), Some(log_level)) = (new_level, self.log_level.get()) {
                    log_level.set(&level);
                }
                *states = kept;
                *lock(&self.text) = text;
                let mut applied =
                    status(ReloadOutcome::Applied, format!("applied the policies in {}", path.display()), Vec::new());
                applied.restart_required = restart_required;
                applied
            }
        }
    }
}

/// Settings that changed but apply only after a restart.
fn restart_required(running: &Config, new: &Config) -> Vec<String> {
    let (a, b) = (&running.server, &new.server);
    let mut changed = Vec::new();
    let mut note = |key: &str, differs: bool| {
        if differs {
            changed.push(format!("server.{key}"));
        }
    };
    note("bind", a.bind != b.bind);
    note("workers", a.workers != b.workers);
    note("max_connections", a.max_connections != b.max_connections);
    note("max_connections_per_ip", a.max_connections_per_ip != b.max_connections_per_ip);
    note("header_read_timeout", a.header_read_timeout != b.header_read_timeout);
    note("trusted_proxies", a.trusted_proxies != b.trusted_proxies);
    if running.store != new.store {
        changed.push("store".to_owned());
    }
    if running.cluster != new.cluster {
        changed.push("cluster".to_owned());
    }
    if running.reload.watch != new.reload.watch {
        changed.push("reload.watch".to_owned());
    }
    if running.log.format != new.log.format {
        changed.push("log.format".to_owned());
    }
    changed
}

/// How long the watched directories must be quiet before a reload, so that
/// an editor's save (truncate, write, rename…) is read once, whole.
const QUIET: Duration = Duration::from_millis(150);

/// Watches the config file and the files it names, and listens for SIGHUP;
/// both trigger [`Reloader::reload`]. Files are watched through their
/// directories (editors replace files by rename, so a file itself cannot be
/// watched), following symlinks, as a Kubernetes ConfigMap swaps them; the
/// links are resolved again after each change. The watch starts when
/// this is called, not when the returned future is first polled, so an edit
/// made right after start-up is not missed; the future runs until dropped.
pub fn watch(reloader: Arc<Reloader>) -> impl Future<Output = ()> + Send + 'static {
    let (tx, rx) = mpsc::unbounded_channel::<()>();
    let mut files = None;
    #[cfg(unix)]
    let mut hangup = None;
    if let Some(path) = &reloader.path {
        if reloader.current().config.reload.watch {
            match FileWatch::new(tx.clone()) {
                Ok(mut watch) => {
                    watch.update(&watched_files(&reloader));
                    files = Some(Arc::new(Mutex::new(watch)));
                }
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "cannot watch the config file; reload with SIGHUP")
                }
            }
        }
        #[cfg(unix)]
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => hangup = Some(signal),
            Err(e) => tracing::warn!(error = %e, "cannot listen for SIGHUP"),
        }
    }
    let mut applied = reloader.applied();
    async move {
        #[cfg(unix)]
        let _hangup = hangup.map(|mut hangup| {
            AbortOnDrop(tokio::spawn(async move {
                while hangup.recv().await.is_some() {
                    if tx.send(()).is_err() {
                        return;
                    }
                }
            }))
        });
        #[cfg(not(unix))]
        drop(tx);
        let mut rx = rx;
        loop {
            let reload = tokio::select! {
                event = rx.recv() => match event {
                    Some(()) => true,
                    None => return,
                },
                // A reload from elsewhere (`POST /admin/reload`, the cluster)
                // may name other files: watch them.
                changed = applied.changed(), if files.is_some() => match changed {
                    Ok(()) => false,
                    Err(_) => return,
                },
            };
            if reload {
                // Wait for the burst of events to end.
                while let Ok(Some(())) = tokio::time::timeout(QUIET, rx.recv()).await {}
            }
            let reloader = reloader.clone();
            let files = files.clone();
            // Reading and building can take a moment (large rule sets), and
            // watching is file system calls: off the runtime.
            let _ = tokio::task::spawn_blocking(move || {
                let Some(files) = files else {
                    reloader.reload();
                    return;
                };
                let mut files = lock(&files);
                // Watch what the files resolve to now (a symlink may have been
                // swapped) before reading them, so no later change is missed.
                files.update(&watched_files(&reloader));
                if reload {
                    reloader.reload();
                    // The new config may name other files; read them once more
                    // if so, in case they changed before they were watched.
                    if files.update(&watched_files(&reloader)) {
                        reloader.reload();
                    }
                }
            })
            .await;
        }
    }
}

/// The files a reload reads: the config file and the files it names.
fn watched_files(reloader: &Reloader) -> Vec<PathBuf> {
    let current = reloader.current();
    reloader.path.iter().cloned().chain(current.config.referenced_files().into_iter().map(Path::to_owned)).collect()
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches files through their directories, symlinks included: for each
/// file, the directory of every link met while resolving it and the
/// directory of the file it resolves to. A Kubernetes ConfigMap is
/// `config.toml -> ..data/config.toml` with `..data -> v1`, updated by
/// renaming a new `..data` link over the old one; that rename, and an edit of
/// `v1/config.toml` itself, are both seen. [`FileWatch::update`] resolves the
/// files again after each change, so the watch follows the links.
struct FileWatch {
    /// The notify watcher; dropping it stops every watch.
    watcher: notify::RecommendedWatcher,
    /// The directories watched now.
    directories: BTreeSet<PathBuf>,
    /// Names of the files and links that matter, shared with the watcher's
    /// callback, which ignores events on anything else (the database may
    /// live in the same directory and change all the time).
    names: Arc<Mutex<BTreeSet<OsString>>>,
}

impl FileWatch {
    /// A watcher that sends `()` to `tx` on each relevant event, watching nothing yet.
    fn new(tx: mpsc::UnboundedSender<()>) -> notify::Result<Self> {
        let names = Arc::new(Mutex::new(BTreeSet::<OsString>::new()));
        let relevant = names.clone();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            let Ok(event) = event else { return };
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let names = lock(&relevant);
            if event.paths.iter().any(|p| p.file_name().is_some_and(|name| names.contains(name))) {
                let _ = tx.send(());
            }
        })?;
        Ok(FileWatch { watcher, directories: BTreeSet::new(), names })
    }

    /// Resolves `files` again and watches what they go through now; returns
    /// whether that differs from what was watched.
    fn update(&mut self, files: &[PathBuf]) -> bool {
        use notify::{RecursiveMode, Watcher};
        let chain: Vec<PathBuf> = files.iter().flat_map(|file| resolution_chain(file)).collect();
        let names: BTreeSet<OsString> = chain.iter().filter_map(|p| p.file_name()).map(ToOwned::to_owned).collect();
        // By canonical name: one directory reached by two paths is one watch.
        let directories: BTreeSet<PathBuf> = chain
            .iter()
            .filter_map(|p| p.parent())
            .map(|dir| std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_owned()))
            .collect();
        let changed = *lock(&self.names) != names || self.directories != directories;
        *lock(&self.names) = names;
        for gone in self.directories.difference(&directories) {
            // It may be gone already (a ConfigMap deletes the old version).
            let _ = self.watcher.unwatch(gone);
        }
        let mut watched = BTreeSet::new();
        for directory in directories {
            if self.directories.contains(&directory) {
                watched.insert(directory);
                continue;
            }
            match self.watcher.watch(&directory, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    watched.insert(directory);
                }
                Err(e) => {
                    tracing::warn!(error = %e, directory = %directory.display(), "cannot watch a directory of the config")
                }
            }
        }
        self.directories = watched;
        changed
    }
}

/// Every path whose change can change what `file` reads as: `file` itself
/// (made absolute), each symlink met while resolving it (in any component),
/// and the path it resolves to. Resolved by hand, not with `canonicalize`,
/// to see the links on the way; a missing file ends the chain where it is.
fn resolution_chain(file: &Path) -> Vec<PathBuf> {
    /// Links followed before giving up, as the kernel does (ELOOP).
    const MAX_LINKS: usize = 40;
    let start = std::path::absolute(file).unwrap_or_else(|_| file.to_owned());
    let mut chain = vec![start.clone()];
    // Components still to resolve, the next one last.
    let mut rest: Vec<PathBuf> = start.components().rev().map(|c| PathBuf::from(c.as_os_str())).collect();
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(component) = rest.pop() {
        match component.components().next() {
            Some(Component::CurDir) | None => {}
            Some(Component::ParentDir) => {
                resolved.pop();
            }
            Some(Component::Normal(name)) => {
                let next = resolved.join(name);
                match std::fs::read_link(&next) {
                    Ok(target) if links < MAX_LINKS => {
                        links += 1;
                        chain.push(next);
                        if target.is_absolute() {
                            resolved = PathBuf::new();
                        }
                        rest.extend(target.components().rev().map(|c| PathBuf::from(c.as_os_str())));
                    }
                    _ => resolved = next,
                }
            }
            Some(root) => resolved.push(root.as_os_str()),
        }
    }
    chain.push(resolved);
    chain.dedup();
    chain
}
