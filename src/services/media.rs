//! Uploaded media: files under the data directory, named by the SHA-256
//! of their content (so a file uploaded twice is stored once), and a
//! record per media ID in the `media` table.
//!
//! A file is written to a temporary name, synced, renamed into place and
//! its directory synced before its record is committed, so a crash never
//! leaves a record naming a missing or partial file. A crash can leave an
//! unreferenced file or temporary file, which costs space, never data.
//! Thumbnails are stored the same way, in the `media_thumbnails` table,
//! made once per original content and size.
//! The only writer of the media directory and the media tables.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::Rng;
use sha2::{Digest, Sha256};

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::thumbnail::{self, Method, Refusal};
use crate::config::MediaConfig;
use crate::storage::tables::{self, MediaRecord, ThumbnailRecord};
use crate::storage::{Batch, Storage};

pub struct Media {
    storage: Storage,
    dir: PathBuf,
    server_name: String,
    config: MediaConfig,
    clock: Arc<dyn Clock>,
    locks: StripedLocks,
    /// Held by content hash from a file's placement until its record is
    /// committed, and by a deletion while it decides whether the file goes,
    /// so that a deletion never removes a file a new record names.
    content_locks: StripedLocks,
    /// Thumbnails being made at once: each decodes a whole image.
    thumbnailers: tokio::sync::Semaphore,
}

/// A file being received: written and hashed as it arrives.
pub struct Incoming {
    file: std::fs::File,
    path: PathBuf,
    hasher: Sha256,
    size: u64,
    limit: u64,
}

/// What an upload says of its content.
#[derive(Clone, Debug, Default)]
pub struct Description {
    pub content_type: Option<String>,
    pub filename: Option<String>,
}

