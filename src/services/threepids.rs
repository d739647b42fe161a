//! Third-party identifiers (3PIDs): email addresses that users validate
//! and add to their accounts, sign in with, and reset a forgotten password
//! with; and binds of them on identity servers.
//!
//! Validation follows the spec's `requestToken` protocol: the server emails
//! a code (and a link that carries it) for a session the client names with
//! its `client_secret`; the code comes back through the link or
//! `submit_token`; the validated session is then used once, to register,
//! add the address or reset the password. The same `send_attempt` sends no
//! second email. Phone numbers (`msisdn`) would need an SMS service, which
//! this server does not have: they are refused as not supported.

use std::sync::Arc;

use ruma::ServerName;
use serde_json::{json, Value};
use tokio::sync::Mutex;

use super::clock::Clock;
use super::email::{self, Mailer, Message};
use super::error::{Error, Result};
use super::federation::client::{FederationClient, SendError};
use crate::storage::tables::{self, ThreepidOwner, ThreepidSession};
use crate::storage::{Batch, Storage};

pub const MEDIUM_EMAIL: &str = "email";
pub const MEDIUM_MSISDN: &str = "msisdn";

/// Longest client secret accepted (the spec's limit).
const MAX_CLIENT_SECRET: usize = 255;
/// Most sessions one client secret may have at once.
const MAX_SESSIONS_PER_SECRET: usize = 16;
/// Sessions removed per step of a sweep.
const SWEEP_PAGE: usize = 512;

/// What a validation is for; a session validated for one cannot serve
/// another.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A new account's address (`/register/email/requestToken`).
    Register,
    /// An address added to an account (`/account/3pid/email/requestToken`).
    Add,
    /// A password reset (`/account/password/email/requestToken`).
    Password,
}

impl Purpose {
    fn as_str(self) -> &'static str {
        match self {
            Purpose::Register => "register",
            Purpose::Add => "add",
            Purpose::Password => "password",
        }
    }
}

/// A bind asked of an identity server: its session of the address, and
/// the user's access token there.
pub struct BindRequest<'a> {
    pub id_server: &'a str,
    pub id_access_token: &'a str,
    pub sid: &'a str,
    pub client_secret: &'a str,
}

/// An address and its medium.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Threepid {
    pub medium: String,
    pub address: String,
}

pub struct Threepids {
    storage: Storage,
    clock: Arc<dyn Clock>,
    mailer: Option<Mailer>,
    token_lifetime_ms: u64,
    server_name: String,
    /// Where links in emails point, without a trailing `/`.
    link_base: String,
    /// Serializes the changes of which account has which address.
    changes: Mutex<()>,
}

impl Threepids {
    pub fn new(
        storage: Storage,
        clock: Arc<dyn Clock>,
        config: &crate::config::Config,
    ) -> Result<Self> {
        let link_base = config
            .email
            .public_base_url
            .clone()
            .or_else(|| config.well_known.client_base_url.clone())
            .unwrap_or_else(|| format!("https://{}", config.server_name));
        Ok(Threepids {
            storage,
            clock,
            mailer: Mailer::new(&config.email, &config.server_name)?,
            token_lifetime_ms: config.email.token_lifetime_ms,
            server_name: config.server_name.clone(),
            link_base: link_base.trim_end_matches('/').to_owned(),
            changes: Mutex::new(()),
        })
    }

    /// Whether addresses can be validated (an SMTP server is configured).
    pub fn email_enabled(&self) -> bool {
        self.mailer.is_some()
    }

    /// Where a client may submit a code itself (`submit_url`).
    pub fn submit_url(&self) -> String {
        format!(
            "{}/_matrix/client/unstable/add_threepid/email/submit_token",
            self.link_base
        )
    }

