//! Other servers' media, fetched from the server of the `mxc://` URI when a
//! local client first asks for it, then kept like an upload: the
//! authenticated federation endpoints first
//! (`/_matrix/federation/v1/media/download` and `/thumbnail`, answered as
//! `multipart/mixed`), the older unauthenticated `/_matrix/media/v3` ones
//! when the server does not know those. Answers larger than
//! `media.max_upload_bytes` are refused.

use std::path::PathBuf;
use std::time::Duration;

use myelin_federation::media::{boundary_of, filename_of, parse, MediaPart};
use ruma::ServerName;

use super::client::{RawAnswer, SendError};
use super::inbound::urlencode;
use crate::services::error::{Error, Result};
use crate::services::media::Description;
use crate::services::thumbnail::Method;
use crate::services::Services;
use crate::storage::tables::{MediaRecord, ThumbnailRecord};

/// How long a client waits for another server's media by default, and at
/// most.
const DEFAULT_TIMEOUT_MS: u64 = 20_000;
const MAX_TIMEOUT_MS: u64 = 120_000;

/// What was fetched: the content and how the server described it.
struct Fetched {
    content_type: Option<String>,
    content_disposition: Option<String>,
    body: Vec<u8>,
}

/// `server`'s media `media_id`: kept from before, or fetched now.
pub async fn download(
    services: &Services,
    server: &ServerName,
    media_id: &str,
    timeout_ms: Option<u64>,
) -> Result<(MediaRecord, PathBuf)> {
    if let Some(found) = services.media.open(server.as_str(), media_id)? {
        return Ok(found);
    }
    let _guard = services
        .media
        .lock(&format!("mxc://{server}/{media_id}"))
        .await;
    if let Some(found) = services.media.open(server.as_str(), media_id)? {
        return Ok(found);
    }
    let id = urlencode(media_id);
    let current = format!("/_matrix/federation/v1/media/download/{id}");
    let legacy = format!(
        "/_matrix/media/v3/download/{}/{id}?allow_remote=false&allow_redirect=true",
        urlencode(server.as_str())
    );
    let fetched = within(timeout_ms, fetch(services, server, &current, &legacy)).await?;
    let description = Description {
        content_type: fetched.content_type,
        filename: fetched.content_disposition.as_deref().and_then(filename_of),
    };
    services
        .media
        .store_remote(server.as_str(), media_id, description, &fetched.body)
        .await
}

/// A thumbnail of `server`'s media at the size asked for, made by that
/// server: kept from before, or fetched now.
pub async fn thumbnail(
    services: &Services,
    server: &ServerName,
    media_id: &str,
    (width, height, method): (u32, u32, Method),
    timeout_ms: Option<u64>,
) -> Result<(ThumbnailRecord, PathBuf)> {
    let cached = || {
        services
            .media
            .remote_thumbnail(server.as_str(), media_id, width, height, method)
    };
    if let Some(found) = cached()? {
        return Ok(found);
    }
    let _guard = services
        .media
        .lock(&format!("mxc://{server}/{media_id} {width}x{height}"))
        .await;
    if let Some(found) = cached()? {
        return Ok(found);
    }
    let id = urlencode(media_id);
    let size = format!(
        "width={width}&height={height}&method={}&animated=false",
        method.as_str()
    );
    let current = format!("/_matrix/federation/v1/media/thumbnail/{id}?{size}");
    let legacy = format!(
        "/_matrix/media/v3/thumbnail/{}/{id}?{size}&allow_remote=false&allow_redirect=true",
        urlencode(server.as_str())
    );
    let fetched = within(timeout_ms, fetch(services, server, &current, &legacy)).await?;
    let content_type = fetched
        .content_type
        .filter(|kind| kind.starts_with("image/"))
        .ok_or_else(|| {
            Error::RemoteUnavailable(format!(
                "{server} answered a thumbnail that is not an image"
            ))
        })?;
    services
        .media
        .store_remote_thumbnail(
            server.as_str(),
            media_id,
            width,
            height,
            method,
            content_type,
            &fetched.body,
        )
        .await
}

