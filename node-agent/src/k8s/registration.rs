//! Registration of this node's `BlockNode`: the data address (canonical `ip:port`,
//! never a wildcard or `:port`, because peers dial it), the data directory, topology
//! labels, capacity and allocatable space from statvfs, and the agent version. Its
//! status carries the `DiskPressure` condition ([`node_conditions`]).

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

impl NodeRegistration {
    /// Applies the `BlockNode` spec and status. `promised_bytes` is the space already
    /// assigned to this node's replicas; allocatable is what is left of the capacity,
    /// bounded by what the filesystem really has free.
    pub async fn apply(&self, client: &Client, promised_bytes: u64) -> Result<BlockNodeStatus> {
        validate_data_address(&self.data_address)?;
        let (capacity, available) = disk_usage(&self.data_dir)?;
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
        let status = BlockNodeStatus {
            capacity_bytes: capacity,
            allocatable_bytes: capacity.saturating_sub(promised_bytes).min(available),
            agent_version: Some(self.agent_version.clone()),
            conditions: node_conditions(
                capacity,
                available,
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
        Ok(status)
    }
}

/// `BlockNode` condition type: True while less than [`DISK_PRESSURE_FREE_PERCENT`] of
/// the data directory's filesystem is free.
pub const DISK_PRESSURE: &str = "DiskPressure";
pub const DISK_PRESSURE_FREE_PERCENT: u64 = 10;

/// The conditions of a node whose data directory's filesystem has `capacity` bytes,
/// `available` of them free. A condition whose status is unchanged keeps its
/// transition time from `previous`.
pub fn node_conditions(
    capacity: u64,
    available: u64,
    previous: &[Condition],
    now: k8s_openapi::jiff::Timestamp,
) -> Vec<Condition> {
    let pressure =
        u128::from(available) * 100 < u128::from(capacity) * u128::from(DISK_PRESSURE_FREE_PERCENT);
    let (status, reason) = if pressure {
        ("True", "LowDiskSpace")
    } else {
        ("False", "EnoughDiskSpace")
    };
    let since = previous
        .iter()
        .find(|c| c.type_ == DISK_PRESSURE && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    vec![Condition {
        type_: DISK_PRESSURE.to_string(),
        status: status.to_string(),
        reason: reason.to_string(),
        message: format!(
            "{available} of {capacity} bytes of the data directory's filesystem are free \
             (pressure below {DISK_PRESSURE_FREE_PERCENT}%)"
        ),
        last_transition_time: since,
        observed_generation: None,
    }]
}

/// Keeps the `BlockNode` current: re-applies it every `interval_ms` with the space
/// promised to replicas as `promised_bytes()` reports it. Runs until dropped.
pub async fn keep_registered(
    registration: NodeRegistration,
    client: Client,
    promised_bytes: impl Fn() -> u64 + Send,
    interval_ms: u64,
) {
    loop {
        if let Err(e) = registration.apply(&client, promised_bytes()).await {
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

    #[test]
    fn disk_pressure_below_ten_percent_free_with_a_stable_transition_time() {
        let t = |s: i64| k8s_openapi::jiff::Timestamp::from_second(1_800_000_000 + s).unwrap();
        let c0 = node_conditions(1000, 500, &[], t(0));
        assert_eq!(
            (
                c0[0].type_.as_str(),
                c0[0].status.as_str(),
                c0[0].reason.as_str()
            ),
            (DISK_PRESSURE, "False", "EnoughDiskSpace")
        );
        let at_ten = node_conditions(1000, 100, &c0, t(60));
        assert_eq!(at_ten[0].status, "False", "10% free is enough");
        assert_eq!(at_ten[0].last_transition_time, Time(t(0)));
        let c1 = node_conditions(1000, 99, &c0, t(120));
        assert_eq!(
            (c1[0].status.as_str(), c1[0].reason.as_str()),
            ("True", "LowDiskSpace")
        );
        assert_eq!(c1[0].last_transition_time, Time(t(120)));
        let c2 = node_conditions(1000, 0, &c1, t(180));
        assert_eq!(
            c2[0].last_transition_time,
            Time(t(120)),
            "still True since 120"
        );
        assert_eq!(node_conditions(0, 0, &[], t(0))[0].status, "False");
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
