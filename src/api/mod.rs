//! The HTTP surface: routing, extraction and Matrix error answers.
//!
//! Handlers parse and authorise, then call a service; they hold no rules of
//! their own and never touch storage.

pub mod client;
pub mod error;
pub mod extract;
pub mod federation;
pub mod metrics;
pub mod shared;
pub mod synapse_admin;

use std::sync::Arc;
use std::time::Duration;

use axum::http::{header, HeaderName, Method, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::Router;
use tower_http::cors::{Any, CorsLayer};
use tower_http::trace::TraceLayer;

use crate::services::Services;
use client::{
    account, admin, appservice, devices, directory, discovery, integrations, keys, legacy, media,
    membership, profile, push_rules, pushers, relations, reporting, room_events, room_keys, search,
    session, sliding_sync, spaces, sync, threepids, user_data, websocket,
};
use error::MatrixError;

/// What every handler receives: the service graph.
pub type AppState = Arc<Services>;

/// The client API prefixes; `r0` is the same API under its older name,
/// still used by some clients.
const CLIENT_PREFIXES: [&str; 2] = ["/_matrix/client/v3", "/_matrix/client/r0"];

/// The whole HTTP application, with the WebSocket extension beside the
/// Matrix API; the extension carries out its requests through the API.
pub fn router(state: AppState) -> Router {
    let api = matrix_api(state.clone());
    let ws = websocket::WsState {
        state,
        api: api.clone(),
    };
    api.route(websocket::PATH, get(websocket::connect).with_state(ws))
}

/// The federation API alone, for the federation listener
/// (`federation.listen`).
pub fn federation_router(state: AppState) -> Router {
    finish(federation::routes(), state)
}

/// The Matrix HTTP API: the client API, and the federation API unless it
/// has a listener of its own (or is off).
fn matrix_api(state: AppState) -> Router {
    let mut router = Router::new()
        .route("/_matrix/client/versions", get(discovery::versions))
        .route("/.well-known/matrix/client", get(discovery::well_known))
        .route("/.well-known/matrix/support", get(discovery::support))
        .route(
            "/_matrix/client/v1/login/get_token",
            post(integrations::get_login_token),
        )
        .route(
            "/_matrix/client/v1/admin/suspend/{user_id}",
            get(admin::get_suspended).put(admin::set_suspended),
        )
        .route(
            "/_matrix/client/v1/admin/lock/{user_id}",
            get(admin::get_locked).put(admin::set_locked),
        )
        .route("/_matrix/client/v1/mutual_rooms", get(admin::mutual_rooms))
        .route(
            "/_matrix/client/v1/appservice/{appservice_id}/ping",
            post(appservice::ping),
        )
        .route("/health", get(health))
        .route(
            "/_matrix/client/v1/register/m.login.registration_token/validity",
            get(account::registration_token_validity),
        );
    let v1_room = |suffix: &str| format!("/_matrix/client/v1/rooms/{{room_id}}{suffix}");
    router = router
        .route(&v1_room("/hierarchy"), get(spaces::hierarchy))
        .route(
            "/_matrix/client/v1/room_summary/{room}",
            get(spaces::room_summary),
        )
        .route(&v1_room("/relations/{event_id}"), get(relations::all))
        .route(
            &v1_room("/relations/{event_id}/{rel_type}"),
            get(relations::by_type),
        )
        .route(
            &v1_room("/relations/{event_id}/{rel_type}/{event_type}"),
            get(relations::by_type_and_event_type),
        )
        .route(&v1_room("/threads"), get(relations::threads))
        .route("/_matrix/media/v3/upload", post(media::upload))
        .route("/_matrix/media/v1/create", post(media::create))
        .route(
            "/_matrix/media/v3/upload/{server_name}/{media_id}",
            put(media::upload_to),
        )
        .route("/_matrix/client/v1/media/config", get(media::config))
        .route(
            "/_matrix/client/v1/media/preview_url",
            get(media::preview_url),
        )
        .route("/_matrix/media/v3/preview_url", get(media::preview_url))
        .route("/_matrix/media/v3/config", get(media::config))
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}",
            get(media::download),
        )
        .route(
            "/_matrix/client/v1/media/download/{server_name}/{media_id}/{file_name}",
            get(media::download_named),
        )
        .route(
            "/_matrix/client/v1/media/thumbnail/{server_name}/{media_id}",
            get(media::thumbnail),
        )
        .route(
            "/_matrix/media/v3/thumbnail/{server_name}/{media_id}",
            get(media::legacy_thumbnail),
        )
        .route(
            "/_matrix/media/v3/download/{server_name}/{media_id}",
            get(media::legacy_download),
        )
        .route(
            "/_matrix/media/v3/download/{server_name}/{media_id}/{file_name}",
            get(media::legacy_download_named),
        )
        .route(
            "/_matrix/client/unstable/add_threepid/email/submit_token",
            get(threepids::submit_token_link).post(threepids::submit_token),
        )
        .route(
            "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
            post(sliding_sync::sliding_sync),
        )
        .route(
            &v1_room("/timestamp_to_event"),
            get(relations::timestamp_to_event),
        );
    for prefix in CLIENT_PREFIXES {
        router = router.merge(client_routes(prefix));
    }
    router = router.merge(synapse_admin::routes());
    let federation = &state.config.federation;
    if federation.enabled && federation.listen.is_none() {
        router = router.merge(federation::routes());
    }
    finish(router, state)
}

