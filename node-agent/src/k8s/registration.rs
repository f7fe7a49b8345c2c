//! Registration of this node's `BlockNode`: the data address (canonical `ip:port`,
//! never a wildcard or `:port`, because peers dial it), the data directory, topology
//! labels, capacity and allocatable space from statvfs (also in binary units for
//! `kubectl get bn`), the count of hosted replicas, and the agent version. Its status
//! carries the `Ready` and `DiskPressure` conditions ([`node_conditions`]), whose
//! transition times move only when their status does, so an idle agent's writes change
//! nothing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use api::{BlockNode, BlockNodeSpec, BlockNodeStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Client;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

use super::{Error, Result};

/// A data address peers can dial: a literal IP (not unspecified) and a non-zero port,
/// written canonically (`10.0.0.5:7400`, `[fd00::5]:7400`).
pub fn validate_data_address(address: &str) -> Result<SocketAddr> {
    let bad = |reason: &str| Error::DataAddress {
        address: address.to_string(),
        reason: reason.to_string(),
    };
    if address.starts_with(':') {
        return Err(bad(
            "it has no IP; write ip:port, for example 10.0.0.5:7400",
        ));
    }
    let addr: SocketAddr = address
        .parse()
        .map_err(|_| bad("it is not ip:port (IPv6 as [addr]:port; host names are not allowed)"))?;
    if addr.ip().is_unspecified() {
        return Err(bad(
            "a wildcard IP cannot be dialled by peers; use this node's IP",
        ));
    }
    if addr.port() == 0 {
        return Err(bad("port 0 is not a port peers can dial"));
    }
    if addr.to_string() != address {
        return Err(bad(&format!("it is not canonical; write {addr}")));
    }
    Ok(addr)
}

/// Capacity and available bytes of the filesystem holding `dir`.
pub fn disk_usage(dir: &Path) -> Result<(u64, u64)> {
    let err = |source| Error::DiskUsage {
        path: dir.display().to_string(),
        source,
    };
    let st = rustix::fs::statvfs(dir).map_err(|e| err(e.into()))?;
    let frsize = st.f_frsize;
    Ok((
        st.f_blocks.saturating_mul(frsize),
        st.f_bavail.saturating_mul(frsize),
    ))
}

/// What this agent registers.
#[derive(Clone, Debug)]
pub struct NodeRegistration {
    pub node_name: String,
    pub data_address: String,
    pub data_dir: PathBuf,
    /// Topology labels (zone, hostname) copied from the Node.
    pub topology: BTreeMap<String, String>,
    pub agent_version: String,
}

/// What the agent knows of itself when it registers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeHealth {
    /// Space already assigned to this node's replicas.
    pub promised_bytes: u64,
    /// Replicas hosted on this node.
    pub replicas: u32,
    /// The agent's Lease was renewed within its duration and no lapse awaits
    /// confirmation (see `LeaseRenewer::is_fresh`).
    pub lease_renewing: bool,
}

impl NodeRegistration {
    /// Applies the `BlockNode` spec and status. Allocatable is what is left of the
    /// capacity after `health.promised_bytes`, bounded by what the filesystem really has
    /// free. When the data directory cannot be measured, the status says so (`Ready`
    /// False, `DiskUnusable`) and the error is returned.
    pub async fn apply(&self, client: &Client, health: NodeHealth) -> Result<BlockNodeStatus> {
        validate_data_address(&self.data_address)?;
        let usage = disk_usage(&self.data_dir);
        let api: Api<BlockNode> = Api::all(client.clone());
        let pp = PatchParams::apply(api::FIELD_MANAGER_AGENT).force();
        let spec = BlockNodeSpec {
            node_name: self.node_name.clone(),
            data_address: self.data_address.clone(),
            data_dir: self.data_dir.display().to_string(),
            topology: self.topology.clone(),
            ..Default::default()
        };
        let labels: BTreeMap<&str, &str> = self
            .topology
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain([(api::LABEL_MANAGED_BY, api::FIELD_MANAGER_AGENT)])
            .collect();
        let body = json!({
            "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
            "kind": "BlockNode",
            "metadata": {"name": self.node_name, "labels": labels},
            "spec": spec,
        });
        let current = api
            .patch(&self.node_name, &pp, &Patch::Apply(&body))
            .await
            .map_err(Error::Kube)?;
        let previous = current.status.map(|s| s.conditions).unwrap_or_default();
        let (capacity, available) = *usage.as_ref().unwrap_or(&(0, 0));
        let allocatable = capacity
            .saturating_sub(health.promised_bytes)
            .min(available);
        let disk = usage.as_ref().err().map(|e| e.to_string());
        let status = BlockNodeStatus {
            capacity_bytes: capacity,
            allocatable_bytes: allocatable,
            capacity: Some(api::format_bytes_binary(capacity)),
            free: Some(api::format_bytes_binary(allocatable)),
            replicas: health.replicas,
            agent_version: Some(self.agent_version.clone()),
            conditions: node_conditions(
                &NodeState {
                    capacity,
                    available,
                    disk_error: disk,
                    lease_renewing: health.lease_renewing,
                },
                &previous,
                k8s_openapi::jiff::Timestamp::now(),
            ),
            ..Default::default()
        };
        let body = json!({
            "apiVersion": format!("{}/{}", api::GROUP, api::VERSION),
            "kind": "BlockNode",
            "status": status,
        });
        api.patch_status(&self.node_name, &pp, &Patch::Apply(&body))
            .await
            .map_err(Error::Kube)?;
        usage?;
        Ok(status)
    }
}