    /// Starts, or repeats, the validation of an email address: emails a
    /// code unless this `send_attempt` was sent already. Returns the
    /// session ID.
    pub async fn request_email_token(
        &self,
        purpose: Purpose,
        client_secret: &str,
        email: &str,
        send_attempt: u64,
    ) -> Result<String> {
        let Some(mailer) = &self.mailer else {
            return Err(Error::ThreepidMediumNotSupported(
                "Email is not configured on this server".to_owned(),
            ));
        };
        check_client_secret(client_secret)?;
        let address = canonical_email(email)?;
        let owner = self.owner(MEDIUM_EMAIL, &address)?;
        match purpose {
            Purpose::Register | Purpose::Add if owner.is_some() => {
                return Err(Error::ThreepidInUse("Email is already in use".to_owned()))
            }
            Purpose::Password if owner.is_none() => {
                return Err(Error::ThreepidNotFound(
                    "Email not found on this server".to_owned(),
                ))
            }
            _ => {}
        }
        let now = self.clock.now_ms();
        let sessions = self.sessions_of(client_secret)?;
        let same = sessions.iter().find(|(_, s)| {
            s.medium == MEDIUM_EMAIL
                && s.address == address
                && s.purpose == purpose.as_str()
                && s.expires_ms > now
        });
        if let Some((sid, session)) = same {
            if send_attempt <= session.send_attempt {
                return Ok(sid.clone());
            }
        }
        if same.is_none() && sessions.len() >= MAX_SESSIONS_PER_SECRET {
            return Err(Error::InvalidParam(
                "Too many validation sessions for this client_secret".to_owned(),
            ));
        }
        let sid = match same {
            Some((sid, _)) => sid.clone(),
            None => crate::ids::new_secret("", &mut rand::thread_rng()),
        };
        let code = crate::ids::new_secret("", &mut rand::thread_rng());
        let link = format!(
            "{}?token={code}&client_secret={}&sid={sid}",
            self.submit_url(),
            percent_encode(client_secret)
        );
        let message = Message {
            to: address.clone(),
            subject: subject(purpose, &self.server_name),
            text: body(purpose, &self.server_name, &code, &link),
        };
        mailer.send(&message, now).await?;
        let session = ThreepidSession {
            medium: MEDIUM_EMAIL.to_owned(),
            address,
            purpose: purpose.as_str().to_owned(),
            send_attempt,
            token: super::accounts::hash_token(&code),
            created_ms: now,
            expires_ms: now.saturating_add(self.token_lifetime_ms),
            validated_ms: None,
        };
        let mut batch = Batch::new();
        batch.put(
            tables::THREEPID_SESSIONS,
            &(client_secret.to_owned(), sid.clone()),
            &session,
        );
        self.storage.commit(batch).await?;
        Ok(sid)
    }

