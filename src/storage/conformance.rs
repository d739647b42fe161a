//! One suite of behaviours every backend must show, run against each.

use std::sync::Arc;

use super::backend::{Backend, Cf, Direction, KeyRange, RawBatch};
use super::tables::{self, DeviceKey, DeviceRecord, TokenHash};
use super::{Batch, MemoryBackend, RocksBackend, Storage, StorageError, SCHEMA_VERSION};

/// Runs every check against backends made by `make`, each check on a new one.
fn conformance(make: &dyn Fn() -> Arc<dyn Backend>) {
    get_put_delete(make().as_ref());
    batches_apply_whole(make().as_ref());
    scans_respect_range_direction_and_limit(make().as_ref());
    tables_are_separate(make().as_ref());
    schema_version_is_recorded_and_checked(make);
    typed_tables_round_trip(make);
    tiered_rows_and_checked_commits(make);
    concurrent_commits_and_rewrites(make);
}

fn put(backend: &dyn Backend, cf: Cf, key: &[u8], value: &[u8]) {
    let mut batch = RawBatch::default();
    batch.put(cf, key.to_vec(), value.to_vec());
    backend.write(batch).unwrap();
}

fn get_put_delete(backend: &dyn Backend) {
    assert_eq!(backend.get(Cf::Users, b"a").unwrap(), None);
    put(backend, Cf::Users, b"a", b"1");
    assert_eq!(backend.get(Cf::Users, b"a").unwrap(), Some(b"1".to_vec()));
    put(backend, Cf::Users, b"a", b"2");
    assert_eq!(backend.get(Cf::Users, b"a").unwrap(), Some(b"2".to_vec()));
    let mut batch = RawBatch::default();
    batch.delete(Cf::Users, b"a".to_vec());
    backend.write(batch).unwrap();
    assert_eq!(backend.get(Cf::Users, b"a").unwrap(), None);
}

fn batches_apply_whole(backend: &dyn Backend) {
    let mut batch = RawBatch::default();
    batch.put(Cf::Users, b"u".to_vec(), b"user".to_vec());
    batch.put(Cf::Devices, b"u\0D".to_vec(), b"device".to_vec());
    batch.put(Cf::AccessTokens, b"t".to_vec(), b"token".to_vec());
    batch.delete(Cf::Profiles, b"missing".to_vec());
    // Later operations on the same key win, as in one sequential pass.
    batch.put(Cf::Meta, b"k".to_vec(), b"first".to_vec());
    batch.put(Cf::Meta, b"k".to_vec(), b"second".to_vec());
    batch.delete(Cf::AccessTokens, b"t".to_vec());
    backend.write(batch).unwrap();
    assert_eq!(
        backend.get(Cf::Users, b"u").unwrap(),
        Some(b"user".to_vec())
    );
    assert_eq!(
        backend.get(Cf::Devices, b"u\0D").unwrap(),
        Some(b"device".to_vec())
    );
    assert_eq!(backend.get(Cf::AccessTokens, b"t").unwrap(), None);
    assert_eq!(
        backend.get(Cf::Meta, b"k").unwrap(),
        Some(b"second".to_vec())
    );
}

fn scans_respect_range_direction_and_limit(backend: &dyn Backend) {
    for key in ["a", "b\0x", "b\0y", "b\0z", "ba", "c"] {
        put(backend, Cf::Devices, key.as_bytes(), key.as_bytes());
    }
    let keys = |entries: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<String> {
        entries
            .into_iter()
            .map(|(k, _)| String::from_utf8(k).unwrap())
            .collect()
    };
    let prefix = KeyRange::prefix(b"b\0");
    let forward = backend.scan(Cf::Devices, &prefix, Direction::Forward, 10);
    assert_eq!(keys(forward.unwrap()), ["b\0x", "b\0y", "b\0z"]);
    let backward = backend.scan(Cf::Devices, &prefix, Direction::Backward, 10);
    assert_eq!(keys(backward.unwrap()), ["b\0z", "b\0y", "b\0x"]);
    let limited = backend.scan(Cf::Devices, &prefix, Direction::Backward, 2);
    assert_eq!(keys(limited.unwrap()), ["b\0z", "b\0y"]);
    let open_ended = KeyRange {
        lower: b"ba".to_vec(),
        upper: None,
    };
    let tail = backend.scan(Cf::Devices, &open_ended, Direction::Forward, 10);
    assert_eq!(keys(tail.unwrap()), ["ba", "c"]);
    let tail_back = backend.scan(Cf::Devices, &open_ended, Direction::Backward, 10);
    assert_eq!(keys(tail_back.unwrap()), ["c", "ba"]);
    let everything = KeyRange::prefix(b"");
    let all = backend.scan(Cf::Devices, &everything, Direction::Forward, 100);
    assert_eq!(all.unwrap().len(), 6);
    let none = backend.scan(
        Cf::Devices,
        &KeyRange::prefix(b"zz"),
        Direction::Forward,
        10,
    );
    assert!(none.unwrap().is_empty());
}