/// Unknown paths and methods as Matrix errors, CORS, and a tracing span
/// per request.
fn finish(router: Router<AppState>, state: AppState) -> Router {
    // Requests are timed only when someone can scrape the figures.
    let router = if state.config.metrics.listen.is_some() {
        router.route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
    } else {
        router
    };
    router
        .fallback(|| async { MatrixError::unrecognized(StatusCode::NOT_FOUND) })
        .method_not_allowed_fallback(|| async {
            MatrixError::unrecognized(StatusCode::METHOD_NOT_ALLOWED)
        })
        .layer(cors())
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
                // The path only: a query string may carry an access token.
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    user_id = tracing::field::Empty,
                    device_id = tracing::field::Empty,
                    origin = tracing::field::Empty,
                )
            }),
        )
        .with_state(state)
}

fn client_routes(prefix: &str) -> Router<AppState> {
    let path = |suffix: &str| format!("{prefix}{suffix}");
    Router::new()
        .route(&path("/register"), post(account::register))
        .route(&path("/register/available"), get(account::available))
        .route(
            &path("/login"),
            get(session::login_flows).post(session::login),
        )
        .route(&path("/refresh"), post(session::refresh))
        .route(&path("/logout"), post(session::logout))
        .route(&path("/logout/all"), post(session::logout_all))
        .route(&path("/account/whoami"), get(account::whoami))
        .route(&path("/account/password"), post(account::change_password))
        .route(&path("/account/deactivate"), post(account::deactivate))
        .route(
            &path("/account/3pid"),
            get(threepids::list).post(threepids::legacy_add),
        )
        .route(&path("/account/3pid/add"), post(threepids::add))
        .route(&path("/pushers"), get(pushers::list))
        .route(&path("/pushers/set"), post(pushers::set))
        .route(&path("/notifications"), get(pushers::notifications))
        .route(&path("/pushrules/"), get(push_rules::all))
        .route(&path("/pushrules"), get(push_rules::all))
        .route(&path("/pushrules/global/"), get(push_rules::global))
        .route(&path("/pushrules/global"), get(push_rules::global))
        .route(
            &path("/pushrules/{scope}/{kind}/{rule_id}"),
            get(push_rules::get_rule)
                .put(push_rules::put_rule)
                .delete(push_rules::delete_rule),
        )
        .route(
            &path("/pushrules/{scope}/{kind}/{rule_id}/enabled"),
            get(push_rules::get_enabled).put(push_rules::put_enabled),
        )
        .route(
            &path("/pushrules/{scope}/{kind}/{rule_id}/actions"),
            get(push_rules::get_actions).put(push_rules::put_actions),
        )
        .route(&path("/account/3pid/bind"), post(threepids::bind))
        .route(&path("/account/3pid/delete"), post(threepids::delete))
        .route(&path("/account/3pid/unbind"), post(threepids::unbind))
        .route(
            &path("/account/3pid/email/requestToken"),
            post(threepids::add_email_token),
        )
        .route(
            &path("/register/email/requestToken"),
            post(threepids::register_email_token),
        )
        .route(
            &path("/account/password/email/requestToken"),
            post(threepids::password_email_token),
        )
        .route(
            &path("/account/3pid/msisdn/requestToken"),
            post(threepids::msisdn_token),
        )
        .route(
            &path("/register/msisdn/requestToken"),
            post(threepids::msisdn_token),
        )
        .route(
            &path("/account/password/msisdn/requestToken"),
            post(threepids::msisdn_token),
        )
        .route(&path("/devices"), get(devices::list))
        .route(
            &path("/devices/{device_id}"),
            get(devices::get)
                .put(devices::update)
                .delete(devices::delete),
        )
        .route(&path("/delete_devices"), post(devices::delete_many))
        .route(&path("/profile/{user_id}"), get(profile::get_profile))
        .route(
            &path("/profile/{user_id}/{key}"),
            get(profile::get_field)
                .put(profile::set_field)
                .delete(profile::delete_field),
        )
        .route(&path("/capabilities"), get(discovery::capabilities))
        .route(&path("/voip/turnServer"), get(integrations::turn_server))
        .route(&path("/admin/whois/{user_id}"), get(admin::whois))
        .route(&path("/events"), get(legacy::events))
        .route(&path("/search"), post(search::search))
        .route(&path("/thirdparty/protocols"), get(appservice::protocols))
        .route(
            &path("/thirdparty/protocol/{protocol}"),
            get(appservice::protocol),
        )
        .route(
            &path("/thirdparty/location/{protocol}"),
            get(appservice::locations),
        )
        .route(&path("/thirdparty/user/{protocol}"), get(appservice::users))
        .route(
            &path("/thirdparty/location"),
            get(appservice::locations_of_alias),
        )
        .route(&path("/thirdparty/user"), get(appservice::users_of_user_id))
        .route(
            &path("/user/{user_id}/openid/request_token"),
            post(integrations::openid_request_token),
        )
        .route(&path("/sync"), get(sync::sync))
        .route(&path("/keys/upload"), post(keys::upload))
        .route(&path("/keys/query"), post(keys::query))
        .route(&path("/keys/claim"), post(keys::claim))
        .route(&path("/keys/changes"), get(keys::changes))
        .route(
            &path("/keys/device_signing/upload"),
            post(keys::device_signing_upload),
        )
        .route(
            &path("/keys/signatures/upload"),
            post(keys::signatures_upload),
        )
        .route(
            &path("/room_keys/version"),
            get(room_keys::current_version).post(room_keys::create_version),
        )
        .route(
            &path("/room_keys/version/{version}"),
            get(room_keys::get_version)
                .put(room_keys::update_version)
                .delete(room_keys::delete_version),
        )
        .route(
            &path("/room_keys/keys"),
            get(room_keys::get_all)
                .put(room_keys::put_all)
                .delete(room_keys::delete_all),
        )
        .route(
            &path("/room_keys/keys/{room_id}"),
            get(room_keys::get_room)
                .put(room_keys::put_room)
                .delete(room_keys::delete_room),
        )
        .route(
            &path("/room_keys/keys/{room_id}/{session_id}"),
            get(room_keys::get_session)
                .put(room_keys::put_session)
                .delete(room_keys::delete_session),
        )
        .route(
            &path("/sendToDevice/{event_type}/{txn_id}"),
            put(keys::send_to_device),
        )
        .merge(room_routes(prefix))
}

