//! Which compute API microversion each call needs, in one place (as Nova's own
//! `rest_api_version_history` does), so the client never scatters version checks.

use std::fmt;

/// A compute API microversion, `2.53` is `Microversion(2, 53)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Microversion(pub u16, pub u16);

impl fmt::Display for Microversion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

impl std::str::FromStr for Microversion {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (major, minor) = text
            .split_once('.')
            .ok_or_else(|| format!("microversion {text:?} is not MAJOR.MINOR"))?;
        let parse = |part: &str| {
            part.parse::<u16>()
                .map_err(|_| format!("microversion {text:?} is not MAJOR.MINOR"))
        };
        Ok(Microversion(parse(major)?, parse(minor)?))
    }
}

/// The oldest compute API we can drive (plain v2.1, with the legacy service calls).
pub const OLDEST: Microversion = Microversion(2, 1);
/// The newest compute API whose response shapes this client has been checked against.
pub const NEWEST: Microversion = Microversion(2, 93);

/// Force-completing a running live migration.
pub const FORCE_COMPLETE: Microversion = Microversion(2, 22);
/// `GET /servers/{id}/migrations` (progress of in-flight migrations) and the
/// `migration_type` filter of `GET /os-migrations`.
pub const SERVER_MIGRATIONS: Microversion = Microversion(2, 23);
/// Aborting a running live migration.
pub const ABORT_RUNNING: Microversion = Microversion(2, 24);
/// A live migration to a named host still goes through the scheduler's
/// checks (below it, a named host bypasses them).
pub const CHECKED_DESTINATION: Microversion = Microversion(2, 30);
/// `block_migration: "auto"` and no `disk_over_commit` in `os-migrateLive`.
pub const BLOCK_MIGRATION_AUTO: Microversion = Microversion(2, 25);
/// Server tags: `tags` in server details, `PUT`/`DELETE /servers/{id}/tags/{tag}`.
pub const SERVER_TAGS: Microversion = Microversion(2, 26);
/// Hypervisor listing is paged (`limit`/`marker`).
pub const HYPERVISOR_PAGING: Microversion = Microversion(2, 33);
/// Hypervisors show their servers (`with_servers=true`), unpaged.
pub const HYPERVISOR_SERVERS: Microversion = Microversion(2, 53);
/// Services are addressed by UUID: `PUT /os-services/{uuid}`.
pub const SERVICE_UUID: Microversion = Microversion(2, 53);
/// `GET /servers/{id}/os-instance-actions` takes `limit`.
pub const INSTANCE_ACTION_PAGING: Microversion = Microversion(2, 58);
/// `GET /os-migrations` is paged, sorted newest first, and takes `changes-since`.
pub const MIGRATION_PAGING: Microversion = Microversion(2, 59);

/// The compute API version agreed with one cloud: the newest both sides speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated(Microversion);

impl Negotiated {
    /// Picks the newest version both we and the cloud (`min..=max`) support,
    /// no newer than `cap` when the operator pins one.
    pub fn pick(min: Microversion, max: Microversion, cap: Option<Microversion>) -> Result<Negotiated, String> {
        let ours = cap.map_or(NEWEST, |cap| cap.min(NEWEST));
        let newest_common = max.min(ours);
        if newest_common < min.max(OLDEST) {
            return Err(format!(
                "the cloud's compute API ({min} to {max}) has no version in common with ours ({OLDEST} to {ours})"
            ));
        }
        Ok(Negotiated(newest_common))
    }

    /// The version sent on every call.
    pub fn version(self) -> Microversion {
        self.0
    }

    /// Whether a call introduced at `needed` is available.
    pub fn supports(self, needed: Microversion) -> bool {
        self.0 >= needed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_newest_common_version() {
        let zed = Negotiated::pick(Microversion(2, 1), Microversion(2, 93), None).unwrap();
        assert_eq!(zed.version(), Microversion(2, 93));
        let future = Negotiated::pick(Microversion(2, 1), Microversion(2, 100), None).unwrap();
        assert_eq!(future.version(), NEWEST);
        let pinned = Negotiated::pick(Microversion(2, 1), Microversion(2, 93), Some(Microversion(2, 52))).unwrap();
        assert_eq!(pinned.version(), Microversion(2, 52));
        let mitaka = Negotiated::pick(Microversion(2, 1), Microversion(2, 25), None).unwrap();
        assert!(mitaka.supports(BLOCK_MIGRATION_AUTO));
        assert!(!mitaka.supports(SERVICE_UUID));
    }

    #[test]
    fn refuses_a_cloud_newer_than_anything_we_know() {
        assert!(Negotiated::pick(Microversion(2, 95), Microversion(2, 99), None).is_err());
        assert!(Negotiated::pick(Microversion(2, 60), Microversion(2, 93), Some(Microversion(2, 50))).is_err());
    }

    #[test]
    fn parses_and_orders() {
        assert_eq!("2.53".parse::<Microversion>().unwrap(), SERVICE_UUID);
        assert!(Microversion(2, 9) < Microversion(2, 10));
        assert!("2".parse::<Microversion>().is_err());
    }
}