fn tables_are_separate(backend: &dyn Backend) {
    put(backend, Cf::Users, b"same", b"users");
    put(backend, Cf::Profiles, b"same", b"profiles");
    assert_eq!(
        backend.get(Cf::Users, b"same").unwrap(),
        Some(b"users".to_vec())
    );
    assert_eq!(
        backend.get(Cf::Profiles, b"same").unwrap(),
        Some(b"profiles".to_vec())
    );
    let users = backend.scan(Cf::Users, &KeyRange::prefix(b""), Direction::Forward, 10);
    assert_eq!(users.unwrap().len(), 1);
}

fn schema_version_is_recorded_and_checked(make: &dyn Fn() -> Arc<dyn Backend>) {
    let backend = make();
    let storage = Storage::with_backend(backend.clone()).unwrap();
    assert_eq!(storage.schema_version().unwrap(), Some(SCHEMA_VERSION));

    // A database from a newer build is refused, and left as it was.
    let newer = SCHEMA_VERSION + 1;
    put(
        backend.as_ref(),
        Cf::Meta,
        b"schema_version",
        newer.to_string().as_bytes(),
    );
    match Storage::with_backend(backend.clone()) {
        Err(StorageError::TooNew { found, supported }) => {
            assert_eq!((found, supported), (newer, SCHEMA_VERSION));
        }
        other => panic!("expected TooNew, got {:?}", other.map(|_| ())),
    }
    assert_eq!(
        backend.get(Cf::Meta, b"schema_version").unwrap(),
        Some(newer.to_string().into_bytes())
    );
}

fn typed_tables_round_trip(make: &dyn Fn() -> Arc<dyn Backend>) {
    let storage = Storage::with_backend(make()).unwrap();
    let device = DeviceRecord {
        display_name: Some("phone".to_owned()),
        created_ts: 7,
        last_seen_ts: None,
        last_seen_ip: None,
        access_token: TokenHash([1; 32]),
        refresh_token: None,
    };
    let mut batch = Batch::new();
    batch.put(tables::DEVICES, &DeviceKey::new("bob", "B1"), &device);
    batch.put(tables::DEVICES, &DeviceKey::new("bob", "B2"), &device);
    batch.put(tables::DEVICES, &DeviceKey::new("bobby", "C1"), &device);
    storage.write_blocking(batch).unwrap();
    let bobs = storage
        .scan_prefix(tables::DEVICES, &DeviceKey::user_prefix("bob"), 10)
        .unwrap();
    let ids: Vec<_> = bobs.iter().map(|(k, _)| k.device_id.as_str()).collect();
    assert_eq!(ids, ["B1", "B2"]);
    assert_eq!(bobs[0].1, device);

    // A value that does not decode is reported as corruption, not a panic.
    put(storage.backend.as_ref(), Cf::Devices, b"bob\0BAD", b"{");
    let error = storage
        .get(tables::DEVICES, &DeviceKey::new("bob", "BAD"))
        .unwrap_err();
    assert!(matches!(
        error,
        StorageError::Corrupt {
            table: "devices",
            ..
        }
    ));
}

