//! Cutover windows: the part of the day in which a move may cut over, in UTC or in a named time zone (IANA
//! names such as `Europe/Berlin`, from the tz database built into the binary, so daylight saving time is
//! followed). Copy and dual_write run any time; a move that is ready outside its window waits in dual_write,
//! tee running, until the window opens.

use std::fmt;
use std::str::FromStr;

use jiff::tz::TimeZone;
use jiff::Timestamp;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::clock::time_of_day;

const DAY: u32 = 86_400;

/// `HH:MM[:SS]-HH:MM[:SS] [ZONE]` (UTC when no zone is given); a window whose end is before its start spans
/// midnight.
#[derive(Debug, Clone, PartialEq)]
pub struct CutoverWindow {
    /// Seconds after local midnight.
    start: u32,
    end: u32,
    /// The zone's IANA name; `None` for UTC.
    zone: Option<String>,
    tz: TimeZone,
}

impl Eq for CutoverWindow {}

impl CutoverWindow {
    /// Seconds after local midnight at `unix`.
    fn local(&self, unix: u64) -> u32 {
        if self.zone.is_none() {
            return (unix % u64::from(DAY)) as u32;
        }
        match Timestamp::from_second(unix as i64) {
            Ok(ts) => {
                let t = ts.to_zoned(self.tz.clone()).time();
                t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
            }
            Err(_) => (unix % u64::from(DAY)) as u32,
        }
    }

    /// Whether `unix` (seconds) falls inside the window.
    pub fn contains(&self, unix: u64) -> bool {
        let t = self.local(unix);
        if self.start <= self.end {
            (self.start..self.end).contains(&t)
        } else {
            t >= self.start || t < self.end
        }
    }

    /// Seconds from `unix` until the window opens (0 inside it). On a day whose clock jumps (daylight saving
    /// time), the first whole minute inside the window.
    pub fn opens_in(&self, unix: u64) -> u64 {
        if self.contains(unix) {
            return 0;
        }
        let naive = u64::from((self.start + DAY - self.local(unix)) % DAY);
        if self.contains(unix + naive) {
            return naive;
        }
        (1..=2 * 60)
            .map(|m| naive + m * 60)
            .chain((1..=2 * 60).map(|m| naive.saturating_sub(m * 60)))
            .find(|d| self.contains(unix + d))
            .unwrap_or(naive)
    }
}

impl FromStr for CutoverWindow {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || {
            format!("cutover window {text:?} is not HH:MM-HH:MM [ZONE] (UTC unless a zone such as Europe/Berlin is given; seconds optional)")
        };
        let (span, zone) = match text.trim().split_once(' ') {
            Some((span, zone)) => (span, Some(zone.trim())),
            None => (text.trim(), None),
        };
        let (a, b) = span.split_once('-').ok_or_else(bad)?;
        let (start, end) = (
            time_of_day(a.trim()).ok_or_else(bad)?,
            time_of_day(b.trim()).ok_or_else(bad)?,
        );
        if start == end {
            return Err(format!("cutover window {text:?} is empty"));
        }
        let zone = zone.filter(|z| !z.eq_ignore_ascii_case("UTC"));
        let tz = match zone {
            None => TimeZone::UTC,
            Some(z) => TimeZone::get(z).map_err(|_| {
                format!("cutover window {text:?}: unknown time zone {z:?} (use an IANA name such as Europe/Berlin)")
            })?,
        };
        Ok(CutoverWindow {
            start,
            end,
            zone: zone.map(str::to_owned),
            tz,
        })
    }
}

impl fmt::Display for CutoverWindow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hms = |t: u32| format!("{:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60);
        let zone = self.zone.as_deref().unwrap_or("UTC");
        write!(f, "{}-{} {zone}", hms(self.start), hms(self.end))
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
        assert!("02:00-03:00 Mars/Olympus".parse::<CutoverWindow>().is_err());
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(json, "\"02:00:00-04:30:00\"");
        assert_eq!(serde_json::from_str::<CutoverWindow>(&json).unwrap(), w);
    }

    #[test]
    fn zoned_windows_follow_the_zone_and_its_daylight_saving_time() {
        let w: CutoverWindow = "02:00-04:00 Europe/Berlin".parse().unwrap();
        // 2026-01-15 (winter, UTC+1) and 2026-07-15 (summer, UTC+2).
        let winter = 1_768_435_200;
        let summer = 1_784_073_600;
        assert!(
            w.contains(winter + 3600 + 1800),
            "01:30 UTC is 02:30 in Berlin in winter"
        );
        assert!(
            !w.contains(winter + 3 * 3600 + 1800),
            "03:30 UTC is 04:30 in winter"
        );
        assert!(w.contains(summer + 1800), "00:30 UTC is 02:30 in summer");
        assert!(!w.contains(summer + 2 * 3600 + 1800));
        assert_eq!(w.opens_in(winter), 3600);
        assert_eq!(w.to_string(), "02:00:00-04:00:00 Europe/Berlin");
        let json = serde_json::to_string(&w).unwrap();
        assert_eq!(serde_json::from_str::<CutoverWindow>(&json).unwrap(), w);
        let utc: CutoverWindow = "02:00-04:00 UTC".parse().unwrap();
        assert_eq!(utc, "02:00-04:00".parse().unwrap());
    }
}
