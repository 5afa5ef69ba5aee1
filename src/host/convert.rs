//! Conversions at the Lua boundary: script numbers to `Duration`s and integers (handles, ids), and Rust
//! errors to Lua errors. Bindings convert here rather than by hand.
//!
//! # Durations (docs/stage.md, "Durations")
//!
//! Every duration a script gives (`stage.sleep`, `stage.addtask`, a task's return value,
//! `stage.request`'s timeout, `vultr.wait`'s options, the odbc timeouts) follows one rule:
//! * NaN is an error naming the function and the argument;
//! * a negative number is 0 for delays (`delay`) and an error for options (`timeout`);
//! * anything longer than [`MAX_DURATION`] (one year), `math.huge` included, is clamped to
//!   it: "wait a year" and "wait forever" are the same thing to a running instance, and no
//!   number a script passes can overflow a `Duration` or a timer.
//!
//! # Errors
//!
//! [`IntoLuaErr`] turns any `Result<T, E: Display>` into an `mlua::Result<T>` whose message
//! is the error's text (`lua_err`) or that text after the function's name (`lua_err_in`);
//! the project's error types also convert with `?` through `From<…> for mlua::Error`.

use mlua::Value;
use std::fmt::Display;
use std::time::Duration;

/// The longest duration a script can ask for: one year (365 days). Longer ones are clamped.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// The unit of a number given by a script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Millis,
    Secs,
}

impl Unit {
    fn name(self) -> &'static str {
        match self {
            Unit::Millis => "milliseconds",
            Unit::Secs => "seconds",
        }
    }
}

/// A number that is not a duration; the text names `what` (the function and argument).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DurationError {
    #[error("{what}: expected a number of {unit}, got NaN")]
    NaN { what: String, unit: &'static str },
    #[error("{what}: expected a non-negative number of {unit}, got {n}")]
    Negative {
        what: String,
        unit: &'static str,
        n: f64,
    },
}

/// `n` (finite or infinite, not NaN, >= 0) in `unit`, clamped to `MAX_DURATION`.
fn clamped(n: f64, unit: Unit) -> Duration {
    let secs = match unit {
        Unit::Millis => n / 1000.0,
        Unit::Secs => n,
    };
    if secs >= MAX_DURATION.as_secs_f64() {
        MAX_DURATION
    } else if secs > 0.0 {
        Duration::from_secs_f64(secs)
    } else {
        Duration::ZERO
    }
}

/// A delay (`stage.sleep`, `stage.addtask`): negative counts as 0, longer than a year is a
/// year, NaN is an error.
pub fn delay(what: &str, n: f64, unit: Unit) -> Result<Duration, DurationError> {
    if n.is_nan() {
        return Err(DurationError::NaN {
            what: what.into(),
            unit: unit.name(),
        });
    }
    Ok(clamped(n, unit))
}

/// A timeout or interval option (`vultr.wait`, odbc): negative and NaN are errors, longer
/// than a year is a year.
pub fn timeout(what: &str, n: f64, unit: Unit) -> Result<Duration, DurationError> {
    if n < 0.0 {
        return Err(DurationError::Negative {
            what: what.into(),
            unit: unit.name(),
            n,
        });
    }
    delay(what, n, unit)
}

/// "Run me again after N ms", returned by a task, a keyed submit or the idle function:
/// `Ok(None)` unless it is a number > 0 (clamped to a year); NaN is an error.
pub fn rerun_after(what: &str, v: Option<&Value>) -> Result<Option<Duration>, DurationError> {
    let ms = match v {
        Some(Value::Integer(i)) => *i as f64,
        Some(Value::Number(n)) => *n,
        _ => return Ok(None),
    };
    if ms.is_nan() {
        return delay(what, ms, Unit::Millis).map(Some);
    }
    Ok((ms > 0.0).then(|| clamped(ms, Unit::Millis)))
}

/// An integer from a Lua integer or a float with an integral value in range.
pub fn as_integer(v: &Value) -> Option<i64> {
    match v {
        Value::Integer(i) => Some(*i),
        // -2^63 is exact as f64; 2^63 is the first float out of range.
        Value::Number(n)
            if n.fract() == 0.0 && *n >= -9.223_372_036_854_776e18 && *n < 9.223_372_036_854_776e18 =>
        {
            Some(*n as i64)
        }
        _ => None,
    }
}

/// `as_integer`, or an error naming `what` and what it got.
pub fn integer(what: &str, v: &Value) -> mlua::Result<i64> {
    as_integer(v).ok_or_else(|| {
        let got = match v {
            Value::Number(n) => format!("{n}"),
            other => format!("a {}", other.type_name()),
        };
        mlua::Error::runtime(format!("{what}: expected an integer, got {got}"))
    })
}

/// Rust errors as Lua errors, without hand-made strings at every call.
pub trait IntoLuaErr<T> {
    /// The error as a Lua runtime error with the error's text.
    fn lua_err(self) -> mlua::Result<T>;
    /// The error as a Lua runtime error `"what: text"` (`what` names the function).
    fn lua_err_in(self, what: &str) -> mlua::Result<T>;
}

