//! The chart's monitoring: its alert rules pass `promtool check rules` and the unit tests
//! in hack/monitoring/rules.test.yaml (`promtool test rules` on recorded series), and
//! every metric the rules and the Grafana dashboard query is one that real agent and
//! operator processes export, scraped over HTTP with the OpenMetrics content type. Real
//! agents also set the BlockReplica (Ready, Recovering) and BlockNode (Ready,
//! DiskPressure) conditions, and the BlockNode's replica count and space in binary units.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::chart::render_chart_with;
use e2e::cluster::{TestCluster, TestClusterOptions};
use e2e::openmetrics::{self, Exposition};

const TIMEOUT: Duration = Duration::from_secs(90);
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The chart rendered with the rules and the dashboard on.
fn render_monitoring() -> Vec<serde_json::Value> {
    let text = render_chart_with(
        &repo(),
        &[
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.dashboard.enabled=true",
        ],
    );
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|v: &serde_json::Value| !v.is_null())
        .collect()
}

fn kind<'a>(docs: &'a [serde_json::Value], kind: &str) -> &'a serde_json::Value {
    let found: Vec<_> = docs.iter().filter(|d| d["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the rendered chart");
    found[0]
}

/// The PrometheusRule's `spec` (a Prometheus rule file: `groups:`).
fn rule_file(docs: &[serde_json::Value]) -> serde_json::Value {
    kind(docs, "PrometheusRule")["spec"].clone()
}

fn dashboard(docs: &[serde_json::Value]) -> serde_json::Value {
    let cm = docs
        .iter()
        .find(|d| d["kind"] == "ConfigMap" && d["data"].get("blockvol.json").is_some())
        .expect("dashboard ConfigMap");
    assert_eq!(
        cm["metadata"]["labels"]["grafana_dashboard"], "1",
        "the Grafana sidecar label"
    );
    serde_json::from_str(cm["data"]["blockvol.json"].as_str().expect("string"))
        .expect("dashboard JSON")
}

fn promtool(args: &[&str], cwd: &Path) -> String {
    let promtool = e2e::tool("promtool").expect("promtool is built by hack/tools/build.sh");
    let out = std::process::Command::new(promtool)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

#[test]
fn alert_rules_pass_promtool_check_and_unit_tests() {
    let docs = render_monitoring();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("blockvol-rules.yaml"),
        serde_norway::to_string(&rule_file(&docs)).expect("YAML"),
    )
    .expect("write rules");
    std::fs::copy(
        repo().join("hack/monitoring/rules.test.yaml"),
        dir.path().join("rules.test.yaml"),
    )
    .expect("copy rule tests");
    let checked = promtool(&["check", "rules", "blockvol-rules.yaml"], dir.path());
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = promtool(&["test", "rules", "rules.test.yaml"], dir.path());
    assert!(tested.contains("SUCCESS"), "{tested}");

    // Every alert the chart ships is exercised by the unit tests.
    let tests = std::fs::read_to_string(repo().join("hack/monitoring/rules.test.yaml"))
        .expect("read rule tests");
    for alert in alert_names(&rule_file(&docs)) {
        assert!(
            tests.contains(&format!("alertname: {alert}\n")),
            "{alert} has no promtool test"
        );
    }
}

fn alert_names(rules: &serde_json::Value) -> Vec<String> {
    rules["groups"]
        .as_array()
        .expect("groups")
        .iter()
        .flat_map(|g| g["rules"].as_array().expect("rules").iter())
        .filter_map(|r| r["alert"].as_str().map(str::to_string))
        .collect()
}

/// Every string under an `expr`, `query` or `definition` key, anywhere in `v`.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

