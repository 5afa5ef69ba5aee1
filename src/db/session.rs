//! Statements on one connection: parameters bound by STAGE's type letters, result sets read
//! into memory with the type mapping, affected rows, transactions and the last generated key.
//!
//! Type mapping (driver → Lua): integer types → integer (64-bit); REAL/FLOAT/DOUBLE → float;
//! DECIMAL/NUMERIC → integer when the scale is 0 and the value fits in 64 bits, else float;
//! BIT → boolean; BINARY/VARBINARY/BLOB/bytea → binary string; DATE/TIME/TIMESTAMP → ISO
//! text (`2024-05-01`, `12:30:00`, `2024-05-01 12:30:00`); everything else → text; NULL →
//! `Value::Null`.

use super::{DbError, QueryDriver, Result, Value};
use odbc_api::parameter::{InputParameter, VarBinaryBox, VarCharBox, WithDataType};
use odbc_api::{Connection, Cursor, DataType, Nullable};
use std::time::Duration;

/// How a column's values are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Int,
    Float,
    Decimal {
        scale: i16,
    },
    Bool,
    Binary,
    /// Character data, read as bytes (binary-safe; text when it is valid UTF-8).
    Chars,
    /// Dates, times and anything else the driver renders as text.
    Text,
}

/// One column of a result set.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    /// The SQL type name (`INTEGER`, `VARCHAR`, ...).
    pub type_name: String,
    pub kind: Kind,
    pub size: Option<usize>,
    pub scale: i16,
    pub nullable: Option<bool>,
}

fn describe(dt: DataType) -> (&'static str, Kind, Option<usize>, i16) {
    let n = |x: Option<std::num::NonZeroUsize>| x.map(|v| v.get());
    match dt {
        DataType::TinyInt => ("TINYINT", Kind::Int, None, 0),
        DataType::SmallInt => ("SMALLINT", Kind::Int, None, 0),
        DataType::Integer => ("INTEGER", Kind::Int, None, 0),
        DataType::BigInt => ("BIGINT", Kind::Int, None, 0),
        DataType::Real => ("REAL", Kind::Float, None, 0),
        DataType::Float { .. } => ("FLOAT", Kind::Float, None, 0),
        DataType::Double => ("DOUBLE", Kind::Float, None, 0),
        DataType::Numeric { precision, scale } => {
            ("NUMERIC", Kind::Decimal { scale }, Some(precision), scale)
        }
        DataType::Decimal { precision, scale } => {
            ("DECIMAL", Kind::Decimal { scale }, Some(precision), scale)
        }
        DataType::Bit => ("BIT", Kind::Bool, None, 0),
        DataType::Binary { length } => ("BINARY", Kind::Binary, n(length), 0),
        DataType::Varbinary { length } => ("VARBINARY", Kind::Binary, n(length), 0),
        DataType::LongVarbinary { length } => ("LONGVARBINARY", Kind::Binary, n(length), 0),
        DataType::Date => ("DATE", Kind::Text, None, 0),
        DataType::Time { .. } => ("TIME", Kind::Text, None, 0),
        DataType::Timestamp { .. } => ("TIMESTAMP", Kind::Text, None, 0),
        DataType::Char { length } => ("CHAR", Kind::Chars, n(length), 0),
        DataType::WChar { length } => ("WCHAR", Kind::Chars, n(length), 0),
        DataType::Varchar { length } => ("VARCHAR", Kind::Chars, n(length), 0),
        DataType::WVarchar { length } => ("WVARCHAR", Kind::Chars, n(length), 0),
        DataType::LongVarchar { length } => ("LONGVARCHAR", Kind::Chars, n(length), 0),
        DataType::WLongVarchar { length } => ("WLONGVARCHAR", Kind::Chars, n(length), 0),
        // sqliteodbc reports BIGINT columns with the C type code SQL_C_SBIGINT (-25).
        DataType::Other { data_type, .. } if matches!(data_type.0, -25 | -27 | -5) => {
            ("BIGINT", Kind::Int, None, 0)
        }
        _ => ("OTHER", Kind::Text, None, 0),
    }
}

