//! The fetch/apply change tracker. `fetch` keeps a `Snapshot` of the rows it handed to the
//! script, keyed the way the script sees them (by key columns, by row number, nested); `apply`
//! reads the script's table back as `Current`, and `diff` turns the difference into INSERT,
//! UPDATE and DELETE `Change`s whose SQL `statement` builds for the dialect.
//!
//! Rules: a snapshot row missing from the table is deleted; a row whose column values differ
//! is updated (only the changed columns; a column missing from the Lua row means NULL;
//! fields that are not columns of the result set are ignored); a row at a path the snapshot
//! does not have is inserted. A key column missing from a new row takes the row's key in the
//! table unless that key is 0 or "", which asks the database for an auto-increment key.

use super::session::{Column, Kind, Param};
use super::{DbError, QueryDriver, Result, Value};

/// One level of `fetch`'s keys.
#[derive(Debug, Clone, PartialEq)]
pub enum KeyPart {
    Column(String),
    /// `"$"`: the row number, from 1.
    RowNumber,
}

/// A Lua table key in a comparable form. Integral floats are integers, as in Lua.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KeyAtom {
    Bool(bool),
    Int(i64),
    Float(u64),
    Text(Vec<u8>),
}

impl KeyAtom {
    pub fn from_value(v: &Value) -> Option<KeyAtom> {
        Some(match v {
            Value::Null => return None,
            Value::Bool(b) => KeyAtom::Bool(*b),
            Value::Int(i) => KeyAtom::Int(*i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.2e18 => KeyAtom::Int(*f as i64),
            Value::Float(f) if f.is_nan() => return None,
            Value::Float(f) => KeyAtom::Float(f.to_bits()),
            Value::Text(s) => KeyAtom::Text(s.as_bytes().to_vec()),
            Value::Bytes(b) => KeyAtom::Text(b.clone()),
        })
    }

    pub fn to_value(&self) -> Value {
        match self {
            KeyAtom::Bool(b) => Value::Bool(*b),
            KeyAtom::Int(i) => Value::Int(*i),
            KeyAtom::Float(f) => Value::Float(f64::from_bits(*f)),
            KeyAtom::Text(b) => match String::from_utf8(b.clone()) {
                Ok(s) => Value::Text(s),
                Err(e) => Value::Bytes(e.into_bytes()),
            },
        }
    }

    /// 0 and "" stand for "the database picks the key".
    fn is_placeholder(&self) -> bool {
        matches!(self, KeyAtom::Int(0)) || matches!(self, KeyAtom::Text(t) if t.is_empty())
    }
}

/// What `fetch` handed out.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub columns: Vec<Column>,
    pub keys: Vec<KeyPart>,
    /// Path in the Lua table → the row's values, in result order; paths are unique.
    pub rows: Vec<(Vec<KeyAtom>, Vec<Value>)>,
}

/// A row's fields by name, as the script left them.
pub type Fields = Vec<(String, Value)>;

/// A path of keys in the fetched table and the row found there.
pub type PathRow = (Vec<KeyAtom>, Fields);

/// A move of a new row from its placeholder path to the path of its generated key, with the
/// key column and value to set in the row.
pub type Move = (Vec<KeyAtom>, Vec<KeyAtom>, String, Value);

/// The script's table as `apply` reads it: path → the row's fields.
#[derive(Debug, Clone, Default)]
pub struct Current {
    pub rows: Vec<PathRow>,
}

/// The change log's action codes, STAGE's (`odbc.h`: 2 UPDATE, 4 INSERT, 8 DELETE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Update = 2,
    Insert = 4,
    Delete = 8,
}

