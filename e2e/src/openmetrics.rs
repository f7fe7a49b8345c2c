//! A strict reader of the OpenMetrics text exposition the daemons serve: every sample
//! must belong to a family declared by `# TYPE`, values must be numbers, histogram
//! buckets must be cumulative and end in `+Inf` equal to `_count`, and the text must end
//! with `# EOF`. Scenario tests use it to check a scrape and to read values out of it.

use std::collections::BTreeMap;

/// One sample line: metric name (with any `_total`/`_bucket` suffix), labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    /// Family name → declared type.
    pub types: BTreeMap<String, String>,
    pub samples: Vec<Sample>,
}

type LabelPairs = Vec<(String, String)>;

/// Suffixes a sample name may add to its family name, by family type.
fn suffixes(kind: &str) -> &'static [&'static str] {
    match kind {
        "counter" => &["_total", "_created"],
        "histogram" => &["_bucket", "_count", "_sum", "_created"],
        "info" => &["_info"],
        _ => &[""],
    }
}

fn parse_labels(s: &str, line: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (key, after) = rest
            .split_once("=\"")
            .ok_or_else(|| format!("label without =\" in {line:?}"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => return Err(format!("dangling escape in {line:?}")),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.ok_or_else(|| format!("unterminated label value in {line:?}"))?;
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?} in {line:?}"));
        }
        if out.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key:?} repeated in {line:?}"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(out)
}

fn parse_value(v: &str, line: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v
            .parse::<f64>()
            .map_err(|e| format!("value {v:?} in {line:?}: {e}")),
    }
}

/// Parses and checks `text` (see the module docs).
pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let mut saw_eof = false;
    for line in text.lines() {
        if saw_eof {
            return Err(format!("text after # EOF: {line:?}"));
        }
        if line == "# EOF" {
            saw_eof = true;
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest
                .split_once(' ')
                .ok_or_else(|| format!("bad TYPE line {line:?}"))?;
            if exp.types.insert(name.into(), kind.into()).is_some() {
                return Err(format!("family {name} declared twice"));
            }
            continue;
        }
        if line.starts_with("# HELP ") || line.starts_with("# UNIT ") {
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            return Err(format!("unexpected line {line:?}"));
        }
        let (head, value) = line
            .rsplit_once(' ')
            .ok_or_else(|| format!("sample without value {line:?}"))?;
        let (name, labels) = match head.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .ok_or_else(|| format!("unterminated labels in {line:?}"))?;
                (n, parse_labels(l, line)?)
            }
            None => (head, BTreeMap::new()),
        };
        let declared = exp.types.iter().any(|(family, kind)| {
            suffixes(kind)
                .iter()
                .any(|s| name.strip_prefix(family.as_str()) == Some(*s))
        });
        if !declared {
            return Err(format!("sample {name} has no # TYPE before it"));
        }
        exp.samples.push(Sample {
            name: name.into(),
            labels,
            value: parse_value(value, line)?,
        });
    }
    if !saw_eof {
        return Err("the exposition does not end with # EOF".into());
    }
    exp.check_histograms()?;
    Ok(exp)
}

impl Exposition {
    /// The value of the sample `name` whose labels include every pair in `labels`;
    /// `None` when there is none, an error message when several match.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>, String> {
        let found: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect();
        match found.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one.value)),
            many => Err(format!("{} samples of {name} match {labels:?}", many.len())),
        }
    }

    /// Buckets of every histogram series are cumulative and `+Inf` equals `_count`.
    fn check_histograms(&self) -> Result<(), String> {
        let histograms: Vec<&String> = self
            .types
            .iter()
            .filter(|(_, k)| k.as_str() == "histogram")
            .map(|(n, _)| n)
            .collect();
        for family in histograms {
            let bucket = format!("{family}_bucket");
            let count = format!("{family}_count");
            // Labels without `le` → (bound, cumulative count) per bucket.
            let mut series: BTreeMap<LabelPairs, Vec<(f64, f64)>> = BTreeMap::new();
            for s in self.samples.iter().filter(|s| s.name == bucket) {
                let le = s
                    .labels
                    .get("le")
                    .ok_or_else(|| format!("{bucket} sample without le"))?;
                let le = parse_value(le, &bucket)?;
                let key: LabelPairs = s
                    .labels
                    .iter()
                    .filter(|(k, _)| k.as_str() != "le")
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                series.entry(key).or_default().push((le, s.value));
            }
            for (key, buckets) in series {
                let ordered = buckets
                    .windows(2)
                    .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
                if !ordered {
                    return Err(format!(
                        "{family} {key:?}: buckets not cumulative: {buckets:?}"
                    ));
                }
                let last = buckets.last().copied().unwrap_or((0.0, 0.0));
                if last.0 != f64::INFINITY {
                    return Err(format!("{family} {key:?}: no +Inf bucket"));
                }
                let labels: Vec<(&str, &str)> =
                    key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let n = self.value(&count, &labels)?;
                if n != Some(last.1) {
                    return Err(format!(
                        "{family} {key:?}: +Inf bucket {} but _count {n:?}",
                        last.1
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_requests Requests.\n# TYPE a_requests counter\n\
a_requests_total{op=\"read\",v=\"x\\\"y\"} 3\n# TYPE a_lat histogram\n\
a_lat_sum{op=\"read\"} 0.5\na_lat_count{op=\"read\"} 3\n\
a_lat_bucket{le=\"0.1\",op=\"read\"} 1\na_lat_bucket{le=\"+Inf\",op=\"read\"} 3\n\
# TYPE a_up gauge\na_up 1\n# EOF\n";

    #[test]
    fn a_well_formed_exposition_parses_and_values_are_found_by_labels() {
        let e = parse(GOOD).expect("parses");
        assert_eq!(
            e.value("a_requests_total", &[("op", "read")]).unwrap(),
            Some(3.0)
        );
        assert_eq!(e.value("a_up", &[]).unwrap(), Some(1.0));
        assert_eq!(e.value("a_up", &[("x", "y")]).unwrap(), None);
        let s = &e.samples[0];
        assert_eq!(s.labels["v"], "x\"y");
    }

    #[test]
    fn malformed_expositions_are_rejected_with_the_reason() {
        let cases = [
            (GOOD.replace("# EOF\n", ""), "EOF"),
            (GOOD.replace("a_up 1", "a_up one"), "value"),
            (GOOD.replace("# TYPE a_up gauge\n", ""), "no # TYPE"),
            (
                GOOD.replace("a_lat_count{op=\"read\"} 3", "a_lat_count{op=\"read\"} 4"),
                "+Inf bucket",
            ),
            (
                GOOD.replace(
                    "a_lat_bucket{le=\"0.1\",op=\"read\"} 1",
                    "a_lat_bucket{le=\"0.1\",op=\"read\"} 5",
                ),
                "cumulative",
            ),
        ];
        for (text, want) in cases {
            let e = parse(&text).expect_err(want);
            assert!(e.contains(want), "{want}: {e}");
        }
    }
}