/// The blockvol metric names (`blockvol_...` identifiers) a PromQL query uses.
fn metric_names(query: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = query.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut i = 0;
    while i < bytes.len() {
        if ident(bytes[i]) && (i == 0 || !ident(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && ident(bytes[i]) {
                i += 1;
            }
            let word = &query[start..i];
            if word.starts_with("blockvol_") {
                out.insert(word.to_string());
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The sample names a scrape may carry: each family with its type's suffixes.
fn sample_names(e: &Exposition) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (family, kind) in &e.types {
        let suffixes: &[&str] = match kind.as_str() {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        for s in suffixes {
            out.insert(format!("{family}{s}"));
        }
    }
    out
}

/// `GET /metrics` at `addr`: the content type and the parsed exposition.
async fn scrape(addr: SocketAddr) -> (String, Exposition) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.expect("connect");
    c.write_all(format!("GET /metrics HTTP/1.1\r\nhost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("request");
    let mut out = String::new();
    c.read_to_string(&mut out).await.expect("response");
    let (head, body) = out.split_once("\r\n\r\n").expect("HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ctype = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .expect("content-type header");
    let e = openmetrics::parse(body).unwrap_or_else(|e| panic!("exposition invalid: {e}\n{body}"));
    (ctype, e)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_and_dashboard_query_only_metrics_real_daemons_export() {
    let docs = render_monitoring();
    let mut texts = Vec::new();
    queries(&rule_file(&docs), &mut texts);
    let rule_queries = texts.len();
    queries(&dashboard(&docs), &mut texts);
    assert!(rule_queries > 0 && texts.len() > rule_queries, "{texts:?}");
    let used: BTreeSet<String> = texts.iter().flat_map(|q| metric_names(q)).collect();

    let mut options = TestClusterOptions::nodes(2);
    options.agent.metrics = true;
    let cluster = TestCluster::start(options).await.expect("cluster starts");
    cluster
        .create_ready_volume("vol-monitoring", "16Mi", 2, TIMEOUT)
        .await
        .expect("volume Ready");

    let mut exported = BTreeSet::new();
    for a in &cluster.agents {
        let (ctype, e) = scrape(a.metrics_address.expect("agent metrics on")).await;
        assert_eq!(ctype, OPENMETRICS, "agent {}", a.node);
        exported.extend(sample_names(&e));
    }
    for o in &cluster.operators {
        let (ctype, e) = scrape(o.metrics_address).await;
        assert_eq!(ctype, OPENMETRICS, "operator {}", o.identity);
        exported.extend(sample_names(&e));
    }
    let missing: Vec<_> = used.difference(&exported).collect();
    assert!(
        missing.is_empty(),
        "queried but exported by no agent or operator: {missing:?}\nexported: {exported:?}"
    );
    // Both daemons' metrics are in use, so the comparison covers both.
    for prefix in ["blockvol_agent_", "blockvol_operator_"] {
        assert!(
            used.iter().any(|m| m.starts_with(prefix)),
            "no {prefix} metric queried: {used:?}"
        );
    }
}

#[test]
fn metric_names_finds_identifiers_not_labels_or_functions() {
    let q = r#"sum by (volume) (rate(blockvol_agent_nbd_read_bytes_total{role="blockvol_x"}[5m])) / blockvol_operator_leader"#;
    let got: Vec<_> = metric_names(q).into_iter().collect();
    // A label value spelled like a metric name is found too: over-reporting only makes
    // the check stricter.
    assert_eq!(
        got,
        [
            "blockvol_agent_nbd_read_bytes_total",
            "blockvol_operator_leader",
            "blockvol_x"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_agents_report_replica_and_node_conditions() {
    use api::BlockReplica;
    use api::replica::replica_condition;
    use kube::Api;
    let cluster = TestCluster::start(TestClusterOptions::nodes(2))
        .await
        .expect("cluster starts");
    cluster
        .create_ready_volume("vol-conditions", "16Mi", 2, TIMEOUT)
        .await
        .expect("volume Ready");
    let api: Api<BlockReplica> = Api::all(cluster.client.clone());
    let ready = e2e::cluster::wait_for("both replicas report Ready=True", TIMEOUT, || async {
        let list = api.list(&Default::default()).await.ok()?;
        let ours: Vec<_> = list
            .items
            .into_iter()
            .filter(|r| r.spec.volume == "vol-conditions")
            .collect();
        let all_ready = ours.len() == 2
            && ours.iter().all(|r| {
                r.status.as_ref().is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == replica_condition::READY && c.status == "True")
                })
            });
        all_ready.then_some(ours)
    })
    .await
    .expect("Ready conditions");
    for r in &ready {
        let s = r.status.as_ref().expect("status");
        let reason = |t: &str| {
            s.conditions
                .iter()
                .find(|c| c.type_ == t)
                .map(|c| (c.status.clone(), c.reason.clone()))
        };
        let state = format!("{:?}", s.state);
        assert_eq!(
            reason(replica_condition::READY),
            Some(("True".into(), state.clone()))
        );
        assert_eq!(
            reason(replica_condition::RECOVERING),
            Some(("False".into(), state))
        );
    }
    // Every BlockNode reports DiskPressure (the test's filesystem has room).
    let nodes: Api<api::BlockNode> = Api::all(cluster.client.clone());
    for n in nodes
        .list(&Default::default())
        .await
        .expect("BlockNodes")
        .items
    {
        let c = n
            .status
            .iter()
            .flat_map(|s| s.conditions.iter())
            .find(|c| c.type_ == "DiskPressure")
            .unwrap_or_else(|| panic!("{n:?} has no DiskPressure condition"));
        assert!(
            ["True", "False"].contains(&c.status.as_str()) && !c.reason.is_empty(),
            "{c:?}"
        );
    }
    // What `kubectl get bn` shows: each node Ready, hosting one of the two replicas,
    // with its space in binary units.
    let shown = e2e::cluster::wait_for(
        "BlockNodes Ready with one replica each",
        TIMEOUT,
        || async {
            let items = nodes.list(&Default::default()).await.ok()?.items;
            let rows: Vec<_> = items
                .iter()
                .filter_map(|n| {
                    let s = n.status.as_ref()?;
                    let ready = s.conditions.iter().find(|c| c.type_ == "Ready")?;
                    Some((
                        ready.status.clone(),
                        ready.reason.clone(),
                        s.replicas,
                        s.capacity.clone()?,
                        s.free.clone()?,
                        s.capacity_bytes,
                        s.allocatable_bytes,
                    ))
                })
                .collect();
            let done = rows.len() == 2 && rows.iter().all(|r| r.0 == "True" && r.2 == 1);
            done.then_some(rows)
        },
    )
    .await
    .expect("BlockNode Ready and replica count");
    for (ready, reason, _, capacity, free, capacity_bytes, allocatable_bytes) in shown {
        assert_eq!((ready.as_str(), reason.as_str()), ("True", "AgentReady"));
        assert_eq!(capacity, api::format_bytes_binary(capacity_bytes));
        assert_eq!(free, api::format_bytes_binary(allocatable_bytes));
        assert!(capacity.ends_with('i'), "{capacity} is in binary units");
    }
}
