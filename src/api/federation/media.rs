//! This server's media for other servers:
//! `GET /_matrix/federation/v1/media/download/{mediaId}` and
//! `/thumbnail/{mediaId}`, answered as `multipart/mixed` (a JSON metadata
//! part, then the content with its type and disposition).

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use myelin_federation::media::{closing, opening};
use rand::Rng;
use serde::Deserialize;

use super::super::client::media::{media_headers, requested_method};
use super::super::error::{ApiResult, MatrixError};
use super::super::extract::{Path, Query, Signed};
use super::super::AppState;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route(
            "/_matrix/federation/v1/media/download/{media_id}",
            get(download),
        )
        .route(
            "/_matrix/federation/v1/media/thumbnail/{media_id}",
            get(thumbnail),
        )
}

/// `GET /_matrix/federation/v1/media/download/{mediaId}`
async fn download(
    State(state): State<AppState>,
    Path(media_id): Path<String>,
    _signed: Signed,
) -> ApiResult<Response> {
    let (record, path) = state
        .media
        .open(state.media.server_name(), &media_id)?
        .ok_or_else(|| MatrixError::not_found("Media not found"))?;
    let headers = media_headers(record.content_type.as_deref(), record.filename.as_deref());
    multipart(&path, record.size, &headers).await
}

#[derive(Deserialize)]
struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
    /// Thumbnails here are still images, which the spec allows.
    #[allow(dead_code)]
    animated: Option<bool>,
}

/// `GET /_matrix/federation/v1/media/thumbnail/{mediaId}`
async fn thumbnail(
    State(state): State<AppState>,
    Path(media_id): Path<String>,
    Query(query): Query<ThumbnailQuery>,
    _signed: Signed,
) -> ApiResult<Response> {
    let method = requested_method(query.method.as_deref(), query.width, query.height)?;
    let own = state.media.server_name().to_owned();
    let (record, path) = state
        .media
        .thumbnail(&own, &media_id, query.width, query.height, method)
        .await?;
    let extension = record.content_type.trim_start_matches("image/");
    let name = format!("thumbnail.{extension}");
    let headers = media_headers(Some(&record.content_type), Some(&name));
    multipart(&path, record.size, &headers).await
}

/// The file at `path` (`size` bytes) as the second part of a
/// `multipart/mixed` answer, its type and disposition from `headers`.
async fn multipart(path: &std::path::Path, size: u64, headers: &HeaderMap) -> ApiResult<Response> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let content_type = text(header::CONTENT_TYPE).unwrap_or("application/octet-stream");
    let boundary = format!("{:032x}", rand::thread_rng().gen::<u128>());
    let head = opening(&boundary, content_type, text(header::CONTENT_DISPOSITION));
    let tail = closing(&boundary);
    let file = tokio::fs::File::open(path).await.map_err(|e| {
        crate::services::error::Error::Internal(format!("media file {}: {e}", path.display()))
    })?;
    let length = head.len() as u64 + size + tail.len() as u64;
    let body = futures_util::stream::once(async move { Ok(Bytes::from(head)) })
        .chain(tokio_util::io::ReaderStream::new(file))
        .chain(futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from(tail))
        }));
    let mut response_headers = HeaderMap::new();
    let multipart_type = format!("multipart/mixed; boundary={boundary}");
    response_headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&multipart_type).expect("ASCII"),
    );
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    Ok((StatusCode::OK, response_headers, Body::from_stream(body)).into_response())
}
