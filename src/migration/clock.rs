//! Times an operator writes (`--since`, `--at`, cutover windows), read one way everywhere: spans (`30s`, `5m`,
//! `2h`, `7d`), times of day (`HH:MM[:SS]`, UTC) and dates (`YYYY-MM-DD`, UTC midnight).

/// `30s`, `5m`, `2h`, `7d` in seconds.
pub fn span(text: &str) -> Option<u64> {
    // By the last character, not byte: text ending in a multibyte character is refused, not split inside it.
    let last = text.chars().next_back()?;
    let n = &text[..text.len() - last.len_utf8()];
    let unit = match last {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    n.parse::<u64>().ok()?.checked_mul(unit)
}

/// `HH:MM[:SS]` in seconds after midnight.
pub fn time_of_day(text: &str) -> Option<u32> {
    let mut parts = text.split(':');
    let h: u32 = parts.next()?.parse().ok()?;
    let m: u32 = parts.next()?.parse().ok()?;
    let s: u32 = match parts.next() {
        Some(s) => s.parse().ok()?,
        None => 0,
    };
    (parts.next().is_none() && h < 24 && m < 60 && s < 60).then_some(h * 3600 + m * 60 + s)
}

/// `YYYY-MM-DD` as the Unix seconds of its midnight, UTC.
pub fn date(text: &str) -> Option<u64> {
    let mut parts = text.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (Some(Some(y)), Some(Some(m)), Some(Some(d))) = (parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    u64::try_from(days_from_civil(y, m, d) * 86_400).ok()
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's days-from-civil).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_read_their_unit_and_refuse_anything_else() {
        assert_eq!(span("30s"), Some(30));
        assert_eq!(span("5m"), Some(300));
        assert_eq!(span("2h"), Some(7200));
        assert_eq!(span("7d"), Some(604_800));
        // A multibyte last character is refused, not split inside (that panicked).
        for bad in ["", "s", "1é", "é", "1x", "-1s", "99999999999999999999d"] {
            assert_eq!(span(bad), None, "{bad}");
        }
    }
}