/// A tiered row is read from either tier; a checked batch commits only if
/// what it read is unchanged; a rewrite brings a row back hot.
fn tiered_rows_and_checked_commits(make: &dyn Fn() -> Arc<dyn Backend>) {
    let storage = Storage::with_backend(make()).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let key = "$event".to_owned();
    let record = stored_pdu;
    let mut batch = Batch::new();
    batch.put(tables::PDUS, &key, &record("{}"));
    storage.write_blocking(batch).unwrap();

    // A move whose read is stale writes nothing.
    let move_from = |read: tables::StoredPdu| {
        let mut batch = Batch::new();
        batch.expect(tables::PDUS, &key, read.clone());
        batch.put(tables::ARCHIVED_PDUS, &key, &read);
        batch.delete(tables::PDUS, &key);
        batch
    };
    let stale = move_from(record("{\"old\":1}"));
    assert!(!runtime.block_on(storage.commit_checked(stale)).unwrap());
    assert_eq!(storage.get(tables::ARCHIVED_PDUS, &key).unwrap(), None);
    assert_eq!(storage.get(tables::PDUS, &key).unwrap(), Some(record("{}")));

    // A move of what is there commits; reads find the row archived.
    assert!(runtime
        .block_on(storage.commit_checked(move_from(record("{}"))))
        .unwrap());
    assert_eq!(storage.get(tables::PDUS, &key).unwrap(), None);
    assert_eq!(
        storage.get_tiered(tables::PDU_TIERS, &key).unwrap(),
        Some(record("{}"))
    );

    // A rewrite brings it back hot, in one tier only.
    let mut batch = Batch::new();
    batch.put_hot(tables::PDU_TIERS, &key, &record("{\"new\":1}"));
    storage.write_blocking(batch).unwrap();
    assert_eq!(storage.get(tables::ARCHIVED_PDUS, &key).unwrap(), None);
    assert_eq!(
        storage.get_tiered(tables::PDU_TIERS, &key).unwrap(),
        Some(record("{\"new\":1}"))
    );

    // Scans of a tiered table merge both tiers in key order.
    let relation = |id: &str| tables::Relation {
        event_id: id.to_owned(),
        rel_type: "m.annotation".to_owned(),
        event_type: "m.reaction".to_owned(),
        sender: "@a:x".to_owned(),
    };
    let mut batch = Batch::new();
    batch.put(tables::RELATIONS, &("$p".to_owned(), 1), &relation("$1"));
    batch.put(
        tables::ARCHIVED_RELATIONS,
        &("$p".to_owned(), 2),
        &relation("$2"),
    );
    batch.put(tables::RELATIONS, &("$p".to_owned(), 3), &relation("$3"));
    batch.put(
        tables::RELATIONS,
        &("$q".to_owned(), 1),
        &relation("$other"),
    );
    storage.write_blocking(batch).unwrap();
    let rows = storage
        .scan_prefix_tiered(tables::RELATION_TIERS, &tables::str_prefix("$p"), 10)
        .unwrap();
    let ids: Vec<&str> = rows.iter().map(|(_, r)| r.event_id.as_str()).collect();
    assert_eq!(ids, ["$1", "$2", "$3"]);
    let rows = storage
        .scan_prefix_tiered(tables::RELATION_TIERS, &tables::str_prefix("$p"), 2)
        .unwrap();
    assert_eq!(rows.len(), 2);
}

