//! `Value`: what crosses stage instances (and, later, nodes). Values are copied: nil,
//! booleans, integers and floats (kept apart), binary-safe strings, nested tables and
//! functions whose only upvalue is `_ENV` (as bytecode). Plain data, no Lua state: the
//! conversion from and to Lua values is `lua::value`, which reports anything that cannot
//! travel as a `SendError` naming where it sits.

/// A Lua value detached from any Lua state.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Nil,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(Vec<u8>),
    /// Key/value pairs in the order `next` gave them.
    Table(Vec<(Value, Value)>),
    /// A Lua function dumped as bytecode (with debug info, so errors keep their lines).
    Function(Vec<u8>),
}

/// Nested tables deeper than this are refused rather than risking the stack.
pub const MAX_DEPTH: usize = 100;

/// Why a value cannot be sent; `Display` gives the message script authors see.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot send {what} at {path}")]
pub struct SendError {
    /// `function with upvalue 'count'`, `userdata`, `table with a cycle`, ...
    pub what: String,
    /// `arg 2.handler`, `return 1[3]`, ...
    pub path: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_send_error_names_what_and_where() {
        let e = SendError {
            what: "userdata".into(),
            path: "arg 2.conn".into(),
        };
        assert_eq!(e.to_string(), "cannot send userdata at arg 2.conn");
    }

    #[test]
    fn integers_and_floats_stay_apart() {
        assert_ne!(Value::Int(3), Value::Float(3.0));
        assert_ne!(Value::Str(b"3".to_vec()), Value::Int(3));
    }
}