    /// Validates a session with the code that was emailed.
    pub async fn submit_token(&self, sid: &str, client_secret: &str, code: &str) -> Result<()> {
        let key = (client_secret.to_owned(), sid.to_owned());
        let failed = |why: &str| Error::ThreepidAuthFailed(why.to_owned());
        let Some(mut session) = self.storage.get(tables::THREEPID_SESSIONS, &key)? else {
            return Err(failed("Unknown session"));
        };
        let now = self.clock.now_ms();
        if session.expires_ms <= now {
            return Err(failed("This validation session has expired"));
        }
        if session.validated_ms.is_some() {
            return Ok(());
        }
        if super::accounts::hash_token(code) != session.token {
            return Err(failed("Invalid validation token"));
        }
        session.validated_ms = Some(now);
        session.expires_ms = now.saturating_add(self.token_lifetime_ms);
        let mut batch = Batch::new();
        batch.put(tables::THREEPID_SESSIONS, &key, &session);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// The address of a validated, unexpired session of `purpose`.
    pub fn validated(&self, sid: &str, client_secret: &str, purpose: Purpose) -> Result<Threepid> {
        let key = (client_secret.to_owned(), sid.to_owned());
        let failed = |why: &str| Error::ThreepidAuthFailed(why.to_owned());
        let session = self
            .storage
            .get(tables::THREEPID_SESSIONS, &key)?
            .filter(|s| s.purpose == purpose.as_str())
            .ok_or_else(|| failed("Unknown session"))?;
        if session.validated_ms.is_none() {
            return Err(failed("This email address has not been validated yet"));
        }
        if session.expires_ms <= self.clock.now_ms() {
            return Err(failed("This validation session has expired"));
        }
        Ok(Threepid {
            medium: session.medium,
            address: session.address,
        })
    }

    /// The account that has an address.
    pub fn owner(&self, medium: &str, address: &str) -> Result<Option<String>> {
        let key = (medium.to_owned(), address.to_owned());
        Ok(self
            .storage
            .get(tables::THREEPIDS, &key)?
            .map(|owner| owner.localpart))
    }

    /// The account an identifier of a login names
    /// (`{"medium": "email", "address": ...}`), if any.
    pub fn login_owner(&self, medium: &str, address: &str) -> Result<Option<String>> {
        let address = match medium {
            MEDIUM_EMAIL => match canonical_email(address) {
                Ok(address) => address,
                Err(_) => return Ok(None),
            },
            _ => address.to_owned(),
        };
        self.owner(medium, &address)
    }

    /// The addresses added to an account, as `GET /account/3pid` lists
    /// them.
    pub fn of_user(&self, localpart: &str) -> Result<Vec<Value>> {
        let prefix = tables::str_prefix(localpart);
        let entries = self
            .storage
            .scan_prefix(tables::USER_THREEPIDS, &prefix, usize::MAX)?;
        Ok(entries
            .into_iter()
            .filter_map(|((_, medium, address), record)| {
                let added = record.added_ms?;
                Some(json!({
                    "medium": medium,
                    "address": address,
                    "added_at": added,
                    "validated_at": record.validated_ms.unwrap_or(added),
                }))
            })
            .collect())
    }

    /// Adds the address of a validated session (of `purpose`) to an
    /// account, and uses the session up. Adding an address the account
    /// has already is no change.
    pub async fn add(
        &self,
        localpart: &str,
        sid: &str,
        client_secret: &str,
        purpose: Purpose,
    ) -> Result<Threepid> {
        let threepid = self.validated(sid, client_secret, purpose)?;
        let _guard = self.changes.lock().await;
        match self.owner(&threepid.medium, &threepid.address)? {
            Some(owner) if owner != localpart => {
                return Err(Error::ThreepidInUse(
                    "This address is already in use by another account".to_owned(),
                ))
            }
            _ => {}
        }
        let now = self.clock.now_ms();
        let user_key = (
            localpart.to_owned(),
            threepid.medium.clone(),
            threepid.address.clone(),
        );
        let mut record = self
            .storage
            .get(tables::USER_THREEPIDS, &user_key)?
            .unwrap_or_default();
        if record.added_ms.is_none() {
            record.added_ms = Some(now);
            record.validated_ms = Some(now);
        }
        let mut batch = Batch::new();
        batch.put(tables::USER_THREEPIDS, &user_key, &record);
        batch.put(
            tables::THREEPIDS,
            &(threepid.medium.clone(), threepid.address.clone()),
            &ThreepidOwner {
                localpart: localpart.to_owned(),
            },
        );
        batch.delete(
            tables::THREEPID_SESSIONS,
            &(client_secret.to_owned(), sid.to_owned()),
        );
        self.storage.commit(batch).await?;
        Ok(threepid)
    }

    /// The password-reset session's account, using the session up.
    pub async fn take_password_reset(&self, sid: &str, client_secret: &str) -> Result<String> {
        let threepid = self.validated(sid, client_secret, Purpose::Password)?;
        let owner = self
            .owner(&threepid.medium, &threepid.address)?
            .ok_or_else(|| Error::ThreepidNotFound("Email not found on this server".to_owned()))?;
        let mut batch = Batch::new();
        batch.delete(
            tables::THREEPID_SESSIONS,
            &(client_secret.to_owned(), sid.to_owned()),
        );
        self.storage.commit(batch).await?;
        Ok(owner)
    }

    /// Removes an address from an account and unbinds it from the
    /// identity servers it was bound on (or `id_server`). Returns the
    /// `id_server_unbind_result`.
    pub async fn delete(
        &self,
        federation: &FederationClient,
        localpart: &str,
        user_id: &str,
        threepid: &Threepid,
        id_server: Option<&str>,
    ) -> Result<&'static str> {
        let unbound = self
            .unbind(federation, localpart, user_id, threepid, id_server)
            .await?;
        let _guard = self.changes.lock().await;
        let user_key = (
            localpart.to_owned(),
            threepid.medium.clone(),
            threepid.address.clone(),
        );
        let mut batch = Batch::new();
        if let Some(mut record) = self.storage.get(tables::USER_THREEPIDS, &user_key)? {
            record.added_ms = None;
            record.validated_ms = None;
            if record.id_servers.is_empty() {
                batch.delete(tables::USER_THREEPIDS, &user_key);
            } else {
                batch.put(tables::USER_THREEPIDS, &user_key, &record);
            }
        }
        let owner_key = (threepid.medium.clone(), threepid.address.clone());
        if self.owner(&threepid.medium, &threepid.address)?.as_deref() == Some(localpart) {
            batch.delete(tables::THREEPIDS, &owner_key);
        }
        self.storage.commit(batch).await?;
        Ok(unbound)
    }

