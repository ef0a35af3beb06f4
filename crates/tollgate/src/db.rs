//! One small SQL interface over the two stores tollgate runs on: SQLite (embedded, the
//! default) and PostgreSQL (`[store] url = "postgres://…"`).
//!
//! Everything above this module writes portable SQL with `?N` placeholders and reads rows as
//! [`Value`]s; this module turns `?N` into `$N` for PostgreSQL, caches prepared statements,
//! and gives both backends the same transaction semantics: a write transaction excludes every
//! other writer (SQLite: `BEGIN IMMEDIATE`; PostgreSQL: a transaction-scoped advisory lock),
//! so the ledger's conditional updates behave identically on both (ADR 0012).
//!
//! PostgreSQL is spoken through `tokio-postgres`, whose connection task runs on a small
//! runtime of its own thread; calls block the caller (like SQLite's do) without needing or
//! disturbing the caller's runtime, so the same store code runs on the writer thread, in
//! `spawn_blocking` and in the CLI.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::task::{Context, Poll, Wake};
use std::time::Duration;

/// A column or parameter value; integers are i64 everywhere (money is micro-USD).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("postgres: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("unexpected value in column {col}: {msg}")]
    Type { col: usize, msg: String },
    #[error("{0}")]
    Other(String),
}

impl DbError {
    /// A store the gateway cannot reach right now (as opposed to a bad statement).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Postgres(e) => e.is_closed() || e.as_db_error().is_none(),
            DbError::Sqlite(rusqlite::Error::SqliteFailure(e, _)) => matches!(
                e.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ),
            _ => false,
        }
    }
}

pub type Result<T> = std::result::Result<T, DbError>;

// The writer thread reports failures to waiting requests as text.
impl From<DbError> for String {
    fn from(e: DbError) -> String {
        e.to_string()
    }
}

/// Something that can be bound to a `?N` placeholder.
pub trait Param {
    fn value(&self) -> Value;
}

macro_rules! int_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn value(&self) -> Value {
                Value::Int(*self as i64)
            }
        }
    )*};
}
int_param!(i64, i32, u32, u16, u8);

impl Param for u64 {
    fn value(&self) -> Value {
        // Counters and money beyond i64 do not occur; saturate rather than wrap.
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}
impl Param for usize {
    fn value(&self) -> Value {
        Value::Int(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}
impl Param for bool {
    fn value(&self) -> Value {
        Value::Int(*self as i64)
    }
}
impl Param for str {
    fn value(&self) -> Value {
        Value::Text(self.to_string())
    }
}
impl Param for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
}
impl Param for [u8] {
    fn value(&self) -> Value {
        Value::Blob(self.to_vec())
    }
}
impl Param for Vec<u8> {
    fn value(&self) -> Value {
        Value::Blob(self.clone())
    }
}
impl Param for Value {
    fn value(&self) -> Value {
        self.clone()
    }
}
impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
}
impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}

/// Reads a [`Value`] as a Rust type.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> std::result::Result<Self, String>;
}

fn mismatch(want: &str, v: &Value) -> String {
    format!("expected {want}, found {v:?}")
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Int(i) => Ok(*i),
            _ => Err(mismatch("an integer", v)),
        }
    }
}
macro_rules! int_from {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> std::result::Result<Self, String> {
                let i = i64::from_value(v)?;
                <$t>::try_from(i).map_err(|_| format!("{i} is out of range for {}", stringify!($t)))
            }
        }
    )*};
}
int_from!(u64, u32, u16, i32);

impl FromValue for bool {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        Ok(i64::from_value(v)? != 0)
    }
}
impl FromValue for String {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err(mismatch("text", v)),
        }
    }
}
impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Blob(b) => Ok(b.clone()),
            _ => Err(mismatch("bytes", v)),
        }
    }
}
impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> std::result::Result<Self, String> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// One result row.
#[derive(Debug, Clone)]
pub struct Row(Vec<Value>);