/// Commits made at once all land, each with its own outcome: a checked
/// batch whose read is stale writes nothing while the others beside it
/// commit. Only commits that may change rows written before advance the
/// rewrite generation, by two each.
fn concurrent_commits_and_rewrites(make: &dyn Fn() -> Arc<dyn Backend>) {
    let storage = Storage::with_backend(make()).unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .build()
        .unwrap();
    let generation = storage.rewrites();
    assert_eq!(generation % 2, 0);

    let outcomes = runtime.block_on(async {
        let mut tasks = Vec::new();
        for n in 0..64u32 {
            let storage = storage.clone();
            tasks.push(tokio::spawn(async move {
                let mut batch = Batch::new();
                batch.put(tables::META, &format!("row {n}"), &n);
                let flag = batch.committed_flag();
                if n == 17 {
                    // Expects a row that is not there.
                    batch.expect(tables::META, &"missing".to_owned(), 0u32);
                }
                let committed = storage.commit_checked(batch).await.unwrap();
                (
                    n,
                    committed,
                    flag.load(std::sync::atomic::Ordering::Acquire),
                )
            }));
        }
        let mut outcomes = Vec::new();
        for task in tasks {
            outcomes.push(task.await.unwrap());
        }
        outcomes
    });
    for (n, committed, flagged) in outcomes {
        let stored = storage.get(tables::META, &format!("row {n}")).unwrap();
        if n == 17 {
            assert!(!committed && !flagged);
            assert_eq!(stored, None::<u32>);
        } else {
            assert!(committed && flagged, "row {n}");
            assert_eq!(stored, Some(n));
        }
    }
    // The one checked batch was a rewrite; the 63 plain ones were not.
    assert_eq!(storage.rewrites(), generation + 2);

    let mut plain = Batch::new();
    plain.put(tables::META, &"plain".to_owned(), &1u32);
    runtime.block_on(storage.commit(plain)).unwrap();
    assert_eq!(storage.rewrites(), generation + 2);

    let mut hot = Batch::new();
    hot.put_hot(tables::PDU_TIERS, &"$e".to_owned(), &stored_pdu("{}"));
    runtime.block_on(storage.commit(hot)).unwrap();
    assert_eq!(storage.rewrites(), generation + 4);

    let mut marked = Batch::new();
    marked.put(tables::PDUS, &"$e".to_owned(), &stored_pdu("{\"a\":1}"));
    marked.mark_rewrite();
    storage.write_blocking(marked).unwrap();
    assert_eq!(storage.rewrites(), generation + 6);
}

fn stored_pdu(json: &str) -> tables::StoredPdu {
    tables::StoredPdu {
        room_id: "!room:x".to_owned(),
        json: json.to_owned(),
        stream: 1,
        state_group: 0,
        txn_id: None,
        sender_device: None,
        redacted_because: None,
        replaces_state: None,
        outlier: false,
        soft_failed: false,
    }
}

#[test]
fn memory_backend_conforms() {
    conformance(&|| Arc::new(MemoryBackend::new()));
}

#[test]
fn rocksdb_backend_conforms() {
    let root = tempfile::tempdir().unwrap();
    let counter = std::cell::Cell::new(0);
    conformance(&|| {
        counter.set(counter.get() + 1);
        let path = root.path().join(counter.get().to_string());
        Arc::new(RocksBackend::open(&path, true).unwrap())
    });
}

#[test]
fn rocksdb_keeps_data_across_reopen_and_locks_against_a_second_opener() {
    let root = tempfile::tempdir().unwrap();
    {
        let storage = Storage::open(root.path(), true).unwrap();
        let mut batch = Batch::new();
        batch.put(tables::META, &"answer".to_owned(), &42);
        storage.write_blocking(batch).unwrap();
        let second = Storage::open(root.path(), true);
        assert!(matches!(second, Err(StorageError::InUse(_))));
    }
    let storage = Storage::open(root.path(), true).unwrap();
    assert_eq!(
        storage.get(tables::META, &"answer".to_owned()).unwrap(),
        Some(42)
    );
    assert_eq!(storage.schema_version().unwrap(), Some(SCHEMA_VERSION));

    // A commit through the committer thread, then the store dropped: it
    // can be opened again at once (the committer does not keep it open).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut batch = Batch::new();
    batch.put(tables::META, &"again".to_owned(), &7);
    runtime.block_on(storage.commit(batch)).unwrap();
    drop(storage);
    let storage = Storage::open(root.path(), true).unwrap();
    assert_eq!(
        storage.get(tables::META, &"again".to_owned()).unwrap(),
        Some(7)
    );
}

#[test]
fn rocksdb_refuses_a_database_from_a_newer_build_with_unknown_tables() {
    let root = tempfile::tempdir().unwrap();
    {
        // Simulate a newer build: an extra column family and a higher version.
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        options.create_missing_column_families(true);
        let db = rocksdb::DB::open_cf(&options, root.path(), ["meta", "from_the_future"]).unwrap();
        let meta = db.cf_handle("meta").unwrap();
        db.put_cf(meta, b"schema_version", b"99").unwrap();
    }
    let error = Storage::open(root.path(), true).err().expect("must refuse");
    assert!(matches!(error, StorageError::TooNew { found: 99, .. }));
    assert!(error.to_string().contains("newer Myelin"), "{error}");
}
