//! The live policy: an `ArcSwap` holding one complete version, replaced only by another complete
//! version. A broken edit is logged and counted; the old version keeps serving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use super::{Policy, Problems, load_dir};
use crate::backends::Registry;

pub struct PolicyStore {
    current: ArcSwap<Policy>,
    dir: PathBuf,
    backends: Arc<Registry>,
    next_version: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl PolicyStore {
    pub fn open(dir: &Path, backends: Arc<Registry>) -> Result<Self, Problems> {
        let policy = load_dir(dir, 1, &backends)?;
        Ok(PolicyStore {
            current: ArcSwap::from_pointee(policy),
            dir: dir.to_path_buf(),
            backends,
            next_version: AtomicU64::new(2),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// The backends policies resolve against (and their breakers).
    pub fn backends(&self) -> &Registry {
        &self.backends
    }

    /// The version a request pins for its whole lifetime.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// The current version for a short look (not held across an await): no reference count is
    /// taken, so the look does not write to the count every request shares.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Policy>> {
        self.current.load()
    }

    /// Reads the directory again; swaps only if every file is valid.
    pub fn reload(&self) -> Result<u64, Problems> {
        let version = self.next_version.fetch_add(1, Ordering::Relaxed);
        match load_dir(&self.dir, version, &self.backends) {
            Ok(policy) => {
                self.current.store(Arc::new(policy));
                self.reloads_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(version, "policy reloaded");
                Ok(version)
            }
            Err(problems) => {
                self.reloads_failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    kept_version = self.current.load().version,
                    problems = %problems,
                    "policy reload rejected; the previous policy keeps serving"
                );
                Err(problems)
            }
        }
    }
}
