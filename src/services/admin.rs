//! What server admins do that spans services: shared-secret registration,
//! shutting down and purging rooms, and server notices.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::Serialize;
use serde_json::{json, Value};

use super::accounts::{Login, NewDevice};
use super::error::{Error, Result};
use super::rooms::create::{CreateRoom, Preset};
use super::rooms::draft::Origin;
use super::Services;
use crate::events::NewEvent;
use crate::ids;

/// How long a registration nonce may be used, in milliseconds.
const NONCE_LIFETIME_MS: u64 = 60_000;
/// Most nonces handed out and not yet used.
const MAX_NONCES: usize = 10_000;
/// Most room deletions whose status is remembered.
const MAX_DELETIONS: usize = 1_000;
/// The device the notice user's transactions are kept under.
const NOTICE_DEVICE: &str = "server_notices";
/// The tag of a user's server notice room.
pub const SERVER_NOTICE_TAG: &str = "m.server_notice";

/// The admins' state in memory: registration nonces and room deletions.
#[derive(Default)]
pub struct AdminState {
    nonces: Mutex<HashMap<String, u64>>,
    deletions: Mutex<VecDeque<RoomDeletion>>,
    /// Serializes the making of server notice rooms.
    notices: tokio::sync::Mutex<()>,
}

/// A shared-secret registration request, as Synapse's `register` takes it.
pub struct SecretRegistration<'a> {
    pub nonce: &'a str,
    pub username: &'a str,
    pub password: &'a str,
    pub admin: bool,
    pub user_type: Option<&'a str>,
    pub displayname: Option<&'a str>,
    /// The hex HMAC-SHA1 of the request under the shared secret.
    pub mac: &'a str,
}

/// What an admin asked of a room deletion.
#[derive(Clone, Debug, Default)]
pub struct DeleteRoom {
    pub block: bool,
    pub purge: bool,
    pub force_purge: bool,
}

/// Where a room deletion stands, as `delete_status` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct RoomDeletion {
    pub delete_id: String,
    #[serde(skip)]
    pub room_id: OwnedRoomId,
    /// `shutting_down`, `purging`, `complete` or `failed`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub shutdown_room: Shutdown,
}

/// What shutting a room down did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Shutdown {
    pub kicked_users: Vec<String>,
    pub failed_to_kick_users: Vec<String>,
    pub local_aliases: Vec<String>,
    pub new_room_id: Option<String>,
}

impl Services {
    /// A nonce for one shared-secret registration within a minute.
    pub fn registration_nonce(&self) -> String {
        let nonce = ids::new_secret("", &mut rand::thread_rng());
        let now = self.now_ms();
        let mut nonces = self.admin.nonces.lock().expect("nonces lock");
        nonces.retain(|_, issued| now.saturating_sub(*issued) < NONCE_LIFETIME_MS);
        // At the bound the oldest goes, so that a flood of requests cannot
        // keep every new nonce from being usable.
        if nonces.len() >= MAX_NONCES {
            let oldest = nonces
                .iter()
                .min_by_key(|(_, issued)| **issued)
                .map(|(nonce, _)| nonce.clone());
            if let Some(oldest) = oldest {
                nonces.remove(&oldest);
            }
        }
        nonces.insert(nonce.clone(), now);
        nonce
    }

