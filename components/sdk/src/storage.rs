//! SQL storage: the component's own database.
//!
//! Write the PostgreSQL/SQLite common subset with `$1` placeholders:
//! TEXT, BIGINT, BOOLEAN, DOUBLE PRECISION, `RETURNING`, `ON CONFLICT`.
//! [`query`] only reads; every statement that writes (with `RETURNING` too)
//! goes through [`execute`]. A query's result is capped (16 MiB on the
//! SQLite backend): read large sets in pages.
//! Generate ids in the component and keep money in integer cents.

use serde::de::{self, DeserializeOwned, IntoDeserializer};
use serde::Serialize;

use crate::bindings::agora::platform::storage as wit;
use crate::http::Error;

pub use wit::Value;

/// `params![a, b, c]`: a parameter list from anything convertible to [`Value`].
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::storage::Value::from($value)),*]
    };
}

/// A schema migration, applied once by the host, in order.
#[derive(Debug, Clone)]
pub struct Migration {
    pub name: &'static str,
    pub sql: &'static str,
}

impl Migration {
    pub const fn new(name: &'static str, sql: &'static str) -> Migration {
        Migration { name, sql }
    }
}

impl From<Migration> for crate::bindings::exports::agora::platform::schema::Migration {
    fn from(m: Migration) -> Self {
        Self {
            name: m.name.to_owned(),
            sql: m.sql.to_owned(),
        }
    }
}

impl From<wit::Error> for Error {
    fn from(e: wit::Error) -> Error {
        match e {
            wit::Error::ConstraintViolation(m) => Error::conflict(m),
            wit::Error::InvalidQuery(m) => Error::internal(format!("storage: {m}")),
            wit::Error::Unavailable(m) => Error::unavailable(format!("storage: {m}")),
        }
    }
}

/// The rows of a query.
#[derive(Debug, Clone)]
pub struct Rows {
    pub columns: Vec<String>,
    pub rows: Vec<Vec<Value>>,
}

impl Rows {
    pub fn iter(&self) -> impl Iterator<Item = Row<'_>> {
        self.rows.iter().map(|values| Row {
            columns: &self.columns,
            values,
        })
    }

    pub fn first(&self) -> Option<Row<'_>> {
        self.iter().next()
    }

    /// Every row as a `T` (see [`Row::decode`]).
    pub fn decode<T: DeserializeOwned>(&self) -> Result<Vec<T>, Error> {
        self.iter().map(|row| row.decode()).collect()
    }

    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl From<wit::RowSet> for Rows {
    fn from(r: wit::RowSet) -> Rows {
        Rows {
            columns: r.columns,
            rows: r.rows,
        }
    }
}

/// One row; columns are read by name.
#[derive(Debug, Clone, Copy)]
pub struct Row<'a> {
    columns: &'a [String],
    values: &'a [Value],
}

impl Row<'_> {
    pub fn get<T: FromValue>(&self, column: &str) -> Result<T, Error> {
        let index = self
            .columns
            .iter()
            .position(|c| c == column)
            .ok_or_else(|| Error::internal(format!("the result has no column `{column}`")))?;
        T::from_value(&self.values[index]).ok_or_else(|| {
            Error::internal(format!("column `{column}` holds {:?}", self.values[index]))
        })
    }

    /// The row as a `T` whose fields are named like the columns, through
    /// serde: `#[derive(Deserialize)] struct Payment { order_id: String,
    /// amount_cents: i64, reason: Option<String> }` for `SELECT order_id,
    /// amount_cents, reason ...`. Cells convert as [`Row::get`] does
    /// (SQLite's 0/1 to `bool`, integers to the field's integer type when
    /// they fit); a column the type lacks is ignored unless the type denies
    /// unknown fields. An error names the column and what it held.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, Error> {
        T::deserialize(RowDeserializer {
            row: *self,
            next: 0,
        })
        .map_err(|e| Error::internal(format!("decoding a row: {}", e.0)))
    }
}

