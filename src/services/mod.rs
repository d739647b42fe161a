//! Services hold the rules: what may be done, by whom, and what it writes.
//!
//! Handlers call services; services call storage. The service graph is
//! built once, in [`Services::new`], and has no cycles.

pub mod accounts;
pub mod admin;
pub mod appservices;
pub mod archive;
pub mod backup;
pub mod clock;
pub mod connections;
pub mod delivery;
pub mod directory;
pub mod e2ee;
pub mod email;
pub mod error;
pub mod federation;
pub mod filter;
pub mod key_backup;
pub mod keys;
mod locks;
pub mod media;
pub mod notifications;
pub mod notifier;
pub mod outbox;
pub mod preview;
pub mod profiles;
pub mod push;
pub mod push_rules;
pub mod pushers;
pub mod rate_limit;
pub mod reports;
pub mod rooms;
pub mod search;
pub mod sliding;
pub mod spaces;
pub mod stream;
pub mod sync;
pub mod threepids;
pub mod thumbnail;
pub mod uia;
pub mod user_data;
pub mod user_directory;

use std::sync::Arc;

use serde_json::Value;

use crate::config::{Config, RegistrationMode};
use crate::storage::Storage;
use accounts::{Accounts, Authed};
use clock::Clock;
use directory::Directory;
use error::{Error, Result};
use profiles::Profiles;
use rate_limit::RateLimiter;
use rooms::Rooms;
use threepids::{Purpose, Threepid, Threepids};
use uia::{Flows, Uia, STAGE_DUMMY, STAGE_EMAIL, STAGE_PASSWORD, STAGE_REGISTRATION_TOKEN};

/// Every service of one server, sharing one configuration and one store.
/// The UIA purpose of a password reset by email (no access token).
pub const PASSWORD_RESET: &str = "password_reset";

/// What a completed user-interactive authentication established.
#[derive(Debug, Default)]
pub struct Authorized {
    /// The address validated by an `m.login.email.identity` stage.
    pub email: Option<ValidatedEmail>,
}

/// An address validated for the operation, and its session.
#[derive(Debug)]
pub struct ValidatedEmail {
    pub threepid: Threepid,
    pub sid: String,
    pub client_secret: String,
}

pub struct Services {
    pub config: Arc<Config>,
    pub accounts: Accounts,
    pub profiles: Profiles,
    pub rooms: Rooms,
    pub directory: Directory,
    pub user_data: user_data::UserData,
    pub filters: filter::Filters,
    pub sync: sync::SyncStream,
    pub sliding: sliding::Connections,
    pub e2ee: e2ee::E2ee,
    pub key_backup: key_backup::KeyBackup,
    pub media: media::Media,
    pub previews: preview::Previews,
    pub uia: Uia,
    pub rate_limiter: RateLimiter,
    pub connections: Arc<connections::Connections>,
    pub federation: federation::Federation,
    pub reports: reports::Reports,
    pub search: search::Search,
    pub threepids: Threepids,
    pub push_rules: push_rules::PushRules,
    pub pushers: pushers::Pushers,
    pub delivery: notifier::Delivery,
    pub appservices: Arc<appservices::Appservices>,
    pub archive: Arc<archive::Archiver>,
    pub admin: admin::AdminState,
    /// The HTTP requests' figures, for the metrics listener.
    pub requests: crate::metrics::RequestMetrics,
    storage: Storage,
    clock: Arc<dyn Clock>,
}

