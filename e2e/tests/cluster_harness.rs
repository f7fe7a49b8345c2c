//! The process harness other scenario tests build on: agents register, an operator takes
//! the leader Lease, and a killed agent restarts on the same data port.

use std::time::Duration;

use e2e::cluster::{NAMESPACE, TestCluster, TestClusterOptions, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_register_operator_leads_and_a_killed_agent_restarts_in_place() {
    let mut cluster = TestCluster::start(TestClusterOptions::nodes(2))
        .await
        .expect("cluster starts");

    let leases: Api<Lease> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let holder = wait_for("the operator to hold the leader Lease", TIMEOUT, || {
        let leases = leases.clone();
        async move {
            let l = leases.get_opt("blockvol-operator").await.ok()??;
            l.spec?.holder_identity
        }
    })
    .await
    .expect("leader elected");
    assert_eq!(holder, "operator-1");

    let agent = cluster.agent("node-1").expect("node-1 agent");
    let address = agent.data_address;
    let old_pid = agent.pid().expect("running");
    agent.kill();
    assert!(!agent.is_running(), "a killed agent is not running");
    assert!(
        std::net::TcpStream::connect(address).is_err(),
        "nothing listens on a killed agent's data port"
    );
    agent.restart().expect("restart");
    assert_ne!(agent.pid(), Some(old_pid));
    wait_for("the restarted agent's data port", TIMEOUT, || async move {
        std::net::TcpStream::connect(address).ok().map(|_| ())
    })
    .await
    .expect("restarted agent listens on the same data port");
    assert!(agent.is_running(), "the restarted agent stays up");
}
