//! Backups: a consistent copy of the database (a RocksDB checkpoint, taken
//! while the server runs) with the media files its records name, and the
//! restore that makes a data directory from one.
//!
//! A backup directory holds `db/` (the checkpoint), `media/` (the files,
//! laid out as under the data directory) and `backup.json` (what it is).
//! The search index is not in it: a server rebuilds the index from the
//! events at its first start.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::media::{content_file, media_dir};
use crate::storage::tables;
use crate::storage::{ArchiveFiles, Storage};

/// The manifest's file name in a backup directory.
const MANIFEST: &str = "backup.json";
/// The manifest's format, for a later build to tell.
const FORMAT: u32 = 1;

/// What a backup holds, as `backup.json` records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub server_name: String,
    pub created_ms: u64,
    pub media_files: usize,
    pub media_bytes: u64,
    /// Media records whose file was gone by the time it was copied (an
    /// admin deleted the media meanwhile).
    pub missing_media_files: usize,
}

/// Makes a backup of the running store into `dest`, which must not exist
/// or be empty. The checkpoint is consistent at one moment; the media
/// files its records name are then linked (or copied) beside it.
pub fn create(
    storage: &Storage,
    data_dir: &Path,
    server_name: &str,
    now_ms: u64,
    dest: &Path,
) -> Result<Manifest, String> {
    if dest.exists() {
        let empty = std::fs::read_dir(dest)
            .map_err(|e| format!("cannot read {}: {e}", dest.display()))?
            .next()
            .is_none();
        if !empty {
            return Err(format!("{} exists and is not empty", dest.display()));
        }
        std::fs::remove_dir(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    }
    if let Some(parent) = dest.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    std::fs::create_dir(dest).map_err(|e| format!("cannot create {}: {e}", dest.display()))?;
    let db = dest.join("db");
    storage.checkpoint(&db).map_err(|e| e.to_string())?;

    // The media the checkpoint's records name, read from the checkpoint
    // itself so that the two agree.
    let copy = Storage::open_read_only(&db, &ArchiveFiles::default()).map_err(|e| e.to_string())?;
    let mut hashes = std::collections::BTreeSet::new();
    for (_, record) in copy
        .scan_prefix(tables::MEDIA, &[], usize::MAX)
        .map_err(|e| e.to_string())?
    {
        hashes.extend(record.content_hash);
    }
    for (_, thumbnail) in copy
        .scan_prefix(tables::MEDIA_THUMBNAILS, &[], usize::MAX)
        .map_err(|e| e.to_string())?
    {
        hashes.insert(thumbnail.content_hash);
    }
    drop(copy);
    let mut manifest = Manifest {
        format: FORMAT,
        server_name: server_name.to_owned(),
        created_ms: now_ms,
        media_files: 0,
        media_bytes: 0,
        missing_media_files: 0,
    };
    let (media, copied_media) = (media_dir(data_dir), media_dir(dest));
    for hash in hashes {
        let bad = || format!("a media record names a bad file: {hash:?}");
        let source = content_file(&media, &hash).ok_or_else(bad)?;
        let Ok(metadata) = std::fs::metadata(&source) else {
            manifest.missing_media_files += 1;
            continue;
        };
        let target = content_file(&copied_media, &hash).ok_or_else(bad)?;
        link_or_copy(&source, &target)?;
        manifest.media_files += 1;
        manifest.media_bytes += metadata.len();
    }
    write_durably(
        &dest.join(MANIFEST),
        &serde_json::to_vec_pretty(&manifest).map_err(|e| e.to_string())?,
    )?;
    sync_tree(&copied_media)?;
    sync_dir(dest)?;
    Ok(manifest)
}

/// Makes the data directory `data_dir` (and the archive directory, when
/// the configuration has one) from the backup in `source`. The data
/// directory must not have a database yet, and the backup must be of a
/// server of the same name.
pub fn restore(
    source: &Path,
    data_dir: &Path,
    archive: &ArchiveFiles,
    server_name: &str,
) -> Result<Manifest, String> {
    let text = std::fs::read(source.join(MANIFEST))
        .map_err(|e| format!("{} is not a backup: {e}", source.display()))?;
    let manifest: Manifest =
        serde_json::from_slice(&text).map_err(|e| format!("{MANIFEST}: {e}"))?;
    if manifest.format != FORMAT {
        return Err(format!(
            "backup format {} is not known to this build",
            manifest.format
        ));
    }
    if manifest.server_name != server_name {
        return Err(format!(
            "the backup is of {}, the configuration's server_name is {server_name}",
            manifest.server_name
        ));
    }
    let db = data_dir.join("db");
    if db.exists() {
        return Err(format!("{} already has a database", data_dir.display()));
    }
    std::fs::create_dir_all(data_dir).map_err(|e| format!("{}: {e}", data_dir.display()))?;
    // Copied under a temporary name and renamed once whole, so that a
    // failed restore never leaves a database that looks complete.
    let partial = data_dir.join("db.restoring");
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    }
    copy_tree(&source.join("db"), &partial)?;
    let media = media_dir(source);
    if media.exists() {
        copy_tree(&media, &media_dir(data_dir))?;
    }
    // An index of another database would skip the restored events: the
    // next start makes it anew from them.
    let search = data_dir.join("search");
    if search.exists() {
        std::fs::remove_dir_all(&search).map_err(|e| format!("{}: {e}", search.display()))?;
    }
    sync_tree(&partial)?;
    if let Some(archive_dir) = &archive.path {
        // The checkpoint holds every table's files in one directory; the
        // archive tables' files go where the configuration keeps them.
        // Last, so that an earlier failure leaves nothing there.
        let files = Storage::open_read_only(&partial, &ArchiveFiles::default())
            .and_then(|copy| copy.table_files())
            .map_err(|e| e.to_string())?;
        std::fs::create_dir_all(archive_dir)
            .map_err(|e| format!("{}: {e}", archive_dir.display()))?;
        for (cf, name) in files {
            if !cf.is_archive() {
                continue;
            }
            let target = archive_dir.join(&name);
            if target.exists() {
                return Err(format!("{} is in the way", target.display()));
            }
            std::fs::rename(partial.join(&name), &target)
                .or_else(|_| {
                    std::fs::copy(partial.join(&name), &target)
                        .and_then(|_| std::fs::remove_file(partial.join(&name)))
                })
                .map_err(|e| format!("{}: {e}", target.display()))?;
        }
        sync_dir(archive_dir)?;
        sync_dir(&partial)?;
    }
    std::fs::rename(&partial, &db).map_err(|e| format!("{}: {e}", db.display()))?;
    sync_dir(data_dir)?;
    Ok(manifest)
}

