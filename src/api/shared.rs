//! Helpers that handlers of both the client API and the federation API
//! use. No handler owns this module, so that neither API imports from the
//! other's handlers.

use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::error::{ApiResult, MatrixError};
use super::AppState;
use crate::ids::UserId;
use crate::services::directory::RoomFilter;
use crate::services::profiles::Profile;

/// The server to ask when `server_name` is not this server: `None` for
/// this server, 404 when federation is off, 400 for a malformed name.
pub fn remote_server(
    state: &AppState,
    server_name: &str,
) -> ApiResult<Option<ruma::OwnedServerName>> {
    if server_name == state.config.server_name {
        return Ok(None);
    }
    if !state.federation.enabled() {
        return Err(MatrixError::not_found(format!(
            "{server_name} cannot be reached: federation is off"
        )));
    }
    ruma::ServerName::parse(server_name)
        .map(Some)
        .map_err(|_| MatrixError::invalid_param(format!("{server_name:?} is not a server name")))
}

/// The profile of a local user; 404 for a user of another server, an
/// unknown one, or a deactivated one.
pub fn local_profile(state: &AppState, user_id: &str) -> ApiResult<Profile> {
    let user = UserId::parse(user_id)
        .ok_or_else(|| MatrixError::invalid_param(format!("{user_id:?} is not a user ID")))?;
    let not_found = || MatrixError::not_found("Profile not found");
    if user.server_name != state.config.server_name {
        return Err(not_found());
    }
    let account = state
        .accounts
        .user(&user.localpart)?
        .ok_or_else(not_found)?;
    if account.deactivated {
        return Err(not_found());
    }
    Ok(state.profiles.profile(&user.localpart)?.unwrap_or_default())
}

/// The page and filter of a public room directory request, as the client
/// and federation `POST /publicRooms` bodies carry them.
#[derive(Deserialize, Serialize, Default)]
pub struct PublicRoomsBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<FilterBody>,
}

#[derive(Deserialize, Serialize, Default)]
pub struct FilterBody {
    #[serde(skip_serializing_if = "Option::is_none")]
    generic_search_term: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    room_types: Option<Vec<Option<String>>>,
}

impl PublicRoomsBody {
    /// The page and filter of a directory search.
    pub fn page(self) -> (Option<usize>, Option<String>, RoomFilter) {
        let filter = self.filter.unwrap_or_default();
        let filter = RoomFilter {
            search_term: filter.generic_search_term,
            room_types: filter.room_types,
        };
        (self.limit, self.since, filter)
    }
}

/// One page of the directory; `since` tokens are offsets (`o20`).
pub fn list(
    state: &AppState,
    limit: Option<usize>,
    since: Option<String>,
    filter: RoomFilter,
) -> ApiResult<Json<Value>> {
    let offset = match since.as_deref() {
        Some(token) => token
            .strip_prefix('o')
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                MatrixError::invalid_param(format!("{token:?} is not a directory token"))
            })?,
        None => 0,
    };
    let rooms = state.directory.public_rooms(&state.rooms, &filter)?;
    let total = rooms.len();
    let limit = limit.unwrap_or(total).clamp(1, 1000);
    let chunk: Vec<Value> = rooms
        .into_iter()
        .skip(offset)
        .take(limit)
        .map(|r| r.summary)
        .collect();
    let mut answer = json!({ "chunk": chunk, "total_room_count_estimate": total });
    if offset + limit < total {
        answer["next_batch"] = json!(format!("o{}", offset + limit));
    }
    if offset > 0 {
        answer["prev_batch"] = json!(format!("o{}", offset.saturating_sub(limit)));
    }
    Ok(Json(answer))
}

/// A local user's device identity keys (the `wanted` devices, every one
/// when empty), each with its display name in `unsigned`.
pub fn local_device_keys(
    state: &AppState,
    user: &ruma::UserId,
    wanted: &[String],
) -> ApiResult<serde_json::Map<String, Value>> {
    let mut devices = serde_json::Map::new();
    for device in state.accounts.devices(user.localpart())? {
        if !wanted.is_empty() && !wanted.contains(&device.device_id) {
            continue;
        }
        let Some(mut keys) = state.e2ee.device_keys(user, &device.device_id)? else {
            continue;
        };
        if let Some(name) = &device.record.display_name {
            if let Some(fields) = keys.as_object_mut() {
                fields.insert(
                    "unsigned".to_owned(),
                    serde_json::json!({ "device_display_name": name }),
                );
            }
        }
        devices.insert(device.device_id.clone(), keys);
    }
    Ok(devices)
}

/// Claims one one-time key (or the fallback key) of each of a local user's
/// devices named in `devices` (device ID → algorithm).
pub async fn local_claim(
    state: &AppState,
    user: &ruma::UserId,
    devices: &serde_json::Map<String, Value>,
) -> ApiResult<serde_json::Map<String, Value>> {
    let mut keys = serde_json::Map::new();
    for (device_id, algorithm) in devices {
        let Some(algorithm) = algorithm.as_str() else {
            return Err(MatrixError::bad_json("algorithms must be strings"));
        };
        if let Some((key_id, key)) = state.e2ee.claim(user, device_id, algorithm).await? {
            keys.insert(device_id.clone(), serde_json::json!({ key_id: key }));
        }
    }
    Ok(keys)
}
