//! Leader election over a `coordination.k8s.io` Lease, so several operator replicas can
//! run and exactly one acts. Updates use the Lease's resourceVersion (compare and swap),
//! so two candidates never both believe they took it; a leader that cannot renew
//! within the lease duration stops acting before anyone else may take over.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ObjectMeta, PostParams};

use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct LeaderSettings {
    /// Name of the Lease object.
    pub lease_name: String,
    /// This candidate's identity (pod name).
    pub identity: String,
    /// How long a leader's claim lasts without renewal, in seconds.
    pub lease_duration_s: u32,
    /// How often the leader renews (and a follower retries), in milliseconds.
    pub renew_interval_ms: u64,
}

/// Whether a Lease held by someone else has run out at `now`.
pub fn lease_expired(spec: &LeaseSpec, now: Timestamp) -> bool {
    let Some(renewed) = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()) else {
        return true;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    renewed.0 + duration <= now
}

/// Local observations of Lease records, so that expiry never rests on the holder's
/// clock alone: a Lease counts as expired only when its renewTime (stamped by the
/// holder) says so *and* this process has not seen the record change for a whole lease
/// duration by its own monotonic clock (the client-go leader-election rule). A fresh
/// process therefore waits one full duration before it declares anything expired.
///
/// The same holds after this process could not see the API server for a while
/// ([`LeaseObserver::api_gap`]): an outage of the API server stops every agent's
/// renewals at once, and when it ends every Lease looks stale until the agents renew
/// again. Expiry then counts from the end of the gap, so an outage alone never promotes
/// anything (primaries keep serving on their member proof meanwhile).
#[derive(Debug, Default)]
pub struct LeaseObserver {
    seen: Mutex<BTreeMap<String, (String, Instant)>>,
    /// Since when this process has seen the API server without a gap.
    watching_since: Mutex<Option<Instant>>,
}

impl LeaseObserver {
    /// This process could not observe the API server from some time until `until` (a
    /// failed or very slow request): Lease records seen before then say nothing about
    /// renewals that could not reach the server meanwhile.
    pub fn api_gap(&self, until: Instant) {
        let mut w = match self.watching_since.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *w = Some(w.map_or(until, |t| t.max(until)));
    }

    /// Records the Lease `name` at `version` (its resourceVersion) and says whether it
    /// has expired at `now` (wall clock) / `local_now` (this process's clock).
    pub fn expired_at(
        &self,
        name: &str,
        spec: &LeaseSpec,
        version: &str,
        now: Timestamp,
        local_now: Instant,
    ) -> bool {
        if spec.holder_identity.is_none() {
            // Released on purpose by its holder.
            return true;
        }
        let observed = {
            let mut seen = match self.seen.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let entry = seen
                .entry(name.to_string())
                .or_insert_with(|| (version.to_string(), local_now));
            if entry.0 != version {
                *entry = (version.to_string(), local_now);
            }
            entry.1
        };
        let since = match self.watching_since.lock() {
            Ok(g) => *g,
            Err(p) => *p.into_inner(),
        };
        let observed = since.map_or(observed, |s| observed.max(s));
        let duration = Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        );
        lease_expired(spec, now) && local_now.saturating_duration_since(observed) >= duration
    }

    pub fn expired(&self, name: &str, spec: &LeaseSpec, version: &str) -> bool {
        self.expired_at(name, spec, version, Timestamp::now(), Instant::now())
    }
}

/// One candidate for leadership.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaderSettings,
    observer: LeaseObserver,
}

impl LeaderElector {
    pub fn new(api: Api<Lease>, settings: LeaderSettings) -> Self {
        LeaderElector {
            api,
            settings,
            observer: LeaseObserver::default(),
        }
    }

    pub fn settings(&self) -> &LeaderSettings {
        &self.settings
    }

