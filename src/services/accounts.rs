//! Accounts, devices and access tokens: the one write path for all three.
//!
//! Passwords are hashed with Argon2id on blocking threads. Each device has
//! exactly one access token (and at most one refresh token); tokens are
//! stored as SHA-256 digests, so a database leak reveals no usable token.
//! Deleting a device deletes its tokens in the same batch, so the token
//! stops working the moment the deletion is committed.

use std::sync::Arc;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use sha2::{Digest, Sha256};

use super::clock::Clock;
use super::error::{Error, Result};
use super::locks::StripedLocks;
use super::rooms::BoundedMemo;
use super::stream::{Reservation, StreamCounter};
use crate::config::PasswordHashing;
use crate::ids::{self, UserId};
use crate::storage::tables::StreamEntry;
use crate::storage::tables::{
    self, AccessTokenRecord, DeviceKey, DeviceRecord, RefreshTokenRecord, TokenHash, UserRecord,
};
use crate::storage::{Batch, Storage, Table};
use rand::Rng;

/// Most devices one account may list at once; far above any real account.
const MAX_DEVICES_LISTED: usize = 10_000;

/// An authenticated request's user and device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authed {
    pub user_id: UserId,
    pub device_id: String,
    /// The account is suspended: it may read but not write.
    pub suspended: bool,
    /// The account is locked: it may only log out.
    pub locked: bool,
    /// The application service acting (as its sender or one of its
    /// users), when the request carried an `as_token`.
    pub appservice: Option<String>,
    /// The `origin_server_ts` the application service asked for (`ts`).
    pub origin_ts: Option<u64>,
}

/// A token found valid ([`Accounts::recheck`]): the storage's rewrite
/// generation seen before it was read, and when it expires.
#[derive(Clone, Copy, Debug)]
pub struct TokenCheck {
    generation: u64,
    expires_at_ms: Option<u64>,
}

/// What an admin may impose on an account.
#[derive(Clone, Copy, Debug)]
pub enum Restriction {
    Suspended,
    Locked,
}

impl Authed {
    pub fn localpart(&self) -> &str {
        &self.user_id.localpart
    }
}

/// What the client asked for when it logs in or registers.
#[derive(Clone, Debug, Default)]
pub struct NewDevice {
    pub device_id: Option<String>,
    pub display_name: Option<String>,
    pub wants_refresh_token: bool,
    pub ip: Option<String>,
}

/// A device's fresh credentials.
#[derive(Clone, Debug)]
pub struct Login {
    pub user_id: UserId,
    pub device_id: String,
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_in_ms: Option<u64>,
}

/// A device as the device-management API shows it.
#[derive(Clone, Debug)]
pub struct Device {
    pub device_id: String,
    pub record: DeviceRecord,
}

pub struct Accounts {
    storage: Storage,
    server_name: String,
    hashing: Params,
    refreshable_lifetime_ms: u64,
    clock: Arc<dyn Clock>,
    locks: StripedLocks,
    stream: Arc<StreamCounter>,
    /// Requests' tokens found valid lately (see [`Accounts::authenticate_request`]).
    checked_tokens: BoundedMemo<TokenHash, CheckedToken>,
}

/// Most access tokens remembered as checked.
const CHECKED_TOKEN_ENTRIES: usize = 4_096;

/// An access token found valid, with what its check found.
#[derive(Clone)]
struct CheckedToken {
    /// The writes to the token and account tables counted before the
    /// check read them.
    writes: u64,
    authed: Authed,
    expires_at_ms: Option<u64>,
}

impl Accounts {
    pub fn new(
        storage: Storage,
        server_name: String,
        hashing: &PasswordHashing,
        refreshable_lifetime_ms: u64,
        clock: Arc<dyn Clock>,
        stream: Arc<StreamCounter>,
    ) -> Self {
        let hashing = Params::new(
            hashing.memory_kib,
            hashing.iterations,
            hashing.parallelism,
            None,
        )
        .expect("password hashing parameters are validated with the config");
        Accounts {
            storage,
            server_name,
            hashing,
            refreshable_lifetime_ms,
            clock,
            locks: StripedLocks::new(64),
            stream,
            checked_tokens: BoundedMemo::new(CHECKED_TOKEN_ENTRIES),
        }
    }

    pub fn user_id(&self, localpart: &str) -> UserId {
        UserId::new(localpart, &self.server_name)
    }