impl Incoming {
    /// Appends a chunk; `TooLarge` past the configured limit.
    pub fn write(&mut self, chunk: &[u8]) -> Result<()> {
        self.size += chunk.len() as u64;
        if self.size > self.limit {
            return Err(Error::TooLarge(format!(
                "media may be at most {} bytes",
                self.limit
            )));
        }
        self.hasher.update(chunk);
        self.file.write_all(chunk).map_err(io_error)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        // Renamed away when stored; otherwise an abandoned upload.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Media {
    pub fn new(
        storage: Storage,
        data_dir: &Path,
        server_name: String,
        config: MediaConfig,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Media {
            storage,
            dir: media_dir(data_dir),
            server_name,
            config,
            clock,
            locks: StripedLocks::new(64),
            content_locks: StripedLocks::new(64),
            thumbnailers: tokio::sync::Semaphore::new(2),
        }
    }

    pub fn max_upload_bytes(&self) -> u64 {
        self.config.max_upload_bytes
    }

    pub fn legacy_downloads(&self) -> bool {
        self.config.legacy_unauthenticated_downloads
    }

    /// Starts receiving a file into a temporary name.
    pub fn incoming(&self) -> Result<Incoming> {
        self.incoming_up_to(self.config.max_upload_bytes)
    }

    fn incoming_up_to(&self, limit: u64) -> Result<Incoming> {
        let tmp = self.dir.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(io_error)?;
        let name: u64 = rand::thread_rng().gen();
        let path = tmp.join(format!("{name:016x}"));
        let file = std::fs::File::create(&path).map_err(io_error)?;
        Ok(Incoming {
            file,
            path,
            hasher: Sha256::new(),
            size: 0,
            limit,
        })
    }

    /// `POST /_matrix/media/v1/create`: a media ID that waits for its
    /// content; answers it and when it stops waiting.
    pub async fn create_pending(&self, uploader: &str) -> Result<(String, u64)> {
        let media_id = new_media_id();
        let now = self.clock.now_ms();
        let until = now + self.config.pending_upload_expiry_ms;
        let record = MediaRecord {
            uploader: uploader.to_owned(),
            created_ts: now,
            content_hash: None,
            content_type: None,
            filename: None,
            size: 0,
            pending_until: Some(until),
            quarantined_by: None,
        };
        let mut batch = Batch::new();
        batch.put(
            tables::MEDIA,
            &(self.server_name.clone(), media_id.clone()),
            &record,
        );
        self.storage.commit(batch).await?;
        Ok((media_id, until))
    }

    /// Stores a received file under a new media ID, or under a pending one
    /// the uploader reserved; answers the media ID.
    pub async fn store(
        &self,
        uploader: &str,
        pending: Option<&str>,
        incoming: Incoming,
        description: Description,
    ) -> Result<String> {
        // Under the media ID's lock, so that of two uploads to one pending
        // ID the second finds it filled.
        let _guard = match pending {
            Some(media_id) => Some(self.locks.lock(media_id).await),
            None => None,
        };
        let media_id = match pending {
            Some(media_id) => {
                self.check_pending(uploader, media_id)?;
                media_id.to_owned()
            }
            None => new_media_id(),
        };
        let size = incoming.size;
        let (hash, _content) = self.put_in_place(incoming).await?;
        let record = MediaRecord {
            uploader: uploader.to_owned(),
            created_ts: self.clock.now_ms(),
            content_hash: Some(hash),
            content_type: description.content_type,
            filename: description.filename,
            size,
            pending_until: None,
            quarantined_by: None,
        };
        let mut batch = Batch::new();
        batch.put(
            tables::MEDIA,
            &(self.server_name.clone(), media_id.clone()),
            &record,
        );
        self.storage.commit(batch).await?;
        Ok(media_id)
    }

    fn check_pending(&self, uploader: &str, media_id: &str) -> Result<()> {
        let key = (self.server_name.clone(), media_id.to_owned());
        let record = self
            .storage
            .get(tables::MEDIA, &key)?
            .ok_or_else(|| Error::NotFound("unknown media ID".to_owned()))?;
        if record.uploader != uploader {
            return Err(Error::Forbidden(
                "this media ID was created by another user".to_owned(),
            ));
        }
        match record.pending_until {
            None => Err(Error::CannotOverwriteMedia(
                "this media already has content".to_owned(),
            )),
            Some(until) if until < self.clock.now_ms() => {
                Err(Error::NotFound("this media ID expired".to_owned()))
            }
            Some(_) => Ok(()),
        }
    }

    /// Stores bytes at hand (at most `limit`) as a file named by their
    /// hash: the hash, the size, and the content's lock, to hold until the
    /// record naming the file is committed.
    async fn keep(
        &self,
        bytes: &[u8],
        limit: u64,
    ) -> Result<(String, u64, tokio::sync::MutexGuard<'_, ()>)> {
        let mut incoming = self.incoming_up_to(limit)?;
        incoming.write(bytes)?;
        let size = incoming.size;
        let (hash, content) = self.put_in_place(incoming).await?;
        Ok((hash, size, content))
    }

    /// Syncs the temporary file, renames it to its content hash (keeping an
    /// identical file already there) and syncs the directory. Answers the
    /// hash and the content's lock (see `content_locks`).
    async fn put_in_place(
        &self,
        incoming: Incoming,
    ) -> Result<(String, tokio::sync::MutexGuard<'_, ()>)> {
        let hash = crate::storage::tables::to_hex(&incoming.hasher.clone().finalize());
        let content = self.content_locks.lock(&hash).await;
        let final_dir = self.dir.join(&hash[..2]);
        let final_path = final_dir.join(&hash);
        let temp_path = incoming.path.clone();
        let file = incoming.file.try_clone().map_err(io_error)?;
        tokio::task::spawn_blocking(move || -> std::io::Result<()> {
            file.sync_all()?;
            if !final_dir.exists() {
                std::fs::create_dir_all(&final_dir)?;
                // The new directory's own entry must be durable too.
                if let Some(parent) = final_dir.parent() {
                    std::fs::File::open(parent)?.sync_all()?;
                }
            }
            if !final_path.exists() {
                std::fs::rename(&temp_path, &final_path)?;
            }
            // Synced even when the file was there: another upload of the
            // same content may not have synced its rename yet.
            std::fs::File::open(&final_dir)?.sync_all()?;
            Ok(())
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
        .map_err(io_error)?;
        // Dropping `incoming` removes the temporary file if it is still
        // there (the content was already stored).
        drop(incoming);
        Ok((hash, content))
    }

    /// A stored file's record and path; `None` for an unknown or pending
    /// media ID.
    pub fn open(&self, server: &str, media_id: &str) -> Result<Option<(MediaRecord, PathBuf)>> {
        let key = (server.to_owned(), media_id.to_owned());
        let Some(record) = self.storage.get(tables::MEDIA, &key)? else {
            return Ok(None);
        };
        let Some(hash) = &record.content_hash else {
            return Ok(None);
        };
        if record.quarantined_by.is_some() {
            return Err(Error::NotFound("This media is quarantined".to_owned()));
        }
        let path = content_file(&self.dir, hash)
            .ok_or_else(|| Error::Internal(format!("media {media_id} has a bad hash")))?;
        Ok(Some((record, path)))
    }

    /// The thumbnail of a stored image that answers a request for
    /// `width`×`height` by `method`: made the first time, then read from
    /// storage. `NotFound` for unknown media and for content that is not a
    /// PNG, JPEG, GIF or WebP image (a video, say); `TooLarge` for an image
    /// with more pixels than `max_image_pixels`.
    pub async fn thumbnail(
        &self,
        server: &str,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
    ) -> Result<(ThumbnailRecord, PathBuf)> {
        let (record, original) = self
            .open(server, media_id)?
            .ok_or_else(|| Error::NotFound("Media not found".to_owned()))?;
        let hash = record.content_hash.expect("open answers stored media only");
        let size = thumbnail::choose(width, height, method);
        let label = format!("{}x{}-{}", size.width, size.height, size.method.as_str());
        let key = (hash.clone(), label);
        if let Some(stored) = self.storage.get(tables::MEDIA_THUMBNAILS, &key)? {
            let path = self.path_of(&stored.content_hash);
            return Ok((stored, path));
        }
        // One request makes it; others for the same thumbnail wait, then
        // find it stored.
        let _guard = self.locks.lock(&format!("{}/{}", key.0, key.1)).await;
        if let Some(stored) = self.storage.get(tables::MEDIA_THUMBNAILS, &key)? {
            let path = self.path_of(&stored.content_hash);
            return Ok((stored, path));
        }
        let _permit = self
            .thumbnailers
            .acquire()
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let max_pixels = self.config.max_image_pixels;
        let made = tokio::task::spawn_blocking(move || {
            let bytes = std::fs::read(&original).map_err(io_error)?;
            Ok::<_, Error>(thumbnail::make(&bytes, size, max_pixels))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))??;
        let made = made.map_err(|refusal| match refusal {
            Refusal::NotAnImage(why) => Error::NotFound(format!("No thumbnail: {why}")),
            Refusal::TooManyPixels {
                width,
                height,
                limit,
            } => Error::TooLarge(format!(
                "The image is {width}x{height} pixels; thumbnails are made of images \
                 of at most {limit} pixels"
            )),
        })?;
        let (content_hash, size, _content) = self.keep(&made.bytes, u64::MAX).await?;
        let stored = ThumbnailRecord {
            content_hash,
            content_type: made.content_type.to_owned(),
            size,
            width: made.width,
            height: made.height,
        };
        let mut batch = Batch::new();
        batch.put(tables::MEDIA_THUMBNAILS, &key, &stored);
        self.storage.commit(batch).await?;
        let path = self.path_of(&stored.content_hash);
        Ok((stored, path))
    }

    /// Serializes the fetching of one piece of another server's media.
    pub async fn lock(&self, key: &str) -> tokio::sync::MutexGuard<'_, ()> {
        self.locks.lock(key).await
    }

    /// Keeps a file fetched from the server it belongs to under its own
    /// name (`server`, `media_id`), as uploads are kept.
    pub async fn store_remote(
        &self,
        server: &str,
        media_id: &str,
        description: Description,
        bytes: &[u8],
    ) -> Result<(MediaRecord, PathBuf)> {
        let (hash, size, _content) = self.keep(bytes, self.config.max_upload_bytes).await?;
        let record = MediaRecord {
            uploader: String::new(),
            created_ts: self.clock.now_ms(),
            content_hash: Some(hash.clone()),
            content_type: description.content_type,
            filename: description.filename,
            size,
            pending_until: None,
            quarantined_by: None,
        };
        let mut batch = Batch::new();
        batch.put(
            tables::MEDIA,
            &(server.to_owned(), media_id.to_owned()),
            &record,
        );
        self.storage.commit(batch).await?;
        Ok((record, self.path_of(&hash)))
    }

    /// The key of a thumbnail of another server's media, fetched from it:
    /// (`mxc://server/media_id`, the size asked for).
    fn remote_thumbnail_key(
        server: &str,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
    ) -> (String, String) {
        (
            format!("mxc://{server}/{media_id}"),
            format!("{width}x{height}-{}", method.as_str()),
        )
    }

    /// A thumbnail of another server's media fetched before.
    pub fn remote_thumbnail(
        &self,
        server: &str,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
    ) -> Result<Option<(ThumbnailRecord, PathBuf)>> {
        let media = (server.to_owned(), media_id.to_owned());
        let quarantined = self
            .storage
            .get(tables::MEDIA, &media)?
            .is_some_and(|record| record.quarantined_by.is_some());
        if quarantined {
            return Err(Error::NotFound("This media is quarantined".to_owned()));
        }
        let key = Self::remote_thumbnail_key(server, media_id, width, height, method);
        Ok(self
            .storage
            .get(tables::MEDIA_THUMBNAILS, &key)?
            .map(|stored| {
                let path = self.path_of(&stored.content_hash);
                (stored, path)
            }))
    }

    /// Keeps a thumbnail fetched from the server of the media. Its size is
    /// recorded as asked for: the server chose the pixels.
    #[allow(clippy::too_many_arguments)]
    pub async fn store_remote_thumbnail(
        &self,
        server: &str,
        media_id: &str,
        width: u32,
        height: u32,
        method: Method,
        content_type: String,
        bytes: &[u8],
    ) -> Result<(ThumbnailRecord, PathBuf)> {
        let (content_hash, size, _content) = self.keep(bytes, self.config.max_upload_bytes).await?;
        let stored = ThumbnailRecord {
            content_hash,
            content_type,
            size,
            width,
            height,
        };
        let key = Self::remote_thumbnail_key(server, media_id, width, height, method);
        let mut batch = Batch::new();
        batch.put(tables::MEDIA_THUMBNAILS, &key, &stored);
        self.storage.commit(batch).await?;
        let path = self.path_of(&stored.content_hash);
        Ok((stored, path))
    }

    /// The media a local user uploaded, as (media ID, record).
    pub fn of_uploader(&self, uploader: &str) -> Result<Vec<(String, MediaRecord)>> {
        let prefix = tables::str_prefix(&self.server_name);
        Ok(self
            .storage
            .scan_prefix(tables::MEDIA, &prefix, usize::MAX)?
            .into_iter()
            .filter(|(_, record)| record.uploader == uploader)
            .map(|((_, media_id), record)| (media_id, record))
            .collect())
    }

    /// Quarantines a media (`by` the admin) or lifts its quarantine
    /// (`None`); `false` for an unknown media.
    pub async fn set_quarantine(
        &self,
        server: &str,
        media_id: &str,
        by: Option<&str>,
    ) -> Result<bool> {
        let _guard = self.locks.lock(media_id).await;
        let key = (server.to_owned(), media_id.to_owned());
        let Some(mut record) = self.storage.get(tables::MEDIA, &key)? else {
            return Ok(false);
        };
        record.quarantined_by = by.map(str::to_owned);
        let mut batch = Batch::new();
        batch.put(tables::MEDIA, &key, &record);
        self.storage.commit(batch).await?;
        Ok(true)
    }

    /// Deletes a media's record; its file and thumbnails go too unless
    /// another record names the same content. `false` for an unknown
    /// media.
    pub async fn delete(&self, server: &str, media_id: &str) -> Result<bool> {
        let _guard = self.locks.lock(media_id).await;
        let key = (server.to_owned(), media_id.to_owned());
        let Some(record) = self.storage.get(tables::MEDIA, &key)? else {
            return Ok(false);
        };
        let mut batch = Batch::new();
        batch.delete(tables::MEDIA, &key);
        let Some(hash) = record.content_hash else {
            self.storage.commit(batch).await?;
            return Ok(true);
        };
        // No file is placed for this content, nor a record of it committed,
        // while this deletion decides.
        let _content = self.content_locks.lock(&hash).await;
        let media = self.storage.scan_prefix(tables::MEDIA, &[], usize::MAX)?;
        let thumbnails = self
            .storage
            .scan_prefix(tables::MEDIA_THUMBNAILS, &[], usize::MAX)?;
        let named_elsewhere = media
            .iter()
            .any(|(other, r)| other != &key && r.content_hash.as_ref() == Some(&hash))
            || thumbnails.iter().any(|(_, t)| t.content_hash == hash);
        let mut files = Vec::new();
        if !named_elsewhere {
            files.push(self.path_of(&hash));
            for (thumb_key, thumb) in thumbnails.iter().filter(|(k, _)| k.0 == hash) {
                batch.delete(tables::MEDIA_THUMBNAILS, thumb_key);
                let others = thumbnails
                    .iter()
                    .any(|(k, t)| k.0 != hash && t.content_hash == thumb.content_hash);
                let original = media
                    .iter()
                    .any(|(_, r)| r.content_hash.as_deref() == Some(thumb.content_hash.as_str()));
                if !others && !original {
                    files.push(self.path_of(&thumb.content_hash));
                }
            }
        }
        self.storage.commit(batch).await?;
        for file in files {
            if let Err(error) = std::fs::remove_file(&file) {
                tracing::warn!(%error, file = %file.display(), "could not delete a media file");
            }
        }
        Ok(true)
    }

    fn path_of(&self, hash: &str) -> PathBuf {
        self.dir.join(&hash[..2]).join(hash)
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }
}

fn new_media_id() -> String {
    crate::ids::new_secret("", &mut rand::thread_rng())[..24].to_owned()
}

fn io_error(error: std::io::Error) -> Error {
    Error::Internal(format!("media storage: {error}"))
}

/// Where the media files of a data directory are.
pub fn media_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("media")
}

/// The file of a content hash under the media directory
/// (`<first two hex digits>/<hash>`); `None` for a hash that is not hex.
pub fn content_file(media_dir: &Path, hash: &str) -> Option<PathBuf> {
    if hash.len() < 2 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    Some(media_dir.join(&hash[..2]).join(hash))
}