/// `BlockNode` condition type: True while the agent is registered, its Lease is
/// renewing and its data directory's filesystem can be measured.
pub const READY: &str = "Ready";
/// `BlockNode` condition type: True while less than [`DISK_PRESSURE_FREE_PERCENT`] of
/// the data directory's filesystem is free.
pub const DISK_PRESSURE: &str = "DiskPressure";
pub const DISK_PRESSURE_FREE_PERCENT: u64 = 10;

/// What the node's conditions are computed from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    /// Bytes of the data directory's filesystem, and how many of them are free.
    pub capacity: u64,
    pub available: u64,
    /// Why the data directory's filesystem could not be measured, if it could not.
    pub disk_error: Option<String>,
    /// The agent's Lease is being renewed.
    pub lease_renewing: bool,
}

/// The conditions of a node in `state`: `Ready` and `DiskPressure`. A condition whose
/// status is unchanged keeps its transition time from `previous`. Messages name no
/// quantity that moves while the status stays (only `DiskPressure`'s free bytes, which
/// the space columns carry anyway).
pub fn node_conditions(
    state: &NodeState,
    previous: &[Condition],
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<Condition> {
    let (capacity, available) = (state.capacity, state.available);
    let pressure =
        u128::from(available) * 100 < u128::from(capacity) * u128::from(DISK_PRESSURE_FREE_PERCENT);
    let (status, reason) = if pressure {
        ("True", "LowDiskSpace")
    } else {
        ("False", "EnoughDiskSpace")
    };
    let (ready, ready_reason, ready_message) = match (&state.disk_error, state.lease_renewing) {
        (Some(e), _) => (
            "False",
            "DiskUnusable",
            format!("the data directory's filesystem cannot be measured: {e}"),
        ),
        (None, false) => (
            "False",
            "LeaseNotRenewing",
            "the agent's Lease is not being renewed (API server unreachable, or a lapse \
             not yet confirmed); its replicas are fenced and the operator may replace them"
                .to_string(),
        ),
        (None, true) => (
            "True",
            "AgentReady",
            "the agent is registered, its Lease is renewing and its data directory is usable"
                .to_string(),
        ),
    };
    let since = |type_: &str, status: &str| {
        previous
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now))
    };
    vec![
        Condition {
            type_: READY.to_string(),
            status: ready.to_string(),
            reason: ready_reason.to_string(),
            message: ready_message,
            last_transition_time: since(READY, ready),
            observed_generation: None,
        },
        Condition {
            type_: DISK_PRESSURE.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message: format!(
                "{available} of {capacity} bytes of the data directory's filesystem are free \
                 (pressure below {DISK_PRESSURE_FREE_PERCENT}%)"
            ),
            last_transition_time: since(DISK_PRESSURE, status),
            observed_generation: None,
        },
    ]
}