impl Row {
    pub fn get<T: FromValue>(&self, col: usize) -> Result<T> {
        let v = self.0.get(col).ok_or_else(|| DbError::Type {
            col,
            msg: format!("the row has {} columns", self.0.len()),
        })?;
        T::from_value(v).map_err(|msg| DbError::Type { col, msg })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    /// A `postgres://` or `postgresql://` URL (or a libpq key=value string).
    Postgres(String),
}

impl Location {
    /// `[store] url` if set, else `<data_dir>/tollgate.db`.
    pub fn from_config(url: Option<&str>, data_dir: &std::path::Path) -> Location {
        match url {
            Some(u) if !u.trim().is_empty() => {
                if let Some(path) = u.strip_prefix("sqlite://") {
                    Location::Sqlite(PathBuf::from(path))
                } else {
                    Location::Postgres(u.to_string())
                }
            }
            _ => Location::Sqlite(data_dir.join("tollgate.db")),
        }
    }

    /// For logs and CLI output: the path, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres(url) => redact(url),
        }
    }

    pub fn connect(&self) -> Result<Db> {
        match self {
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| DbError::Other(format!("creating {}: {e}", dir.display())))?;
                }
                Ok(Db::sqlite(sqlite_connect(path)?))
            }
            Location::Postgres(url) => Ok(Db {
                conn: Conn::Pg(Box::new(Pg::connect(url)?)),
                in_tx: false,
            }),
        }
    }
}

