//! Federation: this server's key document, other servers' keys (fetched,
//! checked, cached durably), the authentication of inbound requests, and
//! the outbound client. The protocol rules live in `myelin-federation`;
//! this service gives them storage, time and the network.

pub mod announce;
pub mod backfill;
pub mod client;
pub mod devices;
pub mod inbound;
pub mod media;
pub mod membership;
pub mod sender;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::http::Method;
use myelin_federation::request_auth::{body_content, AuthError, SignedRequest, XMatrix};
use myelin_federation::server_keys::{
    base64, own_key_document, to_canonical, verify_key_document, KeyError, VerifiedKeys,
};
use ruma::serde::Base64;
use ruma::{CanonicalJsonObject, OwnedServerName, ServerName};
use serde_json::{json, Value};

use super::clock::Clock;
use super::error::{Error, Result};
use crate::config::FederationConfig;
use crate::events::SigningKey;
use crate::storage::tables::{self, RemoteKeysRecord};
use crate::storage::{Batch, Storage};
pub use client::{FederationClient, SendError};

/// Most servers whose keys are kept in memory (all stay on disk).
const MAX_CACHED_SERVERS: usize = 10_000;

/// The federation service of one server.
pub struct Federation {
    server_name: OwnedServerName,
    key: Arc<SigningKey>,
    config: FederationConfig,
    storage: Storage,
    clock: Arc<dyn Clock>,
    pub client: FederationClient,
    /// Checked keys of other servers by name.
    keys: Mutex<HashMap<OwnedServerName, VerifiedKeys>>,
    /// The sender's workers, one per destination.
    pub destinations: sender::Destinations,
    /// Serialize the changes to each remote user's device list.
    pub device_locks: super::locks::StripedLocks,
}

impl Federation {
    pub fn new(
        config: FederationConfig,
        server_name: &str,
        key: Arc<SigningKey>,
        storage: Storage,
        clock: Arc<dyn Clock>,
    ) -> Result<Self> {
        let server_name = ServerName::parse(server_name)
            .map_err(|e| Error::Internal(format!("server_name: {e}")))?;
        let client =
            FederationClient::new(&config, server_name.clone(), key.clone(), clock.clone())?;
        Ok(Federation {
            server_name,
            key,
            config,
            storage,
            clock,
            client,
            keys: Mutex::default(),
            destinations: sender::Destinations::default(),
            device_locks: super::locks::StripedLocks::new(64),
        })
    }

    pub fn server_name(&self) -> &ServerName {
        &self.server_name
    }