/// A hard link where the file system allows one (media files never
/// change), a copy otherwise.
fn link_or_copy(source: &Path, target: &Path) -> Result<(), String> {
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    if std::fs::hard_link(source, target).is_ok() {
        return Ok(());
    }
    std::fs::copy(source, target).map_err(|e| format!("{}: {e}", target.display()))?;
    std::fs::File::open(target)
        .and_then(|file| file.sync_all())
        .map_err(|e| format!("{}: {e}", target.display()))
}

/// Copies a directory tree (files and directories only), each file synced.
fn copy_tree(source: &Path, target: &Path) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("{}: {e}", target.display()))?;
    let entries = std::fs::read_dir(source).map_err(|e| format!("{}: {e}", source.display()))?;
    for entry in entries {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        let to = target.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &to)?;
        } else {
            std::fs::copy(&path, &to).map_err(|e| format!("{}: {e}", to.display()))?;
            std::fs::File::open(&to)
                .and_then(|file| file.sync_all())
                .map_err(|e| format!("{}: {e}", to.display()))?;
        }
    }
    sync_dir(target)
}

/// Syncs every directory of a tree, so that the entries made are durable.
fn sync_tree(dir: &Path) -> Result<(), String> {
    if !dir.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        }
    }
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    std::fs::File::open(dir)
        .and_then(|file| file.sync_all())
        .map_err(|e| format!("{}: {e}", dir.display()))
}

fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), String> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("{}: {e}", path.display()))
}
