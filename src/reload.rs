//! Watching files that may change while serving (policies, certificates). Events are debounced
//! and handed to a callback that rebuilds the whole derived state.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Keeps the OS watch alive; dropping it stops watching.
pub struct WatchHandle {
    _watcher: RecommendedWatcher,
    _task: tokio::task::JoinHandle<()>,
}

const DEBOUNCE: Duration = Duration::from_millis(150);

/// Calls `on_change` (on a blocking thread) after any change in `dirs`, coalescing bursts
/// such as an editor's write-rename or a Kubernetes ConfigMap symlink swap.
pub fn watch_dirs<F>(
    what: &'static str,
    dirs: Vec<PathBuf>,
    on_change: F,
) -> notify::Result<WatchHandle>
where
    F: Fn() + Send + Sync + 'static,
{
    watch(what, dirs, RecursiveMode::NonRecursive, on_change)
}

/// [`watch_dirs`] over whole trees (the knowledge base's collections and their subdirectories).
pub fn watch_trees<F>(
    what: &'static str,
    dirs: Vec<PathBuf>,
    on_change: F,
) -> notify::Result<WatchHandle>
where
    F: Fn() + Send + Sync + 'static,
{
    watch(what, dirs, RecursiveMode::Recursive, on_change)
}

fn watch<F>(
    what: &'static str,
    dirs: Vec<PathBuf>,
    mode: RecursiveMode,
    on_change: F,
) -> notify::Result<WatchHandle>
where
    F: Fn() + Send + Sync + 'static,
{
    let (tx, mut rx) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !ev.kind.is_access()
        {
            let _ = tx.try_send(());
        }
    })?;
    for dir in &dirs {
        watcher.watch(dir, mode)?;
    }
    let on_change = std::sync::Arc::new(on_change);
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Let the burst settle, then drop what piled up meanwhile.
            tokio::time::sleep(DEBOUNCE).await;
            while rx.try_recv().is_ok() {}
            tracing::debug!(what, "change detected");
            let f = on_change.clone();
            let _ = tokio::task::spawn_blocking(move || f()).await;
        }
    });
    Ok(WatchHandle {
        _watcher: watcher,
        _task: task,
    })
}
