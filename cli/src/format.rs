//! How numbers, ages and tables read on a terminal: binary sizes (`10Gi`, `1.5Mi`),
//! replica lag in LSNs, kubectl-style ages (`45s`, `3m`, `2h`, `4d`) and left-aligned
//! columns separated by three spaces, the way `kubectl get` prints them. Pure functions.

use k8s_openapi::jiff::Timestamp;

/// Binary unit suffixes, smallest first (what Kubernetes quantities use).
const BINARY_UNITS: [&str; 6] = ["Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];

/// Spaces between table columns (as `kubectl get`).
const COLUMN_GAP: usize = 3;

/// A byte count for humans: the largest binary unit that leaves at least 1, with one
/// decimal when the value is not whole in that unit (`1536` → `1.5Ki`,
/// `10737418240` → `10Gi`, `512` → `512`). Never rounds a non-zero fraction up to the
/// next unit's boundary: what is shown is within 0.05 of the unit of the true value.
pub fn human_bytes(bytes: u64) -> String {
    let mut unit = None;
    let mut scale = 1u64;
    for (i, _) in BINARY_UNITS.iter().enumerate() {
        let next = 1u64 << (10 * (i + 1));
        if bytes >= next {
            unit = Some(i);
            scale = next;
        }
    }
    let Some(unit) = unit else {
        return bytes.to_string();
    };
    let suffix = BINARY_UNITS[unit];
    let whole = bytes / scale;
    let rest = bytes % scale;
    if rest == 0 {
        return format!("{whole}{suffix}");
    }
    // Tenths, truncated, so 1023.99Ki never prints as 1024.0Ki.
    let tenths = (u128::from(rest) * 10 / u128::from(scale)) as u64;
    format!("{whole}.{tenths}{suffix}")
}

/// A byte count as an exact Kubernetes quantity: the largest binary unit that divides
/// it (`10Gi`), else the plain number. Used where the value must round-trip (PV
/// capacity), unlike [`human_bytes`].
pub fn exact_quantity(bytes: u64) -> String {
    for (i, suffix) in BINARY_UNITS.iter().enumerate().rev() {
        let scale = 1u64 << (10 * (i + 1));
        if bytes >= scale && bytes.is_multiple_of(scale) {
            return format!("{}{suffix}", bytes / scale);
        }
    }
    bytes.to_string()
}

/// How far a replica is behind its primary, in LSNs: the primary's flushed LSN minus
/// the replica's. `None` when there is no primary to compare with. A replica that
/// reports more than the primary (a report from before a promotion) is shown as 0
/// behind, never as a negative or wrapped number.
pub fn lag_lsn(primary_flushed: Option<u64>, replica_flushed: u64) -> Option<u64> {
    primary_flushed.map(|p| p.saturating_sub(replica_flushed))
}

/// A lag for a table cell: `-` when unknown.
pub fn lag_cell(lag: Option<u64>) -> String {
    lag.map_or_else(|| "-".to_string(), |l| l.to_string())
}

/// `n/m` for in-sync members out of desired replicas.
pub fn in_sync_cell(in_sync: u32, desired: u8) -> String {
    format!("{in_sync}/{desired}")
}

/// The time since `then`, as kubectl prints ages: `45s`, `12m`, `5h`, `3d`. A
/// timestamp in the future (clock skew) shows as `0s`.
pub fn age(then: Timestamp, now: Timestamp) -> String {
    let secs = now.as_second().saturating_sub(then.as_second()).max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 2 * 3600 => format!("{}m", s / 60),
        s if s < 2 * 86_400 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

/// A table: a header row and data rows, printed with columns padded to the widest cell.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<I, S>(header: I) -> Table
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Table {
            header: header.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; missing cells print empty, extra cells are kept (and widen the table).
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as text, every line ending in a newline and without trailing spaces;
    /// each line indented by `indent` spaces.
    pub fn render_indented(&self, indent: usize) -> String {
        let columns = std::iter::once(&self.header)
            .chain(&self.rows)
            .map(Vec::len)
            .max()
            .unwrap_or(0);
        let mut widths = vec![0usize; columns];
        for line in std::iter::once(&self.header).chain(&self.rows) {
            for (i, cell) in line.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = " ".repeat(indent);
            for (i, width) in widths.iter().enumerate() {
                let cell = line.get(i).map_or("", String::as_str);
                text.push_str(cell);
                if i + 1 < columns {
                    let pad = width - cell.chars().count() + COLUMN_GAP;
                    text.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }

    pub fn render(&self) -> String {
        self.render_indented(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_picks_the_largest_unit_that_leaves_at_least_one() {
        assert_eq!(human_bytes(0), "0");
        assert_eq!(human_bytes(1023), "1023");
        assert_eq!(human_bytes(1024), "1Ki");
        assert_eq!(human_bytes(1536), "1.5Ki");
        assert_eq!(human_bytes(10 << 30), "10Gi");
        assert_eq!(human_bytes((1 << 30) + (1 << 29)), "1.5Gi");
        assert_eq!(human_bytes(3 << 40), "3Ti");
        assert_eq!(human_bytes(u64::MAX), "15.9Ei");
    }

    #[test]
    fn human_bytes_never_rounds_up_to_the_next_unit() {
        // One byte short of 1Mi is 1023.9Ki, not 1024.0Ki or 1Mi.
        assert_eq!(human_bytes((1 << 20) - 1), "1023.9Ki");
        assert_eq!(human_bytes((1 << 30) - 4096), "1023.9Mi");
    }

    #[test]
    fn exact_quantity_round_trips_through_the_api_parser() {
        for bytes in [
            1u64,
            512,
            4096,
            1 << 20,
            10 << 30,
            (1 << 30) + 4096,
            3 << 40,
        ] {
            let q = exact_quantity(bytes);
            assert_eq!(api::parse_quantity_bytes(&q), Ok(bytes), "{q}");
        }
        assert_eq!(exact_quantity(10 << 30), "10Gi");
        assert_eq!(exact_quantity((1 << 30) + 4096), "1048580Ki");
        assert_eq!(exact_quantity(1000), "1000");
    }

    #[test]
    fn lag_is_the_primary_flushed_lsn_minus_the_replicas() {
        assert_eq!(lag_lsn(Some(120), 100), Some(20));
        assert_eq!(lag_lsn(Some(100), 100), Some(0));
        // A replica ahead of the primary's report is not behind, and never wraps.
        assert_eq!(lag_lsn(Some(5), 9), Some(0));
        assert_eq!(lag_lsn(None, 9), None);
        assert_eq!(lag_cell(Some(20)), "20");
        assert_eq!(lag_cell(None), "-");
    }

    #[test]
    fn ages_read_like_kubectl() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        let ago = |s: i64| Timestamp::from_second(1_000_000 - s).unwrap();
        assert_eq!(age(ago(0), now), "0s");
        assert_eq!(age(ago(119), now), "119s");
        assert_eq!(age(ago(600), now), "10m");
        assert_eq!(age(ago(3 * 3600), now), "3h");
        assert_eq!(age(ago(5 * 86_400), now), "5d");
        assert_eq!(age(Timestamp::from_second(1_000_100).unwrap(), now), "0s");
    }

    #[test]
    fn table_pads_columns_to_the_widest_cell_and_trims_line_ends() {
        let mut t = Table::new(["NAME", "SIZE", "PVC"]);
        t.row(["pvc-1", "10Gi", "default/data"]);
        t.row(["a-much-longer-name", "512", ""]);
        assert_eq!(
            t.render(),
            "NAME                 SIZE   PVC\n\
             pvc-1                10Gi   default/data\n\
             a-much-longer-name   512\n"
        );
    }

    #[test]
    fn table_indents_and_tolerates_ragged_rows() {
        let mut t = Table::new(["A", "B"]);
        t.row(["1"]);
        t.row(["22", "x", "extra"]);
        assert_eq!(t.render_indented(2), "  A    B\n  1\n  22   x   extra\n");
        assert!(!t.is_empty());
        assert!(Table::new(["A"]).is_empty());
    }
}
