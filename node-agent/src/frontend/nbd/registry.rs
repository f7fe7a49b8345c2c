//! The set of exports the NBD server offers, changeable at runtime. Removing an export
//! closes its connections: they stop reading requests, finish what is in flight, and
//! hang up, so nothing reaches a backend after `remove` has waited for them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::backend::{BackendError, BlockBackend};
use super::{Error, Result};

/// Longest export name the protocol allows (strings MUST be ≤ 4096 bytes).
pub const EXPORT_NAME_BYTES_MAX: usize = 4096;

/// One export: a backend and the signal that tells its connections to close.
pub struct Export {
    name: String,
    backend: Arc<dyn BlockBackend>,
    removed: watch::Sender<bool>,
}

impl Export {
    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn backend(&self) -> &Arc<dyn BlockBackend> {
        &self.backend
    }
    /// Resolves once the export has been removed from its registry.
    pub(crate) fn removed(&self) -> watch::Receiver<bool> {
        self.removed.subscribe()
    }
    /// Number of live connections to this export (each holds one receiver).
    pub fn connection_count(&self) -> usize {
        self.removed.receiver_count()
    }
}

/// Exports by name; cheap to clone and share between listeners.
#[derive(Default, Clone)]
pub struct ExportRegistry {
    exports: Arc<Mutex<BTreeMap<String, Arc<Export>>>>,
}

impl ExportRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Export>>> {
        // The map holds no invariants a panicking holder could break half-way.
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an export. Names must be non-empty UTF-8 without NUL, at most
    /// `EXPORT_NAME_BYTES_MAX` bytes, and not already in use.
    pub fn add(&self, name: &str, backend: Arc<dyn BlockBackend>) -> Result<Arc<Export>> {
        validate_name(name)?;
        let bs = backend.block_size();
        if !bs.is_power_of_two() || bs > 65536 {
            return Err(Error::InvalidExport {
                name: name.into(),
                reason: format!("block size {bs} is not a power of two between 1 and 65536"),
            });
        }
        let mut map = self.lock();
        if map.contains_key(name) {
            return Err(Error::ExportExists(name.into()));
        }
        let (removed, _) = watch::channel(false);
        let export = Arc::new(Export {
            name: name.into(),
            backend,
            removed,
        });
        map.insert(name.into(), export.clone());
        Ok(export)
    }

    /// Removes an export and tells its connections to close; returns once none is left
    /// or after `wait_ms`, whichever comes first. Returns `ExportNotFound` for unknown names.
    pub async fn remove(&self, name: &str, wait_ms: u64) -> Result<()> {
        let export = self
            .lock()
            .remove(name)
            .ok_or_else(|| Error::ExportNotFound(name.into()))?;
        export.removed.send_replace(true);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
        while export.connection_count() > 0 {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::ExportBusy {
                    name: name.into(),
                    connections: export.connection_count(),
                });
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// Grows an export's backend. Clients connected before see the old size until they
    /// reconnect (NBD has no size-change notification); new connections see the new one.
    pub fn resize(&self, name: &str, new_size_bytes: u64) -> Result<()> {
        let export = self
            .get(name)
            .ok_or_else(|| Error::ExportNotFound(name.into()))?;
        let old = export.backend.size_bytes();
        if new_size_bytes < old {
            return Err(Error::Backend(BackendError::Invalid(format!(
                "export {name}: shrinking from {old} to {new_size_bytes} bytes is not supported"
            ))));
        }
        export.backend.resize(new_size_bytes)?;
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.lock().get(name).cloned()
    }

    /// Export names in sorted order.
    pub fn names(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }
}

fn validate_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "name is empty"
    } else if name.len() > EXPORT_NAME_BYTES_MAX {
        "name is longer than 4096 bytes"
    } else if name.contains('\0') {
        "name contains NUL"
    } else {
        return Ok(());
    };
    Err(Error::InvalidExport {
        name: name.chars().take(64).collect(),
        reason: reason.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frontend::nbd::MemBackend;

    fn mem() -> Arc<dyn BlockBackend> {
        Arc::new(MemBackend::new(4096, 512).expect("backend"))
    }

    #[tokio::test]
    async fn registry_adds_lists_and_removes_exports() {
        let r = ExportRegistry::new();
        r.add("b", mem()).expect("add b");
        r.add("a", mem()).expect("add a");
        assert!(matches!(r.add("a", mem()), Err(Error::ExportExists(_))));
        assert!(matches!(r.add("", mem()), Err(Error::InvalidExport { .. })));
        assert_eq!(r.names(), vec!["a".to_string(), "b".to_string()]);
        r.remove("a", 100).await.expect("remove");
        assert!(r.get("a").is_none());
        assert!(matches!(
            r.remove("a", 100).await,
            Err(Error::ExportNotFound(_))
        ));
    }

    #[test]
    fn registry_resize_grows_and_refuses_to_shrink() {
        let r = ExportRegistry::new();
        r.add("v", mem()).expect("add");
        r.resize("v", 8192).expect("grow");
        assert_eq!(r.get("v").expect("get").backend().size_bytes(), 8192);
        assert!(r.resize("v", 4096).is_err());
        assert!(matches!(r.resize("nope", 1), Err(Error::ExportNotFound(_))));
    }
}