    /// Removes every address of an account (deactivation), unbinding
    /// each. Returns `success` only if every unbind succeeded.
    ///
    /// Addresses never bound anywhere count only when `id_server` is
    /// given (they are then unbound there).
    pub async fn delete_all(
        &self,
        federation: &FederationClient,
        localpart: &str,
        user_id: &str,
        id_server: Option<&str>,
    ) -> Result<&'static str> {
        let prefix = tables::str_prefix(localpart);
        let entries = self
            .storage
            .scan_prefix(tables::USER_THREEPIDS, &prefix, usize::MAX)?;
        let mut result = "success";
        for ((_, medium, address), record) in entries {
            let threepid = Threepid { medium, address };
            let unbound = self
                .delete(federation, localpart, user_id, &threepid, id_server)
                .await?;
            let counts = id_server.is_some() || !record.id_servers.is_empty();
            if counts && unbound != "success" {
                result = "no-support";
            }
        }
        Ok(result)
    }

    /// Binds an address validated by an identity server to the user there
    /// (`/_matrix/identity/v2/3pid/bind`), and remembers the bind.
    pub async fn bind(
        &self,
        federation: &FederationClient,
        localpart: &str,
        user_id: &str,
        request: &BindRequest<'_>,
    ) -> Result<()> {
        let id_server = request.id_server;
        let server = identity_server(id_server)?;
        let body = json!({
            "sid": request.sid,
            "client_secret": request.client_secret,
            "mxid": user_id,
        });
        let answer = federation
            .identity_post(
                server,
                "/_matrix/identity/v2/3pid/bind",
                Some(request.id_access_token),
                &body,
            )
            .await
            .map_err(identity_error)?;
        let (Some(medium), Some(address)) = (
            answer.get("medium").and_then(Value::as_str),
            answer.get("address").and_then(Value::as_str),
        ) else {
            return Err(Error::RemoteUnavailable(format!(
                "{id_server}: the bind answer names no medium and address"
            )));
        };
        if answer.get("mxid").and_then(Value::as_str) != Some(user_id) {
            return Err(Error::RemoteUnavailable(format!(
                "{id_server}: the bind answer is for another user"
            )));
        }
        let _guard = self.changes.lock().await;
        let user_key = (localpart.to_owned(), medium.to_owned(), address.to_owned());
        let mut record = self
            .storage
            .get(tables::USER_THREEPIDS, &user_key)?
            .unwrap_or_default();
        if !record.id_servers.iter().any(|s| s == id_server) {
            record.id_servers.push(id_server.to_owned());
        }
        let mut batch = Batch::new();
        batch.put(tables::USER_THREEPIDS, &user_key, &record);
        self.storage.commit(batch).await?;
        Ok(())
    }

    /// Unbinds an address from `id_server`, or from every identity server
    /// it was bound on through this server. `no-support` when there is
    /// none to ask or one refused to; `success` when all unbound it.
    pub async fn unbind(
        &self,
        federation: &FederationClient,
        localpart: &str,
        user_id: &str,
        threepid: &Threepid,
        id_server: Option<&str>,
    ) -> Result<&'static str> {
        let user_key = (
            localpart.to_owned(),
            threepid.medium.clone(),
            threepid.address.clone(),
        );
        let record = self.storage.get(tables::USER_THREEPIDS, &user_key)?;
        let servers: Vec<String> = match id_server {
            Some(server) => vec![server.to_owned()],
            None => record
                .as_ref()
                .map(|r| r.id_servers.clone())
                .unwrap_or_default(),
        };
        if servers.is_empty() {
            return Ok("no-support");
        }
        let body = json!({
            "mxid": user_id,
            "threepid": { "medium": threepid.medium, "address": threepid.address },
        });
        let mut result = "success";
        let mut unbound = Vec::new();
        for server in &servers {
            let name = identity_server(server)?;
            let path = "/_matrix/identity/v2/3pid/unbind";
            match federation.identity_post(name, path, None, &body).await {
                Ok(_) => unbound.push(server.clone()),
                // An identity server that does not know the bind or the
                // endpoint: nothing more can be done there.
                Err(SendError::Refused { status, .. }) if [400, 404, 501].contains(&status) => {
                    result = "no-support";
                }
                Err(error) => return Err(identity_error(error)),
            }
        }
        let _guard = self.changes.lock().await;
        if let Some(mut record) = self.storage.get(tables::USER_THREEPIDS, &user_key)? {
            record.id_servers.retain(|s| !unbound.contains(s));
            let mut batch = Batch::new();
            if record.added_ms.is_none() && record.id_servers.is_empty() {
                batch.delete(tables::USER_THREEPIDS, &user_key);
            } else {
                batch.put(tables::USER_THREEPIDS, &user_key, &record);
            }
            self.storage.commit(batch).await?;
        }
        Ok(result)
    }

    /// Deletes the validation sessions that expired; returns how many.
    pub async fn sweep(&self) -> Result<usize> {
        let now = self.clock.now_ms();
        let mut removed = 0;
        // The lower bound of the next page: just past the last key seen.
        let mut lower = Vec::new();
        loop {
            let range = crate::storage::KeyRange {
                lower: lower.clone(),
                upper: None,
            };
            let page = self.storage.scan(
                tables::THREEPID_SESSIONS,
                &range,
                crate::storage::Direction::Forward,
                SWEEP_PAGE,
            )?;
            let Some((last, _)) = page.last() else {
                return Ok(removed);
            };
            lower = crate::storage::Key::encode(last);
            lower.push(0);
            let mut batch = Batch::new();
            let full = page.len() == SWEEP_PAGE;
            for (key, session) in page {
                if session.expires_ms <= now {
                    batch.delete(tables::THREEPID_SESSIONS, &key);
                    removed += 1;
                }
            }
            self.storage.commit(batch).await?;
            if !full {
                return Ok(removed);
            }
        }
    }

    /// The sessions of one client secret.
    fn sessions_of(&self, client_secret: &str) -> Result<Vec<(String, ThreepidSession)>> {
        let prefix = tables::str_prefix(client_secret);
        Ok(self
            .storage
            .scan_prefix(tables::THREEPID_SESSIONS, &prefix, usize::MAX)?
            .into_iter()
            .map(|((_, sid), session)| (sid, session))
            .collect())
    }
}