/// A statement's outcome: its rows (when it produced a result set) and the affected rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueryResult {
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
    /// Rows inserted, updated or deleted, when the driver reports it.
    pub affected: Option<i64>,
}

/// A parameter value with an optional STAGE type letter.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub value: Value,
    pub letter: Option<char>,
}

/// The type letters of `execute({sql, "i", "C", ...}, ...)`.
pub const LETTERS: &str = "WwCcBbsilTSILfdD";

fn text_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(if *b { b"1".to_vec() } else { b"0".to_vec() }),
        Value::Int(i) => Some(i.to_string().into_bytes()),
        Value::Float(f) => Some(f.to_string().into_bytes()),
        Value::Text(s) => Some(s.clone().into_bytes()),
        Value::Bytes(b) => Some(b.clone()),
    }
}

fn int_of(v: &Value, letter: char) -> Result<Option<i64>> {
    Ok(match v {
        Value::Null => None,
        Value::Bool(b) => Some(*b as i64),
        Value::Int(i) => Some(*i),
        Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => Some(*f as i64),
        Value::Text(s) => Some(s.trim().parse().map_err(|_| {
            DbError::other(format!(
                "parameter of type '{letter}' expects an integer, found {s:?}"
            ))
        })?),
        other => {
            return Err(DbError::other(format!(
                "parameter of type '{letter}' expects an integer, found {other:?}"
            )))
        }
    })
}

fn float_of(v: &Value, letter: char) -> Result<Option<f64>> {
    Ok(match v {
        Value::Null => None,
        Value::Bool(b) => Some(*b as i64 as f64),
        Value::Int(i) => Some(*i as f64),
        Value::Float(f) => Some(*f),
        Value::Text(s) => Some(s.trim().parse().map_err(|_| {
            DbError::other(format!(
                "parameter of type '{letter}' expects a number, found {s:?}"
            ))
        })?),
        other => {
            return Err(DbError::other(format!(
                "parameter of type '{letter}' expects a number, found {other:?}"
            )))
        }
    })
}

fn text_param(bytes: Option<Vec<u8>>, data_type: DataType) -> Box<dyn InputParameter> {
    let value = match bytes {
        Some(b) => VarCharBox::from_vec(b),
        None => VarCharBox::null(),
    };
    Box::new(WithDataType { value, data_type })
}

fn binary_param(bytes: Option<Vec<u8>>, data_type: DataType) -> Box<dyn InputParameter> {
    let value = match bytes {
        Some(b) => VarBinaryBox::from_vec(b),
        None => VarBinaryBox::null(),
    };
    Box::new(WithDataType { value, data_type })
}

fn len_of(b: &Option<Vec<u8>>) -> Option<std::num::NonZeroUsize> {
    std::num::NonZeroUsize::new(b.as_ref().map(|b| b.len()).unwrap_or(1).max(1))
}

fn int_param(v: Option<i64>, data_type: DataType) -> Box<dyn InputParameter> {
    let value = match v {
        Some(i) => Nullable::new(i),
        None => Nullable::<i64>::null(),
    };
    Box::new(WithDataType { value, data_type })
}

fn float_param(v: Option<f64>, data_type: DataType) -> Box<dyn InputParameter> {
    let value = match v {
        Some(f) => Nullable::new(f),
        None => Nullable::<f64>::null(),
    };
    Box::new(WithDataType { value, data_type })
}

/// Longer text is sent as LONGVARCHAR, since some drivers cap VARCHAR parameters.
const LONG_TEXT: usize = 4000;