    /// The local account named by `user`, which may be a bare localpart or
    /// a full user ID; localparts are matched case-insensitively.
    pub fn resolve_local_user(&self, user: &str) -> Option<String> {
        let localpart = if user.starts_with('@') {
            let id = UserId::parse(user)?;
            if id.server_name != self.server_name {
                return None;
            }
            id.localpart
        } else {
            user.to_owned()
        };
        Some(localpart.to_lowercase())
    }

    pub fn user(&self, localpart: &str) -> Result<Option<UserRecord>> {
        Ok(self.storage.get(tables::USERS, &localpart.to_owned())?)
    }

    /// Checks that `localpart` is a valid, unused name for a new account.
    pub fn check_available(&self, localpart: &str) -> Result<()> {
        ids::check_new_localpart(localpart, &self.server_name).map_err(Error::InvalidUsername)?;
        self.check_unused(localpart)
    }

    /// Checks that no account has `localpart`.
    fn check_unused(&self, localpart: &str) -> Result<()> {
        if self.user(localpart)?.is_some() {
            return Err(Error::UserInUse);
        }
        Ok(())
    }

    /// Creates an account, and a first device unless `device` is `None`.
    pub async fn register(
        &self,
        localpart: &str,
        password: Option<&str>,
        admin: bool,
        device: Option<NewDevice>,
    ) -> Result<(UserId, Option<Login>)> {
        self.check_available(localpart)?;
        self.create(localpart, password, admin, device).await
    }

    /// Creates an application service's user, or the server's own notice
    /// sender: its localpart may begin with `_` (bridges' users often do);
    /// no password.
    pub async fn register_for_appservice(
        &self,
        localpart: &str,
        device: Option<NewDevice>,
    ) -> Result<(UserId, Option<Login>)> {
        ids::check_appservice_localpart(localpart, &self.server_name)
            .map_err(Error::InvalidUsername)?;
        self.check_unused(localpart)?;
        self.create(localpart, None, false, device).await
    }

    async fn create(
        &self,
        localpart: &str,
        password: Option<&str>,
        admin: bool,
        device: Option<NewDevice>,
    ) -> Result<(UserId, Option<Login>)> {
        if let Some(device_id) = device.as_ref().and_then(|d| d.device_id.as_deref()) {
            ids::check_device_id(device_id).map_err(Error::InvalidParam)?;
        }
        let password_hash = match password {
            Some(password) => Some(self.hash_password(password).await?),
            None => None,
        };
        let _guard = self.locks.lock(localpart).await;
        // Checked again under the lock: another registration may have won.
        if self.user(localpart)?.is_some() {
            return Err(Error::UserInUse);
        }
        let now = self.clock.now_ms();
        let mut batch = Batch::new();
        let record = UserRecord {
            password_hash,
            admin,
            deactivated: false,
            created_ts: now,
            suspended: false,
            locked: false,
        };
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        let mut profile = serde_json::Map::new();
        profile.insert("displayname".to_owned(), localpart.into());
        batch.put(tables::PROFILES, &localpart.to_owned(), &profile);
        let login = match device {
            Some(device) => Some(self.issue_device(&mut batch, localpart, device)?),
            None => None,
        };
        let _device_list = login
            .is_some()
            .then(|| self.device_list_changed(&mut batch, localpart));
        self.storage.commit(batch).await?;
        Ok((self.user_id(localpart), login))
    }

    /// Logs in with a password and returns the new (or renewed) device.
    pub async fn login_with_password(
        &self,
        user: &str,
        password: &str,
        device: NewDevice,
    ) -> Result<Login> {
        let invalid = || Error::Forbidden("Invalid username or password".to_owned());
        let localpart = self.resolve_local_user(user).ok_or_else(invalid)?;
        let record = self.user(&localpart)?.ok_or_else(invalid)?;
        if record.deactivated {
            return Err(Error::UserDeactivated);
        }
        if !self.verify_password(&localpart, password).await? {
            return Err(invalid());
        }
        if let Some(device_id) = &device.device_id {
            ids::check_device_id(device_id).map_err(Error::InvalidParam)?;
        }
        let _guard = self.locks.lock(&localpart).await;
        let mut batch = Batch::new();
        let login = self.issue_device(&mut batch, &localpart, device)?;
        let _device_list = self.device_list_changed(&mut batch, &localpart);
        self.storage.commit(batch).await?;
        Ok(login)
    }