fn redact(url: &str) -> String {
    // postgres://user:secret@host/db → postgres://user:***@host/db
    if let Some((scheme, rest)) = url.split_once("://") {
        if let Some((userinfo, host)) = rest.split_once('@') {
            if let Some((user, _)) = userinfo.split_once(':') {
                return format!("{scheme}://{user}:***@{host}");
            }
        }
        return url.to_string();
    }
    // key=value form: hide password=…
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Opens a SQLite connection with the settings every tollgate connection needs.
fn sqlite_connect(path: &std::path::Path) -> Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    // Other processes (the CLI, sibling gateways) may hold the write lock briefly.
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Not temp_store=MEMORY: it made no measurable difference to the writer, and it keeps
    // a large sort's spill (a report over millions of records) in memory, unbounded.
    // Holds, settles and usage inserts reuse a few dozen statements per request.
    conn.set_prepared_statement_cache_capacity(128);
    // Checkpoints (and their fsync) run on the checkpointer thread, not inside whichever
    // commit happens to fill the WAL: that was the writer, and every hold waited for it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

pub struct Db {
    conn: Conn,
    /// Set between BEGIN and COMMIT/ROLLBACK; a transaction left open by a panic is rolled
    /// back before the connection is used again.
    in_tx: bool,
}

enum Conn {
    Sqlite(rusqlite::Connection),
    Pg(Box<Pg>),
}

/// The one advisory lock every PostgreSQL write transaction takes ("tollgate" in ASCII).
const WRITE_LOCK: i64 = 0x746f_6c6c_6761_7465;

impl Db {
    fn sqlite(conn: rusqlite::Connection) -> Db {
        Db {
            conn: Conn::Sqlite(conn),
            in_tx: false,
        }
    }

    /// A private in-memory SQLite database (unit tests).
    pub fn memory() -> Result<Db> {
        Ok(Db::sqlite(rusqlite::Connection::open_in_memory()?))
    }

    pub fn dialect(&self) -> Dialect {
        match self.conn {
            Conn::Sqlite(_) => Dialect::Sqlite,
            Conn::Pg(_) => Dialect::Postgres,
        }
    }

    /// Runs a statement; the number of rows it changed.
    pub fn exec(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64> {
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let values: Vec<Value> = params.iter().map(|p| p.value()).collect();
                Ok(stmt.execute(rusqlite::params_from_iter(values.iter()))? as u64)
            }
            Conn::Pg(pg) => pg.exec(sql, params),
        }
    }

    /// `exec` with values already made: binds them where they are (the writer's hot path
    /// binds tens of values per record; `exec` would copy each once more).
    pub fn exec_values(&mut self, sql: &str, values: &[Value]) -> Result<u64> {
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                Ok(stmt.execute(rusqlite::params_from_iter(values.iter()))? as u64)
            }
            Conn::Pg(pg) => {
                let params: Vec<&dyn Param> = values.iter().map(|v| v as &dyn Param).collect();
                pg.exec(sql, &params)
            }
        }
    }

    /// Runs a query; every row.
    pub fn rows(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>> {
        match &mut self.conn {
            Conn::Sqlite(c) => {
                let mut stmt = c.prepare_cached(sql)?;
                let n = stmt.column_count();
                let values: Vec<Value> = params.iter().map(|p| p.value()).collect();
                let mut rows = stmt.query(rusqlite::params_from_iter(values.iter()))?;
                let mut out = Vec::new();
                while let Some(r) = rows.next()? {
                    let mut row = Vec::with_capacity(n);
                    for i in 0..n {
                        row.push(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => Value::Null,
                            rusqlite::types::ValueRef::Integer(i) => Value::Int(i),
                            rusqlite::types::ValueRef::Real(f) => Value::Real(f),
                            rusqlite::types::ValueRef::Text(t) => {
                                Value::Text(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => Value::Blob(b.to_vec()),
                        });
                    }
                    out.push(Row(row));
                }
                Ok(out)
            }
            Conn::Pg(pg) => pg.rows(sql, params),
        }
    }

    /// One query once per set of values, in order, each seeing what the ones before it did.
    /// On PostgreSQL they are pipelined: a group costs one round trip, not one per set.
    pub fn pipeline(&mut self, sql: &str, sets: &[Vec<Value>]) -> Result<Vec<Vec<Row>>> {
        match &mut self.conn {
            Conn::Sqlite(_) => sets
                .iter()
                .map(|set| {
                    let params: Vec<&dyn Param> = set.iter().map(|v| v as &dyn Param).collect();
                    self.rows(sql, &params)
                })
                .collect(),
            Conn::Pg(pg) => pg.pipeline(sql, sets),
        }
    }

    /// The first row, if any (an `UPDATE … RETURNING` runs to completion either way).
    pub fn row(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Option<Row>> {
        Ok(self.rows(sql, params)?.into_iter().next())
    }

    /// The first row; an error if there is none.
    pub fn one(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Row> {
        self.row(sql, params)?
            .ok_or_else(|| DbError::Other(format!("no row for: {}", first_line(sql))))
    }

    /// Several statements without parameters (DDL, transaction control).
    pub fn batch(&mut self, sql: &str) -> Result<()> {
        match &mut self.conn {
            Conn::Sqlite(c) => Ok(c.execute_batch(sql)?),
            Conn::Pg(pg) => pg.batch(sql),
        }
    }

    fn begin(&mut self, write: bool) -> Result<()> {
        if self.in_tx {
            // A panic escaped a transaction on this connection: undo what it left.
            let _ = self.batch("ROLLBACK");
            self.in_tx = false;
        }
        if let Conn::Pg(pg) = &mut self.conn {
            pg.reconnect_if_closed()?;
        }
        match (self.dialect(), write) {
            (Dialect::Sqlite, true) => self.batch("BEGIN IMMEDIATE")?,
            (Dialect::Sqlite, false) => self.batch("BEGIN")?,
            (Dialect::Postgres, true) => {
                self.batch("BEGIN")?;
                self.in_tx = true;
                // Writers queue here, as SQLite's take its one write lock.
                self.exec("SELECT pg_advisory_xact_lock(?1)", &[&WRITE_LOCK])
                    .map(|_| ())?;
            }
            (Dialect::Postgres, false) => {
                self.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?
            }
        }
        self.in_tx = true;
        Ok(())
    }

    fn finish<T, E: From<DbError>>(
        &mut self,
        out: std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        let end = if out.is_ok() { "COMMIT" } else { "ROLLBACK" };
        let ended = self.batch(end);
        if ended.is_err() && out.is_ok() {
            let _ = self.batch("ROLLBACK");
        }
        self.in_tx = false;
        let v = out?;
        ended?;
        Ok(v)
    }

    /// Runs `f` in a write transaction that excludes every other writer, and commits it
    /// (or rolls it back if `f` fails).
    pub fn write<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.transaction(true, f)
    }

    /// Runs `f` on one consistent snapshot.
    pub fn snapshot<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        self.transaction(false, f)
    }

    fn transaction<T, E: From<DbError>>(
        &mut self,
        write: bool,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, E>,
    ) -> std::result::Result<T, E> {
        if let Err(e) = self.begin(write) {
            self.in_tx = false;
            let _ = self.batch("ROLLBACK");
            return Err(e.into());
        }
        let out = f(self);
        self.finish(out)
    }

    /// Inside a transaction: runs `f` under a savepoint, kept if `keep` says so and rolled
    /// back otherwise (and always when `f` fails).
    pub fn savepoint<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, E>,
        keep: impl FnOnce(&T) -> bool,
    ) -> std::result::Result<T, E> {
        self.batch("SAVEPOINT tg")?;
        let out = f(self);
        match &out {
            Ok(v) if keep(v) => self.batch("RELEASE SAVEPOINT tg")?,
            _ => self.batch("ROLLBACK TO SAVEPOINT tg; RELEASE SAVEPOINT tg")?,
        }
        out
    }

    /// Used by reads outside any transaction: a PostgreSQL connection that dropped is
    /// reopened before the next statement, not on every one after.
    pub fn ensure_connected(&mut self) -> Result<()> {
        if let Conn::Pg(pg) = &mut self.conn {
            if !self.in_tx {
                pg.reconnect_if_closed()?;
            }
        }
        Ok(())
    }

    /// SQLite only: copies the WAL into the database. `restart`: waits for the writer
    /// lock, copies everything and has the next transaction write the WAL from its start,
    /// so the file stops growing (without shrinking it: truncating the file cost the writer
    /// 10-15 ms per call in `ftruncate`). Otherwise passive, never blocking anyone.
    /// Returns the WAL's length in frames before the checkpoint (0 for PostgreSQL).
    pub fn checkpoint(&mut self, restart: bool) -> Result<i64> {
        if let Conn::Sqlite(c) = &self.conn {
            let sql = if restart {
                "PRAGMA wal_checkpoint(RESTART)"
            } else {
                "PRAGMA wal_checkpoint(PASSIVE)"
            };
            return Ok(c.query_row(sql, [], |r| r.get::<_, i64>(1))?);
        }
        Ok(0)
    }
}

