//! The configuration server's database. Only this crate knows SQL.
//!
//! [`Store`] runs on an embedded SQLite file by default and on PostgreSQL when given a
//! `postgres://` URL: one implementation over sqlx's `Any` driver with the same queries
//! (`$N` placeholders work on both), and versioned migrations per backend
//! (`migrations/{sqlite,postgres}/NNN_*.sql`, applied in order, recorded in `schema_migrations`).
//! The data is a small set of tables: JSON documents by kind and id (inventory, policies,
//! groups, plans, components), API tokens (hashed), jobs, events and settings.

use std::path::Path;
use std::str::FromStr;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("stored {what} is unreadable: {source}")]
    Corrupt { what: String, source: serde_json::Error },
    #[error("{kind} {id:?} was changed by someone else meanwhile (revision {expected} expected, {found} found): reload and retry")]
    Conflict { kind: String, id: String, expected: i64, found: i64 },
    #[error("the database schema is version {found}, newer than this Ferry understands ({known}): upgrade Ferry")]
    TooNew { found: i64, known: i64 },
    #[error("invalid database location {0:?}: give a file path or a postgres:// URL")]
    BadUrl(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Tables and columns a backup carries (events keep their sequence numbers).
const TABLES: &[(&str, &[&str])] = &[
    ("objects", &["kind", "id", "body", "revision", "updated_ms"]),
    ("tokens", &["id", "hash", "name", "role", "created_ms"]),
    ("jobs", &["id", "state", "body", "created_ms", "updated_ms"]),
    ("events", &["seq", "time_ms", "code", "severity", "object", "message"]),
    ("settings", &["key", "value"]),
];

const SQLITE: &[(i64, &str)] = &[(1, include_str!("../migrations/sqlite/001_initial.sql"))];
const POSTGRES: &[(i64, &str)] = &[(1, include_str!("../migrations/postgres/001_initial.sql"))];

/// A stored document with its revision (optimistic concurrency).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Doc<T> {
    pub id: String,
    pub revision: i64,
    pub updated_ms: i64,
    pub body: T,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub created_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: i64,
    pub time_ms: i64,
    pub code: i64,
    pub severity: String,
    pub object: String,
    pub message: String,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

fn now_ms_i64() -> i64 {
    i64::try_from(ferry_sys::time::now_ms()).unwrap_or(i64::MAX)
}

impl Store {
    /// Open (creating on first use) the database at `location`: a file path (SQLite) or a
    /// `postgres://` / `postgresql://` URL. Pending migrations are applied.
    pub async fn open(location: &str) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (url, backend) = if location.starts_with("postgres://") || location.starts_with("postgresql://") {
            (location.to_owned(), Backend::Postgres)
        } else if let Some(path) = location.strip_prefix("sqlite://").or(Some(location)) {
            if path.is_empty() {
                return Err(StoreError::BadUrl(location.into()));
            }
            if let Some(parent) = Path::new(path).parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(|e| StoreError::Db(sqlx::Error::Io(e)))?;
            }
            (format!("sqlite://{path}?mode=rwc"), Backend::Sqlite)
        } else {
            return Err(StoreError::BadUrl(location.into()));
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            .max_connections(if backend == Backend::Sqlite { 1 } else { 8 })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL: readers never block the writer; FULL: a commit is on disk.
                        sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                        sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    }
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    async fn migrate(&self) -> Result<()> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)",
        )
        .execute(&self.pool)
        .await?;
        let current: i64 = sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?
            .try_get("v")?;
        let steps = if self.backend == Backend::Sqlite { SQLITE } else { POSTGRES };
        let known = steps.last().map(|s| s.0).unwrap_or(0);
        if current > known {
            return Err(StoreError::TooNew { found: current, known });
        }
        for (version, sql) in steps.iter().filter(|(v, _)| *v > current) {
            let mut tx = self.pool.begin().await?;
            for stmt in sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(stmt).execute(&mut *tx).await?;
            }
            sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
                .bind(*version)
                .bind(now_ms_i64())
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, backend = ?self.backend, "database migrated");
        }
        Ok(())
    }

    pub async fn schema_version(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COALESCE(MAX(version), 0) AS v FROM schema_migrations")
            .fetch_one(&self.pool)
            .await?
            .try_get("v")?)
    }

    // ---- documents ------------------------------------------------------------------------

    pub async fn get<T: DeserializeOwned>(&self, kind: &str, id: &str) -> Result<Option<Doc<T>>> {
        let row = sqlx::query("SELECT body, revision, updated_ms FROM objects WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| doc(kind, id.to_owned(), &r)).transpose()
    }

    pub async fn list<T: DeserializeOwned>(&self, kind: &str) -> Result<Vec<Doc<T>>> {
        let rows = sqlx::query("SELECT id, body, revision, updated_ms FROM objects WHERE kind = $1 ORDER BY id")
            .bind(kind)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| doc(kind, r.try_get("id")?, r)).collect()
    }

    /// Create or replace. With `expected_revision`, the write succeeds only if the stored
    /// revision still is that one (0 = must not exist). Returns the new revision.
    pub async fn put<T: Serialize>(
        &self,
        kind: &str,
        id: &str,
        body: &T,
        expected_revision: Option<i64>,
    ) -> Result<i64> {
        let mut tx = self.pool.begin().await?;
        let revision = put_in(&mut tx, kind, id, body, expected_revision).await?;
        tx.commit().await?;
        Ok(revision)
    }

    /// Several writes and deletes in one transaction: all happen or none (a policy and its
    /// failback policy).
    pub async fn write_many(
        &self,
        puts: &[(&str, &str, serde_json::Value, Option<i64>)],
        deletes: &[(&str, &str)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (kind, id, body, expected) in puts {
            put_in(&mut tx, kind, id, body, *expected).await?;
        }
        for (kind, id) in deletes {
            sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2")
                .bind(*kind)
                .bind(*id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Delete only if the stored revision still is `revision`; returns whether it was deleted.
    pub async fn delete_if(&self, kind: &str, id: &str, revision: i64) -> Result<bool> {
        let r = sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2 AND revision = $3")
            .bind(kind)
            .bind(id)
            .bind(revision)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    /// Delete; returns whether it existed.
    pub async fn delete(&self, kind: &str, id: &str) -> Result<bool> {
        let r = sqlx::query("DELETE FROM objects WHERE kind = $1 AND id = $2")
            .bind(kind)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(r.rows_affected() > 0)
    }

    // ---- tokens ---------------------------------------------------------------------------

    pub async fn add_token(&self, id: &str, hash: &str, name: &str, role: &str) -> Result<()> {
        sqlx::query("INSERT INTO tokens (id, hash, name, role, created_ms) VALUES ($1, $2, $3, $4, $5)")
            .bind(id)
            .bind(hash)
            .bind(name)
            .bind(role)
            .bind(now_ms_i64())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let row = sqlx::query("SELECT id, name, role, created_ms FROM tokens WHERE hash = $1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| token(&r)).transpose()
    }

    pub async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = sqlx::query("SELECT id, name, role, created_ms FROM tokens ORDER BY created_ms")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(token).collect()
    }

    pub async fn delete_token(&self, id: &str) -> Result<bool> {
        Ok(sqlx::query("DELETE FROM tokens WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected() > 0)
    }

    // ---- jobs -----------------------------------------------------------------------------

    pub async fn put_job<T: Serialize>(&self, id: &str, state: &str, body: &T) -> Result<()> {
        let json = serde_json::to_string(body).map_err(|source| StoreError::Corrupt { what: "job".into(), source })?;
        let now = now_ms_i64();
        let mut tx = self.pool.begin().await?;
        let exists =
            sqlx::query("SELECT id FROM jobs WHERE id = $1").bind(id).fetch_optional(&mut *tx).await?.is_some();
        if exists {
            sqlx::query("UPDATE jobs SET state = $1, body = $2, updated_ms = $3 WHERE id = $4")
                .bind(state)
                .bind(json)
                .bind(now)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query("INSERT INTO jobs (id, state, body, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $4)")
                .bind(id)
                .bind(state)
                .bind(json)
                .bind(now)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn job<T: DeserializeOwned>(&self, id: &str) -> Result<Option<T>> {
        let row = sqlx::query("SELECT body FROM jobs WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        row.map(|r| parse("job", &r.try_get::<String, _>("body")?)).transpose()
    }

    /// Jobs, newest first; only those in `states` when given.
    pub async fn jobs<T: DeserializeOwned>(&self, states: Option<&[&str]>) -> Result<Vec<T>> {
        let rows =
            sqlx::query("SELECT state, body FROM jobs ORDER BY created_ms DESC, id DESC").fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for r in rows {
            let state: String = r.try_get("state")?;
            if states.is_none_or(|s| s.contains(&state.as_str())) {
                out.push(parse("job", &r.try_get::<String, _>("body")?)?);
            }
        }
        Ok(out)
    }

    // ---- events ---------------------------------------------------------------------------

    pub async fn add_event(&self, code: i64, severity: &str, object: &str, message: &str) -> Result<()> {
        sqlx::query("INSERT INTO events (time_ms, code, severity, object, message) VALUES ($1, $2, $3, $4, $5)")
            .bind(now_ms_i64())
            .bind(code)
            .bind(severity)
            .bind(object)
            .bind(message)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// The newest `limit` events, oldest first.
    pub async fn events(&self, limit: i64) -> Result<Vec<EventRecord>> {
        let rows =
            sqlx::query("SELECT seq, time_ms, code, severity, object, message FROM events ORDER BY seq DESC LIMIT $1")
                .bind(limit)
                .fetch_all(&self.pool)
                .await?;
        let mut out = rows
            .iter()
            .map(|r| {
                Ok(EventRecord {
                    seq: r.try_get("seq")?,
                    time_ms: r.try_get("time_ms")?,
                    code: r.try_get("code")?,
                    severity: r.try_get("severity")?,
                    object: r.try_get("object")?,
                    message: r.try_get("message")?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        out.reverse();
        Ok(out)
    }

    // ---- settings -------------------------------------------------------------------------

    pub async fn setting(&self, key: &str) -> Result<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1").bind(key).fetch_optional(&self.pool).await?;
        Ok(row.map(|r| r.try_get("value")).transpose()?)
    }

    pub async fn set_setting(&self, key: &str, value: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM settings WHERE key = $1").bind(key).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every table as JSON, read in one transaction (a consistent snapshot while writes go on).
    pub async fn export_all(&self) -> Result<serde_json::Value> {
        let mut tx = self.pool.begin().await?;
        if self.backend == Backend::Postgres {
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ").execute(&mut *tx).await?;
        }
        let mut out = serde_json::Map::new();
        for (table, cols) in TABLES {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!("SELECT {} FROM {table}", cols.join(", "))))
                .fetch_all(&mut *tx)
                .await?;
            let mut list = Vec::new();
            for r in rows {
                let mut obj = serde_json::Map::new();
                for c in *cols {
                    let v = match r.try_get::<String, _>(*c) {
                        Ok(s) => serde_json::Value::String(s),
                        Err(_) => serde_json::Value::from(r.try_get::<i64, _>(*c)?),
                    };
                    obj.insert((*c).to_owned(), v);
                }
                list.push(serde_json::Value::Object(obj));
            }
            out.insert((*table).to_owned(), serde_json::Value::Array(list));
        }
        tx.commit().await?;
        out.insert("schema_version".into(), self.schema_version().await?.into());
        Ok(serde_json::Value::Object(out))
    }

    /// Replace every table's content by an [`Store::export_all`] snapshot, in one transaction.
    pub async fn import_all(&self, snapshot: &serde_json::Value) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (table, cols) in TABLES {
            sqlx::query(sqlx::AssertSqlSafe(format!("DELETE FROM {table}"))).execute(&mut *tx).await?;
            let placeholders: Vec<String> = (1..=cols.len()).map(|i| format!("${i}")).collect();
            let sql = format!("INSERT INTO {table} ({}) VALUES ({})", cols.join(", "), placeholders.join(", "));
            for row in snapshot[*table].as_array().into_iter().flatten() {
                // Table and column names come from the constant TABLES, never from input.
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone()));
                for c in *cols {
                    q = match &row[*c] {
                        serde_json::Value::String(s) => q.bind(s.clone()),
                        v => q.bind(v.as_i64().unwrap_or(0)),
                    };
                }
                q.execute(&mut *tx).await?;
            }
        }
        if self.backend == Backend::Postgres {
            // Rows came with their sequence numbers: move the sequence past them.
            sqlx::query("SELECT setval(pg_get_serial_sequence('events', 'seq'), COALESCE((SELECT MAX(seq) FROM events), 0) + 1, false)")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// SQLite only: a consistent online copy of the database file (`VACUUM INTO`).
    pub async fn backup_sqlite_to(&self, path: &Path) -> Result<()> {
        sqlx::query("VACUUM INTO $1").bind(path.to_string_lossy().into_owned()).execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Compare-and-set write: the UPDATE names the revision it read and the INSERT yields to a
/// concurrent one, so two writers never both succeed (also under READ COMMITTED on PostgreSQL).
async fn put_in<T: Serialize>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    kind: &str,
    id: &str,
    body: &T,
    expected_revision: Option<i64>,
) -> Result<i64> {
    let json = serde_json::to_string(body).map_err(|source| StoreError::Corrupt { what: kind.into(), source })?;
    let found: i64 = sqlx::query("SELECT revision FROM objects WHERE kind = $1 AND id = $2")
        .bind(kind)
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.try_get("revision"))
        .transpose()?
        .unwrap_or(0);
    let conflict = |found| StoreError::Conflict {
        kind: kind.into(),
        id: id.into(),
        expected: expected_revision.unwrap_or(found),
        found,
    };
    if let Some(expected) = expected_revision {
        if expected != found {
            return Err(StoreError::Conflict { kind: kind.into(), id: id.into(), expected, found });
        }
    }
    let revision = found + 1;
    let affected = if found == 0 {
        sqlx::query("INSERT INTO objects (kind, id, body, revision, updated_ms) VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING")
            .bind(kind)
            .bind(id)
            .bind(&json)
            .bind(revision)
            .bind(now_ms_i64())
            .execute(&mut **tx)
            .await?
            .rows_affected()
    } else {
        sqlx::query("UPDATE objects SET body = $1, revision = $2, updated_ms = $3 WHERE kind = $4 AND id = $5 AND revision = $6")
            .bind(&json)
            .bind(revision)
            .bind(now_ms_i64())
            .bind(kind)
            .bind(id)
            .bind(found)
            .execute(&mut **tx)
            .await?
            .rows_affected()
    };
    if affected != 1 {
        return Err(conflict(found + 1));
    }
    Ok(revision)
}

fn parse<T: DeserializeOwned>(what: &str, s: &str) -> Result<T> {
    serde_json::from_str(s).map_err(|source| StoreError::Corrupt { what: what.into(), source })
}

fn doc<T: DeserializeOwned>(kind: &str, id: String, r: &sqlx::any::AnyRow) -> Result<Doc<T>> {
    Ok(Doc {
        body: parse(kind, &r.try_get::<String, _>("body")?)?,
        revision: r.try_get("revision")?,
        updated_ms: r.try_get("updated_ms")?,
        id,
    })
}

fn token(r: &sqlx::any::AnyRow) -> Result<TokenRecord> {
    Ok(TokenRecord {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        role: r.try_get("role")?,
        created_ms: r.try_get("created_ms")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sqlite_round_trip_and_conflicts() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path().join("db/ferry.db").to_str().unwrap()).await.unwrap();
        conformance(&s).await;
        drop(s);
        // Reopening applies no migration twice.
        let s = Store::open(dir.path().join("db/ferry.db").to_str().unwrap()).await.unwrap();
        assert_eq!(s.schema_version().await.unwrap(), 1);
        assert_eq!(s.list::<serde_json::Value>("policy").await.unwrap().len(), 1);
    }

    /// Behaviour every backend must have (the PostgreSQL run is in the config server's tests).
    pub async fn conformance(s: &Store) {
        let r1 = s.put("policy", "p1", &serde_json::json!({"rpo": 15}), Some(0)).await.unwrap();
        assert_eq!(r1, 1);
        let err = s.put("policy", "p1", &serde_json::json!({"rpo": 16}), Some(0)).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
        assert_eq!(s.put("policy", "p1", &serde_json::json!({"rpo": 16}), Some(1)).await.unwrap(), 2);
        let d: Doc<serde_json::Value> = s.get("policy", "p1").await.unwrap().unwrap();
        assert_eq!(d.body["rpo"], 16);
        s.add_token("t1", "h1", "admin", "admin").await.unwrap();
        assert_eq!(s.token_by_hash("h1").await.unwrap().unwrap().role, "admin");
        s.put_job("j1", "queued", &serde_json::json!({"id": "j1"})).await.unwrap();
        s.put_job("j1", "succeeded", &serde_json::json!({"id": "j1", "x": 1})).await.unwrap();
        let jobs: Vec<serde_json::Value> = s.jobs(Some(&["succeeded"])).await.unwrap();
        assert_eq!(jobs.len(), 1);
        s.add_event(806, "critical", "ps1", "gone").await.unwrap();
        assert_eq!(s.events(10).await.unwrap()[0].code, 806);
        s.set_setting("k", "v1").await.unwrap();
        s.set_setting("k", "v2").await.unwrap();
        assert_eq!(s.setting("k").await.unwrap().as_deref(), Some("v2"));
    }
}
