//! The hypervisor's memory as the kernel tells it: `MemTotal` and
//! `MemAvailable` from `/proc/meminfo`, the estimate of what can be given to
//! new work without swapping (page cache and reclaimable slabs counted in).
//!
//! A container sees the host's `/proc/meminfo` unless a tool such as lxcfs
//! mounts its own view over it (the container's cgroup limit, not the
//! hypervisor's memory). Acting on that view would move VMs for the wrong
//! reason or never, so [`hidden_by_lxcfs`] finds such a mount and relief is
//! refused on that node.

use std::path::Path;

/// What the kernel reports, in MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    pub total_mib: u64,
    pub available_mib: u64,
}

/// Why the memory could not be read.
#[derive(Debug, thiserror::Error)]
pub enum MemInfoError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} has no {field} line (a kernel before 3.14 has no MemAvailable)")]
    Missing { path: String, field: &'static str },
    #[error("{path}: {field} is not a number of kB: {line:?}")]
    Malformed {
        path: String,
        field: &'static str,
        line: String,
    },
}

/// Reads `path` (the node's `/proc/meminfo`, or a file in its format).
pub fn read(path: &Path) -> Result<MemInfo, MemInfoError> {
    let text = std::fs::read_to_string(path).map_err(|source| MemInfoError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text, &path.display().to_string())
}

/// Parses the text of `/proc/meminfo` (`named` is where it came from, for errors).
pub fn parse(text: &str, named: &str) -> Result<MemInfo, MemInfoError> {
    let field = |field: &'static str| -> Result<u64, MemInfoError> {
        let line = text
            .lines()
            .find(|l| l.split(':').next() == Some(field))
            .ok_or_else(|| MemInfoError::Missing {
                path: named.to_string(),
                field,
            })?;
        let malformed = || MemInfoError::Malformed {
            path: named.to_string(),
            field,
            line: line.to_string(),
        };
        let mut words = line.split(':').nth(1).unwrap_or_default().split_whitespace();
        let kib: u64 = words.next().and_then(|n| n.parse().ok()).ok_or_else(malformed)?;
        match words.next() {
            Some("kB") => Ok(kib / 1024),
            _ => Err(malformed()),
        }
    };
    Ok(MemInfo {
        total_mib: field("MemTotal")?,
        available_mib: field("MemAvailable")?,
    })
}

/// Whether `/proc/self/mountinfo` (`mountinfo`) shows a FUSE file system
/// such as lxcfs mounted over `path`: the container then sees its own limit,
/// not the hypervisor's memory.
pub fn hidden_by_lxcfs(mountinfo: &str, path: &Path) -> bool {
    let path = path.to_string_lossy();
    mountinfo.lines().any(|line| {
        // `ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`
        let mut halves = line.splitn(2, " - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        let mount_point = left.split_whitespace().nth(4).unwrap_or_default();
        let fs_type = right.split_whitespace().next().unwrap_or_default();
        mount_point == path && (fs_type.starts_with("fuse") || fs_type.contains("lxcfs"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "MemTotal:       24589164 kB\nMemFree:         1187364 kB\n\
                          MemAvailable:   20342104 kB\nBuffers:          347500 kB\n";

    #[test]
    fn reads_total_and_available_in_mib() {
        let info = parse(SAMPLE, "/proc/meminfo").unwrap();
        assert_eq!(
            info,
            MemInfo {
                total_mib: 24589164 / 1024,
                available_mib: 20342104 / 1024
            }
        );
    }

    #[test]
    fn a_kernel_without_mem_available_or_a_garbled_line_is_an_error_naming_the_field() {
        let old = "MemTotal:       24589164 kB\nMemFree:         1187364 kB\n";
        assert!(matches!(
            parse(old, "f"),
            Err(MemInfoError::Missing {
                field: "MemAvailable",
                ..
            })
        ));
        let garbled = "MemTotal:       lots kB\nMemAvailable:   1 kB\n";
        let error = parse(garbled, "f").unwrap_err().to_string();
        assert!(error.contains("MemTotal is not a number"), "{error}");
        // A prefix is not the field: `MemAvailableX` must not be taken for it.
        assert!(parse("MemTotal: 1 kB\nMemAvailableX: 2 kB\n", "f").is_err());
    }

    #[test]
    fn an_lxcfs_mount_over_meminfo_is_found() {
        let lxcfs = "1430 1421 0:52 /proc/meminfo /proc/meminfo rw,nosuid,nodev,relatime master:281 - \
                     fuse.lxcfs lxcfs rw,user_id=0,group_id=0,allow_other\n";
        let plain = "1425 1421 0:59 / /proc rw,nosuid,nodev,noexec,relatime - proc proc rw\n";
        assert!(hidden_by_lxcfs(lxcfs, Path::new("/proc/meminfo")));
        assert!(!hidden_by_lxcfs(plain, Path::new("/proc/meminfo")));
        assert!(!hidden_by_lxcfs(lxcfs, Path::new("/run/meminfo")));
    }
}