impl Services {
    pub fn new(config: Arc<Config>, storage: Storage, clock: Arc<dyn Clock>) -> Result<Self> {
        let key = Arc::new(keys::load_or_generate(&storage, clock.now_ms())?);
        let default_version = ruma::RoomVersionId::try_from(config.default_room_version.as_str())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let wakeups = Arc::new(stream::Wakeups::default());
        let stream = Arc::new(stream::StreamCounter::load(&storage, wakeups.clone())?);
        let user_data = user_data::UserData::new(
            storage.clone(),
            stream.clone(),
            clock.clone(),
            wakeups.clone(),
        );
        let federation = federation::Federation::new(
            config.federation.clone(),
            &config.server_name,
            key.clone(),
            storage.clone(),
            clock.clone(),
        )?;
        let registrations = config
            .appservice_registrations()
            .map_err(|e| Error::Internal(e.to_string()))?;
        let last_position = appservices::last_queued_position(&storage)?;
        let appservices = Arc::new(appservices::Appservices::new(
            registrations,
            config.appservices.clone(),
            last_position,
        )?);
        let rooms = Rooms::new(
            storage.clone(),
            config.server_name.clone(),
            key,
            clock.clone(),
            stream.clone(),
            rooms::RoomSettings {
                default_version,
                max_members: config.max_room_members,
            },
            appservices.clone(),
        )?;
        Ok(Services {
            filters: filter::Filters::new(storage.clone()),
            sync: sync::SyncStream::new(storage.clone(), stream.clone(), wakeups),
            sliding: sliding::Connections::new(clock.now_ms()),
            e2ee: e2ee::E2ee::new(storage.clone(), stream.clone(), clock.as_ref()),
            key_backup: key_backup::KeyBackup::new(storage.clone()),
            previews: preview::Previews::new(
                config.media.url_previews,
                config.media.url_preview_private_addresses,
            ),
            media: media::Media::new(
                storage.clone(),
                &config.data_dir,
                config.server_name.clone(),
                config.media.clone(),
                clock.clone(),
            ),
            rooms,
            user_data,
            directory: Directory::new(
                storage.clone(),
                config.server_name.clone(),
                appservices.clone(),
            ),
            appservices,
            archive: Arc::new(archive::Archiver::new(
                storage.clone(),
                clock.clone(),
                config.archive.clone(),
                config.retention.clone(),
            )),
            accounts: Accounts::new(
                storage.clone(),
                config.server_name.clone(),
                &config.password_hashing,
                config.refreshable_access_token_lifetime_ms,
                clock.clone(),
                stream.clone(),
            ),
            profiles: Profiles::new(storage.clone()),
            connections: Arc::default(),
            federation,
            reports: reports::Reports::new(storage.clone())?,
            search: search::Search::open(&search::index_dir(&config.data_dir))?,
            threepids: Threepids::new(storage.clone(), clock.clone(), &config)?,
            push_rules: push_rules::PushRules::default(),
            pushers: pushers::Pushers::new(storage.clone(), clock.clone(), config.push_ip_policy()),
            delivery: notifier::Delivery::default(),
            admin: admin::AdminState::default(),
            requests: Default::default(),
            storage,
            uia: Uia::new(config.uia_session_timeout_ms, clock.clone()),
            rate_limiter: RateLimiter::new(config.rate_limits.clone(), clock.clone()),
            clock,
            config,
        })
    }

