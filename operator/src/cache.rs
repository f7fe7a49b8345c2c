//! Watch-fed caches of the objects every reconcile reads (volumes, replicas, `BlockNode`s,
//! Nodes, node agent Leases), so that a reconcile costs the API server nothing but its
//! writes, whatever the number of volumes.
//!
//! A cache may lag the API server. That is safe because every write stays conditional
//! on what the plan saw (see [`crate::controller::perform`]), and because the one read
//! whose staleness could do harm, a node agent Lease that looks expired, is confirmed
//! with a fresh read before a reconcile acts on it (see [`Cache::fresh_leases`]). A
//! failed watch counts as a gap in this process's view of the API server, as a failed
//! read did before (see [`LeaseObserver::api_gap`]).

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::{BlockNode, BlockReplica, BlockVolume};
use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use crate::leader::LeaseObserver;

/// Readers of the watch-fed stores; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    pub volumes: Store<BlockVolume>,
    pub replicas: Store<BlockReplica>,
    pub nodes: Store<BlockNode>,
    pub k8s_nodes: Store<Node>,
    pub leases: Store<Lease>,
}

/// Feeds `writer` from a watch of `api` until dropped. A watch error and the first
/// event after it mark a gap in this process's view of the API server.
fn feed<K>(
    api: Api<K>,
    writer: reflector::store::Writer<K>,
    observer: Arc<LeaseObserver>,
    mut on_apply: impl FnMut(&K) + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync,
    K: 'static,
{
    let mut failing = false;
    watcher(api, watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .for_each(move |ev| {
            match ev {
                Ok(ev) => {
                    if std::mem::take(&mut failing) {
                        observer.api_gap(Instant::now());
                    }
                    match ev {
                        watcher::Event::Apply(o) | watcher::Event::InitApply(o) => on_apply(&o),
                        _ => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        kind = %K::kind(&()),
                        error = %e,
                        "watch failed; node Lease expiry counts from its recovery"
                    );
                    observer.api_gap(Instant::now());
                    failing = true;
                }
            }
            futures::future::ready(())
        })
}

impl Cache {
    /// The cache and the future that keeps it fed (poll it for as long as the cache is
    /// used). Every Lease record a watch delivers is shown to `observer`, so its expiry
    /// clock counts from the last change this process saw.
    pub fn start(
        client: &Client,
        lease_namespace: &str,
        observer: Arc<LeaseObserver>,
    ) -> (Cache, impl Future<Output = ()> + Send + 'static) {
        let (volumes, vw) = reflector::store();
        let (replicas, rw) = reflector::store();
        let (nodes, nw) = reflector::store();
        let (k8s_nodes, kw) = reflector::store();
        let (leases, lw) = reflector::store();
        let lease_observer = observer.clone();
        let feeds = futures::future::join5(
            feed(Api::all(client.clone()), vw, observer.clone(), |_| {}),
            feed(Api::all(client.clone()), rw, observer.clone(), |_| {}),
            feed(Api::all(client.clone()), nw, observer.clone(), |_| {}),
            feed(Api::all(client.clone()), kw, observer.clone(), |_| {}),
            feed(
                Api::namespaced(client.clone(), lease_namespace),
                lw,
                observer,
                move |l: &Lease| {
                    if let Some(spec) = &l.spec {
                        lease_observer.expired(
                            &l.name_any(),
                            spec,
                            l.metadata.resource_version.as_deref().unwrap_or_default(),
                        );
                    }
                },
            ),
        );
        let cache = Cache {
            volumes,
            replicas,
            nodes,
            k8s_nodes,
            leases,
        };
        (cache, async move {
            feeds.await;
        })
    }

    /// Resolves once every store holds a complete first listing.
    pub async fn ready(&self) {
        let _ = futures::future::try_join5(
            self.volumes.wait_until_ready(),
            self.replicas.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.k8s_nodes.wait_until_ready(),
            self.leases.wait_until_ready(),
        )
        .await;
    }

    /// The replicas of volume `volume`.
    pub fn volume_replicas(&self, volume: &str) -> Vec<Arc<BlockReplica>> {
        self.replicas.state_filter(|r| r.spec.volume == volume)
    }

    /// The names of the volumes with a replica on node `node`.
    pub fn volumes_on(&self, node: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .replicas
            .state_filter(|r| r.spec.node == node)
            .iter()
            .map(|r| r.spec.volume.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The cached Leases, with those of `recheck` read afresh from the API server: a
    /// cache that lags would make a live node look expired, so a Lease the cache shows
    /// expired (or lacks) is confirmed before a decision rests on it.
    pub async fn fresh_leases(
        &self,
        api: &Api<Lease>,
        recheck: impl Fn(&Lease) -> bool,
        wanted: &[String],
    ) -> Result<Vec<Lease>, kube::Error> {
        let mut leases: Vec<Lease> = self.leases.state().iter().map(|l| (**l).clone()).collect();
        for name in wanted {
            let stale = leases
                .iter()
                .find(|l| &l.name_any() == name)
                .is_none_or(&recheck);
            if !stale {
                continue;
            }
            leases.retain(|l| &l.name_any() != name);
            if let Some(fresh) = api.get_opt(name).await? {
                leases.push(fresh);
            }
        }
        Ok(leases)
    }
}

/// The version of an object this process knows to be deleted.
const DELETED: &str = "";

/// Per object, the newest resourceVersion this process read from or wrote to the API
/// server. A cached copy with another version may predate this process's own last
/// write, and a plan made from it would be refused (or, for the volume status, undo that
/// write): such a view is read afresh instead. In the steady state the cache agrees and
/// nothing is read.
#[derive(Debug, Default)]
pub struct SeenVersions {
    volumes: Mutex<BTreeMap<String, String>>,
    /// Volume → its replicas → version.
    replicas: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    }
}

impl SeenVersions {
    /// Records `vol` as read from or written to the API server.
    pub fn volume(&self, vol: &BlockVolume) {
        if let Some(rv) = vol.resource_version() {
            lock(&self.volumes).insert(vol.name_any(), rv);
        }
    }

    /// Whether `cached` is the newest version of its volume this process has seen.
    pub fn volume_is_newest(&self, cached: &BlockVolume) -> bool {
        let rv = cached.resource_version();
        rv.is_some() && lock(&self.volumes).get(&cached.name_any()) == rv.as_ref()
    }

    /// Forgets a volume that is gone, with its replicas.
    pub fn forget_volume(&self, name: &str) {
        lock(&self.volumes).remove(name);
        lock(&self.replicas).remove(name);
    }

    /// Records a replica of `volume` as written at `version` (`None`: deleted).
    pub fn replica(&self, volume: &str, name: &str, version: Option<String>) {
        lock(&self.replicas)
            .entry(volume.to_string())
            .or_default()
            .insert(name.to_string(), version.unwrap_or_else(|| DELETED.into()));
    }

    /// Whether the cached replicas of `volume` show every replica at the version this
    /// process last read or wrote (a deleted one absent).
    pub fn replicas_current(&self, volume: &str, cached: &[BlockReplica]) -> bool {
        let mut all = lock(&self.replicas);
        let Some(known) = all.get_mut(volume) else {
            return true;
        };
        let cached_version = |name: &str| {
            cached
                .iter()
                .find(|r| r.name_any() == name)
                .map(|r| r.resource_version().unwrap_or_default())
                .unwrap_or_else(|| DELETED.into())
        };
        let current = known.iter().all(|(n, v)| cached_version(n) == *v);
        // A deletion the cache has caught up with needs no memory.
        known.retain(|n, v| v != DELETED || cached.iter().any(|r| r.name_any() == *n));
        current
    }

    /// Records the replicas of `volume` as just read (`fresh`); those the cache still
    /// holds but the read did not find are deleted.
    pub fn replicas_read(&self, volume: &str, fresh: &[BlockReplica], cached: &[BlockReplica]) {
        let mut known: BTreeMap<String, String> = fresh
            .iter()
            .map(|r| (r.name_any(), r.resource_version().unwrap_or_default()))
            .collect();
        for r in cached {
            known.entry(r.name_any()).or_insert_with(|| DELETED.into());
        }
        lock(&self.replicas).insert(volume.to_string(), known);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(name: &str, version: &str) -> BlockReplica {
        let mut spec = crate::model::test_support::replica(name, "n1").spec;
        spec.volume = "v".into();
        let mut r = BlockReplica::new(name, spec);
        r.metadata.resource_version = Some(version.into());
        r
    }

    #[test]
    fn a_cache_behind_this_process_own_replica_writes_is_not_current() {
        let seen = SeenVersions::default();
        let a1 = replica("a", "1");
        // Nothing written yet: the cache is trusted.
        assert!(seen.replicas_current("v", std::slice::from_ref(&a1)));
        // Written at 2, cache still at 1: read afresh.
        seen.replica("v", "a", Some("2".into()));
        assert!(!seen.replicas_current("v", std::slice::from_ref(&a1)));
        assert!(seen.replicas_current("v", &[replica("a", "2")]));
        // Created here, not in the cache yet.
        seen.replica("v", "b", Some("7".into()));
        assert!(!seen.replicas_current("v", &[replica("a", "2")]));
        // Deleted here, still in the cache.
        seen.replica("v", "b", None);
        assert!(!seen.replicas_current("v", &[replica("a", "2"), replica("b", "7")]));
        assert!(seen.replicas_current("v", &[replica("a", "2")]));
        // A fresh read settles it; what the cache holds beyond it counts as deleted.
        seen.replicas_read(
            "v",
            &[replica("a", "3")],
            &[replica("a", "2"), replica("c", "4")],
        );
        assert!(!seen.replicas_current("v", &[replica("a", "3"), replica("c", "4")]));
        assert!(!seen.replicas_current("v", &[replica("a", "2"), replica("c", "4")]));
        assert!(seen.replicas_current("v", &[replica("a", "3")]));
        // Forgetting the volume forgets its replicas.
        seen.forget_volume("v");
        assert!(seen.replicas_current("v", &[replica("a", "1")]));
    }

    #[test]
    fn a_cached_volume_is_used_only_at_the_newest_version_seen() {
        let seen = SeenVersions::default();
        let mut vol = BlockVolume::new("v", api::BlockVolumeSpec::with_size("1Gi"));
        vol.metadata.resource_version = Some("5".into());
        assert!(!seen.volume_is_newest(&vol), "never read: read it");
        seen.volume(&vol);
        assert!(seen.volume_is_newest(&vol));
        let mut written = vol.clone();
        written.metadata.resource_version = Some("6".into());
        seen.volume(&written);
        assert!(
            !seen.volume_is_newest(&vol),
            "predates this process's write"
        );
        assert!(seen.volume_is_newest(&written));
    }
}
