//! Media upload and download.
//!
//! - `POST /_matrix/media/v3/upload`
//! - `POST /_matrix/media/v1/create`, then
//!   `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
//! - `GET /_matrix/client/v1/media/config` (and the old `/_matrix/media/v3/config`)
//! - `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}[/{fileName}]`
//! - `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
//! - `GET /_matrix/media/v3/download/...` and `.../thumbnail/...`:
//!   unauthenticated, frozen by default

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, Path, Query};
use crate::api::AppState;
use crate::services::federation::media as remote_media;
use crate::services::media::Description;
use crate::services::thumbnail::Method;
use ruma::{OwnedServerName, ServerName};

/// Content types a browser may show inline; anything else downloads.
const INLINE_TYPES: &[&str] = &[
    "text/css",
    "text/plain",
    "text/csv",
    "application/json",
    "application/ld+json",
    "image/jpeg",
    "image/gif",
    "image/png",
    "image/apng",
    "image/webp",
    "image/avif",
    "video/mp4",
    "video/webm",
    "video/ogg",
    "video/quicktime",
    "audio/mp4",
    "audio/webm",
    "audio/aac",
    "audio/mpeg",
    "audio/ogg",
    "audio/wave",
    "audio/wav",
    "audio/x-wav",
    "audio/x-pn-wav",
    "audio/flac",
    "audio/x-flac",
];

/// The spec's Content-Security-Policy for media.
const MEDIA_CSP: &str = "sandbox; default-src 'none'; script-src 'none'; \
    plugin-types application/pdf; style-src 'unsafe-inline'; media-src 'self'; \
    object-src 'self';";

#[derive(Deserialize, Default)]
pub struct UploadQuery {
    filename: Option<String>,
}

