//! Measures durable (fsync'd) commits per second, one writer at a time and
//! with many concurrent writers, to show that concurrent commits share the
//! write-ahead log's fsync (group commit).
//!
//! `cargo run --release --example group_commit [-- DIR]`

use std::time::Instant;

use myelin::storage::{tables, Batch, Storage};

const COMMITS: usize = 2000;
const WRITERS: usize = 64;

#[tokio::main]
async fn main() {
    let dir = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => std::env::temp_dir().join(format!("myelin-group-commit-{}", std::process::id())),
    };
    let storage = Storage::open(&dir, true).expect("database opens");

    let started = Instant::now();
    for i in 0..COMMITS / 10 {
        storage.commit(batch("seq", i)).await.expect("commit");
    }
    let sequential = (COMMITS / 10) as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let tasks: Vec<_> = (0..WRITERS)
        .map(|writer| {
            let storage = storage.clone();
            tokio::spawn(async move {
                for i in (writer..COMMITS).step_by(WRITERS) {
                    storage.commit(batch("par", i)).await.expect("commit");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer finishes");
    }
    let concurrent = COMMITS as f64 / started.elapsed().as_secs_f64();

    println!("sequential durable commits: {sequential:.0}/s");
    println!("{WRITERS} concurrent writers:    {concurrent:.0}/s");
    println!("ratio: {:.1}x", concurrent / sequential);
    drop(storage);
    let _ = std::fs::remove_dir_all(&dir);
}

fn batch(prefix: &str, i: usize) -> Batch {
    let mut batch = Batch::new();
    batch.put(tables::META, &format!("{prefix}{i}"), &(i as u32));
    batch
}
