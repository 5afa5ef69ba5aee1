//! Statements on one connection: parameters bound by STAGE's type letters, result sets read
//! into memory with the type mapping, affected rows, transactions and the last generated key.
//!
//! Type mapping (driver → Lua): integer types → integer (64-bit); REAL/FLOAT/DOUBLE → float;
//! DECIMAL/NUMERIC → integer when the scale is 0 and the value fits in 64 bits, else float;
//! BIT → boolean; BINARY/VARBINARY/BLOB/bytea → binary string; DATE/TIME/TIMESTAMP → integer
//! epoch seconds in local time as STAGE (`when`; text the driver gives that is not a date stays
//! text); everything else → text; NULL → `Value::Null`.

use super::when::{self, DateKind};
use super::{DbError, QueryDriver, Result, Value};
use odbc_api::handles::Statement;
use odbc_api::parameter::{InputParameter, VarBinaryBox, VarCharBox, WithDataType};
use odbc_api::sys::ParamType;
use odbc_api::{Connection, Cursor, DataType, Nullable, ParameterCollectionRef};
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
    /// DATE, TIME, TIMESTAMP: read as text, handed out as epoch seconds.
    When(DateKind),
    /// Anything else the driver renders as text.
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
        DataType::Date => ("DATE", Kind::When(DateKind::Date), None, 0),
        DataType::Time { .. } => ("TIME", Kind::When(DateKind::Time), None, 0),
        DataType::Timestamp { .. } => ("TIMESTAMP", Kind::When(DateKind::Timestamp), None, 0),
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
    /// With output parameters: every parameter's value after the statement, in order.
    pub outputs: Option<Vec<Value>>,
}

/// How a parameter travels: to the database, back from it (`=`), or both (`+`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Dir {
    #[default]
    In,
    Out,
    InOut,
}

/// One parameter type of `execute({sql, "i", "=10c", ...}, ...)`: STAGE's `[=|+][length]letter`
/// (a length without a letter is `W`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    pub letter: char,
    pub len: Option<usize>,
    pub dir: Dir,
}

/// A parameter value with an optional STAGE type.
#[derive(Debug, Clone, PartialEq)]
pub struct Param {
    pub value: Value,
    pub letter: Option<char>,
    /// The declared length of a character or binary parameter (`10c`).
    pub len: Option<usize>,
    pub dir: Dir,
}

/// The type letters of `execute({sql, "i", "C", ...}, ...)`.
pub const LETTERS: &str = "WwCcBbtsilTSILfdD";

/// Parses one type string into its specs: `"i"`, `"ci"` (two), `"10c"`, `"=10c"`, `"+i"`.
pub fn parse_specs(s: &str) -> Result<Vec<Spec>> {
    let bad = |why: &str| {
        DbError::other(format!(
            "parameter type {s:?}: {why} (expected [=|+][length]letter, letters {LETTERS})"
        ))
    };
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let dir = match b[i] {
            b'=' => Dir::Out,
            b'+' => Dir::InOut,
            _ => Dir::In,
        };
        if dir != Dir::In {
            i += 1;
        }
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let len = if i > start {
            Some(
                s[start..i]
                    .parse::<usize>()
                    .map_err(|_| bad("length too large"))?,
            )
        } else {
            None
        };
        let letter = match b.get(i) {
            Some(&c) if LETTERS.as_bytes().contains(&c) => {
                i += 1;
                c as char
            }
            Some(&c) if !matches!(c, b'=' | b'+') => {
                return Err(DbError::other(format!(
                    "unknown parameter type '{}' in {s:?} (expected one of {LETTERS})",
                    s[i..].chars().next().unwrap_or('?')
                )))
            }
            _ if len.is_some() => 'W',
            _ => return Err(bad("a direction without a type")),
        };
        out.push(Spec { letter, len, dir });
    }
    Ok(out)
}

impl Param {
    /// An input parameter with an optional type letter.
    pub fn new(value: Value, letter: Option<char>) -> Param {
        Param {
            value,
            letter,
            len: None,
            dir: Dir::In,
        }
    }
}

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