/// `POST /_matrix/media/v3/upload`
pub async fn upload(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Json<Value>> {
    let description = describe(request.headers(), query.filename);
    let incoming = receive(&state, request).await?;
    let uploader = authed.user_id.to_string();
    let media_id = state
        .media
        .store(&uploader, None, incoming, description)
        .await?;
    let uri = format!("mxc://{}/{media_id}", state.media.server_name());
    Ok(Json(json!({ "content_uri": uri })))
}

/// `POST /_matrix/media/v1/create`
pub async fn create(State(state): State<AppState>, Auth(authed): Auth) -> ApiResult<Json<Value>> {
    let (media_id, until) = state
        .media
        .create_pending(&authed.user_id.to_string())
        .await?;
    Ok(Json(json!({
        "content_uri": format!("mxc://{}/{media_id}", state.media.server_name()),
        "unused_expires_at": until,
    })))
}

/// `PUT /_matrix/media/v3/upload/{serverName}/{mediaId}`
pub async fn upload_to(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Path((server, media_id)): Path<(String, String)>,
    Query(query): Query<UploadQuery>,
    request: Request,
) -> ApiResult<Json<Value>> {
    if server != state.media.server_name() {
        return Err(MatrixError::forbidden(
            "media of other servers cannot be uploaded here",
        ));
    }
    let description = describe(request.headers(), query.filename);
    let incoming = receive(&state, request).await?;
    state
        .media
        .store(
            &authed.user_id.to_string(),
            Some(&media_id),
            incoming,
            description,
        )
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct PreviewQuery {
    url: String,
}

/// `GET /_matrix/client/v1/media/preview_url`: the OpenGraph data of a
/// page, when previews are switched on.
pub async fn preview_url(
    State(state): State<AppState>,
    Auth(authed): Auth,
    Query(query): Query<PreviewQuery>,
) -> ApiResult<Json<Value>> {
    if !state.previews.enabled() {
        return Err(MatrixError::unrecognized(StatusCode::NOT_FOUND));
    }
    let user = authed.user_id.to_string();
    Ok(Json(Value::Object(
        state.preview_url(&user, &query.url).await?,
    )))
}

/// `GET /_matrix/client/v1/media/config`
pub async fn config(State(state): State<AppState>, Auth(_): Auth) -> Json<Value> {
    Json(json!({ "m.upload.size": state.media.max_upload_bytes() }))
}

fn describe(headers: &HeaderMap, filename: Option<String>) -> Description {
    Description {
        content_type: headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        filename: filename.filter(|f| !f.is_empty()),
    }
}

/// Streams the request body into a temporary file, refusing it as soon as
/// it passes the size limit.
async fn receive(
    state: &AppState,
    request: Request,
) -> ApiResult<crate::services::media::Incoming> {
    let limit = state.media.max_upload_bytes();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > limit) {
        return Err(MatrixError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "M_TOO_LARGE",
            format!("media may be at most {limit} bytes"),
        ));
    }
    let mut incoming = state.media.incoming()?;
    let mut body = request.into_body();
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| MatrixError::bad_json(format!("could not read the upload: {e}")))?;
        if let Ok(data) = frame.into_data() {
            incoming.write(&data)?;
        }
    }
    Ok(incoming)
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}`
pub async fn download(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path((server, media_id)): Path<(String, String)>,
    Query(query): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(&state, &server, &media_id, None, query.remote(), &headers).await
}

/// `GET /_matrix/client/v1/media/download/{serverName}/{mediaId}/{fileName}`
pub async fn download_named(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path((server, media_id, filename)): Path<(String, String, String)>,
    Query(query): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve(
        &state,
        &server,
        &media_id,
        Some(filename),
        query.remote(),
        &headers,
    )
    .await
}

/// `GET /_matrix/media/v3/download/{serverName}/{mediaId}`: without
/// authentication, served only when the configuration allows it.
pub async fn legacy_download(
    State(state): State<AppState>,
    Path((server, media_id)): Path<(String, String)>,
    Query(query): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    legacy(&state)?;
    serve(&state, &server, &media_id, None, query.remote(), &headers).await
}

/// `GET /_matrix/media/v3/download/{serverName}/{mediaId}/{fileName}`
pub async fn legacy_download_named(
    State(state): State<AppState>,
    Path((server, media_id, filename)): Path<(String, String, String)>,
    Query(query): Query<DownloadQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    legacy(&state)?;
    serve(
        &state,
        &server,
        &media_id,
        Some(filename),
        query.remote(),
        &headers,
    )
    .await
}

#[derive(Deserialize)]
pub struct ThumbnailQuery {
    width: u32,
    height: u32,
    method: Option<String>,
    /// Asks for an animated thumbnail where possible. Thumbnails here are
    /// still images (the first frame), which the specification allows.
    #[allow(dead_code)]
    animated: Option<bool>,
    /// How long to wait for another server's media.
    timeout_ms: Option<u64>,
    /// `false`: answer only what this server has (the legacy endpoints).
    allow_remote: Option<bool>,
}

/// What a download may say of other servers' media.
#[derive(Deserialize, Default)]
#[serde(default)]
pub struct DownloadQuery {
    /// How long to wait for another server's media.
    timeout_ms: Option<u64>,
    /// `false`: answer only what this server has (the legacy endpoints).
    allow_remote: Option<bool>,
}

impl DownloadQuery {
    fn remote(&self) -> Remote {
        Remote {
            allowed: self.allow_remote.unwrap_or(true),
            timeout_ms: self.timeout_ms,
        }
    }
}

/// Whether and how long to fetch media of another server.
#[derive(Clone, Copy)]
struct Remote {
    allowed: bool,
    timeout_ms: Option<u64>,
}

/// The server of an `mxc://` URI when it is another server, whose media
/// is then fetched from it; `None` for this server.
fn other_server(
    state: &AppState,
    server: &str,
    remote: Remote,
) -> ApiResult<Option<OwnedServerName>> {
    if server == state.media.server_name() {
        return Ok(None);
    }
    let not_found = || MatrixError::not_found("Media not found");
    let name = ServerName::parse(server).map_err(|_| not_found())?;
    if !remote.allowed || !state.federation.enabled() {
        return Err(not_found());
    }
    Ok(Some(name))
}