/// Keeps the `BlockNode` current: re-applies it every `interval_ms` with what
/// `health()` reports. Runs until dropped.
pub async fn keep_registered(
    registration: NodeRegistration,
    client: Client,
    health: impl Fn() -> NodeHealth + Send,
    interval_ms: u64,
) {
    loop {
        if let Err(e) = registration.apply(&client, health()).await {
            tracing::warn!(node = %registration.node_name, error = %e, "BlockNode update failed");
        }
        tokio::time::sleep(std::time::Duration::from_millis(interval_ms)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_address_table() {
        for ok in [
            "10.0.0.5:7400",
            "127.0.0.1:1",
            "[fd00::5]:7400",
            "[::1]:65535",
        ] {
            assert_eq!(validate_data_address(ok).unwrap().to_string(), ok);
        }
        for (bad, why) in [
            (":7400", "no IP"),
            ("0.0.0.0:7400", "wildcard"),
            ("[::]:7400", "wildcard"),
            ("10.0.0.5:0", "port 0"),
            ("node1:7400", "not ip:port"),
            ("10.0.0.5", "not ip:port"),
            ("fd00::5:7400", "not ip:port"),
            ("10.0.0.5:07400", "canonical"),
            ("[fd00:0::5]:7400", "canonical"),
            ("", "not ip:port"),
        ] {
            let err = validate_data_address(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }

    fn healthy(capacity: u64, available: u64) -> NodeState {
        NodeState {
            capacity,
            available,
            disk_error: None,
            lease_renewing: true,
        }
    }

    fn condition<'a>(conditions: &'a [Condition], type_: &str) -> &'a Condition {
        conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn disk_pressure_below_ten_percent_free_with_a_stable_transition_time() {
        let t = |s: i64| k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
        let c0 = node_conditions(&healthy(1000, 500), &[], t(0));
        let p0 = condition(&c0, DISK_PRESSURE);
        assert_eq!(
            (p0.type_.as_str(), p0.status.as_str(), p0.reason.as_str()),
            (DISK_PRESSURE, "False", "EnoughDiskSpace")
        );
        let at_ten = node_conditions(&healthy(1000, 100), &c0, t(60));
        let at_ten = condition(&at_ten, DISK_PRESSURE);
        assert_eq!(at_ten.status, "False", "10% free is enough");
        assert_eq!(at_ten.last_transition_time, Time(t(0)));
        let c1 = node_conditions(&healthy(1000, 99), &c0, t(120));
        let p1 = condition(&c1, DISK_PRESSURE);
        assert_eq!(
            (p1.status.as_str(), p1.reason.as_str()),
            ("True", "LowDiskSpace")
        );
        assert_eq!(p1.last_transition_time, Time(t(120)));
        let c2 = node_conditions(&healthy(1000, 0), &c1, t(180));
        assert_eq!(
            condition(&c2, DISK_PRESSURE).last_transition_time,
            Time(t(120)),
            "still True since 120"
        );
        assert_eq!(
            condition(&node_conditions(&healthy(0, 0), &[], t(0)), DISK_PRESSURE).status,
            "False"
        );
    }

    #[test]
    fn ready_follows_lease_and_disk_and_an_unchanged_state_rewrites_nothing() {
        let t = |s: i64| k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
        let starting = NodeState {
            lease_renewing: false,
            ..healthy(1000, 500)
        };
        let c0 = node_conditions(&starting, &[], t(0));
        let r0 = condition(&c0, READY);
        assert_eq!(
            (r0.status.as_str(), r0.reason.as_str()),
            ("False", "LeaseNotRenewing")
        );
        let c1 = node_conditions(&healthy(1000, 500), &c0, t(30));
        let r1 = condition(&c1, READY);
        assert_eq!(
            (r1.status.as_str(), r1.reason.as_str()),
            ("True", "AgentReady")
        );
        assert_eq!(r1.last_transition_time, Time(t(30)));
        // The same state a period later: the very same conditions, so the status the
        // agent applies is unchanged and the write is a no-op.
        assert_eq!(node_conditions(&healthy(1000, 500), &c1, t(60)), c1);
        let broken = NodeState {
            disk_error: Some("EIO".into()),
            ..Default::default()
        };
        let c2 = node_conditions(&broken, &c1, t(90));
        let r2 = condition(&c2, READY);
        assert_eq!(
            (r2.status.as_str(), r2.reason.as_str()),
            ("False", "DiskUnusable")
        );
        assert!(r2.message.contains("EIO"), "{}", r2.message);
        assert_eq!(r2.last_transition_time, Time(t(90)));
        // The disk error wins over a lapsed Lease: it is what the admin must fix.
        let both = NodeState {
            lease_renewing: false,
            ..broken
        };
        assert_eq!(
            condition(&node_conditions(&both, &c2, t(120)), READY).reason,
            "DiskUnusable"
        );
    }

    #[test]
    fn disk_usage_of_a_real_dir_is_nonzero_and_consistent() {
        let dir = std::env::temp_dir();
        let (cap, avail) = disk_usage(&dir).unwrap();
        assert!(cap > 0 && avail <= cap, "{cap} {avail}");
        assert!(matches!(
            disk_usage(Path::new("/nonexistent/blockvol")),
            Err(Error::DiskUsage { .. })
        ));
    }
}