async fn within<T>(
    timeout_ms: Option<u64>,
    work: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    let timeout = timeout_ms.unwrap_or(DEFAULT_TIMEOUT_MS).min(MAX_TIMEOUT_MS);
    tokio::time::timeout(Duration::from_millis(timeout), work)
        .await
        .map_err(|_| {
            Error::RemoteUnavailable("the media server did not answer in time".to_owned())
        })?
}

/// Fetches through the federation endpoint `current`, or through `legacy`
/// when the server does not have it.
async fn fetch(
    services: &Services,
    server: &ServerName,
    current: &str,
    legacy: &str,
) -> Result<Fetched> {
    let client = &services.federation.client;
    let limit = usize::try_from(services.media.max_upload_bytes()).unwrap_or(usize::MAX);
    // Room for the multipart framing around the content.
    let framed_limit = limit.saturating_add(64 * 1024);
    match client.get_bytes(server, current, true, framed_limit).await {
        Ok(answer) => {
            let fetched = from_multipart(answer)?;
            let fetched = match fetched {
                Ok(fetched) => fetched,
                Err(location) => plain(client.get_url(&location, limit).await, server)?,
            };
            if fetched.body.len() > limit {
                return Err(Error::TooLarge(format!(
                    "{server} answered more than {limit} bytes"
                )));
            }
            Ok(fetched)
        }
        Err(SendError::Refused { status, body }) if unrecognized(status, &body) => {
            let answer = client.get_bytes(server, legacy, false, limit).await;
            let answer = match answer {
                Ok(RawAnswer {
                    location: Some(location),
                    ..
                }) => client.get_url(&location, limit).await,
                other => other,
            };
            plain(answer, server)
        }
        Err(error) => Err(refusal(error, server)),
    }
}

/// Whether an answer says the endpoint is unknown (not the media).
fn unrecognized(status: u16, body: &serde_json::Value) -> bool {
    status == 405
        || status == 501
        || (matches!(status, 400 | 404) && body["errcode"] == "M_UNRECOGNIZED")
}

fn refusal(error: SendError, server: &ServerName) -> Error {
    match error {
        SendError::Refused { status: 404, .. } => Error::NotFound("Media not found".to_owned()),
        SendError::Refused { status, body } => {
            Error::RemoteUnavailable(format!("{server} refused the media: {status} {body}"))
        }
        SendError::Failed(error) => error,
    }
}

/// The content of a plain answer (not multipart).
fn plain(
    answer: std::result::Result<RawAnswer, SendError>,
    server: &ServerName,
) -> Result<Fetched> {
    let answer = answer.map_err(|error| refusal(error, server))?;
    if answer.location.is_some() {
        return Err(Error::RemoteUnavailable(format!(
            "{server} redirected more than once"
        )));
    }
    Ok(Fetched {
        content_type: answer.content_type,
        content_disposition: answer.content_disposition,
        body: answer.body,
    })
}

/// The content of a multipart answer, or the `Location` it points to.
fn from_multipart(answer: RawAnswer) -> Result<std::result::Result<Fetched, String>> {
    let bad = |why: String| Error::RemoteUnavailable(format!("a media answer: {why}"));
    let boundary = answer
        .content_type
        .as_deref()
        .and_then(boundary_of)
        .ok_or_else(|| bad("not multipart/mixed".to_owned()))?;
    match parse(&answer.body, &boundary).map_err(|e| bad(e.to_string()))? {
        MediaPart::Bytes {
            content_type,
            content_disposition,
            body,
        } => Ok(Ok(Fetched {
            content_type,
            content_disposition,
            body,
        })),
        MediaPart::Location(location) => Ok(Err(location)),
    }
}