    /// Synapse's shared-secret registration: the MAC proves the request
    /// was made with the configured secret; the nonce is used once.
    pub async fn register_with_secret(&self, request: SecretRegistration<'_>) -> Result<Login> {
        let Some(secret) = &self.config.registration_shared_secret else {
            return Err(Error::InvalidParam(
                "Shared secret registration is not enabled".to_owned(),
            ));
        };
        let issued = self
            .admin
            .nonces
            .lock()
            .expect("nonces lock")
            .remove(request.nonce);
        if issued.is_none_or(|at| self.now_ms().saturating_sub(at) >= NONCE_LIFETIME_MS) {
            return Err(Error::InvalidParam("unrecognised nonce".to_owned()));
        }
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes())
            .map_err(|e| Error::Internal(e.to_string()))?;
        mac.update(request.nonce.as_bytes());
        mac.update(b"\0");
        mac.update(request.username.as_bytes());
        mac.update(b"\0");
        mac.update(request.password.as_bytes());
        mac.update(b"\0");
        mac.update(if request.admin { b"admin" } else { b"notadmin" });
        if let Some(user_type) = request.user_type {
            mac.update(b"\0");
            mac.update(user_type.as_bytes());
        }
        let given = crate::storage::tables::from_hex(request.mac)
            .ok_or_else(|| Error::Forbidden("HMAC incorrect".to_owned()))?;
        mac.verify_slice(&given)
            .map_err(|_| Error::Forbidden("HMAC incorrect".to_owned()))?;
        let localpart = request.username.to_lowercase();
        let (_, login) = self
            .accounts
            .register(
                &localpart,
                Some(request.password),
                request.admin,
                Some(NewDevice::default()),
            )
            .await?;
        if let Some(name) = request.displayname {
            self.set_profile_field(&localpart, "displayname", json!(name))
                .await?;
        }
        login.ok_or_else(|| Error::Internal("registration made no device".to_owned()))
    }

    /// Starts deleting a room (see [`Services::delete_room_now`]) in the
    /// background; answers the deletion's ID.
    /// `None` when a deletion of the room is under way already.
    pub fn delete_room(
        self: &Arc<Self>,
        room_id: OwnedRoomId,
        by: String,
        how: DeleteRoom,
    ) -> Option<String> {
        let under_way = self
            .deletions_of_room(&room_id)
            .iter()
            .any(|d| matches!(d.status, "shutting_down" | "purging"));
        if under_way {
            return None;
        }
        let delete_id = ids::new_secret("", &mut rand::thread_rng());
        self.record_deletion(RoomDeletion {
            delete_id: delete_id.clone(),
            room_id: room_id.clone(),
            status: "shutting_down",
            error: None,
            shutdown_room: Shutdown::default(),
        });
        let services = self.clone();
        let id = delete_id.clone();
        tokio::spawn(async move {
            let outcome = services
                .delete_room_now(&room_id, &by, &how, Some(&id))
                .await;
            services.update_deletion(&id, |deletion| match outcome {
                Ok(shutdown) => {
                    deletion.status = "complete";
                    deletion.shutdown_room = shutdown;
                }
                Err(error) => {
                    tracing::warn!(%error, %room_id, "room deletion failed");
                    deletion.status = "failed";
                    deletion.error = Some(error.to_string());
                }
            });
        });
        Some(delete_id)
    }

    /// Deletes a room: every local member leaves it (or has their invite
    /// or knock withdrawn), its local aliases go, it leaves the public
    /// directory; with `block`, no local user may enter it again; with
    /// `purge`, everything stored about it is deleted. `by` names the admin
    /// (or the command line) for the block's record.
    pub async fn delete_room_now(
        &self,
        room_id: &RoomId,
        by: &str,
        how: &DeleteRoom,
        delete_id: Option<&str>,
    ) -> Result<Shutdown> {
        if how.block {
            self.rooms.set_blocked(room_id, by, true).await?;
        }
        let mut shutdown = Shutdown::default();
        if self.rooms.room(room_id)?.is_none() {
            if how.block {
                return Ok(shutdown);
            }
            return Err(Error::NotFound(format!("Unknown room {room_id}")));
        }
        for user in self
            .rooms
            .local_members(room_id, &["join", "invite", "knock"])?
        {
            let target = user.as_str();
            let left = self
                .rooms
                .set_membership(room_id, &user, &user, "leave", json!({}), None)
                .await;
            match left {
                Ok(_) => shutdown.kicked_users.push(target.to_owned()),
                Err(error) => {
                    tracing::warn!(%error, %room_id, user = target, "could not take a member out of a deleted room");
                    shutdown.failed_to_kick_users.push(target.to_owned());
                }
            }
        }
        for alias in self.directory.aliases(room_id)? {
            if let Ok(parsed) = ruma::RoomAliasId::parse(&alias) {
                self.directory
                    .delete_alias(&parsed, None, &self.rooms)
                    .await?;
                shutdown.local_aliases.push(alias);
            }
        }
        if self.directory.is_public(room_id)? {
            self.directory
                .set_visibility(room_id, None, false, &self.rooms)
                .await?;
        }
        if how.purge {
            if !shutdown.failed_to_kick_users.is_empty() && !how.force_purge {
                return Err(Error::Forbidden(format!(
                    "{} local users are still in the room; force_purge deletes it anyway",
                    shutdown.failed_to_kick_users.len()
                )));
            }
            if let Some(id) = delete_id {
                let partial = shutdown.clone();
                self.update_deletion(id, |deletion| {
                    deletion.status = "purging";
                    deletion.shutdown_room = partial;
                });
            }
            let purged = self.rooms.purge(room_id).await?;
            tracing::info!(%room_id, events = purged.events, state_groups = purged.state_groups, "room purged");
        }
        Ok(shutdown)
    }

    /// The remembered deletions of a room, newest first.
    pub fn deletions_of_room(&self, room_id: &RoomId) -> Vec<RoomDeletion> {
        let deletions = self.admin.deletions.lock().expect("deletions lock");
        deletions
            .iter()
            .rev()
            .filter(|d| d.room_id == room_id)
            .cloned()
            .collect()
    }

    /// One deletion by its ID.
    pub fn deletion(&self, delete_id: &str) -> Option<RoomDeletion> {
        let deletions = self.admin.deletions.lock().expect("deletions lock");
        deletions.iter().find(|d| d.delete_id == delete_id).cloned()
    }

    fn record_deletion(&self, deletion: RoomDeletion) {
        let mut deletions = self.admin.deletions.lock().expect("deletions lock");
        if deletions.len() >= MAX_DELETIONS {
            deletions.pop_front();
        }
        deletions.push_back(deletion);
    }

    fn update_deletion(&self, delete_id: &str, change: impl FnOnce(&mut RoomDeletion)) {
        let mut deletions = self.admin.deletions.lock().expect("deletions lock");
        if let Some(deletion) = deletions.iter_mut().find(|d| d.delete_id == delete_id) {
            change(deletion);
        }
    }

    /// Sends a server notice to a local user: in their notice room (made
    /// and tagged `m.server_notice` the first time, the user invited), by
    /// the notice user. Answers the event ID.
    pub async fn send_server_notice(
        &self,
        user: &UserId,
        kind: &str,
        state_key: Option<String>,
        content: Value,
        txn: Option<String>,
    ) -> Result<ruma::OwnedEventId> {
        let notices = &self.config.server_notices;
        if !notices.enabled {
            return Err(Error::InvalidParam(
                "Server notices are not enabled on this server".to_owned(),
            ));
        }
        if user.server_name().as_str() != self.config.server_name
            || self
                .accounts
                .user(user.localpart())?
                .is_none_or(|record| record.deactivated)
        {
            return Err(Error::InvalidParam(
                "Server notices can only be sent to active local users".to_owned(),
            ));
        }
        let room_id = self.notice_room(user).await?;
        let sender = self.notice_user()?;
        let new = match state_key {
            Some(key) => NewEvent::state(kind, &key, content),
            None => NewEvent::message(kind, content),
        };
        // A repeated transaction finds the first event through the
        // notice user's transactions, as a client's repeated send does.
        let origin = Origin {
            device_id: txn.as_ref().map(|_| NOTICE_DEVICE.to_owned()),
            txn: txn.map(|txn| (txn.clone(), txn)),
            ts: None,
        };
        self.rooms.send(&room_id, &sender, new, origin).await
    }

    /// The notice user's ID.
    fn notice_user(&self) -> Result<OwnedUserId> {
        let id = format!(
            "@{}:{}",
            self.config.server_notices.localpart, self.config.server_name
        );
        UserId::parse(id).map_err(|e| Error::Internal(e.to_string()))
    }

    /// The user's notice room: the room of the notice user's that the user
    /// is joined or invited to, made when there is none.
    async fn notice_room(&self, user: &UserId) -> Result<OwnedRoomId> {
        let _guard = self.admin.notices.lock().await;
        let sender = self.notice_user()?;
        let localpart = sender.localpart().to_owned();
        if self.accounts.user(&localpart)?.is_none() {
            self.accounts
                .register_for_appservice(&localpart, None)
                .await?;
            let name = self.config.server_notices.display_name.clone();
            self.set_profile_field(&localpart, "displayname", json!(name))
                .await?;
        }
        for membership in ["join", "invite"] {
            for room_id in self.rooms.rooms_of_user(user, membership)? {
                let tagged = self
                    .user_data
                    .tags(user, &room_id)?
                    .contains_key(SERVER_NOTICE_TAG);
                if tagged && self.rooms.membership(&room_id, &sender)? == "join" {
                    return Ok(room_id);
                }
            }
        }
        let request = CreateRoom {
            preset: Some(Preset::PrivateChat),
            name: Some(self.config.server_notices.room_name.clone()),
            power_level_content_override: Some(
                json!({ "events_default": 100, "invite": 100 })
                    .as_object()
                    .cloned()
                    .unwrap_or_default(),
            ),
            ..CreateRoom::default()
        };
        let profile = self
            .profiles
            .profile(&localpart)?
            .map(Value::Object)
            .unwrap_or(Value::Null);
        let room_id = self
            .rooms
            .create_room(
                &sender,
                request,
                &[user.to_owned()],
                profile,
                &self.directory,
                None,
            )
            .await?;
        self.user_data
            .update_tags(user, &room_id, |tags| {
                tags.insert(SERVER_NOTICE_TAG.to_owned(), json!({ "order": 0.5 }));
            })
            .await?;
        Ok(room_id)
    }
}
