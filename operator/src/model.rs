//! The operator's view of one volume's replicas and nodes, built from API objects by
//! the controller and consumed by the pure decision functions, so every decision can be
//! table-tested without an API server.

use api::{BlockReplicaSpec, BlockReplicaStatus, ReplicaRole, ReplicaState};

/// One `BlockReplica` as the decisions see it.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaView {
    /// Object name; also the stable ReplicaID.
    pub id: String,
    pub spec: BlockReplicaSpec,
    /// What the node agent last reported, if anything.
    pub status: Option<BlockReplicaStatus>,
    /// The object has a deletion timestamp.
    pub deleting: bool,
    /// The replica's node has a current agent Lease.
    pub node_live: bool,
    /// The replica's `BlockNode` exists.
    pub node_registered: bool,
}

impl ReplicaView {
    pub fn node(&self) -> &str {
        &self.spec.node
    }

    /// Reported state, `Pending` until the agent reports.
    pub fn state(&self) -> ReplicaState {
        self.status.as_ref().map(|s| s.state).unwrap_or_default()
    }

    pub fn flushed_lsn(&self) -> u64 {
        self.status.as_ref().map(|s| s.flushed_lsn).unwrap_or(0)
    }

    /// Epoch the agent reports having persisted.
    pub fn reported_epoch(&self) -> u64 {
        self.status.as_ref().map(|s| s.epoch).unwrap_or(0)
    }

    pub fn reported_role(&self) -> Option<ReplicaRole> {
        self.status.as_ref().and_then(|s| s.role)
    }

    /// The agent reports the replica healthy at `epoch`: serving as primary or in sync.
    pub fn healthy_at(&self, epoch: u64) -> bool {
        self.reported_epoch() == epoch
            && matches!(self.state(), ReplicaState::InSync | ReplicaState::Serving)
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Builders for test objects.
    use super::*;
    use api::{Durability, PeerStatus};

    pub fn replica(id: &str, node: &str) -> ReplicaView {
        ReplicaView {
            id: id.into(),
            spec: BlockReplicaSpec {
                pvc: None,
                volume: "vol".into(),
                replica_id: id.into(),
                node: node.into(),
                role: ReplicaRole::Replica,
                epoch: 1,
                size_bytes: 1 << 30,
                block_size: 4096,
                durability: Durability::SyncAll,
                peers: vec![],
                in_sync_set: vec![],
                in_sync_set_generation: 0,
            },
            status: None,
            deleting: false,
            node_live: true,
            node_registered: true,
        }
    }

    impl ReplicaView {
        pub fn primary(mut self) -> Self {
            self.spec.role = ReplicaRole::Primary;
            self
        }
        pub fn epoch(mut self, e: u64) -> Self {
            self.spec.epoch = e;
            self
        }
        pub fn set(mut self, members: &[&str], generation: u64) -> Self {
            self.spec.in_sync_set = members.iter().map(|m| m.to_string()).collect();
            self.spec.in_sync_set_generation = generation;
            self
        }
        pub fn reports(mut self, state: ReplicaState, epoch: u64, flushed: u64) -> Self {
            let st = self.status.get_or_insert_with(Default::default);
            st.state = state;
            st.epoch = epoch;
            st.flushed_lsn = flushed;
            st.role = Some(self.spec.role);
            self
        }
        pub fn reports_role(mut self, role: ReplicaRole) -> Self {
            self.status.get_or_insert_with(Default::default).role = Some(role);
            self
        }
        pub fn reports_error(mut self, error: &str) -> Self {
            self.status.get_or_insert_with(Default::default).last_error = Some(error.into());
            self
        }
        /// The in-sync set generation the agent reports having applied.
        pub fn reports_generation(mut self, generation: u64) -> Self {
            self.status
                .get_or_insert_with(Default::default)
                .in_sync_set_generation = generation;
            self
        }
        pub fn reports_size(mut self, size: u64) -> Self {
            self.status.get_or_insert_with(Default::default).size_bytes = Some(size);
            self
        }
        pub fn unreachable(mut self, ids: &[&str]) -> Self {
            self.status.get_or_insert_with(Default::default).unreachable =
                ids.iter().map(|s| s.to_string()).collect();
            self
        }
        pub fn peer(mut self, id: &str, state: ReplicaState) -> Self {
            self.status
                .get_or_insert_with(Default::default)
                .peers
                .push(PeerStatus {
                    lag: None,
                    replica_id: id.into(),
                    state,
                    flushed_lsn: 0,
                    last_error: None,
                });
            self
        }
        pub fn node_dead(mut self) -> Self {
            self.node_live = false;
            self
        }
        pub fn node_unregistered(mut self) -> Self {
            self.node_live = false;
            self.node_registered = false;
            self
        }
        pub fn deleting(mut self) -> Self {
            self.deleting = true;
            self
        }
        pub fn size(mut self, s: u64) -> Self {
            self.spec.size_bytes = s;
            self
        }
    }
}
