//! A service's series, numbered. Ingest interns each series a stream names once (per stream, thanks to the series
//! dictionary on the wire), so everything between a stream and a sealed second handles a `SeriesId`: hashing and
//! comparing a number, never strings, and no reference counts touched per series per second.
//!
//! A table is append-only and lives as long as anything holds it: the streams of its service and the service's
//! open and recent seconds. While it lives, an id means one series. It is bounded: past `capacity` series, new ones
//! are refused (the service's cardinality limit), and the refusal is the caller's to count.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use super::{PerService, SeriesKey};

/// A series' number within its service's table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SeriesId(u32);

impl SeriesId {
    /// Its place in the table (ids are numbered from 0 without gaps).
    pub(crate) fn index(self) -> usize {
        self.0 as usize
    }

    /// The id numbered `n` (tests that need ids without a table).
    #[cfg(test)]
    pub(crate) fn test(n: u32) -> Self {
        Self(n)
    }
}

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
struct Entries {
    ids: FastMap<SeriesKey, SeriesId>,
    /// The first id interned under each key hash, so that a series can be found by its spelling without building
    /// its key (two keys with one hash: the second is found only by its key).
    by_hash: FastMap<u64, SeriesId>,
    keys: Vec<SeriesKey>,
}

/// One service's series table.
#[derive(Debug)]
pub(crate) struct SeriesTable {
    entries: RwLock<Entries>,
    capacity: usize,
}

impl SeriesTable {
    /// An empty table that takes at most `capacity` series.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: RwLock::new(Entries::default()),
            capacity: capacity.min(u32::MAX as usize),
        }
    }

    /// The id of `key`, numbered now if it is new; `None` when the table is full. Keys come only from ingest's
    /// checks (`series_key`, under the process's fixed limits): [`SeriesTable::find`] hands out their ids without
    /// checking the spelling again.
    pub(crate) fn intern(&self, key: SeriesKey) -> Option<SeriesId> {
        if let Some(id) = self.read().ids.get(&key) {
            return Some(*id);
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = entries.ids.get(&key) {
            return Some(*id);
        }
        if entries.keys.len() >= self.capacity {
            return None;
        }
        let id = SeriesId(u32::try_from(entries.keys.len()).ok()?);
        entries.keys.push(key.clone());
        entries.by_hash.entry(key.hash).or_insert(id);
        entries.ids.insert(key, id);
        Some(id)
    }

    /// The id of the series named `metric` with `tags` (sorted, keys unique), if the table holds it: found without
    /// building its key, which allocates a string per name and tag (ten thousand streams each naming their
    /// hundred series at once, as after a restart, were a million keys built to be thrown away).
    pub(crate) fn find(&self, metric: &str, tags: &[(&str, &str)]) -> Option<SeriesId> {
        let hash = SeriesKey::hash_of(metric, tags);
        let entries = self.read();
        let id = *entries.by_hash.get(&hash)?;
        entries.keys[id.index()].spells(metric, tags).then_some(id)
    }

    /// How many series the table holds.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.read().keys.len()
    }

    /// The keys, for looking up many ids under one lock (hold it briefly: interning waits for it).
    pub(crate) fn keys(&self) -> Keys<'_> {
        Keys(self.read())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Entries> {
        self.entries.read().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A table's keys under its read lock.
pub(crate) struct Keys<'a>(std::sync::RwLockReadGuard<'a, Entries>);

impl Keys<'_> {
    /// The series `id` stands for. Ids come only from this table, which never shrinks.
    pub(crate) fn get(&self, id: SeriesId) -> &SeriesKey {
        &self.0.keys[id.0 as usize]
    }

    /// The series at place `index` (see [`SeriesId::index`]), if the table holds that many.
    pub(crate) fn at(&self, index: usize) -> Option<&SeriesKey> {
        self.0.keys.get(index)
    }
}

/// Every live service's table, by service name. Streams look theirs up once, at the hello; a table nobody holds
/// any more is gone, and the next stream of its service starts a new one.
#[derive(Debug)]
pub(crate) struct SeriesTables {
    tables: PerService<SeriesTable>,
    capacity: usize,
}

impl SeriesTables {
    /// Tables of at most `capacity` series each.
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            tables: PerService::default(),
            capacity,
        }
    }

    /// `service`'s table, started if nobody holds one.
    pub(crate) fn of(&self, service: &Arc<str>) -> Arc<SeriesTable> {
        self.tables.of(service, || SeriesTable::new(self.capacity))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> SeriesKey {
        SeriesKey::new(name.into(), Arc::from(Vec::new()))
    }

    #[test]
    fn the_same_series_gets_the_same_id_and_a_full_table_refuses_new_ones() {
        let table = SeriesTable::new(2);
        let a = table.intern(key("a")).expect("room");
        let b = table.intern(key("b")).expect("room");
        assert_ne!(a, b);
        assert_eq!(table.intern(key("a")), Some(a));
        assert_eq!(table.intern(key("c")), None);
        assert_eq!(table.len(), 2);
        assert_eq!(&*table.keys().get(b).metric, "b");
    }

    /// A series is found by its spelling exactly when it was interned: same name, same tags, same order.
    #[test]
    fn a_series_is_found_by_its_spelling_without_a_key() {
        let table = SeriesTable::new(10);
        let tagged = |metric: &str, tags: &[(&str, &str)]| {
            SeriesKey::new(
                metric.into(),
                tags.iter()
                    .map(|(k, v)| (Arc::from(*k), Arc::from(*v)))
                    .collect::<Vec<_>>()
                    .into(),
            )
        };
        let tags = [("route", "/a"), ("status", "2xx")];
        let key = tagged("requests", &tags);
        // Hashed alike borrowed and shared, however many tags.
        for n in [0, 1, 8, 9, 32] {
            let owned: Vec<(String, String)> = (0..n)
                .map(|i| (format!("k{i:02}"), format!("v{i}")))
                .collect();
            let borrowed: Vec<(&str, &str)> = owned
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            assert_eq!(
                SeriesKey::hash_of("m", &borrowed),
                tagged("m", &borrowed).hash,
                "{n} tags"
            );
        }
        assert_eq!(
            table.find("requests", &tags),
            None,
            "not before it is interned"
        );
        let id = table.intern(key).unwrap();
        let plain = table.intern(tagged("requests", &[])).unwrap();
        assert_eq!(table.find("requests", &tags), Some(id));
        assert_eq!(table.find("requests", &[]), Some(plain));
        assert_eq!(table.find("requests", &[("route", "/a")]), None);
        assert_eq!(
            table.find("requests", &[("route", "/a"), ("status", "5xx")]),
            None
        );
        assert_eq!(table.find("request", &tags), None);
        // A tag's key and value moved across the boundary between them spell another series.
        assert_eq!(
            table.find("requests", &[("route", "/a"), ("statu", "s2xx")]),
            None
        );
    }

    #[test]
    fn a_service_keeps_its_table_while_held_and_starts_anew_after() {
        let tables = SeriesTables::new(10);
        let service: Arc<str> = "svc".into();
        let first = tables.of(&service);
        first.intern(key("a"));
        assert!(Arc::ptr_eq(&first, &tables.of(&service)));
        drop(first);
        assert_eq!(tables.of(&service).len(), 0);
    }
}