fn len_of(b: &Option<Vec<u8>>, declared: Option<usize>) -> Option<std::num::NonZeroUsize> {
    let n = b
        .as_ref()
        .map(|b| b.len())
        .unwrap_or(1)
        .max(declared.unwrap_or(1));
    std::num::NonZeroUsize::new(n.max(1))
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
            // STAGE: `b` is a bool and `t`/`T` a (unsigned) tinyint, all bound as TINYINT.
            Some(l @ ('b' | 't' | 'T')) => int_param(int_of(v, l)?, DataType::TinyInt),
            Some(l @ 'f') => float_param(float_of(v, l)?, DataType::Real),
            Some(l @ 'd') => float_param(float_of(v, l)?, DataType::Double),
            Some('D') => {
                let t = match v {
                    // Epoch seconds, as dates are read back.
                    Value::Int(e) => Some(when::from_epoch(DateKind::Timestamp, *e).into_bytes()),
                    other => text_of(other),
                };
                text_param(t, DataType::Timestamp { precision: 0 })
            }
            Some('B') => {
                let b = text_of(v);
                let length = len_of(&b, self.len);
                binary_param(b, DataType::LongVarbinary { length })
            }
            Some(l @ ('W' | 'w' | 'C' | 'c')) => {
                let b = text_of(v);
                let length = len_of(&b, self.len);
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
                    let length = len_of(&b, None);
                    if s.len() > LONG_TEXT {
                        text_param(b, DataType::LongVarchar { length })
                    } else {
                        text_param(b, DataType::Varchar { length })
                    }
                }
                Value::Bytes(b) => {
                    let b = Some(b.clone());
                    let length = len_of(&b, None);
                    binary_param(b, DataType::LongVarbinary { length })
                }
            },
        })
    }
}

/// A bound parameter: an input one, or a buffer the driver writes an output value into.
/// Output values travel as text (numbers too: MariaDB's driver writes the text of a number
/// into an integer buffer) and are converted back by the parameter's letter.
enum Slot {
    In(Box<dyn InputParameter>),
    Text(VarCharBox, ParamType),
    Bin(VarBinaryBox, ParamType),
}

/// Output buffers hold this many bytes unless the type gives a length (`=32c`).
const OUT_LEN: usize = 255;

impl Slot {
    fn of(p: &Param) -> Result<Slot> {
        let t = match p.dir {
            Dir::In => return Ok(Slot::In(p.bind()?)),
            Dir::Out => ParamType::Output,
            Dir::InOut => ParamType::InputOutput,
        };
        let l = p.letter.unwrap_or('W');
        let value = match (p.dir, l) {
            (Dir::Out, _) => None,
            (_, 'b' | 't' | 'T' | 's' | 'S' | 'i' | 'I' | 'l' | 'L') => {
                int_of(&p.value, l)?.map(|i| i.to_string().into_bytes())
            }
            (_, 'f' | 'd') => float_of(&p.value, l)?.map(|f| f.to_string().into_bytes()),
            (_, 'D') => match &p.value {
                Value::Int(e) => Some(when::from_epoch(DateKind::Timestamp, *e).into_bytes()),
                v => text_of(v),
            },
            (_, _) => text_of(&p.value),
        };
        let cap = p
            .len
            .unwrap_or(OUT_LEN)
            .max(value.as_ref().map_or(0, |v| v.len()))
            .max(1);
        let mut buf = vec![0u8; cap + 1];
        let ind = match &value {
            Some(v) => {
                buf[..v.len()].copy_from_slice(v);
                odbc_api::buffers::Indicator::Length(v.len())
            }
            None => odbc_api::buffers::Indicator::Null,
        };
        Ok(if l == 'B' {
            buf.pop();
            Slot::Bin(VarBinaryBox::from_buffer(buf.into_boxed_slice(), ind), t)
        } else {
            Slot::Text(VarCharBox::from_buffer(buf.into_boxed_slice(), ind), t)
        })
    }

