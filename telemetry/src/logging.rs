//! Log set-up shared by the blockvol binaries: the level filter comes from `RUST_LOG`
//! (default `info`), the format from `BLOCKVOL_LOG_FORMAT`: `text` (the default,
//! human-readable lines) or `json` (one JSON object per line, for log collectors). Any
//! other format is refused at start. The chart sets both from `logging.level` and
//! `logging.format`.

use tracing_subscriber::EnvFilter;

/// Environment variable choosing the log format.
pub const LOG_FORMAT_ENV: &str = "BLOCKVOL_LOG_FORMAT";

/// A `BLOCKVOL_LOG_FORMAT` value that names no format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{LOG_FORMAT_ENV}={value:?} is not a log format; use text or json")]
pub struct UnknownLogFormat {
    pub value: String,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

impl LogFormat {
    /// The format a `BLOCKVOL_LOG_FORMAT` value names (`None`: unset, so text).
    pub fn parse(value: Option<&str>) -> Result<LogFormat, UnknownLogFormat> {
        match value {
            None | Some("") | Some("text") => Ok(LogFormat::Text),
            Some("json") => Ok(LogFormat::Json),
            Some(other) => Err(UnknownLogFormat {
                value: other.to_string(),
            }),
        }
    }

    /// The format from the environment.
    pub fn from_env() -> Result<LogFormat, UnknownLogFormat> {
        let value = std::env::var(LOG_FORMAT_ENV).ok();
        LogFormat::parse(value.as_deref())
    }
}

/// Installs the global subscriber in `format`, filtered by `RUST_LOG` (default `info`).
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Installs the global subscriber in the format the environment names.
pub fn init_from_env() -> Result<(), UnknownLogFormat> {
    init(LogFormat::from_env()?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_values() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("text")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("json")), Ok(LogFormat::Json));
        let err = LogFormat::parse(Some("JSON")).unwrap_err().to_string();
        assert!(
            err.contains("BLOCKVOL_LOG_FORMAT") && err.contains("text or json"),
            "{err}"
        );
    }
}