impl Param {
    /// The bound form of this parameter.
    pub fn bind(&self) -> Result<Box<dyn InputParameter>> {
        let v = &self.value;
        Ok(match self.letter {
            Some(l @ ('s' | 'S')) => int_param(int_of(v, l)?, DataType::SmallInt),
            Some(l @ ('i' | 'I')) => int_param(int_of(v, l)?, DataType::Integer),
            Some(l @ ('l' | 'L')) => int_param(int_of(v, l)?, DataType::BigInt),
            Some(l @ 'T') => int_param(int_of(v, l)?, DataType::TinyInt),
            Some(l @ 'f') => float_param(float_of(v, l)?, DataType::Real),
            Some(l @ 'd') => float_param(float_of(v, l)?, DataType::Double),
            Some('D') => text_param(text_of(v), DataType::Timestamp { precision: 0 }),
            Some('B') => {
                let b = text_of(v);
                let length = len_of(&b);
                binary_param(b, DataType::LongVarbinary { length })
            }
            Some('b') => {
                let b = text_of(v);
                let length = len_of(&b);
                binary_param(b, DataType::Varbinary { length })
            }
            Some(l @ ('W' | 'w' | 'C' | 'c')) => {
                let b = text_of(v);
                let length = len_of(&b);
                let dt = match l {
                    'W' => DataType::WLongVarchar { length },
                    'w' => DataType::WVarchar { length },
                    'C' => DataType::LongVarchar { length },
                    _ => DataType::Varchar { length },
                };
                text_param(b, dt)
            }
            Some(other) => {
                return Err(DbError::other(format!(
                    "unknown parameter type '{other}' (expected one of {LETTERS})"
                )))
            }
            None => match v {
                Value::Null => text_param(None, DataType::Varchar { length: None }),
                Value::Bool(b) => int_param(Some(*b as i64), DataType::Integer),
                Value::Int(i) => int_param(Some(*i), DataType::BigInt),
                Value::Float(f) => float_param(Some(*f), DataType::Double),
                Value::Text(s) => {
                    let b = Some(s.clone().into_bytes());
                    let length = len_of(&b);
                    if s.len() > LONG_TEXT {
                        text_param(b, DataType::LongVarchar { length })
                    } else {
                        text_param(b, DataType::Varchar { length })
                    }
                }
                Value::Bytes(b) => {
                    let b = Some(b.clone());
                    let length = len_of(&b);
                    binary_param(b, DataType::LongVarbinary { length })
                }
            },
        })
    }
}

/// Runs `sql` with `params` and reads the whole result set into memory.
pub fn execute(
    conn: &Connection<'_>,
    sql: &str,
    params: &[Param],
    timeout: Option<Duration>,
) -> Result<QueryResult> {
    let bound = params.iter().map(Param::bind).collect::<Result<Vec<_>>>()?;
    let mut stmt = conn.preallocate()?;
    if let Some(t) = timeout {
        stmt.set_query_timeout_sec(t.as_secs_f64().ceil() as usize)?;
    }
    let mut result = QueryResult::default();
    if let Some(cursor) = stmt.execute(sql, bound.as_slice())? {
        read_cursor(cursor, &mut result)?;
    }
    if result.columns.is_empty() {
        result.affected = stmt.row_count()?.map(|n| n as i64);
    }
    Ok(result)
}

