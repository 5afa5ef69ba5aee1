//! The database layer behind the Lua `odbc` module, in plain Rust over odbc-api: connection
//! strings and options (`connstr`), the per-connection-string pool and the bounded worker
//! threads that run every blocking ODBC call (`pool`), statements, parameters and type mapping
//! (`session`), and the fetch/apply change tracker (`track`). Nothing here imports mlua.

pub mod connstr;
pub mod pool;
pub mod session;
pub mod track;
pub mod when;

pub use connstr::{ConnSpec, QueryDriver};
pub use pool::{Executor, Pool, PooledConn};
pub use session::{Column, Dir, Param, QueryResult, Session, Spec};

use std::path::Path;

/// A database value as it crosses between the driver and Lua.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    /// UTF-8 text (character columns, decimals that are not numbers).
    Text(String),
    /// Binary data (BLOB, bytea, VARBINARY), and text that is not valid UTF-8.
    Bytes(Vec<u8>),
}

impl Value {
    /// Equality as the change tracker needs it: integers and floats of the same value are
    /// equal, and text equals the same bytes.
    pub fn same(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Int(a), Value::Float(b)) | (Value::Float(b), Value::Int(a)) => (*a as f64) == *b,
            (Value::Text(a), Value::Bytes(b)) | (Value::Bytes(b), Value::Text(a)) => {
                a.as_bytes() == b.as_slice()
            }
            (a, b) => a == b,
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }
}

/// An error of the database layer. Driver errors carry the SQLSTATE, the native code and the
/// driver's message.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    #[error("odbc error [{state}] (native {native}): {message}")]
    Driver {
        state: String,
        native: i32,
        message: String,
    },
    #[error("odbc: {0}")]
    Other(String),
    #[error("odbc: no free connection for {name} within {waited_ms} ms (pool of {size})")]
    PoolTimeout {
        name: String,
        waited_ms: u64,
        size: usize,
    },
}

impl DbError {
    pub fn other(msg: impl Into<String>) -> DbError {
        DbError::Other(msg.into())
    }

    /// The SQLSTATE, when the driver gave one.
    pub fn state(&self) -> Option<&str> {
        match self {
            DbError::Driver { state, .. } => Some(state),
            _ => None,
        }
    }

    /// Whether the error means the connection is unusable (communication link failures,
    /// server shutdown), so that the pool drops it instead of reusing it.
    pub fn is_connection_lost(&self) -> bool {
        match self.state() {
            Some(s) => s.starts_with("08") || s.starts_with("57P") || s == "HYT01",
            None => false,
        }
    }
}

impl From<odbc_api::Error> for DbError {
    fn from(e: odbc_api::Error) -> DbError {
        match e {
            odbc_api::Error::Diagnostics { record, .. } | odbc_api::Error::UnableToRepresentNull(record) => {
                DbError::Driver {
                    state: record.state.as_str().to_string(),
                    native: record.native_error,
                    message: String::from_utf8_lossy(&record.message)
                        .trim_end_matches('\0')
                        .trim()
                        .to_string(),
                }
            }
            other => DbError::Other(other.to_string()),
        }
    }
}

pub type Result<T> = std::result::Result<T, DbError>;

/// Points unixODBC at `<home>/conf` for its driver list when the home has
/// `conf/odbcinst.ini` and the environment does not choose otherwise. Call it before any
/// ODBC environment exists (at node start).
pub fn use_home_odbcinst(home: &Path) {
    let conf = home.join("conf");
    if std::env::var_os("ODBCSYSINI").is_none() && conf.join("odbcinst.ini").is_file() {
        std::env::set_var("ODBCSYSINI", &conf);
    }
}