    /// A new short-lived token for a local user in `table` (OpenID or
    /// login tokens), lasting `lifetime_ms`; the token.
    pub async fn issue_short_token(
        &self,
        table: Table<TokenHash, (String, u64)>,
        user_id: &str,
        lifetime_ms: u64,
    ) -> Result<String> {
        let token: String = rand::thread_rng()
            .sample_iter(&rand::distributions::Alphanumeric)
            .take(32)
            .map(char::from)
            .collect();
        let expires = self.clock.now_ms().saturating_add(lifetime_ms);
        let mut batch = Batch::new();
        batch.put(table, &hash_token(&token), &(user_id.to_owned(), expires));
        self.storage.commit(batch).await?;
        Ok(token)
    }

    /// The user an unexpired short-lived token of `table` names.
    pub fn short_token_user(
        &self,
        table: Table<TokenHash, (String, u64)>,
        token: &str,
    ) -> Result<Option<String>> {
        let found = self.storage.get(table, &hash_token(token))?;
        Ok(found
            .filter(|(_, expires)| *expires > self.clock.now_ms())
            .map(|(user_id, _)| user_id))
    }

    /// `m.login.token`: a login token, used once, makes a new device.
    pub async fn login_with_token(&self, token: &str, device: NewDevice) -> Result<Login> {
        let invalid = || Error::Forbidden("Invalid login token".to_owned());
        let user_id = self
            .short_token_user(tables::LOGIN_TOKENS, token)?
            .ok_or_else(invalid)?;
        let localpart = self.resolve_local_user(&user_id).ok_or_else(invalid)?;
        let record = self.user(&localpart)?.ok_or_else(invalid)?;
        if record.deactivated {
            return Err(Error::UserDeactivated);
        }
        if let Some(device_id) = &device.device_id {
            ids::check_device_id(device_id).map_err(Error::InvalidParam)?;
        }
        let _guard = self.locks.lock(&localpart).await;
        // Under the lock: of two logins with one token, the second finds
        // it gone.
        if self
            .storage
            .get(tables::LOGIN_TOKENS, &hash_token(token))?
            .is_none()
        {
            return Err(invalid());
        }
        let mut batch = Batch::new();
        batch.delete(tables::LOGIN_TOKENS, &hash_token(token));
        let login = self.issue_device(&mut batch, &localpart, device)?;
        let _device_list = self.device_list_changed(&mut batch, &localpart);
        self.storage.commit(batch).await?;
        Ok(login)
    }