fn first_line(sql: &str) -> &str {
    sql.trim().lines().next().unwrap_or("")
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Value::Null => ValueRef::Null,
            Value::Int(i) => ValueRef::Integer(*i),
            Value::Real(f) => ValueRef::Real(*f),
            Value::Text(s) => ValueRef::Text(s.as_bytes()),
            Value::Blob(b) => ValueRef::Blob(b),
        }))
    }
}

impl tokio_postgres::types::ToSql for Value {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> std::result::Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>>
    {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            Value::Null => Ok(IsNull::Yes),
            Value::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                // An untyped parameter (e.g. only ever compared with IS NULL) travels as text.
                _ => i.to_string().to_sql(ty, out),
            },
            Value::Real(f) => f.to_sql(ty, out),
            Value::Text(s) => s.to_sql(ty, out),
            Value::Blob(b) => b.to_sql(ty, out),
        }
    }

    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// `?1` → `$1`, outside string literals.
fn pg_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_str = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                in_str = !in_str;
                out.push(c);
            }
            '?' if !in_str => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

/// Blocks the calling thread on a future that needs no runtime of its own (tokio-postgres's
/// client side only talks to its connection task through channels), for at most `within`.
fn block_on<F: Future>(f: F, within: Duration) -> Option<F::Output> {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = Arc::new(Unpark(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return None;
        }
        std::thread::park_timeout(left);
    }
}

/// How long one PostgreSQL round trip may take before the connection is given up (a stalled
/// or unreachable server must not freeze the writer thread forever).
const PG_DEADLINE: Duration = Duration::from_secs(10);

struct Pg {
    url: String,
    client: tokio_postgres::Client,
    stmts: HashMap<String, tokio_postgres::Statement>,
    /// A call timed out: the connection's state is unknown, so it is replaced (the server
    /// rolls back whatever transaction it had open).
    broken: bool,
}