impl<T, E: Display> IntoLuaErr<T> for Result<T, E> {
    fn lua_err(self) -> mlua::Result<T> {
        self.map_err(|e| mlua::Error::runtime(e.to_string()))
    }

    fn lua_err_in(self, what: &str) -> mlua::Result<T> {
        self.map_err(|e| mlua::Error::runtime(format!("{what}: {e}")))
    }
}

macro_rules! runtime_error_from {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for mlua::Error {
            fn from(e: $t) -> mlua::Error {
                mlua::Error::runtime(e.to_string())
            }
        }
    )*};
}

runtime_error_from!(
    DurationError,
    crate::host::loader::LoadError,
    crate::router::TargetError,
    crate::db::DbError,
    crate::cloud::vultr::VultrError,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_clamp_and_reject_nan() {
        assert_eq!(delay("f", 1500.0, Unit::Millis), Ok(Duration::from_millis(1500)));
        assert_eq!(delay("f", 1.5, Unit::Secs), Ok(Duration::from_millis(1500)));
        assert_eq!(delay("f", -1.0, Unit::Millis), Ok(Duration::ZERO));
        assert_eq!(delay("f", f64::NEG_INFINITY, Unit::Millis), Ok(Duration::ZERO));
        for huge in [1e30, f64::INFINITY, f64::MAX, 31_536_000_001.0] {
            assert_eq!(delay("f", huge, Unit::Millis), Ok(MAX_DURATION), "{huge}");
        }
        assert_eq!(delay("f", 1e30, Unit::Secs), Ok(MAX_DURATION));
        assert_eq!(
            delay("f", 31_535_999_000.0, Unit::Millis),
            Ok(MAX_DURATION - Duration::from_secs(1))
        );
        let e = delay("stage.sleep(ms)", f64::NAN, Unit::Millis).unwrap_err();
        assert_eq!(
            e.to_string(),
            "stage.sleep(ms): expected a number of milliseconds, got NaN"
        );
    }

    #[test]
    fn timeouts_reject_negative_and_nan_and_clamp_huge() {
        assert_eq!(timeout("t", 0.0, Unit::Millis), Ok(Duration::ZERO));
        assert_eq!(timeout("t", 1e30, Unit::Millis), Ok(MAX_DURATION));
        let e = timeout("vultr.wait: timeout", -5.0, Unit::Millis).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vultr.wait: timeout: expected a non-negative number of milliseconds, got -5"
        );
        assert!(timeout("t", f64::NAN, Unit::Secs).is_err());
        assert!(timeout("t", f64::NEG_INFINITY, Unit::Secs).is_err());
    }

    #[test]
    fn rerun_after_takes_positive_numbers_only() {
        let r = |v: Value| rerun_after("task", Some(&v));
        assert_eq!(r(Value::Integer(20)), Ok(Some(Duration::from_millis(20))));
        assert_eq!(r(Value::Number(0.5)), Ok(Some(Duration::from_micros(500))));
        assert_eq!(r(Value::Number(f64::INFINITY)), Ok(Some(MAX_DURATION)));
        assert_eq!(r(Value::Integer(i64::MAX)), Ok(Some(MAX_DURATION)));
        assert_eq!(r(Value::Integer(0)), Ok(None));
        assert_eq!(r(Value::Integer(-3)), Ok(None));
        assert_eq!(r(Value::Boolean(true)), Ok(None));
        assert_eq!(rerun_after("task", None), Ok(None));
        assert!(r(Value::Number(f64::NAN)).is_err());
    }

    #[test]
    fn integers_are_exact_and_in_range() {
        assert_eq!(as_integer(&Value::Integer(-7)), Some(-7));
        assert_eq!(as_integer(&Value::Number(3.0)), Some(3));
        assert_eq!(
            as_integer(&Value::Number(-9.223_372_036_854_776e18)),
            Some(i64::MIN)
        );
        assert_eq!(as_integer(&Value::Number(9.223_372_036_854_776e18)), None);
        assert_eq!(as_integer(&Value::Number(2.5)), None);
        assert_eq!(as_integer(&Value::Number(f64::NAN)), None);
        assert_eq!(as_integer(&Value::Number(f64::INFINITY)), None);
        assert_eq!(as_integer(&Value::Nil), None);
        let e = integer("stage.addtask(handle, nil)", &Value::Number(1.5)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "runtime error: stage.addtask(handle, nil): expected an integer, got 1.5"
        );
        let e = integer("x", &Value::Boolean(true)).unwrap_err();
        assert!(
            e.to_string().ends_with("x: expected an integer, got a boolean"),
            "{e}"
        );
    }

    #[test]
    fn errors_become_lua_errors_with_their_text() {
        let r: Result<(), std::io::Error> = Err(std::io::Error::other("disk on fire"));
        match r.lua_err_in("bundle.json") {
            Err(mlua::Error::RuntimeError(m)) => assert_eq!(m, "bundle.json: disk on fire"),
            other => panic!("{other:?}"),
        }
        let r: Result<u8, String> = Err("plain".into());
        match r.lua_err() {
            Err(mlua::Error::RuntimeError(m)) => assert_eq!(m, "plain"),
            other => panic!("{other:?}"),
        }
    }
}