/// One row change.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub action: Action,
    pub table: String,
    pub path: Vec<KeyAtom>,
    /// The columns and values that identify the row (UPDATE, DELETE).
    pub filter: Vec<(String, Value)>,
    /// Old values of the changed columns (UPDATE) or of the whole row (DELETE).
    pub old: Vec<(String, Value)>,
    /// New values (INSERT: the inserted columns; UPDATE: the changed ones).
    pub new: Vec<(String, Value)>,
    /// Column → SQL type name (or the Lua-side kind for fields that are not columns).
    pub types: Vec<(String, String)>,
    /// For an INSERT: the key column the database generates, if known.
    pub generated: Option<String>,
}

impl Snapshot {
    /// Keeps the rows as `fetch(keys)` shapes them (no keys: the last row only).
    pub fn new(columns: Vec<Column>, rows: &[Vec<Value>], keys: Vec<KeyPart>) -> Result<Snapshot> {
        let mut index = Vec::new();
        for k in &keys {
            index.push(match k {
                KeyPart::RowNumber => None,
                KeyPart::Column(name) => Some(column_index(&columns, name).ok_or_else(|| {
                    DbError::other(format!(
                        "fetch key {name:?} is not a column of the result (columns: {})",
                        columns
                            .iter()
                            .map(|c| c.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })?),
            });
        }
        let mut snap = Snapshot {
            columns,
            keys,
            rows: Vec::new(),
        };
        let mut at: std::collections::HashMap<Vec<KeyAtom>, usize> = Default::default();
        let selected: Box<dyn Iterator<Item = (usize, &Vec<Value>)>> = if snap.keys.is_empty() {
            Box::new(rows.iter().enumerate().next_back().into_iter())
        } else {
            Box::new(rows.iter().enumerate())
        };
        'rows: for (n, row) in selected {
            let mut path = Vec::with_capacity(index.len());
            for i in &index {
                match i {
                    None => path.push(KeyAtom::Int(n as i64 + 1)),
                    Some(i) => match KeyAtom::from_value(&row[*i]) {
                        Some(a) => path.push(a),
                        // A NULL key cannot index a Lua table: the row is not handed out.
                        None => continue 'rows,
                    },
                }
            }
            match at.get(&path) {
                Some(&i) => snap.rows[i].1 = row.clone(),
                None => {
                    at.insert(path.clone(), snap.rows.len());
                    snap.rows.push((path, row.clone()));
                }
            }
        }
        Ok(snap)
    }

    fn key_columns(&self) -> Option<Vec<&str>> {
        self.keys
            .iter()
            .map(|k| match k {
                KeyPart::Column(c) => Some(c.as_str()),
                KeyPart::RowNumber => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|v| !v.is_empty())
    }

    /// What identifies an original row: its key columns, or else every column that compares
    /// reliably (not floats, not binary).
    fn filter_of(&self, row: &[Value]) -> Vec<(String, Value)> {
        if let Some(keys) = self.key_columns() {
            return keys
                .iter()
                .map(|k| {
                    let i = column_index(&self.columns, k).expect("key columns were checked");
                    (self.columns[i].name.clone(), row[i].clone())
                })
                .collect();
        }
        let reliable: Vec<(String, Value)> = self
            .columns
            .iter()
            .zip(row)
            .filter(|(c, _)| !matches!(c.kind, Kind::Float | Kind::Binary))
            .map(|(c, v)| (c.name.clone(), v.clone()))
            .collect();
        if reliable.is_empty() {
            self.columns
                .iter()
                .zip(row)
                .map(|(c, v)| (c.name.clone(), v.clone()))
                .collect()
        } else {
            reliable
        }
    }

    fn type_of(&self, name: &str, v: &Value) -> String {
        match column_index(&self.columns, name) {
            Some(i) => self.columns[i].type_name.clone(),
            None => lua_kind(v).to_string(),
        }
    }

    /// The changes that turn the snapshot into `current`: deletes, then updates, then inserts.
    pub fn diff(&self, current: &Current, table: &str) -> Vec<Change> {
        let cur: std::collections::HashMap<&Vec<KeyAtom>, &Vec<(String, Value)>> =
            current.rows.iter().map(|(p, r)| (p, r)).collect();
        let mut deletes = Vec::new();
        let mut updates = Vec::new();
        for (path, orig) in &self.rows {
            let Some(fields) = cur.get(path) else {
                deletes.push(Change {
                    action: Action::Delete,
                    table: table.to_string(),
                    path: path.clone(),
                    filter: self.filter_of(orig),
                    old: self
                        .columns
                        .iter()
                        .zip(orig)
                        .map(|(c, v)| (c.name.clone(), v.clone()))
                        .collect(),
                    new: vec![],
                    types: self
                        .columns
                        .iter()
                        .map(|c| (c.name.clone(), c.type_name.clone()))
                        .collect(),
                    generated: None,
                });
                continue;
            };
            let mut old = Vec::new();
            let mut new = Vec::new();
            let mut types = Vec::new();
            for (c, o) in self.columns.iter().zip(orig) {
                let n = field(fields, &c.name).cloned().unwrap_or(Value::Null);
                if !o.same(&n) {
                    old.push((c.name.clone(), o.clone()));
                    new.push((c.name.clone(), n));
                    types.push((c.name.clone(), c.type_name.clone()));
                }
            }
            if !new.is_empty() {
                updates.push(Change {
                    action: Action::Update,
                    table: table.to_string(),
                    path: path.clone(),
                    filter: self.filter_of(orig),
                    old,
                    new,
                    types,
                    generated: None,
                });
            }
        }
        let known: std::collections::HashSet<&Vec<KeyAtom>> = self.rows.iter().map(|(p, _)| p).collect();
        let mut inserts: Vec<Change> = Vec::new();
        let mut new_rows: Vec<&PathRow> = current.rows.iter().filter(|(p, _)| !known.contains(p)).collect();
        new_rows.sort_by(|a, b| a.0.cmp(&b.0));
        for (path, fields) in new_rows {
            let mut new: Vec<(String, Value)> = Vec::new();
            for c in &self.columns {
                if let Some(v) = field(fields, &c.name) {
                    new.push((c.name.clone(), v.clone()));
                }
            }
            let mut extra: Vec<(String, Value)> = fields
                .iter()
                .filter(|(k, _)| column_index(&self.columns, k).is_none())
                .cloned()
                .collect();
            extra.sort_by(|a, b| a.0.cmp(&b.0));
            new.extend(extra);
            let mut generated = None;
            for (k, atom) in self.keys.iter().zip(path) {
                if let KeyPart::Column(c) = k {
                    if field(&new, c).is_none() {
                        if atom.is_placeholder() {
                            generated = Some(c.clone());
                        } else {
                            new.push((c.clone(), atom.to_value()));
                        }
                    }
                }
            }
            let types = new.iter().map(|(k, v)| (k.clone(), self.type_of(k, v))).collect();
            inserts.push(Change {
                action: Action::Insert,
                table: table.to_string(),
                path: path.clone(),
                filter: vec![],
                old: vec![],
                new,
                types,
                generated,
            });
        }
        deletes.into_iter().chain(updates).chain(inserts).collect()
    }

    /// After a successful apply the snapshot is what the table now holds; `keys` are the
    /// generated keys of the inserts, in order. Returns the moves the Lua table needs: a new
    /// row at a placeholder path goes to the path of its generated key (one-column keys).
    pub fn commit(
        &mut self,
        current: &Current,
        changes: &[Change],
        keys: &[Value],
    ) -> Vec<(Vec<KeyAtom>, Vec<KeyAtom>, String, Value)> {
        let mut moves = Vec::new();
        let mut generated_at = std::collections::HashMap::new();
        let inserts = changes.iter().filter(|c| c.action == Action::Insert);
        for (change, key) in inserts.zip(keys) {
            if let (Some(col), Some(atom)) = (&change.generated, KeyAtom::from_value(key)) {
                generated_at.insert(change.path.clone(), (col.clone(), key.clone()));
                if self.keys.len() == 1 {
                    moves.push((change.path.clone(), vec![atom], col.clone(), key.clone()));
                }
            }
        }
        let mut rows = Vec::new();
        for (path, fields) in &current.rows {
            let mut values: Vec<Value> = self
                .columns
                .iter()
                .map(|c| field(fields, &c.name).cloned().unwrap_or(Value::Null))
                .collect();
            let mut path = path.clone();
            if let Some((col, key)) = generated_at.get(&path) {
                if let Some(i) = column_index(&self.columns, col) {
                    values[i] = key.clone();
                }
                if self.keys.len() == 1 {
                    if let Some(a) = KeyAtom::from_value(key) {
                        path = vec![a];
                    }
                }
            }
            rows.push((path, values));
        }
        self.rows = rows;
        moves
    }
}

fn field<'a>(fields: &'a [(String, Value)], name: &str) -> Option<&'a Value> {
    fields.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Finds a column by name: exactly, else ignoring case (drivers differ in the case they report).
pub fn column_index(columns: &[Column], name: &str) -> Option<usize> {
    columns
        .iter()
        .position(|c| c.name == name)
        .or_else(|| columns.iter().position(|c| c.name.eq_ignore_ascii_case(name)))
}

fn lua_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Int(_) => "integer",
        Value::Float(_) => "float",
        Value::Text(_) => "text",
        Value::Bytes(_) => "binary",
    }
}