    /// Whether `password` is the account's password. A deactivated account
    /// or one without a password never matches.
    pub async fn verify_password(&self, localpart: &str, password: &str) -> Result<bool> {
        let Some(hash) = self.user(localpart)?.and_then(|u| u.password_hash) else {
            return Ok(false);
        };
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let Ok(parsed) = PasswordHash::new(&hash) else {
                return false;
            };
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The user and device an access token belongs to.
    pub fn authenticate(&self, token: &str) -> Result<Authed> {
        self.authed(&self.token_record(token)?)
    }

    /// The user and device of a valid token's record.
    fn authed(&self, record: &AccessTokenRecord) -> Result<Authed> {
        let user = self.user(&record.localpart)?;
        Ok(Authed {
            user_id: self.user_id(&record.localpart),
            device_id: record.device_id.clone(),
            suspended: user.as_ref().is_some_and(|u| u.suspended),
            locked: user.as_ref().is_some_and(|u| u.locked),
            appservice: None,
            origin_ts: None,
        })
    }

    /// [`Accounts::authenticate`] for a client's request: a token checked
    /// lately is trusted without reading it and its account again while
    /// neither the token table nor the account table has been written
    /// since (a logout, a new login, a suspension or lock, a deactivation
    /// all write one of them), and until it expires.
    pub fn authenticate_request(&self, token: &str) -> Result<Authed> {
        let hash = hash_token(token);
        let writes = self.token_writes();
        if let Some(checked) = self.checked_tokens.get(&hash) {
            let unexpired = checked
                .expires_at_ms
                .is_none_or(|at| self.clock.now_ms() < at);
            if checked.writes == writes && unexpired {
                return Ok(checked.authed);
            }
        }
        let record = self.token_record(token)?;
        let authed = self.authed(&record)?;
        let checked = CheckedToken {
            writes,
            authed: authed.clone(),
            expires_at_ms: record.expires_at_ms,
        };
        self.checked_tokens.insert(hash, checked);
        Ok(authed)
    }

    /// The writes so far to the tables a token's check reads (each count
    /// only grows, so their sum moves when either does).
    fn token_writes(&self) -> u64 {
        self.storage.table_writes(tables::ACCESS_TOKENS) + self.storage.table_writes(tables::USERS)
    }

    /// A valid token's record: known, and not expired.
    fn token_record(&self, token: &str) -> Result<AccessTokenRecord> {
        let record = self
            .storage
            .get(tables::ACCESS_TOKENS, &hash_token(token))?
            .ok_or(Error::UnknownToken { soft_logout: false })?;
        if let Some(expires_at_ms) = record.expires_at_ms {
            if self.clock.now_ms() >= expires_at_ms {
                return Err(Error::UnknownToken { soft_logout: true });
            }
        }
        Ok(record)
    }

    /// Checks again a token that its holder keeps (a WebSocket connection
    /// checks its token before each push), given the previous check: the
    /// token is read only when one may have been removed since (every
    /// removal of an access token advances the storage's rewrite
    /// generation before and after it is written), or when it expires.
    pub fn recheck(&self, token: &str, previous: Option<TokenCheck>) -> Result<TokenCheck> {
        let generation = self.storage.rewrites();
        if let Some(previous) = previous {
            let unexpired = previous
                .expires_at_ms
                .is_none_or(|at| self.clock.now_ms() < at);
            if previous.generation == generation && unexpired {
                return Ok(previous);
            }
        }
        let record = self.token_record(token)?;
        Ok(TokenCheck {
            generation,
            expires_at_ms: record.expires_at_ms,
        })
    }

    /// The user an application service acts as: `user_id` (its sender
    /// when `None`), which must be in its namespaces and registered; and
    /// with `device_id` (MSC3202) one of that user's devices.
    pub fn authenticate_appservice(
        &self,
        service: &myelin_appservices::Registration,
        user_id: Option<&str>,
        device_id: Option<&str>,
    ) -> Result<Authed> {
        let user_id = user_id.unwrap_or(&service.sender);
        if !service.may_masquerade_as(user_id) {
            return Err(Error::Forbidden(format!(
                "The application service cannot act as {user_id}"
            )));
        }
        let localpart = self
            .resolve_local_user(user_id)
            .ok_or_else(|| Error::Forbidden(format!("{user_id} is not a user of this server")))?;
        let user = self
            .user(&localpart)?
            .filter(|user| !user.deactivated)
            .ok_or_else(|| {
                Error::Forbidden(format!(
                    "The application service has not registered {user_id}"
                ))
            })?;
        let device_id = match device_id {
            Some(device_id) => {
                if self.device(&localpart, device_id)?.is_none() {
                    return Err(Error::Forbidden(format!(
                        "{user_id} has no device {device_id}"
                    )));
                }
                device_id.to_owned()
            }
            None => String::new(),
        };
        Ok(Authed {
            user_id: self.user_id(&localpart),
            device_id,
            suspended: user.suspended,
            locked: user.locked,
            appservice: Some(service.id.clone()),
            origin_ts: None,
        })
    }

    /// Logs an application service's user in
    /// (`m.login.application_service`): a new device, no password.
    pub async fn login_for_appservice(&self, localpart: &str, device: NewDevice) -> Result<Login> {
        let record = self
            .user(localpart)?
            .ok_or_else(|| Error::Forbidden("No such user".to_owned()))?;
        if record.deactivated {
            return Err(Error::UserDeactivated);
        }
        if let Some(device_id) = &device.device_id {
            ids::check_device_id(device_id).map_err(Error::InvalidParam)?;
        }
        let _guard = self.locks.lock(localpart).await;
        let mut batch = Batch::new();
        let login = self.issue_device(&mut batch, localpart, device)?;
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(login)
    }

    /// An admin suspends (or unsuspends) a local user, or locks (or
    /// unlocks) them. Admins themselves cannot be.
    pub async fn set_restriction(
        &self,
        localpart: &str,
        restriction: Restriction,
        on: bool,
    ) -> Result<()> {
        let _guard = self.locks.lock(localpart).await;
        let mut record = self
            .user(localpart)?
            .filter(|record| !record.deactivated)
            .ok_or_else(|| Error::NotFound("No such user".to_owned()))?;
        if record.admin {
            return Err(Error::Forbidden(
                "An administrator cannot be suspended or locked".to_owned(),
            ));
        }
        match restriction {
            Restriction::Suspended => record.suspended = on,
            Restriction::Locked => record.locked = on,
        }
        let mut batch = Batch::new();
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Exchanges a refresh token for a new access and refresh token. The
    /// old pair stops working.
    pub async fn refresh(&self, refresh_token: &str) -> Result<Login> {
        let unknown = || Error::UnknownToken { soft_logout: false };
        let hash = hash_token(refresh_token);
        let record = self
            .storage
            .get(tables::REFRESH_TOKENS, &hash)?
            .ok_or_else(unknown)?;
        let _guard = self.locks.lock(&record.localpart).await;
        let key = DeviceKey::new(&record.localpart, &record.device_id);
        let device = self
            .storage
            .get(tables::DEVICES, &key)?
            .ok_or_else(unknown)?;
        if device.refresh_token != Some(hash) {
            return Err(unknown());
        }
        let mut batch = Batch::new();
        let login = self.issue_device(
            &mut batch,
            &record.localpart,
            NewDevice {
                device_id: Some(record.device_id),
                wants_refresh_token: true,
                ..NewDevice::default()
            },
        )?;
        self.storage.commit(batch).await?;
        Ok(login)
    }

    /// Every device of an account, ordered by device ID.
    pub fn devices(&self, localpart: &str) -> Result<Vec<Device>> {
        let prefix = DeviceKey::user_prefix(localpart);
        let entries = self
            .storage
            .scan_prefix(tables::DEVICES, &prefix, MAX_DEVICES_LISTED)?;
        Ok(entries
            .into_iter()
            .map(|(key, record)| Device {
                device_id: key.device_id,
                record,
            })
            .collect())
    }

    pub fn device(&self, localpart: &str, device_id: &str) -> Result<Option<DeviceRecord>> {
        Ok(self
            .storage
            .get(tables::DEVICES, &DeviceKey::new(localpart, device_id))?)
    }

    /// Sets a device's display name; `NotFound` if there is no such device.
    pub async fn rename_device(
        &self,
        localpart: &str,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<()> {
        let _guard = self.locks.lock(localpart).await;
        let key = DeviceKey::new(localpart, device_id);
        let mut record = self
            .storage
            .get(tables::DEVICES, &key)?
            .ok_or_else(|| Error::NotFound("Unknown device".to_owned()))?;
        record.display_name = display_name;
        let mut batch = Batch::new();
        batch.put(tables::DEVICES, &key, &record);
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// MSC4190: an application service creates a device for one of its
    /// users (or names an existing one); whether it was created. The
    /// device's access token is never handed out: the service acts for
    /// it with its own token and `device_id`.
    pub async fn ensure_device(
        &self,
        localpart: &str,
        device_id: &str,
        display_name: Option<String>,
    ) -> Result<bool> {
        ids::check_device_id(device_id).map_err(Error::InvalidParam)?;
        // Under the account's lock: a device a login made meanwhile is
        // renamed, never given new tokens.
        let _guard = self.locks.lock(localpart).await;
        let mut batch = Batch::new();
        let key = DeviceKey::new(localpart, device_id);
        if let Some(mut record) = self.storage.get(tables::DEVICES, &key)? {
            record.display_name = display_name;
            batch.put(tables::DEVICES, &key, &record);
            let _device_list = self.device_list_changed(&mut batch, localpart);
            self.storage.commit(batch).await?;
            return Ok(false);
        }
        let device = NewDevice {
            device_id: Some(device_id.to_owned()),
            display_name,
            wants_refresh_token: false,
            ip: None,
        };
        self.issue_device(&mut batch, localpart, device)?;
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(true)
    }

    /// Deletes devices and their tokens in one batch. Unknown IDs are
    /// skipped, as the spec allows.
    pub async fn delete_devices(&self, localpart: &str, device_ids: &[String]) -> Result<()> {
        let _guard = self.locks.lock(localpart).await;
        let mut batch = Batch::new();
        for device_id in device_ids {
            self.delete_device_into(&mut batch, localpart, device_id)?;
        }
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Deletes every device of the account except `keep`.
    pub async fn delete_all_devices(&self, localpart: &str, keep: Option<&str>) -> Result<()> {
        let ids: Vec<String> = self
            .devices(localpart)?
            .into_iter()
            .map(|d| d.device_id)
            .filter(|id| Some(id.as_str()) != keep)
            .collect();
        self.delete_devices(localpart, &ids).await
    }

    /// Sets a new password; with `logout_devices`, every device other than
    /// `keep` is logged out in the same batch.
    pub async fn set_password(
        &self,
        localpart: &str,
        password: &str,
        logout_devices: bool,
        keep: Option<&str>,
    ) -> Result<()> {
        let hash = self.hash_password(password).await?;
        let _guard = self.locks.lock(localpart).await;
        let mut record = self
            .user(localpart)?
            .ok_or_else(|| Error::NotFound(format!("no local user {localpart}")))?;
        if record.deactivated {
            return Err(Error::UserDeactivated);
        }
        record.password_hash = Some(hash);
        let mut batch = Batch::new();
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        if logout_devices {
            for device in self.devices(localpart)? {
                if Some(device.device_id.as_str()) != keep {
                    self.delete_device_into(&mut batch, localpart, &device.device_id)?;
                }
            }
        }
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Every local account, by localpart (for admins).
    pub fn all(&self) -> Result<Vec<(String, UserRecord)>> {
        Ok(self.storage.scan_prefix(tables::USERS, &[], usize::MAX)?)
    }

    /// Makes a local user a server admin, or no longer one.
    pub async fn set_admin(&self, localpart: &str, admin: bool) -> Result<()> {
        let _guard = self.locks.lock(localpart).await;
        let mut record = self
            .user(localpart)?
            .ok_or_else(|| Error::NotFound(format!("no local user {localpart}")))?;
        if record.admin == admin {
            return Ok(());
        }
        record.admin = admin;
        let mut batch = Batch::new();
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Gives a deactivated account a password again, so that it can log
    /// in (an admin's doing; its profile starts afresh).
    pub async fn reactivate(&self, localpart: &str, password: &str) -> Result<()> {
        let hash = self.hash_password(password).await?;
        let _guard = self.locks.lock(localpart).await;
        let mut record = self
            .user(localpart)?
            .ok_or_else(|| Error::NotFound(format!("no local user {localpart}")))?;
        if !record.deactivated {
            return Ok(());
        }
        record.deactivated = false;
        record.password_hash = Some(hash);
        let mut batch = Batch::new();
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        let mut profile = serde_json::Map::new();
        profile.insert("displayname".to_owned(), localpart.into());
        batch.put(tables::PROFILES, &localpart.to_owned(), &profile);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Deactivates an account for good: no password, no devices, no
    /// profile. The user ID stays taken.
    pub async fn deactivate(&self, localpart: &str) -> Result<()> {
        let _guard = self.locks.lock(localpart).await;
        let mut record = self
            .user(localpart)?
            .ok_or_else(|| Error::NotFound(format!("no local user {localpart}")))?;
        record.deactivated = true;
        record.password_hash = None;
        let mut batch = Batch::new();
        batch.put(tables::USERS, &localpart.to_owned(), &record);
        batch.delete(tables::PROFILES, &localpart.to_owned());
        for device in self.devices(localpart)? {
            self.delete_device_into(&mut batch, localpart, &device.device_id)?;
        }
        let _device_list = self.device_list_changed(&mut batch, localpart);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Records in `batch` that the user's device list changed, for the
    /// `device_lists` of everyone who shares a room with them; keep the
    /// reservation until the batch has committed.
    fn device_list_changed(&self, batch: &mut Batch, localpart: &str) -> Reservation {
        let entry = StreamEntry::DeviceList {
            user_id: self.user_id(localpart).to_string(),
        };
        self.stream.next_into(batch, &entry).1
    }

    /// Adds to `batch` the deletion of a device and its tokens.
    fn delete_device_into(
        &self,
        batch: &mut Batch,
        localpart: &str,
        device_id: &str,
    ) -> Result<()> {
        let key = DeviceKey::new(localpart, device_id);
        if let Some(device) = self.storage.get(tables::DEVICES, &key)? {
            // Holders of the token learn of its removal (`recheck`).
            batch.mark_rewrite();
            batch.delete(tables::ACCESS_TOKENS, &device.access_token);
            if let Some(refresh) = device.refresh_token {
                batch.delete(tables::REFRESH_TOKENS, &refresh);
            }
            batch.delete(tables::DEVICES, &key);
            let user_id = self.user_id(localpart).to_string();
            super::e2ee::forget_device_into(&self.storage, batch, &user_id, device_id)?;
            super::pushers::forget_device_into(&self.storage, batch, localpart, device_id)?;
        }
        Ok(())
    }

    /// Adds to `batch` a device with fresh tokens. An existing device keeps
    /// its display name and loses its previous tokens. The caller holds the
    /// account's lock.
    fn issue_device(&self, batch: &mut Batch, localpart: &str, new: NewDevice) -> Result<Login> {
        let mut rng = rand::thread_rng();
        let device_id = new
            .device_id
            .unwrap_or_else(|| ids::new_device_id(&mut rng));
        let key = DeviceKey::new(localpart, &device_id);
        let now = self.clock.now_ms();
        let previous = self.storage.get(tables::DEVICES, &key)?;
        if let Some(previous) = &previous {
            // Holders of the old token learn of its removal (`recheck`).
            batch.mark_rewrite();
            batch.delete(tables::ACCESS_TOKENS, &previous.access_token);
            if let Some(refresh) = &previous.refresh_token {
                batch.delete(tables::REFRESH_TOKENS, refresh);
            }
        }
        let access_token = ids::new_secret("mya_", &mut rng);
        let (refresh_token, expires_in_ms) = if new.wants_refresh_token {
            let token = ids::new_secret("myr_", &mut rng);
            (Some(token), Some(self.refreshable_lifetime_ms))
        } else {
            (None, None)
        };
        let record = DeviceRecord {
            display_name: match &previous {
                Some(previous) => previous.display_name.clone(),
                None => new.display_name,
            },
            created_ts: previous.as_ref().map_or(now, |p| p.created_ts),
            last_seen_ts: Some(now),
            last_seen_ip: new.ip,
            access_token: hash_token(&access_token),
            refresh_token: refresh_token.as_deref().map(hash_token),
        };
        let grant = AccessTokenRecord {
            localpart: localpart.to_owned(),
            device_id: device_id.clone(),
            expires_at_ms: expires_in_ms.map(|lifetime| now + lifetime),
        };
        batch.put(tables::ACCESS_TOKENS, &record.access_token, &grant);
        if let Some(hash) = &record.refresh_token {
            let renews = RefreshTokenRecord {
                localpart: localpart.to_owned(),
                device_id: device_id.clone(),
            };
            batch.put(tables::REFRESH_TOKENS, hash, &renews);
        }
        batch.put(tables::DEVICES, &key, &record);
        Ok(Login {
            user_id: self.user_id(localpart),
            device_id,
            access_token,
            refresh_token,
            expires_in_ms,
        })
    }

    async fn hash_password(&self, password: &str) -> Result<String> {
        let params = self.hashing.clone();
        let password = password.to_owned();
        tokio::task::spawn_blocking(move || {
            let salt = SaltString::generate(&mut rand::thread_rng());
            Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(password.as_bytes(), &salt)
                .map(|hash| hash.to_string())
                .map_err(|e| Error::Internal(format!("password hashing failed: {e}")))
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }
}

/// The stored form of a secret token.
pub fn hash_token(token: &str) -> TokenHash {
    TokenHash(Sha256::digest(token.as_bytes()).into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ManualClock;

    fn accounts(clock: Arc<ManualClock>) -> Accounts {
        let cheap = PasswordHashing {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        };
        let storage = Storage::in_memory();
        let stream = StreamCounter::load(&storage, Arc::default()).unwrap();
        Accounts::new(
            storage,
            "example.org".into(),
            &cheap,
            1000,
            clock,
            Arc::new(stream),
        )
    }

    #[tokio::test]
    async fn refreshable_tokens_expire_and_rotate() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let accounts = accounts(clock.clone());
        let device = NewDevice {
            wants_refresh_token: true,
            ..NewDevice::default()
        };
        let (_, login) = accounts
            .register("alice", Some("pw"), false, Some(device))
            .await
            .unwrap();
        let login = login.unwrap();
        assert_eq!(login.expires_in_ms, Some(1000));
        assert!(accounts.authenticate(&login.access_token).is_ok());
        clock.advance_ms(1000);
        assert!(matches!(
            accounts.authenticate(&login.access_token),
            Err(Error::UnknownToken { soft_logout: true })
        ));
        let refresh = login.refresh_token.unwrap();
        let renewed = accounts.refresh(&refresh).await.unwrap();
        assert_eq!(renewed.device_id, login.device_id);
        assert!(accounts.authenticate(&renewed.access_token).is_ok());
        // The old refresh token was used up.
        assert!(matches!(
            accounts.refresh(&refresh).await,
            Err(Error::UnknownToken { soft_logout: false })
        ));
    }

    #[tokio::test]
    async fn plain_tokens_never_expire_and_die_with_their_device() {
        let clock = Arc::new(ManualClock::new(0));
        let accounts = accounts(clock.clone());
        let (user, login) = accounts
            .register("bob", Some("pw"), false, Some(NewDevice::default()))
            .await
            .unwrap();
        let login = login.unwrap();
        assert_eq!(login.refresh_token, None);
        clock.advance_ms(u32::MAX as u64);
        let authed = accounts.authenticate(&login.access_token).unwrap();
        assert_eq!(authed.user_id, user);
        accounts
            .delete_devices("bob", std::slice::from_ref(&login.device_id))
            .await
            .unwrap();
        assert!(matches!(
            accounts.authenticate(&login.access_token),
            Err(Error::UnknownToken { soft_logout: false })
        ));
    }

    #[tokio::test]
    async fn a_remembered_token_check_follows_the_token_and_the_account() {
        let clock = Arc::new(ManualClock::new(1_000_000));
        let accounts = accounts(clock.clone());
        let expiring = NewDevice {
            wants_refresh_token: true,
            ..NewDevice::default()
        };
        let (_, login) = accounts
            .register("dave", Some("pw"), false, Some(expiring))
            .await
            .unwrap();
        let token = login.unwrap().access_token;
        // Checked, then trusted from memory: the same answer.
        let first = accounts.authenticate_request(&token).unwrap();
        assert_eq!(accounts.authenticate_request(&token).unwrap(), first);
        assert!(!first.locked);

        // Locking the account writes it: the next check sees the lock.
        accounts
            .set_restriction("dave", Restriction::Locked, true)
            .await
            .unwrap();
        assert!(accounts.authenticate_request(&token).unwrap().locked);

        // A remembered token still expires on time.
        clock.advance_ms(1000);
        assert!(matches!(
            accounts.authenticate_request(&token),
            Err(Error::UnknownToken { soft_logout: true })
        ));

        // A token remembered as valid dies with its device at once.
        let (_, login) = accounts
            .register("erin", Some("pw"), false, Some(NewDevice::default()))
            .await
            .unwrap();
        let login = login.unwrap();
        assert!(accounts.authenticate_request(&login.access_token).is_ok());
        accounts
            .delete_devices("erin", std::slice::from_ref(&login.device_id))
            .await
            .unwrap();
        assert!(matches!(
            accounts.authenticate_request(&login.access_token),
            Err(Error::UnknownToken { soft_logout: false })
        ));
    }

    #[tokio::test]
    async fn logging_in_again_with_a_device_id_replaces_its_token() {
        let accounts = accounts(Arc::new(ManualClock::new(0)));
        accounts
            .register("carol", Some("pw"), false, None)
            .await
            .unwrap();
        let device = |id: &str| NewDevice {
            device_id: Some(id.to_owned()),
            display_name: Some(format!("{id} name")),
            ..NewDevice::default()
        };
        let first = accounts
            .login_with_password("@carol:example.org", "pw", device("D"))
            .await
            .unwrap();
        let second = accounts
            .login_with_password("CAROL", "pw", device("E"))
            .await
            .unwrap();
        let again = accounts
            .login_with_password("carol", "pw", device("D"))
            .await
            .unwrap();
        assert!(accounts.authenticate(&first.access_token).is_err());
        assert!(accounts.authenticate(&second.access_token).is_ok());
        assert!(accounts.authenticate(&again.access_token).is_ok());
        let devices = accounts.devices("carol").unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].record.display_name.as_deref(), Some("D name"));
        let wrong = accounts
            .login_with_password("carol", "nope", NewDevice::default())
            .await;
        assert!(matches!(wrong, Err(Error::Forbidden(_))));
        let remote = accounts
            .login_with_password("@carol:elsewhere.org", "pw", NewDevice::default())
            .await;
        assert!(matches!(remote, Err(Error::Forbidden(_))));
    }
}
