//! Reading the cluster: one [`Snapshot`] of every blockvol object plus the PVs and Leases
//! it is joined with, and resolving what a user typed (`NAME`, `PVC`, `ns/pvc`) to a
//! `BlockVolume`. Optional data (PVs, Leases) that RBAC hides is left out rather than
//! failing the command; the blockvol objects themselves must be readable.

use api::{BlockNode, BlockReplica, BlockVolume};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};

use crate::error::{Error, Result, is_not_found};
use crate::views::{Claim, Snapshot, pv_handle};

/// How many of a volume's Events `describe` shows (the most recent).
pub const RECENT_EVENTS_MAX: usize = 15;

/// The API client and the namespaces commands default to.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// Namespace of the blockvol agents' Leases (where the chart installs blockvol).
    pub blockvol_namespace: String,
    /// Namespace for claim names given without one (`--namespace`, else the kubeconfig's).
    pub namespace: String,
}

impl Cluster {
    pub fn volumes(&self) -> Api<BlockVolume> {
        Api::all(self.client.clone())
    }

    pub async fn volume(&self, name: &str) -> Result<BlockVolume> {
        match self.volumes().get(name).await {
            Ok(v) => Ok(v),
            Err(e) if is_not_found(&e) => Err(Error::VolumeNotFound { name: name.into() }),
            Err(e) => Err(Error::kube(format!("reading BlockVolume {name}"), e)),
        }
    }

    /// Every blockvol object, the driver's PVs and the agents' Leases.
    pub async fn snapshot(&self) -> Result<Snapshot> {
        let volumes = self
            .volumes()
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube_list("listing BlockVolumes", e))?
            .items;
        let replicas = Api::<BlockReplica>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube_list("listing BlockReplicas", e))?
            .items;
        let nodes = Api::<BlockNode>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube_list("listing BlockNodes", e))?
            .items;
        let pvs = self.blockvol_pvs().await.ok();
        let leases = self.agent_leases().await.ok();
        Ok(Snapshot {
            volumes,
            replicas,
            nodes,
            pvs,
            leases,
            now: None,
        })
    }

    /// The PersistentVolumes of the blockvol CSI driver.
    pub async fn blockvol_pvs(&self) -> Result<Vec<PersistentVolume>> {
        let pvs = Api::<PersistentVolume>::all(self.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(|e| Error::kube("listing PersistentVolumes", e))?;
        Ok(pvs
            .items
            .into_iter()
            .filter(|pv| pv_handle(pv).is_some())
            .collect())
    }

    /// Every Lease in the blockvol namespace (one per agent, plus the operator's).
    pub async fn agent_leases(&self) -> Result<Vec<Lease>> {
        Ok(
            Api::<Lease>::namespaced(self.client.clone(), &self.blockvol_namespace)
                .list(&ListParams::default())
                .await
                .map_err(|e| {
                    Error::kube(
                        format!("listing Leases in namespace {}", self.blockvol_namespace),
                        e,
                    )
                })?
                .items,
        )
    }

    /// The replicas of one volume (by the label the operator puts on them).
    pub async fn replicas_of(&self, volume: &str) -> Result<Vec<BlockReplica>> {
        let lp = ListParams::default().labels(&format!("{}={volume}", api::LABEL_VOLUME));
        Ok(Api::<BlockReplica>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::kube_list(format!("listing the BlockReplicas of {volume}"), e))?
            .items)
    }

    /// Events about one object of `kind`, in every namespace, oldest first, at most the
    /// [`RECENT_EVENTS_MAX`] most recent.
    pub async fn events_of(&self, kind: &str, name: &str) -> Result<Vec<Event>> {
        let lp = ListParams::default().fields(&format!(
            "involvedObject.kind={kind},involvedObject.name={name}"
        ));
        let mut events = Api::<Event>::all(self.client.clone())
            .list(&lp)
            .await
            .map_err(|e| Error::kube(format!("listing the Events of {kind} {name}"), e))?
            .items;
        events.sort_by_key(event_time);
        let skip = events.len().saturating_sub(RECENT_EVENTS_MAX);
        Ok(events.split_off(skip))
    }

    /// What the user named: a BlockVolume, or a claim (`ns/name`, or `name` in the
    /// default namespace) bound to a PV of the blockvol driver.
    pub async fn resolve(&self, what: &str) -> Result<(BlockVolume, Claim)> {
        if let Some((namespace, claim)) = what.split_once('/') {
            return self.resolve_claim(namespace, claim).await;
        }
        match self.volumes().get(what).await {
            Ok(v) => {
                let claim = match self.blockvol_pvs().await {
                    Ok(pvs) => Snapshot {
                        pvs: Some(pvs),
                        ..Default::default()
                    }
                    .claim_of(what),
                    Err(_) => Claim::Unknown,
                };
                Ok((v, claim))
            }
            Err(e) if is_not_found(&e) => {
                match self.resolve_claim(&self.namespace.clone(), what).await {
                    Err(Error::ClaimNotFound { .. }) => Err(Error::NothingNamed {
                        name: what.into(),
                        namespace: self.namespace.clone(),
                    }),
                    other => other,
                }
            }
            Err(e) => Err(Error::kube(format!("reading BlockVolume {what}"), e)),
        }
    }

    async fn resolve_claim(&self, namespace: &str, name: &str) -> Result<(BlockVolume, Claim)> {
        let pvcs: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let pvc = match pvcs.get(name).await {
            Ok(p) => p,
            Err(e) if is_not_found(&e) => {
                return Err(Error::ClaimNotFound {
                    namespace: namespace.into(),
                    name: name.into(),
                });
            }
            Err(e) => {
                return Err(Error::kube(
                    format!("reading PersistentVolumeClaim {namespace}/{name}"),
                    e,
                ));
            }
        };
        let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.clone()) else {
            return Err(Error::ClaimNotBound {
                namespace: namespace.into(),
                name: name.into(),
            });
        };
        let pv = Api::<PersistentVolume>::all(self.client.clone())
            .get(&pv_name)
            .await
            .map_err(|e| Error::kube(format!("reading PersistentVolume {pv_name}"), e))?;
        let Some(handle) = pv_handle(&pv) else {
            let driver = pv
                .spec
                .as_ref()
                .and_then(|s| s.csi.as_ref())
                .map_or_else(|| "none: not a CSI volume".into(), |c| c.driver.clone());
            return Err(Error::NotBlockvol {
                pv: pv.name_any(),
                claim: format!("{namespace}/{name}"),
                driver,
            });
        };
        let volume = self.volume(handle).await?;
        Ok((
            volume,
            Claim::Bound {
                namespace: namespace.into(),
                name: name.into(),
                pv: pv_name,
            },
        ))
    }
}

/// When an Event last happened, whichever API wrote it: the series' last observation,
/// the legacy last timestamp, the events.k8s.io event time, or its creation.
pub fn event_time(e: &Event) -> Option<k8s_openapi::jiff::Timestamp> {
    e.series
        .as_ref()
        .and_then(|s| s.last_observed_time.as_ref().map(|t| t.0))
        .or_else(|| e.last_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.event_time.as_ref().map(|t| t.0))
        .or_else(|| e.first_timestamp.as_ref().map(|t| t.0))
        .or_else(|| e.metadata.creation_timestamp.as_ref().map(|t| t.0))
}