/// A decoding error: what went wrong, and where.
#[derive(Debug)]
struct DecodeError(String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

impl de::Error for DecodeError {
    fn custom<T: std::fmt::Display>(message: T) -> Self {
        DecodeError(message.to_string())
    }
}

/// A row as a map from column names to cells.
struct RowDeserializer<'a> {
    row: Row<'a>,
    next: usize,
}

impl<'de> de::Deserializer<'de> for RowDeserializer<'_> {
    type Error = DecodeError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        visitor.visit_map(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> de::MapAccess<'de> for RowDeserializer<'_> {
    type Error = DecodeError;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, DecodeError> {
        let Some(column) = self.row.columns.get(self.next) else {
            return Ok(None);
        };
        seed.deserialize(column.as_str().into_deserializer())
            .map(Some)
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, DecodeError> {
        let (column, value) = (&self.row.columns[self.next], &self.row.values[self.next]);
        self.next += 1;
        seed.deserialize(Cell(value))
            .map_err(|e| DecodeError(format!("column `{column}` ({value:?}): {e}")))
    }
}

/// One cell.
struct Cell<'a>(&'a Value);

impl<'de> de::Deserializer<'de> for Cell<'_> {
    type Error = DecodeError;

    fn deserialize_any<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Boolean(b) => visitor.visit_bool(*b),
            Value::Integer(i) => visitor.visit_i64(*i),
            Value::Real(f) => visitor.visit_f64(*f),
            Value::Text(s) => visitor.visit_str(s),
            Value::Blob(b) => visitor.visit_bytes(b),
        }
    }

    /// SQLite stores booleans as 0 and 1.
    fn deserialize_bool<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Integer(i) => visitor.visit_bool(*i != 0),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_option<V: de::Visitor<'de>>(self, visitor: V) -> Result<V::Value, DecodeError> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    serde::forward_to_deserialize_any! {
        i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

/// Reading a typed value out of a cell.
pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

impl FromValue for f64 {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Real(f) => Some(*f),
            Value::Integer(i) => Some(*i as f64),
            _ => None,
        }
    }
}

impl FromValue for bool {
    /// SQLite stores booleans as 0 and 1.
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Boolean(b) => Some(*b),
            Value::Integer(i) => Some(*i != 0),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Blob(b) => Some(b.clone()),
            Value::Text(s) => Some(s.clone().into_bytes()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(value: &Value) -> Option<Self> {
        match value {
            Value::Null => Some(None),
            other => T::from_value(other).map(Some),
        }
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Text(s.to_owned())
    }
}

impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Text(s)
    }
}

impl From<&String> for Value {
    fn from(s: &String) -> Value {
        Value::Text(s.clone())
    }
}

impl From<i64> for Value {
    fn from(i: i64) -> Value {
        Value::Integer(i)
    }
}

impl From<i32> for Value {
    fn from(i: i32) -> Value {
        Value::Integer(i.into())
    }
}

impl From<u32> for Value {
    fn from(i: u32) -> Value {
        Value::Integer(i.into())
    }
}

impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Boolean(b)
    }
}

impl From<f64> for Value {
    fn from(f: f64) -> Value {
        Value::Real(f)
    }
}

