//! Objects of the dev API: in memory, written through to an embedded database (redb) under
//! the data dir so a restart keeps them, with one resourceVersion counter and a bounded
//! event log that watches replay from.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde_json::Value;
use tokio::sync::broadcast;

const OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("objects");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Events kept for watches to resume from by default; older resourceVersions get 410 Gone.
pub const LOG: usize = 20_000;

/// What happened to an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Created.
    Added,
    /// Updated.
    Modified,
    /// Removed.
    Deleted,
}

impl Change {
    /// Watch event type.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Change::Added => "ADDED",
            Change::Modified => "MODIFIED",
            Change::Deleted => "DELETED",
        }
    }
}

/// One logged change.
#[derive(Clone, Debug)]
pub struct Event {
    /// resourceVersion of the change.
    pub rv: u64,
    /// Resource key (`group/version/plural`).
    pub resource: String,
    /// Kind of change.
    pub change: Change,
    /// The object after (or, for deletes, at) the change.
    pub object: Value,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The database.
    #[error("dev API store: {0}")]
    Db(String),
}

fn db_err<E: std::fmt::Display>(e: E) -> Error {
    Error::Db(e.to_string())
}

type Objects = BTreeMap<(String, String, String), Value>;

/// The store.
pub struct Store {
    db: Database,
    objects: Objects,
    rv: u64,
    log: VecDeque<Event>,
    log_capacity: usize,
    tx: broadcast::Sender<Event>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("rv", &self.rv)
            .finish_non_exhaustive()
    }
}

fn db_key(resource: &str, namespace: &str, name: &str) -> String {
    format!("{resource}|{namespace}|{name}")
}

/// Opens the database, waiting briefly for a lock that is being released.
///
/// redb holds an `flock` on the file. A process forked by this one (the tests run kubectl
/// and ClickHouse next to the endpoint) shares the locked file description until it execs,
/// so a restart in the same process can find the lock still held for a few milliseconds
/// after the previous store closed. Another process that really has the file open keeps it,
/// and the error stands after the wait.
fn open_database(path: &Path) -> Result<Database, Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        match Database::create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen)
                if std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other.map_err(db_err),
        }
    }
}

impl Store {
    /// Opens (creating) the database at `path` and loads every object.
    ///
    /// # Errors
    /// Database errors.
    pub fn open(path: &Path, log_capacity: usize) -> Result<Self, Error> {
        let db = open_database(path)?;
        let mut objects = BTreeMap::new();
        let mut rv = 0;
        {
            let w = db.begin_write().map_err(db_err)?;
            w.open_table(OBJECTS).map_err(db_err)?;
            w.open_table(META).map_err(db_err)?;
            w.commit().map_err(db_err)?;
        }
        let r = db.begin_read().map_err(db_err)?;
        let table = r.open_table(OBJECTS).map_err(db_err)?;
        for entry in table.iter().map_err(db_err)? {
            let (k, v) = entry.map_err(db_err)?;
            let mut parts = k.value().splitn(3, '|');
            let (Some(res), Some(ns), Some(name)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Ok(obj) = serde_json::from_slice(v.value()) {
                objects.insert((res.to_owned(), ns.to_owned(), name.to_owned()), obj);
            }
        }
        if let Some(v) = r
            .open_table(META)
            .map_err(db_err)?
            .get("rv")
            .map_err(db_err)?
        {
            rv = v.value();
        }
        drop(table);
        drop(r);
        let (tx, _) = broadcast::channel(4096);
        Ok(Store {
            db,
            objects,
            rv,
            log: VecDeque::new(),
            log_capacity,
            tx,
        })
    }

    /// The current resourceVersion.
    #[must_use]
    pub fn rv(&self) -> u64 {
        self.rv
    }

    /// Oldest resourceVersion a watch may resume from.
    #[must_use]
    pub fn oldest_resumable(&self) -> u64 {
        self.log.front().map_or(self.rv, |e| e.rv.saturating_sub(1))
    }

    /// One object.
    #[must_use]
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<&Value> {
        self.objects
            .get(&(resource.to_owned(), namespace.to_owned(), name.to_owned()))
    }

    /// Objects of a resource, in one namespace or all (`None`).
    pub fn list<'a>(
        &'a self,
        resource: &'a str,
        namespace: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Value> + 'a {
        self.objects
            .iter()
            .filter(move |((r, ns, _), _)| r == resource && namespace.is_none_or(|n| n == ns))
            .map(|(_, v)| v)
    }

    /// Subscribes to changes after now.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }

    /// Logged events after `rv` for `resource`.
    pub fn since<'a>(&'a self, resource: &'a str, rv: u64) -> impl Iterator<Item = &'a Event> + 'a {
        self.log
            .iter()
            .filter(move |e| e.rv > rv && e.resource == resource)
    }

    /// Writes (or, with `change == Deleted`, removes) an object, stamping a new
    /// resourceVersion; durable before it returns.
    ///
    /// # Errors
    /// Database errors; the object is then unchanged.
    pub fn write(
        &mut self,
        resource: &str,
        namespace: &str,
        name: &str,
        mut object: Value,
        change: Change,
    ) -> Result<Value, Error> {
        let rv = self.rv + 1;
        object["metadata"]["resourceVersion"] = Value::String(rv.to_string());
        let key = db_key(resource, namespace, name);
        let w = self.db.begin_write().map_err(db_err)?;
        {
            let mut table = w.open_table(OBJECTS).map_err(db_err)?;
            if change == Change::Deleted {
                table.remove(key.as_str()).map_err(db_err)?;
            } else {
                let bytes = serde_json::to_vec(&object).map_err(db_err)?;
                table
                    .insert(key.as_str(), bytes.as_slice())
                    .map_err(db_err)?;
            }
            w.open_table(META)
                .map_err(db_err)?
                .insert("rv", rv)
                .map_err(db_err)?;
        }
        w.commit().map_err(db_err)?;
        self.rv = rv;
        let k = (resource.to_owned(), namespace.to_owned(), name.to_owned());
        if change == Change::Deleted {
            self.objects.remove(&k);
        } else {
            self.objects.insert(k, object.clone());
        }
        let event = Event {
            rv,
            resource: resource.to_owned(),
            change,
            object: object.clone(),
        };
        self.log.push_back(event.clone());
        while self.log.len() > self.log_capacity {
            self.log.pop_front();
        }
        let _ = self.tx.send(event);
        Ok(object)
    }
}
