//! API server load as kube-apiserver counts it: `apiserver_request_total` from its own
//! `/metrics`, summed by verb and resource. Tests and the scale benchmark take two
//! readings around an idle window and compare the difference across volume counts.

use std::collections::BTreeMap;

use crate::cluster::TestCluster;
use crate::error::Result;

/// Requests by (verb, resource or `resource/subresource`).
pub type RequestCounts = BTreeMap<(String, String), f64>;

/// `apiserver_request_total` of a Prometheus text exposition summed by (verb,
/// resource/subresource); requests that name no resource (`/metrics`, `/healthz`,
/// discovery) are left out. A sample whose value is not a number is an error naming it.
pub fn parse_request_totals(text: &str) -> Result<RequestCounts, String> {
    let mut out = RequestCounts::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|e| format!("apiserver_request_total sample {line:?}: {e}"))?;
        let label = |key: &str| {
            labels
                .split("\",")
                .filter_map(|kv| kv.split_once("=\""))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let resource = label("resource");
        if resource.is_empty() {
            continue;
        }
        let resource = match label("subresource") {
            s if s.is_empty() => resource,
            s => format!("{resource}/{s}"),
        };
        *out.entry((label("verb"), resource)).or_default() += value;
    }
    Ok(out)
}

/// What grew from `before` to `after`, by key; keys that did not grow are left out.
pub fn growth(before: &RequestCounts, after: &RequestCounts) -> RequestCounts {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, d)| *d > 0.0)
        .collect()
}

/// The cluster's API server request counters now.
pub async fn request_counts(c: &TestCluster) -> Result<RequestCounts> {
    let text = c
        .control_plane
        .kubectl(["get", "--raw", "/metrics"])
        .await?;
    parse_request_totals(&text).map_err(crate::error::Error::Metrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCRAPE: &str = "\
# HELP apiserver_request_total [STABLE] Counter of apiserver requests
# TYPE apiserver_request_total counter
apiserver_request_total{code=\"200\",component=\"apiserver\",dry_run=\"\",group=\"coordination.k8s.io\",resource=\"leases\",scope=\"resource\",subresource=\"\",verb=\"PUT\",version=\"v1\"} 12
apiserver_request_total{code=\"409\",component=\"apiserver\",dry_run=\"\",group=\"coordination.k8s.io\",resource=\"leases\",scope=\"resource\",subresource=\"\",verb=\"PUT\",version=\"v1\"} 3
apiserver_request_total{code=\"200\",component=\"apiserver\",dry_run=\"\",group=\"blockvol.io\",resource=\"blockreplicas\",scope=\"resource\",subresource=\"status\",verb=\"APPLY\",version=\"v1alpha1\"} 5
apiserver_request_total{code=\"200\",component=\"apiserver\",dry_run=\"\",group=\"\",resource=\"\",scope=\"\",subresource=\"/metrics\",verb=\"GET\",version=\"\"} 7
apiserver_request_duration_seconds_count{resource=\"leases\",verb=\"PUT\"} 99
";

    #[test]
    fn request_totals_sum_codes_and_skip_requests_without_a_resource() {
        let c = parse_request_totals(SCRAPE).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[&("PUT".into(), "leases".into())], 15.0);
        assert_eq!(c[&("APPLY".into(), "blockreplicas/status".into())], 5.0);
    }

    #[test]
    fn a_sample_that_is_not_a_number_is_an_error() {
        let bad = "apiserver_request_total{resource=\"leases\",verb=\"PUT\"} many\n";
        assert!(parse_request_totals(bad).unwrap_err().contains("many"));
    }

    #[test]
    fn growth_keeps_only_what_grew() {
        let key = |v: &str, r: &str| (v.to_string(), r.to_string());
        let before =
            RequestCounts::from([(key("PUT", "leases"), 10.0), (key("GET", "nodes"), 4.0)]);
        let after = RequestCounts::from([
            (key("PUT", "leases"), 16.0),
            (key("GET", "nodes"), 4.0),
            (key("LIST", "blockreplicas"), 2.0),
        ]);
        let g = growth(&before, &after);
        assert_eq!(
            g,
            RequestCounts::from([
                (key("PUT", "leases"), 6.0),
                (key("LIST", "blockreplicas"), 2.0)
            ])
        );
    }
}