    /// Takes a backup into `dest` while the server runs (see
    /// [`backup::create`]).
    pub async fn backup(
        &self,
        dest: std::path::PathBuf,
    ) -> std::result::Result<backup::Manifest, String> {
        let storage = self.storage.clone();
        let data_dir = self.config.data_dir.clone();
        let server_name = self.config.server_name.clone();
        let now = self.now_ms();
        tokio::task::spawn_blocking(move || {
            backup::create(&storage, &data_dir, &server_name, now, &dest)
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The commits' figures, for metrics.
    pub fn commit_stats(&self) -> &crate::storage::CommitStats {
        self.storage.commit_stats()
    }

    /// The storage engine's figures, for metrics.
    pub fn engine_stats(&self) -> Option<crate::storage::EngineStats> {
        self.storage.engine_stats()
    }

    /// Items waiting in the durable queues (federation, application
    /// services, pushers), by the engine's estimate.
    pub fn queue_depths(&self) -> Result<[(&'static str, u64); 3]> {
        use crate::storage::Cf;
        let rows = |table: Cf| -> Result<u64> { Ok(self.storage.table_size(table)?.rows) };
        Ok([
            ("federation", rows(Cf::FederationOutbox)?),
            ("appservices", rows(Cf::AppserviceQueue)?),
            ("pushers", rows(Cf::PushQueue)?),
        ])
    }

    /// The current time, for answers that say how long ago something was.
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// Deactivates an account and takes it out of every room it is in or
    /// invited to, as Synapse does.
    ///
    /// Its email addresses are removed first, and unbound from `id_server`
    /// or the identity servers they were bound on; returns the
    /// `id_server_unbind_result`. With `erased_by` (an admin, or the
    /// command line), the user is also erased (see `Rooms::erase_user`).
    pub async fn deactivate_account(
        &self,
        localpart: &str,
        id_server: Option<&str>,
        erased_by: Option<&str>,
    ) -> Result<&'static str> {
        let user = ruma::UserId::parse(self.accounts.user_id(localpart).to_string())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let unbound = self
            .threepids
            .delete_all(&self.federation.client, localpart, user.as_str(), id_server)
            .await?;
        self.accounts.deactivate(localpart).await?;
        for membership in ["join", "invite", "knock"] {
            for room_id in self.rooms.rooms_of_user(&user, membership)? {
                let leave = self
                    .rooms
                    .set_membership(&room_id, &user, &user, "leave", serde_json::json!({}), None)
                    .await;
                if let Err(error) = leave {
                    tracing::warn!(%error, %room_id, "could not leave a room on deactivation");
                }
            }
        }
        if let Some(by) = erased_by {
            self.rooms.erase_user(&user, by).await?;
        }
        Ok(unbound)
    }

    /// Sets a profile field; a new display name or avatar is also shown in
    /// the member event of every room the user is in.
    pub async fn set_profile_field(&self, localpart: &str, key: &str, value: Value) -> Result<()> {
        self.profiles.set_field(localpart, key, value).await?;
        if key == "displayname" || key == "avatar_url" {
            self.refresh_member_events(localpart).await?;
        }
        Ok(())
    }

    /// Removes a profile field, and from member events as above.
    pub async fn delete_profile_field(&self, localpart: &str, key: &str) -> Result<()> {
        self.profiles.delete_field(localpart, key).await?;
        if key == "displayname" || key == "avatar_url" {
            self.refresh_member_events(localpart).await?;
        }
        Ok(())
    }

    async fn refresh_member_events(&self, localpart: &str) -> Result<()> {
        let user = ruma::UserId::parse(self.accounts.user_id(localpart).to_string())
            .map_err(|e| Error::Internal(e.to_string()))?;
        let profile = self.profiles.profile(localpart)?.map(Value::Object);
        for room_id in self.rooms.rooms_of_user(&user, "join")? {
            let update = self
                .rooms
                .set_membership(
                    &room_id,
                    &user,
                    &user,
                    "join",
                    serde_json::json!({}),
                    profile.clone(),
                )
                .await;
            // One room refusing the update must not hold up the others.
            if let Err(error) = update {
                tracing::warn!(%error, %room_id, "member event not updated with the new profile");
            }
        }
        Ok(())
    }

    /// The flows a registration must complete in the configured mode, or
    /// `None` when registration is disabled.
    ///
    /// With email on, a validated address may be given (it is then added
    /// to the account), or must be when `email.require_for_registration`.
    pub fn registration_flows(&self) -> Option<Flows> {
        let first = match self.config.registration {
            RegistrationMode::Disabled => return None,
            RegistrationMode::Open => vec![],
            RegistrationMode::Token => vec![STAGE_REGISTRATION_TOKEN],
        };
        let with_email = [first.clone(), vec![STAGE_EMAIL]].concat();
        let without_email = if first.is_empty() {
            vec![STAGE_DUMMY]
        } else {
            first
        };
        let email = &self.config.email;
        Some(Flows(if email.require_for_registration {
            vec![with_email]
        } else if email.enabled() {
            vec![without_email, with_email]
        } else {
            vec![without_email]
        }))
    }

    /// Whether `token` is one of the configured registration tokens.
    pub fn registration_token_valid(&self, token: &str) -> bool {
        self.config.registration_tokens.iter().any(|t| t == token)
    }

    /// Runs one round of user-interactive authentication for `purpose`.
    ///
    /// `user` is the account the operation acts on, when there is one: a
    /// password stage must then name that account and give its password.
    ///
    /// Once a flow is complete, what it established: the validated email
    /// address of an `m.login.email.identity` stage, if it had one.
    pub async fn authorize_interactively(
        &self,
        purpose: &str,
        flows: &Flows,
        auth: Option<&Value>,
        user: Option<&Authed>,
    ) -> Result<Authorized> {
        let attempt = self.uia.begin(purpose, flows, auth)?;
        let outcome = match attempt.stage.as_str() {
            STAGE_DUMMY => Ok(None),
            STAGE_REGISTRATION_TOKEN => {
                let token = attempt.auth.get("token").and_then(Value::as_str);
                match token {
                    Some(token) if self.registration_token_valid(token) => Ok(None),
                    _ => Err("Invalid registration token".to_owned()),
                }
            }
            STAGE_PASSWORD => self
                .check_password_stage(&attempt.auth, user)
                .await?
                .map(|()| None),
            STAGE_EMAIL => self.check_email_stage(&attempt.auth, purpose)?,
            other => {
                return Err(Error::Unrecognized(format!(
                    "Unrecognised authentication stage {other:?}"
                )))
            }
        };
        let facts = self.uia.finish(attempt, flows, outcome)?;
        let email = facts.into_iter().find_map(|fact| {
            let text = |name: &str| fact.get(name)?.as_str().map(str::to_owned);
            Some(ValidatedEmail {
                threepid: Threepid {
                    medium: text("medium")?,
                    address: text("address")?,
                },
                sid: text("sid")?,
                client_secret: text("client_secret")?,
            })
        });
        Ok(Authorized { email })
    }

    /// `m.login.email.identity`: a session validated for this operation
    /// (registration or password reset), named by `threepid_creds`.
    fn check_email_stage(
        &self,
        auth: &Value,
        purpose: &str,
    ) -> Result<std::result::Result<Option<Value>, String>> {
        let purpose = match purpose {
            "register" => Purpose::Register,
            PASSWORD_RESET => Purpose::Password,
            _ => return Ok(Err("Email is not a stage of this operation".to_owned())),
        };
        let creds = auth
            .get("threepid_creds")
            .or_else(|| auth.get("threepidCreds"));
        let text = |name: &str| creds.and_then(|c| c.get(name)).and_then(Value::as_str);
        let (Some(sid), Some(client_secret)) = (text("sid"), text("client_secret")) else {
            return Err(Error::MissingParam(
                "threepid_creds needs sid and client_secret".to_owned(),
            ));
        };
        match self.threepids.validated(sid, client_secret, purpose) {
            Ok(threepid) => Ok(Ok(Some(serde_json::json!({
                "medium": threepid.medium,
                "address": threepid.address,
                "sid": sid,
                "client_secret": client_secret,
            })))),
            Err(Error::ThreepidAuthFailed(why)) => Ok(Err(why)),
            Err(other) => Err(other),
        }
    }

    /// `Ok(Err(reason))` for wrong credentials, which the client may retry.
    async fn check_password_stage(
        &self,
        auth: &Value,
        user: Option<&Authed>,
    ) -> Result<Result<(), String>> {
        let Some(user) = user else {
            return Ok(Err("No account to authenticate as".to_owned()));
        };
        let named = auth
            .pointer("/identifier/user")
            .or_else(|| auth.get("user"))
            .and_then(Value::as_str);
        if let Some(named) = named {
            if self.accounts.resolve_local_user(named).as_deref() != Some(user.localpart()) {
                return Err(Error::Forbidden(
                    "Requested authentication as a different user".to_owned(),
                ));
            }
        }
        let Some(password) = auth.get("password").and_then(Value::as_str) else {
            return Ok(Err("Missing password".to_owned()));
        };
        if self
            .accounts
            .verify_password(user.localpart(), password)
            .await?
        {
            Ok(Ok(()))
        } else {
            Ok(Err("Invalid password".to_owned()))
        }
    }
}