impl Pg {
    fn connect(url: &str) -> Result<Pg> {
        let (tx, rx) = std::sync::mpsc::channel();
        let target = url.to_string();
        std::thread::Builder::new()
            .name("tollgate-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(DbError::Other(format!("starting a runtime: {e}"))));
                        return;
                    }
                };
                rt.block_on(async move {
                    let connected = tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio_postgres::connect(&target, tokio_postgres::NoTls),
                    )
                    .await;
                    match connected {
                        Ok(Ok((client, connection))) => {
                            let _ = tx.send(Ok(client));
                            // Runs until the client is dropped or the server goes away.
                            if let Err(e) = connection.await {
                                tracing::warn!(error = %e, "PostgreSQL connection ended");
                            }
                        }
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(DbError::Postgres(e)));
                        }
                        Err(_) => {
                            let _ = tx.send(Err(DbError::Other(format!(
                                "connecting to {}: timed out after 10 s",
                                redact(&target)
                            ))));
                        }
                    }
                });
            })
            .map_err(|e| DbError::Other(format!("starting the PostgreSQL thread: {e}")))?;
        let client = rx
            .recv()
            .map_err(|_| DbError::Other("the PostgreSQL thread died".into()))??;
        Ok(Pg {
            url: url.to_string(),
            client,
            stmts: HashMap::new(),
            broken: false,
        })
    }

    fn reconnect_if_closed(&mut self) -> Result<()> {
        if self.client.is_closed() || self.broken {
            *self = Pg::connect(&self.url)?;
        }
        Ok(())
    }

    fn usable(&self) -> Result<()> {
        if self.broken {
            return Err(DbError::Other(
                "the PostgreSQL connection was given up after a timeout".into(),
            ));
        }
        Ok(())
    }

    /// The outcome of a call waited for within the deadline.
    fn finish<T>(&mut self, r: Option<std::result::Result<T, tokio_postgres::Error>>) -> Result<T> {
        match r {
            Some(r) => Ok(r?),
            None => {
                self.broken = true;
                Err(DbError::Other(format!(
                    "PostgreSQL did not answer within {PG_DEADLINE:?}"
                )))
            }
        }
    }

    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement> {
        if let Some(s) = self.stmts.get(sql) {
            return Ok(s.clone());
        }
        self.usable()?;
        let r = block_on(self.client.prepare(&pg_placeholders(sql)), PG_DEADLINE);
        let stmt = self.finish(r)?;
        self.stmts.insert(sql.to_string(), stmt.clone());
        Ok(stmt)
    }

    fn exec(&mut self, sql: &str, params: &[&dyn Param]) -> Result<u64> {
        let stmt = self.statement(sql)?;
        let values: Vec<Value> = params.iter().map(|p| p.value()).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let r = block_on(self.client.execute(&stmt, &refs), PG_DEADLINE);
        self.finish(r)
    }

    fn rows(&mut self, sql: &str, params: &[&dyn Param]) -> Result<Vec<Row>> {
        let stmt = self.statement(sql)?;
        let values: Vec<Value> = params.iter().map(|p| p.value()).collect();
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = values
            .iter()
            .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let r = block_on(self.client.query(&stmt, &refs), PG_DEADLINE);
        let rows = self.finish(r)?;
        pg_rows(&rows)
    }

    fn pipeline(&mut self, sql: &str, sets: &[Vec<Value>]) -> Result<Vec<Vec<Row>>> {
        let stmt = self.statement(sql)?;
        let refs: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = sets
            .iter()
            .map(|set| {
                set.iter()
                    .map(|v| v as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect()
            })
            .collect();
        // Polled together, tokio-postgres writes every query before reading any answer.
        let queries = refs.iter().map(|r| self.client.query(&stmt, r));
        let r = block_on(futures_util::future::try_join_all(queries), PG_DEADLINE);
        let answers = self.finish(r)?;
        answers.iter().map(|rows| pg_rows(rows)).collect()
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.usable()?;
        let r = block_on(self.client.batch_execute(sql), PG_DEADLINE);
        self.finish(r)
    }
}

fn pg_rows(rows: &[tokio_postgres::Row]) -> Result<Vec<Row>> {
    rows.iter()
        .map(|r| {
            (0..r.len())
                .map(|i| pg_value(r, i))
                .collect::<Result<Vec<_>>>()
        })
        .map(|r| r.map(Row))
        .collect()
}