    /// The value after the statement ran (an input parameter's own value).
    fn value(&self, p: &Param) -> Value {
        match self {
            Slot::In(_) => p.value.clone(),
            Slot::Bin(v, _) => v
                .as_bytes()
                .map(|b| Value::Bytes(b.to_vec()))
                .unwrap_or(Value::Null),
            Slot::Text(v, _) => {
                let Some(b) = v.as_bytes() else { return Value::Null };
                let text = String::from_utf8_lossy(b);
                let t = text.trim();
                match p.letter.unwrap_or('W') {
                    'b' | 't' | 'T' | 's' | 'S' | 'i' | 'I' | 'l' | 'L' => t
                        .parse()
                        .map(Value::Int)
                        .unwrap_or_else(|_| text_value(Kind::Decimal { scale: 0 }, t.as_bytes())),
                    'f' | 'd' => t.parse().map(Value::Float).unwrap_or(Value::Text(t.to_string())),
                    'D' => text_value(Kind::When(DateKind::Timestamp), t.as_bytes()),
                    _ => match std::str::from_utf8(b) {
                        Ok(s) => Value::Text(s.to_string()),
                        Err(_) => Value::Bytes(b.to_vec()),
                    },
                }
            }
        }
    }
}

/// The parameters of one statement, bound in order.
struct Slots(Vec<Slot>);

// SAFETY: every buffer bound here is owned by `Slots` (heap boxes, or the elements of a Vec
// that is never resized after binding) and outlives the statement's use of it, since
// `execute` keeps the `Slots` until the statement and its cursor are gone.
unsafe impl ParameterCollectionRef for &mut Slots {
    fn parameter_set_size(&self) -> usize {
        1
    }

    unsafe fn bind_parameters_to(
        &mut self,
        stmt: &mut impl Statement,
    ) -> std::result::Result<(), odbc_api::Error> {
        for (i, slot) in self.0.iter_mut().enumerate() {
            let n = i as u16 + 1;
            // SAFETY: see the impl: the buffers outlive the statement's use of them.
            let r = unsafe {
                match slot {
                    Slot::In(p) => {
                        p.assert_completness();
                        stmt.bind_input_parameter(n, p.as_ref())
                    }
                    Slot::Text(v, t) => stmt.bind_parameter(n, *t, v),
                    Slot::Bin(v, t) => stmt.bind_parameter(n, *t, v),
                }
            };
            r.into_result(stmt)?;
        }
        Ok(())
    }
}

/// Runs `sql` with `params` and reads the whole result set into memory. With output
/// parameters (`=`/`+`), `outputs` holds every parameter's value after the statement.
/// `driver` decides how character columns are read (as text on PostgreSQL, see `read_cursor`).
pub fn execute(
    conn: &Connection<'_>,
    driver: QueryDriver,
    sql: &str,
    params: &[Param],
    timeout: Option<Duration>,
) -> Result<QueryResult> {
    let outputs = params.iter().any(|p| p.dir != Dir::In);
    let mut stmt = conn.preallocate()?;
    if let Some(t) = timeout {
        stmt.set_query_timeout_sec(t.as_secs_f64().ceil() as usize)?;
    }
    let mut result = QueryResult::default();
    if !outputs {
        let bound = params.iter().map(Param::bind).collect::<Result<Vec<_>>>()?;
        if let Some(cursor) = stmt.execute(sql, bound.as_slice())? {
            read_cursor(cursor, &mut result, driver)?;
        }
    } else {
        let mut slots = Slots(params.iter().map(Slot::of).collect::<Result<Vec<_>>>()?);
        if let Some(cursor) = stmt.execute(sql, &mut slots)? {
            read_cursor(cursor, &mut result, driver)?;
        }
        result.outputs = Some(slots.0.iter().zip(params).map(|(s, p)| s.value(p)).collect());
    }
    if result.columns.is_empty() {
        result.affected = stmt.row_count()?.map(|n| n as i64);
    }
    Ok(result)
}

