//! The application service endpoints of the client API, and the
//! third-party look-ups clients make through the bridges.
//!
//! - `POST /_matrix/client/v1/appservice/{appserviceId}/ping`
//! - `GET /_matrix/client/v3/thirdparty/protocols`
//! - `GET /_matrix/client/v3/thirdparty/protocol/{protocol}`
//! - `GET /_matrix/client/v3/thirdparty/location/{protocol}`
//! - `GET /_matrix/client/v3/thirdparty/user/{protocol}`
//! - `GET /_matrix/client/v3/thirdparty/location`
//! - `GET /_matrix/client/v3/thirdparty/user`

use axum::extract::State;
use axum::http::Uri;
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::session::appservice_of;
use crate::api::error::{ApiResult, MatrixError};
use crate::api::extract::{Auth, BearerToken, JsonBody, Path};
use crate::api::AppState;

#[derive(Deserialize)]
pub struct PingBody {
    transaction_id: Option<String>,
}

/// `POST /_matrix/client/v1/appservice/{appserviceId}/ping`: the service
/// asks the homeserver to ping it, to check both directions work.
pub async fn ping(
    State(state): State<AppState>,
    BearerToken(token): BearerToken,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<PingBody>,
) -> ApiResult<Json<Value>> {
    let service = appservice_of(&state, token.as_deref())?;
    if service.id != id {
        return Err(MatrixError::forbidden(
            "The access token does not belong to this application service",
        ));
    }
    let duration_ms = state
        .appservices
        .ping(service, body.transaction_id.as_deref())
        .await?;
    Ok(Json(json!({ "duration_ms": duration_ms })))
}

/// `GET /_matrix/client/v3/thirdparty/protocols`: every bridged protocol,
/// as its service describes it; the instances of services bridging the
/// same protocol are put together.
pub async fn protocols(State(state): State<AppState>, Auth(_): Auth) -> Json<Value> {
    let mut protocols: Map<String, Value> = Map::new();
    let names: std::collections::BTreeSet<String> = state
        .appservices
        .registrations
        .iter()
        .flat_map(|service| service.protocols.iter().cloned())
        .collect();
    for name in names {
        if let Some(protocol) = protocol_of(&state, &name).await {
            protocols.insert(name, protocol);
        }
    }
    Json(Value::Object(protocols))
}

/// `GET /_matrix/client/v3/thirdparty/protocol/{protocol}`
pub async fn protocol(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    protocol_of(&state, &name)
        .await
        .map(Json)
        .ok_or_else(|| MatrixError::not_found(format!("No protocol {name:?} is known")))
}

/// `GET /_matrix/client/v3/thirdparty/location/{protocol}`: the
/// locations the bridges of `protocol` find for the query's fields.
pub async fn locations(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    lookup(&state, Some(&name), "location", &uri).await
}

/// `GET /_matrix/client/v3/thirdparty/user/{protocol}`
pub async fn users(
    State(state): State<AppState>,
    Auth(_): Auth,
    Path(name): Path<String>,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    lookup(&state, Some(&name), "user", &uri).await
}

/// `GET /_matrix/client/v3/thirdparty/location?alias=`: the third-party
/// locations of a Matrix room alias.
pub async fn locations_of_alias(
    State(state): State<AppState>,
    Auth(_): Auth,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    lookup(&state, None, "location", &uri).await
}

/// `GET /_matrix/client/v3/thirdparty/user?userid=`: the third-party
/// users of a Matrix user ID.
pub async fn users_of_user_id(
    State(state): State<AppState>,
    Auth(_): Auth,
    uri: Uri,
) -> ApiResult<Json<Value>> {
    lookup(&state, None, "user", &uri).await
}

/// One protocol's description: the first service's, with every
/// service's instances.
async fn protocol_of(state: &AppState, name: &str) -> Option<Value> {
    let path = format!("/_matrix/app/v1/thirdparty/protocol/{}", segment(name));
    let answers = state.appservices.third_party(Some(name), &path).await;
    let mut merged: Option<Value> = None;
    for (_, answer) in answers {
        let Value::Object(_) = answer else { continue };
        match &mut merged {
            None => merged = Some(answer),
            Some(first) => {
                let more = answer["instances"].as_array().cloned().unwrap_or_default();
                if let Some(instances) = first["instances"].as_array_mut() {
                    instances.extend(more);
                } else {
                    first["instances"] = json!(more);
                }
            }
        }
    }
    merged
}

/// A location or user look-up passed to the bridges, with the request's
/// query; their lists, one after the other.
async fn lookup(
    state: &AppState,
    protocol: Option<&str>,
    kind: &str,
    uri: &Uri,
) -> ApiResult<Json<Value>> {
    // The client's own token is not passed on.
    let query: String = form_urlencoded::Serializer::new(String::new())
        .extend_pairs(
            form_urlencoded::parse(uri.query().unwrap_or_default().as_bytes())
                .filter(|(key, _)| key != "access_token"),
        )
        .finish();
    let mut path = match protocol {
        Some(protocol) => format!("/_matrix/app/v1/thirdparty/{kind}/{}", segment(protocol)),
        None => format!("/_matrix/app/v1/thirdparty/{kind}"),
    };
    if !query.is_empty() {
        path = format!("{path}?{query}");
    }
    if protocol.is_some_and(|p| {
        !state
            .appservices
            .registrations
            .iter()
            .any(|s| s.protocols.iter().any(|q| q == p))
    }) {
        return Err(MatrixError::not_found(format!(
            "No protocol {:?} is known",
            protocol.unwrap_or_default()
        )));
    }
    let mut found = Vec::new();
    for (_, answer) in state.appservices.third_party(protocol, &path).await {
        if let Value::Array(items) = answer {
            found.extend(items);
        }
    }
    Ok(Json(Value::Array(found)))
}

fn segment(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}