    /// Whether the federation API is on.
    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// This server's signed key document (`GET /_matrix/key/v2/server`).
    pub fn own_key_document(&self) -> Result<CanonicalJsonObject> {
        let valid_until_ts = self
            .clock
            .now_ms()
            .saturating_add(self.config.key_valid_for_ms);
        own_key_document(
            &self.server_name,
            self.key.as_ref(),
            &self.key.key_id(),
            &self.key.public_key(),
            &[],
            valid_until_ts,
        )
        .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The checked keys of `server`, with `key_id` among them and valid
    /// until at least `minimum_valid_until_ts`: from memory, then disk, then
    /// the server itself, then each trusted notary.
    pub async fn server_keys(
        &self,
        server: &ServerName,
        key_id: &str,
        minimum_valid_until_ts: u64,
    ) -> Result<VerifiedKeys> {
        if server.as_str() == self.server_name.as_str() {
            let document = self.own_key_document()?;
            let now = self.clock.now_ms();
            return verify_key_document(&document, server, None, now)
                .map_err(|e| Error::Internal(e.to_string()));
        }
        let usable = |keys: &VerifiedKeys| {
            (keys.verify_keys.contains_key(key_id) && keys.valid_until_ts >= minimum_valid_until_ts)
                || keys.old_verify_keys.contains_key(key_id)
        };
        if let Some(keys) = self.cached_keys(server)? {
            if usable(&keys) {
                return Ok(keys);
            }
        }
        let mut problems = Vec::new();
        match self.fetch_keys_directly(server).await {
            Ok(keys) if usable(&keys) => return Ok(keys),
            Ok(_) => problems.push(format!("{server} does not publish {key_id}")),
            Err(error) => problems.push(error.to_string()),
        }
        for notary in &self.config.trusted_key_servers {
            match self.fetch_keys_from_notary(notary, server, key_id).await {
                Ok(keys) if usable(&keys) => return Ok(keys),
                Ok(_) => problems.push(format!("notary {notary} does not know {key_id}")),
                Err(error) => problems.push(error.to_string()),
            }
        }
        Err(Error::RemoteUnavailable(format!(
            "no usable key {key_id} of {server}: {}",
            problems.join("; ")
        )))
    }

    /// A remote user's profile, or one field of it, from their server
    /// (`GET /_matrix/federation/v1/query/profile`).
    pub async fn query_profile(
        &self,
        server: &ServerName,
        user_id: &str,
        field: Option<&str>,
    ) -> Result<Value> {
        let mut pairs = vec![("user_id", user_id)];
        pairs.extend(field.map(|field| ("field", field)));
        let query = query_string(&pairs);
        let path = format!("/_matrix/federation/v1/query/profile?{query}");
        match self.client.send(server, Method::GET, &path, None).await {
            Ok(profile) if profile.is_object() => Ok(profile),
            Ok(_) => Err(Error::RemoteUnavailable(format!(
                "{server} answered a profile that is not an object"
            ))),
            Err(SendError::Refused { status: 404, .. }) => {
                Err(Error::NotFound("Profile not found".to_owned()))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The room an alias of another server names, and the servers to
    /// join it through (`GET /_matrix/federation/v1/query/directory`).
    pub async fn query_directory(&self, alias: &ruma::RoomAliasId) -> Result<Value> {
        let query = query_string(&[("room_alias", alias.as_str())]);
        let path = format!("/_matrix/federation/v1/query/directory?{query}");
        match self
            .client
            .send(alias.server_name(), Method::GET, &path, None)
            .await
        {
            Ok(answer) if answer["room_id"].is_string() => Ok(answer),
            Ok(_) => Err(Error::RemoteUnavailable(format!(
                "{} answered an alias without a room_id",
                alias.server_name()
            ))),
            Err(SendError::Refused { status: 404, .. }) => {
                Err(Error::NotFound(format!("Room alias {alias} not found")))
            }
            Err(error) => Err(error.into()),
        }
    }

    /// A page of another server's public room directory
    /// (`GET`/`POST /_matrix/federation/v1/publicRooms`); `search` sends
    /// the page and filter as a `POST` body.
    pub async fn public_rooms(
        &self,
        server: &ServerName,
        page: &Value,
        search: bool,
    ) -> Result<Value> {
        let answer = if search {
            let path = "/_matrix/federation/v1/publicRooms";
            self.client
                .send(server, Method::POST, path, Some(page))
                .await
        } else {
            let limit = page["limit"].as_u64().map(|limit| limit.to_string());
            let mut pairs = Vec::new();
            pairs.extend(limit.as_deref().map(|limit| ("limit", limit)));
            pairs.extend(page["since"].as_str().map(|since| ("since", since)));
            let query = query_string(&pairs);
            let path = format!("/_matrix/federation/v1/publicRooms?{query}");
            self.client.send(server, Method::GET, &path, None).await
        };
        match answer {
            Ok(rooms) if rooms["chunk"].is_array() => Ok(rooms),
            Ok(_) => Err(Error::RemoteUnavailable(format!(
                "{server} answered a directory without a chunk"
            ))),
            Err(error) => Err(error.into()),
        }
    }

    /// Checks an inbound request's `Authorization` header and returns the
    /// server that sent it.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        method: &Method,
        uri: &str,
        body: &[u8],
    ) -> Result<OwnedServerName> {
        let unauthorized = |e: AuthError| Error::Unauthorized(e.to_string());
        let header = authorization
            .ok_or_else(|| Error::Unauthorized("missing X-Matrix authorization".to_owned()))?;
        let header = XMatrix::parse(header).map_err(unauthorized)?;
        if header.origin == self.server_name {
            return Err(Error::Unauthorized(
                "a request cannot come from this server itself".to_owned(),
            ));
        }
        let content =
            body_content(body).map_err(|_| Error::BadJson("the body is not JSON".to_owned()))?;
        let now = self.clock.now_ms();
        let keys = self
            .server_keys(&header.origin, &header.key, now)
            .await
            .map_err(|e| Error::Unauthorized(format!("cannot check the signature: {e}")))?;
        let public_key = keys.key_for(&header.key, now).ok_or_else(|| {
            Error::Unauthorized(format!(
                "{} is not a current key of {}",
                header.key, header.origin
            ))
        })?;
        SignedRequest {
            method: method.as_str(),
            uri,
            origin: &header.origin,
            destination: &self.server_name,
            content: content.as_ref(),
        }
        .verify(&header, &public_key)
        .map_err(unauthorized)?;
        self.destinations.peer_alive(header.origin.as_str());
        Ok(header.origin)
    }

    /// The notary answer for `(server, key_id)` pairs
    /// (`/_matrix/key/v2/query`): each server's key document as fetched
    /// (signed by the server), countersigned by this server. Servers whose
    /// keys cannot be had are left out, as the spec says.
    pub async fn notary_query(&self, wanted: &BTreeMap<OwnedServerName, Value>) -> Value {
        let mut documents = Vec::new();
        for server in wanted.keys() {
            let document = if server.as_str() == self.server_name.as_str() {
                self.own_key_document()
            } else {
                self.notarised_document(server).await
            };
            match document {
                Ok(document) => documents.push(json!(document)),
                Err(error) => tracing::info!(%server, %error, "no keys to notarise"),
            }
        }
        json!({ "server_keys": documents })
    }

    /// `server`'s own key document, freshly fetched and checked,
    /// countersigned by this server.
    async fn notarised_document(&self, server: &ServerName) -> Result<CanonicalJsonObject> {
        let (mut document, _) = self.fetch_key_document(server).await?;
        ruma::signatures::sign_json(self.server_name.as_str(), self.key.as_ref(), &mut document)
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(document)
    }

    async fn fetch_keys_directly(&self, server: &ServerName) -> Result<VerifiedKeys> {
        Ok(self.fetch_key_document(server).await?.1)
    }

    /// `server`'s own key document, fetched from it, checked and
    /// remembered.
    async fn fetch_key_document(
        &self,
        server: &ServerName,
    ) -> Result<(CanonicalJsonObject, VerifiedKeys)> {
        let fetched = self
            .client
            .get_public(server, "/_matrix/key/v2/server")
            .await?;
        let document = to_canonical(fetched).map_err(|e| key_problem(server, e))?;
        let keys = verify_key_document(&document, server, None, self.clock.now_ms())
            .map_err(|e| key_problem(server, e))?;
        self.remember(server, &keys).await?;
        Ok((document, keys))
    }

    async fn fetch_keys_from_notary(
        &self,
        notary: &str,
        server: &ServerName,
        key_id: &str,
    ) -> Result<VerifiedKeys> {
        let notary = ServerName::parse(notary).map_err(|e| Error::Internal(e.to_string()))?;
        let notary: &ServerName = &notary;
        let notary_keys = match self.cached_keys(notary)? {
            Some(keys) if keys.valid_until_ts >= self.clock.now_ms() => keys,
            _ => self.fetch_keys_directly(notary).await?,
        };
        let query = json!({ "server_keys": { server.as_str(): { key_id: {} } } });
        let answer = self
            .client
            .send(notary, Method::POST, "/_matrix/key/v2/query", Some(&query))
            .await
            .map_err(Error::from)?;
        let documents = answer["server_keys"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let now = self.clock.now_ms();
        for document in documents {
            let Ok(document) = to_canonical(document) else {
                continue;
            };
            match verify_key_document(&document, server, Some((notary, &notary_keys)), now) {
                Ok(keys) => {
                    self.remember(server, &keys).await?;
                    return Ok(keys);
                }
                Err(error) => tracing::info!(%server, %notary, %error, "notary answer refused"),
            }
        }
        Err(Error::RemoteUnavailable(format!(
            "notary {notary} gave no valid keys of {server}"
        )))
    }

    fn cached_keys(&self, server: &ServerName) -> Result<Option<VerifiedKeys>> {
        if let Some(keys) = self.keys.lock().expect("not poisoned").get(server) {
            return Ok(Some(keys.clone()));
        }
        let Some(record) = self
            .storage
            .get(tables::REMOTE_SERVER_KEYS, &server.to_string())?
        else {
            return Ok(None);
        };
        let keys = from_record(server, &record)?;
        self.keep_in_memory(server, &keys);
        Ok(Some(keys))
    }

    /// Stores checked keys, merging the former keys already known.
    async fn remember(&self, server: &ServerName, keys: &VerifiedKeys) -> Result<()> {
        let mut merged = keys.clone();
        if let Some(previous) = self.cached_keys(server)? {
            for (key_id, key) in previous.verify_keys {
                if !merged.verify_keys.contains_key(&key_id) {
                    // A key the server stopped publishing: it stays good for
                    // what it signed while it was current.
                    merged
                        .old_verify_keys
                        .entry(key_id)
                        .or_insert((key, previous.valid_until_ts));
                }
            }
            for (key_id, old) in previous.old_verify_keys {
                merged.old_verify_keys.entry(key_id).or_insert(old);
            }
        }
        let record = to_record(&merged, self.clock.now_ms());
        let mut batch = Batch::new();
        batch.put(tables::REMOTE_SERVER_KEYS, &server.to_string(), &record);
        self.storage.commit(batch).await?;
        self.keep_in_memory(server, &merged);
        Ok(())
    }

    fn keep_in_memory(&self, server: &ServerName, keys: &VerifiedKeys) {
        let mut cache = self.keys.lock().expect("not poisoned");
        if cache.len() >= MAX_CACHED_SERVERS && !cache.contains_key(server) {
            cache.clear();
        }
        cache.insert(server.to_owned(), keys.clone());
    }
}

/// A URL query string of `pairs`, encoded. (The encoder is not `Send`,
/// so it lives only inside this function, never across an await.)
fn query_string(pairs: &[(&str, &str)]) -> String {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.extend_pairs(pairs);
    query.finish()
}

fn key_problem(server: &ServerName, error: KeyError) -> Error {
    Error::RemoteUnavailable(format!("keys of {server}: {error}"))
}

fn to_record(keys: &VerifiedKeys, now_ms: u64) -> RemoteKeysRecord {
    RemoteKeysRecord {
        verify_keys: keys
            .verify_keys
            .iter()
            .map(|(id, key)| (id.clone(), base64(key)))
            .collect(),
        old_verify_keys: keys
            .old_verify_keys
            .iter()
            .map(|(id, (key, expired))| (id.clone(), (base64(key), *expired)))
            .collect(),
        valid_until_ts: keys.valid_until_ts,
        fetched_ts: now_ms,
    }
}

fn from_record(server: &ServerName, record: &RemoteKeysRecord) -> Result<VerifiedKeys> {
    let decode = |text: &str| -> Result<[u8; 32]> {
        let parsed: Base64 = Base64::parse(text)
            .map_err(|_| Error::Internal(format!("stored key of {server} is not base64")))?;
        parsed
            .as_bytes()
            .try_into()
            .map_err(|_| Error::Internal(format!("stored key of {server} is not 32 bytes")))
    };
    let mut verify_keys = BTreeMap::new();
    for (id, key) in &record.verify_keys {
        verify_keys.insert(id.clone(), decode(key)?);
    }
    let mut old_verify_keys = BTreeMap::new();
    for (id, (key, expired)) in &record.old_verify_keys {
        old_verify_keys.insert(id.clone(), (decode(key)?, *expired));
    }
    Ok(VerifiedKeys {
        server_name: server.to_string(),
        verify_keys,
        old_verify_keys,
        valid_until_ts: record.valid_until_ts,
    })
}