/// Character columns are read as bytes (SQL_C_BINARY: no conversion to the client's locale),
/// except on PostgreSQL: psqlODBC loses the last byte of a TEXT value read as binary in more
/// than one SQLGetData call (postgresql-interfaces/psqlodbc#98), so there they are read as
/// text, which its "Unicode" driver hands out as UTF-8.
fn read_cursor(mut cursor: impl Cursor, result: &mut QueryResult, driver: QueryDriver) -> Result<()> {
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
    if driver == QueryDriver::Postgres {
        for k in kinds.iter_mut().filter(|k| **k == Kind::Chars) {
            *k = Kind::Text;
        }
    }
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
                Kind::Bool | Kind::Decimal { .. } | Kind::When(_) | Kind::Text => {
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
        Kind::When(k) => match when::to_epoch(k, text) {
            Some(e) => Value::Int(e),
            None => Value::Text(text.to_string()),
        },
        _ => Value::Text(text.to_string()),
    }
}

/// Whether `b` is exactly one BSON document (its length prefix is its size, it ends in a
/// NUL): how STAGE tells a BLOB it wrote from a table (`IsBSON`). The caller still decodes it
/// and keeps the bytes when that fails.
pub fn looks_like_bson(b: &[u8]) -> bool {
    b.len() >= 5 && b[b.len() - 1] == 0 && u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize == b.len()
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
        execute(conn, driver, "SAVEPOINT stage_lastval", &[], None)?;
    }
    let r = execute(conn, driver, driver.last_insert_id_sql(), &[], None);
    if guard {
        let undo = if r.is_ok() {
            "RELEASE SAVEPOINT stage_lastval"
        } else {
            "ROLLBACK TO SAVEPOINT stage_lastval"
        };
        execute(conn, driver, undo, &[], None)?;
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

    /// Runs one statement (and reads its rows); its time and outcome count in the pool's
    /// `stage_odbc_query_*` metrics.
    pub fn execute(&mut self, sql: &str, params: &[Param]) -> Result<QueryResult> {
        let timeout = self.timeout;
        let t0 = std::time::Instant::now();
        let r = self.with(|c, driver, _| execute(c, driver, sql, params, timeout));
        self.conn.pool().queries.observe(t0.elapsed(), r.is_ok());
        r
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
        let ts = text_value(Kind::When(DateKind::Timestamp), b"2024-05-01 12:30:00");
        assert_eq!(
            ts,
            Value::Int(when::to_epoch(DateKind::Timestamp, "2024-05-01 12:30:00").unwrap())
        );
        assert_eq!(
            text_value(Kind::When(DateKind::Date), b"0000-00-00"),
            Value::Text("0000-00-00".into())
        );
        assert_eq!(text_value(Kind::Text, &[0xff, 0]), Value::Bytes(vec![0xff, 0]));
    }

    #[test]
    fn binds_by_letter_and_rejects_wrong_values() {
        let p = |v: Value, l: char| Param::new(v, Some(l)).bind();
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
    fn parses_stage_parameter_types() {
        let sp = |l, len, dir| Spec { letter: l, len, dir };
        assert_eq!(
            parse_specs("ci").unwrap(),
            vec![sp('c', None, Dir::In), sp('i', None, Dir::In)]
        );
        assert_eq!(parse_specs("10c").unwrap(), vec![sp('c', Some(10), Dir::In)]);
        assert_eq!(parse_specs("=10c").unwrap(), vec![sp('c', Some(10), Dir::Out)]);
        assert_eq!(
            parse_specs("+i=32").unwrap(),
            vec![sp('i', None, Dir::InOut), sp('W', Some(32), Dir::Out)]
        );
        assert_eq!(parse_specs("b").unwrap(), vec![sp('b', None, Dir::In)]);
        let e = parse_specs("q").unwrap_err().to_string();
        assert!(e.contains("unknown parameter type 'q'"), "{e}");
        let e = parse_specs("i=").unwrap_err().to_string();
        assert!(e.contains("a direction without a type"), "{e}");
    }

    #[test]
    fn tells_a_bson_document_from_other_bytes() {
        assert!(looks_like_bson(&[5, 0, 0, 0, 0]));
        assert!(!looks_like_bson(&[6, 0, 0, 0, 0]));
        assert!(!looks_like_bson(&(0..=255u8).collect::<Vec<_>>()));
        assert!(!looks_like_bson(b"\0\xff"));
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