/// `GET /_matrix/client/v1/media/thumbnail/{serverName}/{mediaId}`
pub async fn thumbnail(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path((server, media_id)): Path<(String, String)>,
    Query(query): Query<ThumbnailQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    serve_thumbnail(&state, &server, &media_id, query, &headers).await
}

/// `GET /_matrix/media/v3/thumbnail/{serverName}/{mediaId}`: without
/// authentication, served only when the configuration allows it.
pub async fn legacy_thumbnail(
    State(state): State<AppState>,
    Path((server, media_id)): Path<(String, String)>,
    Query(query): Query<ThumbnailQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    legacy(&state)?;
    serve_thumbnail(&state, &server, &media_id, query, &headers).await
}

async fn serve_thumbnail(
    state: &AppState,
    server: &str,
    media_id: &str,
    query: ThumbnailQuery,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let method = requested_method(query.method.as_deref(), query.width, query.height)?;
    let remote = Remote {
        allowed: query.allow_remote.unwrap_or(true),
        timeout_ms: query.timeout_ms,
    };
    let (record, path) = match other_server(state, server, remote)? {
        Some(name) => {
            let size = (query.width, query.height, method);
            remote_media::thumbnail(state, &name, media_id, size, remote.timeout_ms).await?
        }
        None => {
            state
                .media
                .thumbnail(server, media_id, query.width, query.height, method)
                .await?
        }
    };
    let extension = record.content_type.trim_start_matches("image/");
    let name = format!("thumbnail.{extension}");
    let response_headers = media_headers(Some(&record.content_type), Some(&name));
    serve_file(&path, record.size, response_headers, headers).await
}

/// The thumbnail method asked for (`scale` by default), for a size of at
/// least one pixel each way.
pub(crate) fn requested_method(method: Option<&str>, width: u32, height: u32) -> ApiResult<Method> {
    let method = match method {
        None => Method::Scale,
        Some(text) => Method::parse(text)
            .ok_or_else(|| MatrixError::invalid_param("method must be \"scale\" or \"crop\""))?,
    };
    if width == 0 || height == 0 {
        return Err(MatrixError::invalid_param(
            "width and height must be at least 1",
        ));
    }
    Ok(method)
}

fn legacy(state: &AppState) -> ApiResult<()> {
    if state.media.legacy_downloads() {
        Ok(())
    } else {
        // As Synapse once media is frozen: new media is not served here.
        Err(MatrixError::not_found(
            "Not found: download media through /_matrix/client/v1/media",
        ))
    }
}

/// Answers a file, whole or the one byte range asked for (206), with the
/// headers that keep a browser from running it.
async fn serve(
    state: &AppState,
    server: &str,
    media_id: &str,
    filename: Option<String>,
    remote: Remote,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let not_found = || MatrixError::not_found("Media not found");
    let (record, path) = match other_server(state, server, remote)? {
        Some(name) => remote_media::download(state, &name, media_id, remote.timeout_ms).await?,
        None => state.media.open(server, media_id)?.ok_or_else(not_found)?,
    };
    let response_headers = media_headers(
        record.content_type.as_deref(),
        filename.as_deref().or(record.filename.as_deref()),
    );
    serve_file(&path, record.size, response_headers, headers).await
}