impl From<Vec<u8>> for Value {
    fn from(b: Vec<u8>) -> Value {
        Value::Blob(b)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Value {
        v.map_or(Value::Null, Into::into)
    }
}

/// Runs a statement that only reads; one that writes is refused.
pub fn query(sql: &str, params: &[Value]) -> Result<Rows, Error> {
    Ok(wit::query(sql, params)?.into())
}

/// The most keys [`query_keys`] puts in one statement: well under every
/// backend's limit on parameters (SQLite's is 32766, PostgreSQL's 65535).
const KEYS_PER_QUERY: usize = 500;

/// Reads the rows of many keys: `sql` holds `{keys}` where the key list
/// goes (`WHERE id IN ({keys})`), and runs once per chunk of keys, so a
/// list of any length fits in the backend's limits. No keys, no query.
pub fn query_keys(sql: &str, keys: &[String]) -> Result<Rows, Error> {
    let mut all = Rows {
        columns: Vec::new(),
        rows: Vec::new(),
    };
    for chunk in keys.chunks(KEYS_PER_QUERY) {
        let params: Vec<Value> = chunk.iter().map(Value::from).collect();
        let rows = query(&with_placeholders(sql, chunk.len()), &params)?;
        all.columns = rows.columns;
        all.rows.extend(rows.rows);
    }
    Ok(all)
}

/// `sql` with `{keys}` replaced by `$1, $2, ..., $count`.
fn with_placeholders(sql: &str, count: usize) -> String {
    let placeholders: Vec<String> = (1..=count).map(|i| format!("${i}")).collect();
    sql.replace("{keys}", &placeholders.join(", "))
}

/// Runs a statement; returns the number of rows it changed.
pub fn execute(sql: &str, params: &[Value]) -> Result<u64, Error> {
    Ok(wit::execute(sql, params)?)
}

/// Starts a transaction. Dropping it without [`Transaction::commit`] rolls it back.
pub fn begin() -> Result<Transaction, Error> {
    Ok(Transaction(wit::begin()?))
}

pub struct Transaction(wit::Transaction);

impl Transaction {
    pub fn query(&self, sql: &str, params: &[Value]) -> Result<Rows, Error> {
        Ok(self.0.query(sql, params)?.into())
    }

    pub fn execute(&self, sql: &str, params: &[Value]) -> Result<u64, Error> {
        Ok(self.0.execute(sql, params)?)
    }

    /// Publishes `event` as JSON if and only if this transaction commits
    /// (the transactional outbox). Returns the event id.
    pub fn publish<T: Serialize + ?Sized>(
        &self,
        topic: &str,
        key: Option<&str>,
        event: &T,
    ) -> Result<String, Error> {
        let message = crate::messaging::outgoing(topic, key, event)?;
        Ok(crate::bindings::agora::platform::messaging::publish_in(
            &self.0, &message,
        )?)
    }

    pub fn commit(self) -> Result<(), Error> {
        Ok(wit::Transaction::commit(self.0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_decodes_into_a_struct_by_column_name() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct Payment {
            order_id: String,
            amount_cents: i64,
            quantity: u32,
            settled: bool,
            reason: Option<String>,
            reference: Option<String>,
        }
        let rows = Rows {
            columns: [
                "order_id",
                "amount_cents",
                "quantity",
                "settled",
                "reason",
                "reference",
                "extra",
            ]
            .map(String::from)
            .to_vec(),
            rows: vec![vec![
                Value::Text("o1".into()),
                Value::Integer(1250),
                Value::Integer(3),
                Value::Integer(1),
                Value::Null,
                Value::Text("r-9".into()),
                Value::Real(0.5),
            ]],
        };
        let decoded: Vec<Payment> = rows.decode().unwrap();
        assert_eq!(
            decoded,
            [Payment {
                order_id: "o1".into(),
                amount_cents: 1250,
                quantity: 3,
                settled: true,
                reason: None,
                reference: Some("r-9".into()),
            }]
        );
        let wrong = Rows {
            columns: vec!["order_id".into()],
            rows: vec![vec![Value::Integer(7)]],
        };
        let e = wrong.decode::<Payment>().unwrap_err();
        assert!(e.message.contains("column `order_id`"), "{}", e.message);
    }

    #[test]
    fn a_key_list_gets_one_placeholder_per_key() {
        assert_eq!(
            super::with_placeholders("SELECT * FROM t WHERE id IN ({keys})", 3),
            "SELECT * FROM t WHERE id IN ($1, $2, $3)"
        );
    }
}