    fn spec(&self, now: Timestamp, acquired: Option<MicroTime>, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.settings.identity.clone()),
            lease_duration_seconds: Some(
                i32::try_from(self.settings.lease_duration_s).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or(MicroTime(now))),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Tries once to take or renew the Lease. `Ok(true)`: this candidate leads until
    /// at least the returned moment plus the lease duration.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let now = Timestamp::now();
        let name = &self.settings.lease_name;
        let current = match self.api.get_opt(name).await.map_err(Error::Kube)? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(now, None, 0)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(Error::Kube(e)),
                };
            }
            Some(l) => l,
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.settings.identity.as_str());
        let version = current
            .metadata
            .resource_version
            .clone()
            .unwrap_or_default();
        if !ours && !self.observer.expired(name, &spec, &version) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let new_spec = if ours {
            self.spec(now, spec.acquire_time.clone(), transitions)
        } else {
            self.spec(now, None, transitions.saturating_add(1))
        };
        let mut updated = current.clone();
        updated.spec = Some(new_spec);
        // replace() sends the resourceVersion we read: a concurrent writer makes it 409.
        match self
            .api
            .replace(name, &PostParams::default(), &updated)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Gives the Lease up (clears the holder) if this candidate holds it, so a
    /// successor need not wait for expiry.
    pub async fn release(&self) -> Result<()> {
        let Some(mut current) = self
            .api
            .get_opt(&self.settings.lease_name)
            .await
            .map_err(Error::Kube)?
        else {
            return Ok(());
        };
        let Some(spec) = current.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.settings.lease_name, &PostParams::default(), &current)
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(Error::Kube(e)),
        }
    }

    /// Waits until this candidate leads.
    pub async fn acquire(&self) -> Result<()> {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(Duration::from_millis(self.settings.renew_interval_ms)).await;
        }
    }

    /// Renews while leading; returns when leadership is lost or cannot be confirmed
    /// within the lease duration (minus one renew interval of safety margin).
    pub async fn hold(&self) -> Error {
        let margin = Duration::from_millis(self.settings.renew_interval_ms);
        let lease = Duration::from_secs(u64::from(self.settings.lease_duration_s));
        let mut last_ok = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(Duration::from_millis(self.settings.renew_interval_ms)).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = tokio::time::Instant::now(),
                Ok(false) => {
                    return Error::LostLeadership("another operator holds the lease".into());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "renewing the leader lease failed");
                    if last_ok.elapsed() + margin >= lease {
                        return Error::LostLeadership(format!(
                            "could not renew the leader lease in time: {e}"
                        ));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(renewed_secs_ago: Option<i64>, duration: i32, now: Timestamp) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some("x".into()),
            lease_duration_seconds: Some(duration),
            renew_time: renewed_secs_ago.map(|s| MicroTime(now - SignedDuration::from_secs(s))),
            ..Default::default()
        }
    }

    #[test]
    fn lease_expiry_table() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        for (renewed, duration, want) in [
            (Some(5), 15, false),
            (Some(15), 15, true),
            (Some(16), 15, true),
            (Some(0), 0, true),
            (None, 15, true),
        ] {
            assert_eq!(
                lease_expired(&spec(renewed, duration, now), now),
                want,
                "{renewed:?} {duration}"
            );
        }
    }

    /// A fresh observer, the API server's clock `now`, this process's clock `t0`, and a
    /// 10 s Lease last renewed 100 s before `now`.
    fn observing_a_stale_lease() -> (LeaseObserver, Timestamp, Instant, LeaseSpec) {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        (
            LeaseObserver::default(),
            now,
            Instant::now(),
            spec(Some(100), 10, now),
        )
    }

    #[test]
    fn observer_needs_both_clocks_to_agree_before_expiry() {
        let (o, now, t0, stale) = observing_a_stale_lease();
        let later = |s| t0 + Duration::from_secs(s);
        // The holder's renewTime is long past, but this process only just saw it.
        assert!(!o.expired_at("l", &stale, "1", now, t0));
        assert!(!o.expired_at("l", &stale, "1", now, later(9)));
        assert!(o.expired_at("l", &stale, "1", now, later(10)));
        // A change of the record (a renewal, whatever its stamp) restarts the local clock.
        assert!(!o.expired_at("l", &stale, "2", now, later(11)));
        assert!(o.expired_at("l", &stale, "2", now, later(21)));
        // Fresh by the holder's clock: never expired, however long unchanged.
        let fresh = spec(Some(1), 10, now);
        assert!(!o.expired_at("m", &fresh, "1", now, t0));
        assert!(!o.expired_at("m", &fresh, "1", now, later(60)));
        // Released on purpose: expired at once.
        let mut released = fresh.clone();
        released.holder_identity = None;
        assert!(o.expired_at("n", &released, "1", now, t0));
    }

    /// After an API-server outage every Lease looks stale: expiry counts from the end
    /// of the gap, so the agents get a whole duration to renew before any promotion.
    #[test]
    fn an_api_gap_restarts_every_expiry_clock() {
        let (o, now, t0, stale) = observing_a_stale_lease();
        let later = |s| t0 + Duration::from_secs(s);
        assert!(!o.expired_at("l", &stale, "1", now, t0));
        // Unchanged for a whole duration, but the server was unreachable until 30 s.
        o.api_gap(later(30));
        assert!(!o.expired_at("l", &stale, "1", now, later(31)));
        assert!(!o.expired_at("l", &stale, "1", now, later(39)));
        assert!(o.expired_at("l", &stale, "1", now, later(40)));
        // An older gap reported late never moves the clock back.
        o.api_gap(later(20));
        assert!(o.expired_at("l", &stale, "1", now, later(40)));
    }
}