/// The table an `apply` without a table name writes to: the first one after FROM.
pub fn table_from_sql(sql: &str) -> Option<String> {
    let lower = sql.to_ascii_lowercase();
    let mut search = 0;
    while let Some(at) = lower[search..].find("from") {
        let start = search + at;
        let end = start + 4;
        let before_ok = start == 0 || !is_ident(lower.as_bytes()[start - 1]);
        let after_ok = lower
            .as_bytes()
            .get(end)
            .map(|b| b.is_ascii_whitespace())
            .unwrap_or(false);
        if before_ok && after_ok {
            let rest = sql[end..].trim_start();
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '"' | '`' | '[' | ']' | '$'))
                .collect();
            let name = name.replace(['"', '`', '[', ']'], "");
            return (!name.is_empty()).then_some(name);
        }
        search = end;
    }
    None
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The SQL and parameters of a change for the dialect. Binary columns bind as binary, and
/// the epoch seconds of date columns go back as the column's text form.
pub fn statement(change: &Change, columns: &[Column], driver: QueryDriver) -> (String, Vec<Param>) {
    let q = |s: &str| driver.quote(s);
    let param = |name: &str, v: &Value| {
        let kind = column_index(columns, name).map(|i| columns[i].kind);
        match (kind, v) {
            (Some(Kind::When(k)), Value::Int(e)) => {
                let text = Value::Text(super::when::from_epoch(k, *e));
                Param::new(text, (k != super::when::DateKind::Time).then_some('D'))
            }
            (Some(Kind::Binary), v) if !v.is_null() => Param::new(v.clone(), Some('B')),
            _ => Param::new(v.clone(), None),
        }
    };
    let mut params = Vec::new();
    let filter = |params: &mut Vec<Param>| -> String {
        let mut parts = Vec::new();
        for (k, v) in &change.filter {
            if v.is_null() {
                parts.push(format!("{} IS NULL", q(k)));
            } else {
                parts.push(format!("{} = ?", q(k)));
                params.push(param(k, v));
            }
        }
        if parts.is_empty() {
            "1 = 0".to_string()
        } else {
            parts.join(" AND ")
        }
    };
    let sql = match change.action {
        Action::Delete => {
            let w = filter(&mut params);
            format!("DELETE FROM {} WHERE {w}", q(&change.table))
        }
        Action::Update => {
            let sets: Vec<String> = change.new.iter().map(|(k, _)| format!("{} = ?", q(k))).collect();
            params.extend(change.new.iter().map(|(k, v)| param(k, v)));
            let w = filter(&mut params);
            format!("UPDATE {} SET {} WHERE {w}", q(&change.table), sets.join(", "))
        }
        Action::Insert => {
            params.extend(change.new.iter().map(|(k, v)| param(k, v)));
            let mut sql = if change.new.is_empty() {
                match driver {
                    QueryDriver::Mysql => format!("INSERT INTO {} () VALUES ()", q(&change.table)),
                    _ => format!("INSERT INTO {} DEFAULT VALUES", q(&change.table)),
                }
            } else {
                let cols: Vec<String> = change.new.iter().map(|(k, _)| q(k)).collect();
                let marks = vec!["?"; cols.len()].join(", ");
                format!(
                    "INSERT INTO {} ({}) VALUES ({marks})",
                    q(&change.table),
                    cols.join(", ")
                )
            };
            if let (QueryDriver::Postgres, Some(col)) = (driver, &change.generated) {
                sql.push_str(&format!(" RETURNING {}", q(col)));
            }
            sql
        }
    };
    (sql, params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn col(name: &str, kind: Kind) -> Column {
        Column {
            name: name.into(),
            type_name: format!("{kind:?}").to_uppercase(),
            kind,
            size: None,
            scale: 0,
            nullable: None,
        }
    }

    fn users() -> (Vec<Column>, Vec<Vec<Value>>) {
        let cols = vec![
            col("id", Kind::Int),
            col("name", Kind::Text),
            col("level", Kind::Int),
        ];
        let rows = vec![
            vec![Value::Int(3), Value::Text("lee".into()), Value::Int(10)],
            vec![Value::Int(7), Value::Text("park".into()), Value::Int(11)],
        ];
        (cols, rows)
    }

    fn fields(pairs: &[(&str, Value)]) -> Vec<(String, Value)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.clone())).collect()
    }

    #[test]
    fn keys_rows_by_column_row_number_or_last_row() {
        let (cols, rows) = users();
        let s = Snapshot::new(cols.clone(), &rows, vec![KeyPart::Column("id".into())]).unwrap();
        assert_eq!(
            s.rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
            vec![vec![KeyAtom::Int(3)], vec![KeyAtom::Int(7)]]
        );
        let s = Snapshot::new(cols.clone(), &rows, vec![KeyPart::RowNumber]).unwrap();
        assert_eq!(s.rows[1].0, vec![KeyAtom::Int(2)]);
        let s = Snapshot::new(cols.clone(), &rows, vec![]).unwrap();
        assert_eq!(s.rows.len(), 1);
        assert_eq!(s.rows[0].1[0], Value::Int(7));
        let e = Snapshot::new(cols, &rows, vec![KeyPart::Column("nope".into())]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "odbc: fetch key \"nope\" is not a column of the result (columns: id, name, level)"
        );
    }

    #[test]
    fn diffs_into_deletes_updates_and_inserts() {
        let (cols, rows) = users();
        let mut s = Snapshot::new(cols.clone(), &rows, vec![KeyPart::Column("id".into())]).unwrap();
        let current = Current {
            rows: vec![
                (
                    vec![KeyAtom::Int(3)],
                    fields(&[
                        ("id", Value::Int(3)),
                        ("name", Value::Text("lee".into())),
                        ("level", Value::Int(99)),
                    ]),
                ),
                (
                    vec![KeyAtom::Int(0)],
                    fields(&[("name", Value::Text("kim".into())), ("level", Value::Int(12))]),
                ),
            ],
        };
        let changes = s.diff(&current, "users");
        assert_eq!(
            changes.iter().map(|c| c.action).collect::<Vec<_>>(),
            vec![Action::Delete, Action::Update, Action::Insert]
        );
        let (sql, params) = statement(&changes[0], &cols, QueryDriver::Mysql);
        assert_eq!(sql, "DELETE FROM `users` WHERE `id` = ?");
        assert_eq!(params[0].value, Value::Int(7));
        let (sql, params) = statement(&changes[1], &cols, QueryDriver::Sqlite);
        assert_eq!(sql, "UPDATE \"users\" SET \"level\" = ? WHERE \"id\" = ?");
        assert_eq!(
            params.iter().map(|p| p.value.clone()).collect::<Vec<_>>(),
            vec![Value::Int(99), Value::Int(3)]
        );
        assert_eq!(changes[1].old, fields(&[("level", Value::Int(10))]));
        let (sql, _) = statement(&changes[2], &cols, QueryDriver::Postgres);
        assert_eq!(
            sql,
            "INSERT INTO \"users\" (\"name\", \"level\") VALUES (?, ?) RETURNING \"id\""
        );
        assert_eq!(changes[2].generated.as_deref(), Some("id"));
        let moves = s.commit(&current, &changes, &[Value::Int(8)]);
        assert_eq!(
            moves,
            vec![(
                vec![KeyAtom::Int(0)],
                vec![KeyAtom::Int(8)],
                "id".to_string(),
                Value::Int(8)
            )]
        );
        assert!(s.diff(&current_after(&s), "users").is_empty());
    }

    fn current_after(s: &Snapshot) -> Current {
        Current {
            rows: s
                .rows
                .iter()
                .map(|(p, r)| {
                    (
                        p.clone(),
                        s.columns
                            .iter()
                            .zip(r)
                            .map(|(c, v)| (c.name.clone(), v.clone()))
                            .collect(),
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn a_new_row_takes_its_table_key_unless_it_is_a_placeholder() {
        let (cols, rows) = users();
        let s = Snapshot::new(cols, &rows, vec![KeyPart::Column("id".into())]).unwrap();
        let mut current = current_after(&s);
        current.rows.push((
            vec![KeyAtom::Int(20)],
            fields(&[("name", Value::Text("choi".into()))]),
        ));
        let changes = s.diff(&current, "users");
        assert_eq!(changes.len(), 1);
        assert_eq!(
            changes[0].new,
            fields(&[("name", Value::Text("choi".into())), ("id", Value::Int(20))])
        );
        assert_eq!(changes[0].generated, None);
    }

    #[test]
    fn filters_without_key_columns_use_reliable_columns_and_null() {
        let cols = vec![col("a", Kind::Int), col("b", Kind::Text), col("f", Kind::Float)];
        let rows = vec![vec![Value::Int(1), Value::Null, Value::Float(0.5)]];
        let s = Snapshot::new(cols.clone(), &rows, vec![KeyPart::RowNumber]).unwrap();
        let changes = s.diff(&Current::default(), "t");
        let (sql, params) = statement(&changes[0], &cols, QueryDriver::Postgres);
        assert_eq!(sql, "DELETE FROM \"t\" WHERE \"a\" = ? AND \"b\" IS NULL");
        assert_eq!(params.len(), 1);
    }

    #[test]
    fn integral_floats_equal_integers() {
        assert!(Value::Int(3).same(&Value::Float(3.0)));
        assert_eq!(KeyAtom::from_value(&Value::Float(3.0)), Some(KeyAtom::Int(3)));
    }

    #[test]
    fn finds_the_table_of_a_query() {
        assert_eq!(
            table_from_sql("SELECT * FROM users WHERE level >= ?").as_deref(),
            Some("users")
        );
        assert_eq!(
            table_from_sql("select a from \"game\".\"items\"").as_deref(),
            Some("game.items")
        );
        assert_eq!(
            table_from_sql("SELECT fromage FROM cheese").as_deref(),
            Some("cheese")
        );
        assert_eq!(table_from_sql("SELECT 1"), None);
    }
}