/// An address as kept and compared: trimmed and lower-case, as Synapse
/// does, so that one mailbox is one identifier.
pub fn canonical_email(email: &str) -> Result<String> {
    let address = email.trim().to_lowercase();
    if !email::valid_address(&address) {
        return Err(Error::InvalidParam(format!(
            "{email:?} is not an email address"
        )));
    }
    Ok(address)
}

/// The spec's client secret: `[0-9a-zA-Z.=_-]`, 1 to 255 characters.
pub fn check_client_secret(secret: &str) -> Result<()> {
    let valid = |c: char| c.is_ascii_alphanumeric() || ".=_-".contains(c);
    if secret.is_empty() || secret.len() > MAX_CLIENT_SECRET || !secret.chars().all(valid) {
        return Err(Error::InvalidParam(
            "client_secret must be 1 to 255 characters of 0-9 a-z A-Z . = _ -".to_owned(),
        ));
    }
    Ok(())
}

/// An identity server's name (`host[:port]`).
fn identity_server(name: &str) -> Result<&ServerName> {
    <&ServerName>::try_from(name)
        .map_err(|_| Error::InvalidParam(format!("{name:?} is not an identity server name")))
}

/// An identity server's refusal, passed on; no answer, a 502.
fn identity_error(error: SendError) -> Error {
    match error {
        SendError::Refused { status, body } => Error::IdentityServer { status, body },
        SendError::Failed(error) => error,
    }
}

fn subject(purpose: Purpose, server_name: &str) -> String {
    match purpose {
        Purpose::Register => format!("Validate your email for your new account on {server_name}"),
        Purpose::Add => format!("Validate your email for your account on {server_name}"),
        Purpose::Password => format!("Reset your password on {server_name}"),
    }
}

fn body(purpose: Purpose, server_name: &str, code: &str, link: &str) -> String {
    let why = match purpose {
        Purpose::Register => format!("to register an account on {server_name}"),
        Purpose::Add => format!("to add this address to your account on {server_name}"),
        Purpose::Password => format!("to reset the password of your account on {server_name}"),
    };
    format!(
        "Someone asked to use this email address {why}.\n\
         \n\
         If it was you, open this link to confirm:\n\
         \n\
         {link}\n\
         \n\
         or give this code where you were asked: {code}\n\
         \n\
         If it was not you, ignore this email: nothing changes.\n"
    )
}

/// Percent-encodes a query value (client secrets may hold `=`).
fn percent_encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_canonical() {
        assert_eq!(
            canonical_email("  Alice@Example.ORG ").unwrap(),
            "alice@example.org"
        );
        assert!(canonical_email("alice").is_err());
        assert!(canonical_email("alice@example.org\r\nX: y").is_err());
    }

    #[test]
    fn client_secrets_follow_the_spec() {
        assert!(check_client_secret("d0nt-T3ll.=_").is_ok());
        assert!(check_client_secret("").is_err());
        assert!(check_client_secret("a b").is_err());
        assert!(check_client_secret(&"a".repeat(256)).is_err());
    }
}