fn room_routes(prefix: &str) -> Router<AppState> {
    let path = |suffix: &str| format!("{prefix}{suffix}");
    let room = |suffix: &str| format!("{prefix}/rooms/{{room_id}}{suffix}");
    Router::new()
        .route(&path("/createRoom"), post(membership::create_room))
        .route(&path("/joined_rooms"), get(membership::joined_rooms))
        .route(
            &path("/join/{target}"),
            post(membership::join_by_id_or_alias),
        )
        .route(&room("/join"), post(membership::join))
        .route(&room("/leave"), post(membership::leave))
        .route(&room("/invite"), post(membership::invite))
        .route(&room("/kick"), post(membership::kick))
        .route(&room("/ban"), post(membership::ban))
        .route(&room("/unban"), post(membership::unban))
        .route(&room("/forget"), post(membership::forget))
        .route(&room("/upgrade"), post(membership::upgrade))
        .route(&room("/initialSync"), get(legacy::room_initial_sync))
        .route(&room("/report"), post(reporting::report_room))
        .route(&room("/report/{event_id}"), post(reporting::report_event))
        .route(
            &path("/users/{user_id}/report"),
            post(reporting::report_user),
        )
        .route(&path("/knock/{target}"), post(membership::knock))
        .route(&room("/send/{kind}/{txn_id}"), put(room_events::send))
        .route(
            &room("/redact/{event_id}/{txn_id}"),
            put(room_events::redact),
        )
        .route(&room("/event/{event_id}"), get(room_events::get_event))
        .route(&room("/state"), get(room_events::get_state))
        .route(
            &room("/state/{kind}"),
            get(room_events::get_state_event_empty_key).put(room_events::put_state_empty_key),
        )
        // Clients write the empty state key as a trailing slash, or leave it out.
        .route(
            &room("/state/{kind}/"),
            get(room_events::get_state_event_empty_key).put(room_events::put_state_empty_key),
        )
        .route(
            &room("/state/{kind}/{state_key}"),
            get(room_events::get_state_event).put(room_events::put_state),
        )
        .route(&room("/members"), get(room_events::members))
        .route(&room("/joined_members"), get(room_events::joined_members))
        .route(&room("/messages"), get(room_events::messages))
        .route(&room("/aliases"), get(directory::room_aliases))
        .route(&room("/context/{event_id}"), get(relations::context))
        .route(
            &room("/receipt/{receipt_type}/{event_id}"),
            post(user_data::receipt),
        )
        .route(&room("/read_markers"), post(user_data::read_markers))
        .route(&room("/typing/{user_id}"), put(user_data::typing))
        .route(
            &path("/user/{user_id}/filter"),
            post(user_data::create_filter),
        )
        .route(
            &path("/user/{user_id}/filter/{filter_id}"),
            get(user_data::get_filter),
        )
        .route(
            &path("/user/{user_id}/account_data/{kind}"),
            get(user_data::get_global).put(user_data::put_global),
        )
        .route(
            &path("/user/{user_id}/rooms/{room_id}/account_data/{kind}"),
            get(user_data::get_room).put(user_data::put_room),
        )
        .route(
            &path("/user/{user_id}/rooms/{room_id}/tags"),
            get(user_data::get_tags),
        )
        .route(
            &path("/user/{user_id}/rooms/{room_id}/tags/{tag}"),
            put(user_data::put_tag).delete(user_data::delete_tag),
        )
        .route(
            &path("/presence/{user_id}/status"),
            get(user_data::get_presence).put(user_data::set_presence),
        )
        .route(
            &path("/directory/room/{alias}"),
            get(directory::resolve_alias)
                .put(directory::create_alias)
                .delete(directory::delete_alias),
        )
        .route(
            &path("/directory/list/room/{room_id}"),
            get(directory::visibility).put(directory::set_visibility),
        )
        .route(
            &path("/publicRooms"),
            get(directory::public_rooms).post(directory::search_public_rooms),
        )
        .route(
            &path("/user_directory/search"),
            post(directory::search_users),
        )
}

/// Browsers may call the client API from any origin, as the spec requires.
fn cors() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("x-requested-with"),
        ])
        .max_age(Duration::from_secs(86_400))
}

/// `GET /health`: 200 while the server can read its database.
async fn health(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    match state.accounts.user("") {
        Ok(_) => (StatusCode::OK, "OK"),
        Err(error) => {
            tracing::error!(%error, "health check failed");
            (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable")
        }
    }
}
