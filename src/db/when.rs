//! Dates and times as STAGE hands them to Lua: integer seconds since the epoch, read and
//! written in the process's local time zone (STAGE converts with `mktime`/`localtime_r`).
//! DATE is local midnight of that day, TIMESTAMP the local moment, and TIME the seconds since
//! midnight (STAGE's value for TIME has no usable meaning; see docs/porting-from-stage.md).

/// Which of the three SQL date/time types a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DateKind {
    Date,
    Time,
    Timestamp,
}

fn num(s: &str) -> Option<i64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// `HH:MM:SS[.fraction]` → seconds of the day (the fraction is dropped).
fn time_of_day(s: &str) -> Option<i64> {
    let s = s.split('.').next()?;
    let mut it = s.split(':');
    let (h, m) = (num(it.next()?)?, num(it.next()?)?);
    let sec = it.next().map(num).unwrap_or(Some(0))?;
    if it.next().is_some() || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    Some(h * 3600 + m * 60 + sec)
}

fn ymd(s: &str) -> Option<(i64, i64, i64)> {
    let mut it = s.splitn(3, '-');
    let y = num(it.next()?)?;
    let m = num(it.next()?)?;
    let d = num(it.next()?)?;
    ((1..=12).contains(&m) && (1..=31).contains(&d) && y > 0).then_some((y, m, d))
}

/// Local date and time → epoch seconds (`mktime`, daylight saving decided by the zone).
pub fn local_epoch(y: i64, mo: i64, d: i64, secs_of_day: i64) -> Option<i64> {
    // SAFETY: `tm` is plain data, zero-initialised before use; mktime only reads and
    // normalises it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = (y - 1900) as libc::c_int;
    tm.tm_mon = (mo - 1) as libc::c_int;
    tm.tm_mday = d as libc::c_int;
    tm.tm_hour = (secs_of_day / 3600) as libc::c_int;
    tm.tm_min = (secs_of_day / 60 % 60) as libc::c_int;
    tm.tm_sec = (secs_of_day % 60) as libc::c_int;
    tm.tm_isdst = -1;
    // SAFETY: a valid, exclusively borrowed `tm`.
    let t = unsafe { libc::mktime(&mut tm) };
    (t != -1 || (y, mo, d) == (1969, 12, 31)).then_some(t as i64)
}

/// Epoch seconds → local (year, month, day, hour, minute, second).
pub fn local_parts(epoch: i64) -> (i64, i64, i64, i64, i64, i64) {
    let t = epoch as libc::time_t;
    // SAFETY: `tm` is plain data that localtime_r fills in; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    unsafe { libc::localtime_r(&t, &mut tm) };
    (
        tm.tm_year as i64 + 1900,
        tm.tm_mon as i64 + 1,
        tm.tm_mday as i64,
        tm.tm_hour as i64,
        tm.tm_min as i64,
        tm.tm_sec as i64,
    )
}

/// A driver's text of a DATE, TIME or TIMESTAMP (`2024-05-01`, `12:30:00`,
/// `2024-05-01 12:30:00[.fff]`, also with `T`) → epoch seconds; None when it is not one
/// (MySQL's zero date `0000-00-00`, out-of-range values), so the caller keeps the text.
pub fn to_epoch(kind: DateKind, text: &str) -> Option<i64> {
    let t = text.trim();
    match kind {
        DateKind::Time => time_of_day(t),
        DateKind::Date | DateKind::Timestamp => {
            let (date, time) = match t.find([' ', 'T']) {
                Some(i) => (&t[..i], Some(&t[i + 1..])),
                None => (t, None),
            };
            let (y, m, d) = ymd(date)?;
            let secs = match time {
                Some(tm) => time_of_day(tm.trim_end_matches('Z'))?,
                None => 0,
            };
            local_epoch(y, m, d, secs)
        }
    }
}

/// Epoch seconds → the text a driver accepts for a parameter of that type.
pub fn from_epoch(kind: DateKind, epoch: i64) -> String {
    match kind {
        DateKind::Time => {
            let s = epoch.rem_euclid(86_400);
            format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        }
        DateKind::Date => {
            let (y, mo, d, ..) = local_parts(epoch);
            format!("{y:04}-{mo:02}-{d:02}")
        }
        DateKind::Timestamp => {
            let (y, mo, d, h, mi, s) = local_parts(epoch);
            format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_local_time() {
        let e = to_epoch(DateKind::Timestamp, "2024-05-01 12:30:07").unwrap();
        assert_eq!(from_epoch(DateKind::Timestamp, e), "2024-05-01 12:30:07");
        assert_eq!(to_epoch(DateKind::Timestamp, "2024-05-01 12:30:07.250"), Some(e));
        assert_eq!(to_epoch(DateKind::Timestamp, "2024-05-01T12:30:07Z"), Some(e));
        let d = to_epoch(DateKind::Date, "2024-05-01").unwrap();
        assert_eq!(e - d, 12 * 3600 + 30 * 60 + 7);
        assert_eq!(from_epoch(DateKind::Date, d), "2024-05-01");
        assert_eq!(to_epoch(DateKind::Time, "12:30:07"), Some(45007));
        assert_eq!(from_epoch(DateKind::Time, 45007), "12:30:07");
    }

    #[test]
    fn refuses_what_is_not_a_date() {
        assert_eq!(to_epoch(DateKind::Date, "0000-00-00"), None);
        assert_eq!(to_epoch(DateKind::Date, "soon"), None);
        assert_eq!(to_epoch(DateKind::Time, "25:00:00"), None);
        assert_eq!(to_epoch(DateKind::Timestamp, "2024-13-01 00:00:00"), None);
    }
}
