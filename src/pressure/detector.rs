//! When low memory is pressure: below a threshold for a sustained window,
//! and over only once back above the threshold plus a margin (hysteresis),
//! so that a host hovering at the threshold neither moves VMs for a passing
//! dip nor starts and stops relief at every sample.

use std::time::{Duration, Instant};

/// An amount of memory, fixed or a share of the host's total.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Amount {
    Mib(u64),
    /// Percent of `MemTotal`.
    Percent(f64),
}

impl Amount {
    /// In MiB on a host with `total_mib`.
    pub fn of(self, total_mib: u64) -> u64 {
        match self {
            Amount::Mib(mib) => mib,
            Amount::Percent(percent) => (total_mib as f64 * percent / 100.0).round() as u64,
        }
    }
}

impl std::str::FromStr for Amount {
    type Err = String;

    /// `10%`, or a size with a binary unit: `512Mi`, `2Gi`, `1Ti` (as Kubernetes writes quantities).
    fn from_str(text: &str) -> Result<Amount, String> {
        let text = text.trim();
        if let Some(percent) = text.strip_suffix('%') {
            return percent
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| (0.0..100.0).contains(p))
                .map(Amount::Percent)
                .ok_or_else(|| format!("{text:?}: a percentage must be at least 0 and below 100"));
        }
        let units = [
            ("Ki", 1.0 / 1024.0),
            ("Mi", 1.0),
            ("Gi", 1024.0),
            ("Ti", 1024.0 * 1024.0),
        ];
        units
            .iter()
            .find_map(|(unit, mib)| {
                let number = text.strip_suffix(unit)?.trim().parse::<f64>().ok()?;
                (number.is_finite() && number >= 0.0).then(|| Amount::Mib((number * mib).round() as u64))
            })
            .ok_or_else(|| format!("{text:?} is neither a percentage (10%) nor a size such as 512Mi or 2Gi"))
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Amount::Mib(mib) => write!(f, "{mib}Mi"),
            Amount::Percent(percent) => write!(f, "{percent}%"),
        }
    }
}

/// When relief starts and ends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PressureRule {
    /// Pressure when `MemAvailable` is below this...
    pub threshold: Amount,
    /// ...for at least this long.
    pub window: Duration,
    /// Relieved once `MemAvailable` is at least the threshold plus this.
    pub margin: Amount,
}

/// The host's memory as the rule judges it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pressure {
    /// Above the threshold (or relieved: above it plus the margin).
    None,
    /// Below the threshold since `since`, not yet for the whole window.
    Dipping { since: Instant },
    /// Below the threshold for the window (since `since`, when it first
    /// dipped), not yet back above the threshold plus the margin.
    Sustained {
        since: Instant,
        /// What must still be freed to be relieved, in MiB.
        short_mib: u64,
    },
}

impl Pressure {
    /// Below the threshold, sustained or not: other agents should send no VM here.
    pub fn is_low(self) -> bool {
        !matches!(self, Pressure::None)
    }
}

/// Follows the samples of one host.
#[derive(Clone, Debug)]
pub struct Detector {
    rule: PressureRule,
    state: Pressure,
}

impl Detector {
    pub fn new(rule: PressureRule) -> Detector {
        Detector {
            rule,
            state: Pressure::None,
        }
    }

    pub fn rule(&self) -> PressureRule {
        self.rule
    }

    pub fn state(&self) -> Pressure {
        self.state
    }

    /// Folds in a sample of `available_mib` of `total_mib` taken at `now`.
    pub fn observe(&mut self, now: Instant, total_mib: u64, available_mib: u64) -> Pressure {
        let threshold = self.rule.threshold.of(total_mib);
        let relieved_at = threshold.saturating_add(self.rule.margin.of(total_mib));
        self.state = match self.state {
            Pressure::Sustained { since, .. } if available_mib < relieved_at => Pressure::Sustained {
                since,
                short_mib: relieved_at - available_mib,
            },
            Pressure::Sustained { .. } => Pressure::None,
            _ if available_mib >= threshold => Pressure::None,
            Pressure::None => self.dipping_since(now, now, relieved_at - available_mib),
            Pressure::Dipping { since } => self.dipping_since(since, now, relieved_at - available_mib),
        };
        self.state
    }

    fn dipping_since(&self, since: Instant, now: Instant, short_mib: u64) -> Pressure {
        if now.duration_since(since) >= self.rule.window {
            Pressure::Sustained { since, short_mib }
        } else {
            Pressure::Dipping { since }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(window_s: u64) -> PressureRule {
        PressureRule {
            threshold: Amount::Mib(2048),
            window: Duration::from_secs(window_s),
            margin: Amount::Mib(1024),
        }
    }

    #[test]
    fn amounts_take_percent_and_binary_units() {
        assert_eq!("10%".parse::<Amount>(), Ok(Amount::Percent(10.0)));
        assert_eq!("2Gi".parse::<Amount>(), Ok(Amount::Mib(2048)));
        assert_eq!("512Mi".parse::<Amount>(), Ok(Amount::Mib(512)));
        assert_eq!("1.5Gi".parse::<Amount>(), Ok(Amount::Mib(1536)));
        for bad in ["2G", "100%", "-1Gi", "lots", ""] {
            assert!(bad.parse::<Amount>().is_err(), "{bad}");
        }
        assert_eq!(Amount::Percent(10.0).of(24000), 2400);
    }

    #[test]
    fn a_dip_shorter_than_the_window_is_no_pressure() {
        let start = Instant::now();
        let mut detector = Detector::new(rule(60));
        assert_eq!(detector.observe(start, 16384, 1000), Pressure::Dipping { since: start });
        let later = start + Duration::from_secs(59);
        assert_eq!(detector.observe(later, 16384, 1500), Pressure::Dipping { since: start });
        assert_eq!(
            detector.observe(later, 16384, 2048),
            Pressure::None,
            "back at the threshold"
        );
        // A new dip counts its window from its own start.
        let again = later + Duration::from_secs(10);
        assert_eq!(detector.observe(again, 16384, 1000), Pressure::Dipping { since: again });
    }

    #[test]
    fn pressure_sustained_for_the_window_lasts_until_the_threshold_plus_the_margin() {
        let start = Instant::now();
        let mut detector = Detector::new(rule(60));
        detector.observe(start, 16384, 1500);
        let at_window = start + Duration::from_secs(60);
        assert_eq!(
            detector.observe(at_window, 16384, 1800),
            Pressure::Sustained {
                since: start,
                short_mib: 3072 - 1800
            }
        );
        // Above the threshold but within the margin: still under pressure.
        let state = detector.observe(at_window, 16384, 2500);
        assert_eq!(
            state,
            Pressure::Sustained {
                since: start,
                short_mib: 572
            }
        );
        assert!(state.is_low());
        assert_eq!(detector.observe(at_window, 16384, 3072), Pressure::None);
    }
}