fn read_cursor(mut cursor: impl Cursor, result: &mut QueryResult) -> Result<()> {
    let ncols = cursor.num_result_cols()?.max(0) as u16;
    for i in 1..=ncols {
        // One SQLDescribeCol per column gives name, type and nullability in one driver call.
        let mut desc = odbc_api::ColumnDescription::default();
        cursor.describe_col(i, &mut desc)?;
        let name = desc
            .name_to_string()
            .unwrap_or_else(|_| String::from_utf8_lossy(&desc.name).into_owned());
        let (type_name, kind, size, scale) = describe(desc.data_type);
        let nullable = match desc.nullability {
            odbc_api::Nullability::Nullable => Some(true),
            odbc_api::Nullability::NoNulls => Some(false),
            _ => None,
        };
        result.columns.push(Column {
            name,
            type_name: type_name.into(),
            kind,
            size,
            scale,
            nullable,
        });
    }
    let mut kinds: Vec<Kind> = result.columns.iter().map(|c| c.kind).collect();
    let mut buf = Vec::new();
    while let Some(mut row) = cursor.next_row()? {
        let mut values = Vec::with_capacity(kinds.len());
        #[allow(clippy::needless_range_loop)] // `kinds[i]` may change inside the loop
        for i in 0..kinds.len() {
            let kind = &kinds[i].clone();
            let col = i as u16 + 1;
            // odbc-api expects a buffer that ends in zeroes before it reads text into it.
            buf.clear();
            let v = match kind {
                Kind::Int => {
                    let mut x = Nullable::<i64>::null();
                    row.get_data(col, &mut x)?;
                    x.into_opt().map(Value::Int).unwrap_or(Value::Null)
                }
                Kind::Float => {
                    let mut x = Nullable::<f64>::null();
                    row.get_data(col, &mut x)?;
                    x.into_opt().map(Value::Float).unwrap_or(Value::Null)
                }
                Kind::Binary => {
                    if row.get_binary(col, &mut buf)? {
                        Value::Bytes(buf.clone())
                    } else {
                        Value::Null
                    }
                }
                Kind::Chars => match row.get_binary(col, &mut buf) {
                    Ok(true) => match std::str::from_utf8(&buf) {
                        Ok(t) => Value::Text(t.to_string()),
                        Err(_) => Value::Bytes(buf.clone()),
                    },
                    Ok(false) => Value::Null,
                    // Some drivers cannot hand out every character type as bytes (psqlODBC's
                    // booleans as text): read this column as text from now on.
                    Err(e) => {
                        let e = DbError::from(e);
                        if e.state() != Some("07006") {
                            return Err(e);
                        }
                        kinds[i] = Kind::Text;
                        buf.clear();
                        if row.get_text(col, &mut buf)? {
                            text_value(Kind::Text, &buf)
                        } else {
                            Value::Null
                        }
                    }
                },
                Kind::Bool | Kind::Decimal { .. } | Kind::Text => {
                    if !row.get_text(col, &mut buf)? {
                        Value::Null
                    } else {
                        text_value(*kind, &buf)
                    }
                }
            };
            values.push(v);
        }
        result.rows.push(values);
    }
    Ok(())
}

/// Converts the text form of a value according to its column kind.
pub fn text_value(kind: Kind, bytes: &[u8]) -> Value {
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => return Value::Bytes(bytes.to_vec()),
    };
    match kind {
        Kind::Bool => match text.trim() {
            "1" | "t" | "true" | "TRUE" | "T" | "y" | "Y" => Value::Bool(true),
            _ => Value::Bool(false),
        },
        Kind::Decimal { scale } => {
            let t = text.trim();
            if scale <= 0 {
                if let Ok(i) = t.parse::<i64>() {
                    return Value::Int(i);
                }
            }
            match t.parse::<f64>() {
                Ok(f) => Value::Float(f),
                Err(_) => Value::Text(t.to_string()),
            }
        }
        _ => Value::Text(text.to_string()),
    }
}

/// Starts a transaction (autocommit off).
pub fn begin(conn: &Connection<'_>) -> Result<()> {
    conn.set_autocommit(false)?;
    Ok(())
}

/// Commits or rolls back, then returns to autocommit.
pub fn finish(conn: &Connection<'_>, commit: bool) -> Result<()> {
    let r = if commit { conn.commit() } else { conn.rollback() };
    let back = conn.set_autocommit(true);
    r?;
    back?;
    Ok(())
}

/// The key generated by this connection's last INSERT, when the dialect can tell.
pub fn last_insert_id(conn: &Connection<'_>, driver: QueryDriver, in_transaction: bool) -> Result<Value> {
    // PostgreSQL's lastval() fails when no sequence was used, and a failure inside a
    // transaction aborts it; a savepoint keeps the transaction usable.
    let guard = driver == QueryDriver::Postgres && in_transaction;
    if guard {
        execute(conn, "SAVEPOINT stage_lastval", &[], None)?;
    }
    let r = execute(conn, driver.last_insert_id_sql(), &[], None);
    if guard {
        let undo = if r.is_ok() {
            "RELEASE SAVEPOINT stage_lastval"
        } else {
            "ROLLBACK TO SAVEPOINT stage_lastval"
        };
        execute(conn, undo, &[], None)?;
    }
    match r {
        Ok(res) => Ok(first_value(&res)),
        Err(_) if driver == QueryDriver::Postgres => Ok(Value::Null),
        Err(e) => Err(e),
    }
}

/// The first column of the first row, with integral text read as an integer.
pub fn first_value(res: &QueryResult) -> Value {
    match res.rows.first().and_then(|r| r.first()) {
        Some(Value::Text(t)) => t
            .trim()
            .parse::<i64>()
            .map(Value::Int)
            .unwrap_or(Value::Text(t.clone())),
        Some(Value::Float(f)) if f.fract() == 0.0 => Value::Int(*f as i64),
        Some(v) => v.clone(),
        None => Value::Null,
    }
}