/// Answers a stored file of `size` bytes, whole or the one byte range the
/// request asks for.
async fn serve_file(
    path: &std::path::Path,
    size: u64,
    mut response_headers: HeaderMap,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| {
        crate::services::error::Error::Internal(format!("media file {}: {e}", path.display()))
    })?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map(|text| parse_range(text, size));
    let (status, start, length) = match range {
        None | Some(Range::Ignored) => (StatusCode::OK, 0, size),
        Some(Range::Unsatisfiable) => {
            let mut response = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            let value = format!("bytes */{size}");
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&value).expect("ASCII"),
            );
            return Ok(response);
        }
        Some(Range::Bytes(start, end)) => {
            let value = format!("bytes {start}-{end}/{size}");
            response_headers.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&value).expect("ASCII"),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(|e| crate::services::error::Error::Internal(e.to_string()))?;
    response_headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file.take(length)));
    Ok((status, response_headers, body).into_response())
}

pub(crate) fn media_headers(content_type: Option<&str>, filename: Option<&str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    let content_type = content_type.unwrap_or("application/octet-stream");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let disposition = if INLINE_TYPES.contains(&essence.as_str()) {
        "inline"
    } else {
        "attachment"
    };
    let mut disposition = disposition.to_owned();
    if let Some(name) = filename {
        let encoded: String = form_urlencoded::byte_serialize(name.as_bytes()).collect();
        disposition += &format!("; filename*=utf-8''{}", encoded.replace('+', "%20"));
    }
    let put = |headers: &mut HeaderMap, name, value: &str| {
        if let Ok(value) = HeaderValue::from_str(value) {
            headers.insert(name, value);
        }
    };
    put(&mut headers, header::CONTENT_TYPE, content_type);
    put(&mut headers, header::CONTENT_DISPOSITION, &disposition);
    put(&mut headers, header::CONTENT_SECURITY_POLICY, MEDIA_CSP);
    put(
        &mut headers,
        header::CACHE_CONTROL,
        "public, max-age=86400, s-maxage=86400",
    );
    put(&mut headers, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    put(&mut headers, header::ACCEPT_RANGES, "bytes");
    headers.insert(
        header::HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("cross-origin"),
    );
    headers
}

#[derive(Debug, PartialEq, Eq)]
enum Range {
    /// Not a single byte range this server serves: the whole file.
    Ignored,
    Unsatisfiable,
    /// First and last byte, inclusive.
    Bytes(u64, u64),
}

/// One `bytes=` range: `a-b`, `a-` or `-n` (the last n bytes).
fn parse_range(text: &str, size: u64) -> Range {
    let Some(spec) = text.trim().strip_prefix("bytes=") else {
        return Range::Ignored;
    };
    if spec.contains(',') {
        return Range::Ignored;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Range::Ignored;
    };
    let number = |s: &str| s.trim().parse::<u64>().ok();
    let (start, end) = match (first.trim().is_empty(), last.trim().is_empty()) {
        (true, false) => match number(last) {
            Some(0) => return Range::Unsatisfiable,
            Some(suffix) => (size.saturating_sub(suffix), size.saturating_sub(1)),
            None => return Range::Ignored,
        },
        (false, true) => match number(first) {
            Some(start) => (start, size.saturating_sub(1)),
            None => return Range::Ignored,
        },
        (false, false) => match (number(first), number(last)) {
            (Some(start), Some(end)) if start <= end => (start, end.min(size.saturating_sub(1))),
            _ => return Range::Ignored,
        },
        (true, true) => return Range::Ignored,
    };
    if size == 0 || start >= size {
        Range::Unsatisfiable
    } else {
        Range::Bytes(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        let cases = [
            ("bytes=0-9", Range::Bytes(0, 9)),
            ("bytes=90-", Range::Bytes(90, 99)),
            ("bytes=-10", Range::Bytes(90, 99)),
            ("bytes=95-200", Range::Bytes(95, 99)),
            ("bytes=100-", Range::Unsatisfiable),
            ("bytes=-0", Range::Unsatisfiable),
            ("bytes=5-2", Range::Ignored),
            ("bytes=0-1,5-6", Range::Ignored),
            ("items=0-1", Range::Ignored),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_range(text, 100), expected, "{text}");
        }
    }
}
