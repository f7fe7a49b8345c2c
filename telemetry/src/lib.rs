//! What every blockvol binary (operator, node agent, CSI driver) shares to be observed:
//! the log set-up ([`logging`]) and the one small HTTP endpoint serving `/metrics`,
//! `/healthz` and `/readyz` ([`http`]). Each binary says what those answer through
//! [`http::Probes`]; how they are served (bounds, content types, status codes) is the
//! same everywhere.

pub mod http;
pub mod logging;