fn pg_value(row: &tokio_postgres::Row, i: usize) -> Result<Value> {
    use tokio_postgres::types::Type;
    let ty = row.columns()[i].type_().clone();
    Ok(match ty {
        Type::INT8 => row
            .try_get::<_, Option<i64>>(i)?
            .map_or(Value::Null, Value::Int),
        Type::INT4 => row
            .try_get::<_, Option<i32>>(i)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::INT2 => row
            .try_get::<_, Option<i16>>(i)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::BOOL => row
            .try_get::<_, Option<bool>>(i)?
            .map_or(Value::Null, |v| Value::Int(v.into())),
        Type::FLOAT8 => row
            .try_get::<_, Option<f64>>(i)?
            .map_or(Value::Null, Value::Real),
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => row
            .try_get::<_, Option<String>>(i)?
            .map_or(Value::Null, Value::Text),
        Type::BYTEA => row
            .try_get::<_, Option<Vec<u8>>>(i)?
            .map_or(Value::Null, Value::Blob),
        Type::VOID => Value::Null,
        other => {
            return Err(DbError::Type {
                col: i,
                msg: format!(
                    "PostgreSQL type {other} is not read by tollgate (cast it in the query)"
                ),
            })
        }
    })
}

/// The SQLite schema text, as PostgreSQL DDL: 64-bit integers, byte strings, an identity
/// column where SQLite uses the rowid. One list of migrations serves both stores.
pub fn pg_ddl(sql: &str) -> String {
    let mut s = sql.replace(
        "INTEGER PRIMARY KEY",
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    );
    s = s.replace("WITHOUT ROWID", "");
    s = replace_word(&s, "INTEGER", "BIGINT");
    replace_word(&s, "BLOB", "BYTEA")
}

fn replace_word(s: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(word) {
        let before = rest[..i].chars().next_back();
        let after = rest[i + word.len()..].chars().next();
        let boundary = |c: Option<char>| !c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        out.push_str(&rest[..i]);
        out.push_str(if boundary(before) && boundary(after) {
            with
        } else {
            word
        });
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_become_dollars_outside_strings() {
        assert_eq!(
            pg_placeholders("SELECT '?x' FROM t WHERE a = ?1 AND b = ?12"),
            "SELECT '?x' FROM t WHERE a = $1 AND b = $12"
        );
    }

    #[test]
    fn ddl_translates_types_by_word() {
        let got = pg_ddl(
            "CREATE TABLE t (seq INTEGER PRIMARY KEY, n INTEGER NOT NULL, d BLOB, big_integer_x TEXT) WITHOUT ROWID;",
        );
        assert_eq!(
            got,
            "CREATE TABLE t (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, d BYTEA, big_integer_x TEXT) ;"
        );
    }

    #[test]
    fn urls_lose_their_passwords_in_logs() {
        assert_eq!(
            redact("postgres://tg:hunter2@db:5432/tollgate"),
            "postgres://tg:***@db:5432/tollgate"
        );
        assert_eq!(
            redact("host=db password=hunter2 user=tg"),
            "host=db password=*** user=tg"
        );
    }

    #[test]
    fn sqlite_roundtrips_values_and_savepoints_roll_back() {
        let mut db = Db::memory().unwrap();
        db.batch("CREATE TABLE t (a INTEGER, b TEXT, c BLOB)")
            .unwrap();
        db.write(|db| {
            db.exec(
                "INSERT INTO t VALUES (?1, ?2, ?3)",
                &[&7i64, &"x", &vec![1u8, 2]],
            )?;
            let kept: Result<u64> = db.savepoint(
                |db| db.exec("INSERT INTO t VALUES (?1, NULL, NULL)", &[&8i64]),
                |_| false,
            );
            kept.map(|_| ())
        })
        .unwrap();
        let rows = db.rows("SELECT a, b, c FROM t", &[]).unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].get::<i64>(0).unwrap(), 7);
        assert_eq!(rows[0].get::<String>(1).unwrap(), "x");
        assert_eq!(rows[0].get::<Vec<u8>>(2).unwrap(), vec![1, 2]);
        assert!(rows[0].get::<String>(0).is_err());
        assert_eq!(rows[0].get::<Option<i64>>(0).unwrap(), Some(7));
    }
}