/// Whether a statement is an INSERT (for `exec`'s last insert id).
pub fn is_insert(sql: &str) -> bool {
    sql.trim_start()
        .get(..6)
        .map(|s| s.eq_ignore_ascii_case("insert"))
        .unwrap_or(false)
}

/// A checked-out connection with what the adapter knows about it.
pub struct Session {
    pub conn: super::PooledConn,
    pub driver: QueryDriver,
    pub timeout: Option<Duration>,
}

impl Session {
    /// Runs `f` on the connection, marking it broken when the error lost the connection.
    pub fn with<T>(
        &mut self,
        f: impl FnOnce(&Connection<'static>, QueryDriver, bool) -> Result<T>,
    ) -> Result<T> {
        let in_txn = self.conn.in_transaction;
        let r = f(self.conn.conn(), self.driver, in_txn);
        if let Err(e) = &r {
            self.conn.note_error(e);
        }
        r
    }

    pub fn execute(&mut self, sql: &str, params: &[Param]) -> Result<QueryResult> {
        let timeout = self.timeout;
        self.with(|c, _, _| execute(c, sql, params, timeout))
    }

    pub fn begin(&mut self) -> Result<()> {
        if self.conn.in_transaction {
            return Err(DbError::other("a transaction is already open on this adapter"));
        }
        self.with(|c, _, _| begin(c))?;
        self.conn.in_transaction = true;
        Ok(())
    }

    pub fn finish(&mut self, commit: bool) -> Result<()> {
        if !self.conn.in_transaction {
            return Ok(());
        }
        self.conn.in_transaction = false;
        self.with(|c, _, _| finish(c, commit))
    }

    pub fn last_insert_id(&mut self) -> Result<Value> {
        self.with(|c, d, t| last_insert_id(c, d, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_text_forms_by_kind() {
        assert_eq!(text_value(Kind::Decimal { scale: 0 }, b"12"), Value::Int(12));
        assert_eq!(
            text_value(Kind::Decimal { scale: 2 }, b"12.50"),
            Value::Float(12.5)
        );
        assert_eq!(
            text_value(Kind::Decimal { scale: 0 }, b"123456789012345678901234"),
            Value::Float(123456789012345678901234.0)
        );
        assert_eq!(text_value(Kind::Bool, b"1"), Value::Bool(true));
        assert_eq!(
            text_value(Kind::Text, b"2024-05-01 12:30:00"),
            Value::Text("2024-05-01 12:30:00".into())
        );
        assert_eq!(text_value(Kind::Text, &[0xff, 0]), Value::Bytes(vec![0xff, 0]));
    }

    #[test]
    fn binds_by_letter_and_rejects_wrong_values() {
        let p = |v: Value, l: char| {
            Param {
                value: v,
                letter: Some(l),
            }
            .bind()
        };
        assert!(p(Value::Text("12".into()), 'i').is_ok());
        let e = p(Value::Text("x".into()), 'i').err().unwrap();
        assert_eq!(
            e.to_string(),
            "odbc: parameter of type 'i' expects an integer, found \"x\""
        );
        let e = p(Value::Int(1), 'q').err().unwrap();
        assert!(e.to_string().contains("unknown parameter type 'q'"), "{e}");
        for l in LETTERS.chars() {
            assert!(p(Value::Int(1), l).is_ok(), "{l}");
            assert!(p(Value::Null, l).is_ok(), "{l}");
        }
    }

    #[test]
    fn recognises_inserts() {
        assert!(is_insert("  insert into t values (1)"));
        assert!(!is_insert("UPDATE t SET a = 1"));
        assert!(!is_insert("ins"));
    }

    #[test]
    fn reads_the_first_value() {
        let r = QueryResult {
            rows: vec![vec![Value::Text("42".into())]],
            ..Default::default()
        };
        assert_eq!(first_value(&r), Value::Int(42));
        assert_eq!(first_value(&QueryResult::default()), Value::Null);
    }
}
