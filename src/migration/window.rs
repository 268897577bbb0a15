//! Cutover windows: the part of the day (UTC) in which a move may cut over. Copy and dual_write run any time;
//! a move that is ready outside its window waits in dual_write, tee running, until the window opens.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::clock::time_of_day;

const DAY: u32 = 86_400;

/// `HH:MM[:SS]-HH:MM[:SS]`, UTC; a window whose end is before its start spans midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CutoverWindow {
    /// Seconds after midnight UTC.
    start: u32,
    end: u32,
}

impl CutoverWindow {
    /// Whether `unix` (seconds) falls inside the window.
    pub fn contains(&self, unix: u64) -> bool {
        let t = (unix % u64::from(DAY)) as u32;
        if self.start <= self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Seconds from `unix` until the window opens (0 inside it).
    pub fn opens_in(&self, unix: u64) -> u64 {
        if self.contains(unix) {
            return 0;
        }
        let t = (unix % u64::from(DAY)) as u32;
        u64::from((self.start + DAY - t) % DAY)
    }
}

impl FromStr for CutoverWindow {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("cutover window {text:?} is not HH:MM-HH:MM (UTC, seconds optional)");
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let (start, end) = (
            time_of_day(a.trim()).ok_or_else(bad)?,
            time_of_day(b.trim()).ok_or_else(bad)?,
        );
        if start == end {
            return Err(format!("cutover window {text:?} is empty"));
        }
        Ok(CutoverWindow { start, end })
    }
}

impl fmt::Display for CutoverWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hms = |t: u32| format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
        write!(f, "{}-{} UTC", hms(self.start), hms(self.end))
    }
}

impl Serialize for CutoverWindow {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!(
            "{}",
            self.to_string().trim_end_matches(" UTC")
        ))
    }
}

impl<'de> Deserialize<'de> for CutoverWindow {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_contain_the_right_times() {
        let w: CutoverWindow = "02:00-04:30".parse().unwrap();
        let at = |h: u64, m: u64| 20_000 * 86_400 + h * 3600 + m * 60;
        assert!(!w.contains(at(1, 59)));
        assert!(w.contains(at(2, 0)));
        assert!(w.contains(at(4, 29)));
        assert!(!w.contains(at(4, 30)));
        assert_eq!(w.opens_in(at(1, 0)), 3600);
        assert_eq!(w.opens_in(at(5, 0)), 21 * 3600);
        let night: CutoverWindow = "22:00-02:00".parse().unwrap();
        assert!(
            night.contains(at(23, 0)) && night.contains(at(1, 0)) && !night.contains(at(12, 0))
        );
        let exact: CutoverWindow = "10:00:05-10:00:30".parse().unwrap();
        assert!(exact.contains(20_000 * 86_400 + 36_005));
        assert_eq!(exact.to_string(), "10:00:05-10:00:30 UTC");
        for bad in [
            "",
            "2-4",
            "25:00-01:00",
            "02:00-02:00",
            "02:00",
            "02:00-03:00:99",
        ] {
            assert!(bad.parse::<CutoverWindow>().is_err(), "{bad}");
        }
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, "\"02:00:00-04:30:00\"");
        assert_eq!(serde_json::from_str::<CutoverWindow>(&json).unwrap(), w);
    }
}
