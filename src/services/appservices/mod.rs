//! Application services (bridges and bots): the configured registrations,
//! which rooms interest which service, the requests Myelin makes to a
//! service (queries, pings, third-party look-ups) and, in `sender` and
//! `ephemeral`, what it pushes to them.
//!
//! Events reach a service through its durable queue (`appservice_queue`),
//! written by the room's draft in the batch of the event itself (see
//! `Draft::queue_for_appservices`), so nothing acknowledged is missed
//! while a service is down or Myelin restarts.

pub mod ephemeral;
pub mod sender;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use myelin_appservices::{Registration, Registrations};
use serde_json::{json, Value};

use super::error::{Error, Result};
use super::outbox::Outbox;
use crate::config::AppservicesConfig;

/// Rooms whose interest is remembered; past it the memory starts over.
const MAX_REMEMBERED_ROOMS: usize = 100_000;
/// Largest answer read from a service's query or third-party look-up.
const MAX_ANSWER_BYTES: usize = 1024 * 1024;
/// Users and aliases a service said it does not know, remembered this
/// long, at most this many.
const REFUSAL_REMEMBERED: Duration = Duration::from_secs(60);
const MAX_REMEMBERED_REFUSALS: usize = 10_000;
/// Longest a query, look-up or ping may take, whatever the transactions'
/// time-out: a client waits for it.
const MAX_QUERY_TIME: Duration = Duration::from_secs(10);

/// The application services and what the server knows about them.
pub struct Appservices {
    pub registrations: Registrations,
    config: AppservicesConfig,
    /// Queue positions and the wake-ups of each service's sender, by ID.
    pub outbox: Arc<Outbox>,
    http: reqwest::Client,
    /// Room ID → the indices (in `registrations`) of the services a
    /// room's joined members, aliases or ID interest.
    interest: Mutex<HashMap<String, Arc<[usize]>>>,
    /// Bumped by every `forget_room`: an interest computed from the
    /// database before a change is not remembered after it.
    interest_epoch: AtomicU64,
    /// User IDs and aliases the services said they do not know, until when.
    refused: Mutex<HashMap<String, Instant>>,
}

impl Appservices {
    /// `last_position`: the highest queue position in the database, so
    /// that new items come after it even if the clock went back.
    pub fn new(
        registrations: Registrations,
        config: AppservicesConfig,
        last_position: u64,
    ) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.request_timeout_ms))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Appservices {
            registrations,
            config,
            outbox: Outbox::starting_after(last_position),
            http,
            interest: Mutex::new(HashMap::new()),
            interest_epoch: AtomicU64::new(0),
            refused: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.registrations.is_empty()
    }

    pub fn config(&self) -> &AppservicesConfig {
        &self.config
    }

    /// The service whose `as_token` this is.
    pub fn by_token(&self, token: &str) -> Option<&Registration> {
        self.registrations.by_as_token(token)
    }

    /// The service a request acts for, if it carried an `as_token`.
    pub fn acting(&self, authed: &super::accounts::Authed) -> Option<&Registration> {
        self.registrations.by_id(authed.appservice.as_deref()?)
    }

    /// Refuses a user ID that a service claims exclusively, unless
    /// `asking` is that service.
    pub fn check_user_free(&self, user_id: &str, asking: Option<&Registration>) -> Result<()> {
        match self.registrations.exclusive_owner_of_user(user_id) {
            Some(owner) if asking.is_none_or(|a| a.id != owner.id) => Err(Error::Exclusive(
                format!("{user_id} is reserved by an application service"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses an alias that a service claims exclusively to anyone else,
    /// and an alias outside its namespaces to a service.
    pub fn check_alias_free(&self, alias: &str, asking: Option<&Registration>) -> Result<()> {
        if let Some(service) = asking {
            if !service.namespaces.has_alias(alias) {
                return Err(Error::Exclusive(format!(
                    "{alias} is not in the application service's namespaces"
                )));
            }
        }
        match self.registrations.exclusive_owner_of_alias(alias) {
            Some(owner) if asking.is_none_or(|a| a.id != owner.id) => Err(Error::Exclusive(
                format!("{alias} is reserved by an application service"),
            )),
            _ => Ok(()),
        }
    }

    /// The services interested in a room because of its joined members,
    /// aliases or ID.
    pub fn interest_of(
        &self,
        room_id: &str,
        joined: &[String],
        aliases: &[String],
    ) -> Arc<[usize]> {
        self.registrations
            .iter()
            .enumerate()
            .filter(|(_, service)| {
                service.namespaces.has_room(room_id)
                    || aliases
                        .iter()
                        .any(|alias| service.namespaces.has_alias(alias))
                    || joined
                        .iter()
                        .any(|user| service.is_interested_in_user(user))
            })
            .map(|(index, _)| index)
            .collect()
    }

    /// Queues an event into `batch` for every service with a URL that
    /// `wanted` picks (by index into the registrations); the IDs of the
    /// services to wake once the batch has committed.
    pub fn queue_event_into(
        &self,
        batch: &mut crate::storage::Batch,
        event_id: &str,
        wanted: impl Fn(usize, &Registration) -> bool,
    ) -> Vec<String> {
        let mut queued = Vec::new();
        for (index, service) in self.registrations.iter().enumerate() {
            // Without a URL nothing would ever send it.
            if service.url.is_none() || !wanted(index, service) {
                continue;
            }
            let position = self.outbox.next_position();
            let item = crate::storage::tables::AppserviceItem::Event {
                event_id: event_id.to_owned(),
            };
            batch.put(
                crate::storage::tables::APPSERVICE_QUEUE,
                &(service.id.clone(), position),
                &item,
            );
            queued.push(service.id.clone());
        }
        queued
    }

    /// Whether any service could be interested in this user.
    pub fn concerns_user(&self, user_id: &str) -> bool {
        self.registrations
            .iter()
            .any(|service| service.is_interested_in_user(user_id))
    }

    pub fn remembered_interest(&self, room_id: &str) -> Option<Arc<[usize]>> {
        let interest = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        interest.get(room_id).cloned()
    }

    /// The epoch to pass to [`Appservices::remember_interest`], read
    /// before the interest is computed.
    pub fn interest_epoch(&self) -> u64 {
        self.interest_epoch.load(Ordering::SeqCst)
    }

    /// Remembers a room's interest computed at `epoch`, unless a room's
    /// members or aliases changed since.
    pub fn remember_interest(&self, room_id: &str, services: Arc<[usize]>, epoch: u64) {
        let mut interest = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        if self.interest_epoch.load(Ordering::SeqCst) != epoch {
            return;
        }
        if interest.len() >= MAX_REMEMBERED_ROOMS {
            interest.clear();
        }
        interest.insert(room_id.to_owned(), services);
    }

    /// The room's members or aliases changed: its interest is computed
    /// again when next needed.
    pub fn forget_room(&self, room_id: &str) {
        let mut interest = self.interest.lock().unwrap_or_else(|e| e.into_inner());
        self.interest_epoch.fetch_add(1, Ordering::SeqCst);
        interest.remove(room_id);
    }

    /// `GET /_matrix/app/v1/users/{userId}`: asks the service that
    /// claims the user exclusively whether it exists; that service when
    /// it said yes (having created it, the spec says). A no is
    /// remembered for a minute, so that asking again costs nothing.
    pub async fn query_user(&self, user_id: &str) -> Option<&Registration> {
        let service = self.registrations.exclusive_owner_of_user(user_id)?;
        let path = format!("/_matrix/app/v1/users/{}", encode(user_id));
        self.ask_unless_refused(service, user_id, &path)
            .await
            .then_some(service)
    }

    /// `GET /_matrix/app/v1/rooms/{roomAlias}`: asks the service that
    /// claims the alias exclusively to create its room; whether it did.
    pub async fn query_alias(&self, alias: &str) -> bool {
        let Some(service) = self.registrations.exclusive_owner_of_alias(alias) else {
            return false;
        };
        let path = format!("/_matrix/app/v1/rooms/{}", encode(alias));
        self.ask_unless_refused(service, alias, &path).await
    }

    /// Asks `path` of the service unless it refused `id` lately.
    async fn ask_unless_refused(&self, service: &Registration, id: &str, path: &str) -> bool {
        let now = Instant::now();
        {
            let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
            refused.retain(|_, until| *until > now);
            if refused.contains_key(id) {
                return false;
            }
        }
        if self.ask(service, path).await.is_ok() {
            return true;
        }
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if refused.len() < MAX_REMEMBERED_REFUSALS {
            refused.insert(id.to_owned(), now + REFUSAL_REMEMBERED);
        }
        false
    }

    /// `POST /_matrix/app/v1/ping` to `service`; how long it took.
    pub async fn ping(&self, service: &Registration, transaction_id: Option<&str>) -> Result<u64> {
        let Some(url) = &service.url else {
            return Err(Error::AppservicePing(PingFailure::UrlNotSet));
        };
        let body = match transaction_id {
            Some(id) => json!({ "transaction_id": id }),
            None => json!({}),
        };
        let started = Instant::now();
        let answer = self
            .http
            .post(format!("{url}/_matrix/app/v1/ping"))
            .bearer_auth(&service.hs_token)
            .timeout(self.query_time())
            .json(&body)
            .send()
            .await
            .map_err(|e| {
                Error::AppservicePing(if e.is_timeout() {
                    PingFailure::TimedOut
                } else {
                    PingFailure::Unreachable(e.to_string())
                })
            })?;
        let status = answer.status();
        if !status.is_success() {
            let body = read_bounded(answer, 4096).await.unwrap_or_default();
            return Err(Error::AppservicePing(PingFailure::BadStatus {
                status: status.as_u16(),
                body: String::from_utf8_lossy(&body).into_owned(),
            }));
        }
        Ok(started.elapsed().as_millis() as u64)
    }

    /// The time-out of queries, look-ups and pings.
    fn query_time(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms).min(MAX_QUERY_TIME)
    }

    /// A third-party look-up (`/_matrix/app/v1/thirdparty/...`) asked at
    /// once of every service that bridges `protocol` (every service with
    /// protocols when `None`); the answers that came back in time.
    pub async fn third_party(
        &self,
        protocol: Option<&str>,
        path_and_query: &str,
    ) -> Vec<(String, Value)> {
        let asked = self.registrations.iter().filter(|service| match protocol {
            Some(protocol) => service.protocols.iter().any(|p| p == protocol),
            None => !service.protocols.is_empty(),
        });
        let answers = futures_util::future::join_all(
            asked.map(|service| async move { (service, self.ask(service, path_and_query).await) }),
        )
        .await;
        answers
            .into_iter()
            .filter_map(|(service, answer)| match answer {
                Ok(answer) => Some((service.id.clone(), answer)),
                Err(error) => {
                    tracing::warn!(appservice = %service.id, %error, "third-party look-up failed");
                    None
                }
            })
            .collect()
    }

    /// A `GET` to a service; its JSON answer when it said 2xx.
    async fn ask(&self, service: &Registration, path_and_query: &str) -> Result<Value> {
        let Some(url) = &service.url else {
            return Err(Error::NotFound("The service has no URL".to_owned()));
        };
        let answer = self
            .http
            .get(format!("{url}{path_and_query}"))
            .bearer_auth(&service.hs_token)
            .timeout(self.query_time())
            .send()
            .await
            .map_err(|e| Error::RemoteUnavailable(e.to_string()))?;
        if !answer.status().is_success() {
            return Err(Error::NotFound(format!(
                "the service answered {}",
                answer.status()
            )));
        }
        let body = read_bounded(answer, MAX_ANSWER_BYTES)
            .await
            .ok_or_else(|| Error::RemoteUnavailable("answer unreadable or too large".to_owned()))?;
        Ok(serde_json::from_slice(&body).unwrap_or(json!({})))
    }

    /// `PUT /_matrix/app/v1/transactions/{txnId}`; whether it was taken.
    async fn put_transaction(
        &self,
        service: &Registration,
        txn_id: &str,
        body: &Value,
    ) -> std::result::Result<(), String> {
        let Some(url) = &service.url else {
            return Ok(());
        };
        let answer = self
            .http
            .put(format!(
                "{url}/_matrix/app/v1/transactions/{}",
                encode(txn_id)
            ))
            .bearer_auth(&service.hs_token)
            .json(body)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        match answer.status() {
            status if status.is_success() => Ok(()),
            status => Err(format!("the service answered {status}")),
        }
    }
}

impl super::Services {
    /// The room of a local alias. An alias unknown here but in a
    /// service's namespaces is asked of that service, which may create
    /// the room and alias before it answers.
    pub async fn resolve_local_alias(
        &self,
        alias: &ruma::RoomAliasId,
    ) -> Result<Option<ruma::OwnedRoomId>> {
        if let Some(room_id) = self.directory.resolve(alias)? {
            return Ok(Some(room_id));
        }
        if self.appservices.query_alias(alias.as_str()).await {
            return self.directory.resolve(alias);
        }
        Ok(None)
    }

    /// Makes sure a local user the services may know of exists: one that
    /// is unknown here but in a service's namespaces is asked of that
    /// service and, if it says the user exists, created.
    pub async fn ensure_appservice_user(&self, user_id: &str) -> Result<()> {
        let Some(localpart) = self.accounts.resolve_local_user(user_id) else {
            return Ok(());
        };
        if self.accounts.user(&localpart)?.is_some() {
            return Ok(());
        }
        let Some(service) = self.appservices.query_user(user_id).await else {
            return Ok(());
        };
        match self
            .accounts
            .register_for_appservice(&localpart, None)
            .await
        {
            // The service may have registered it itself meanwhile.
            Ok(_) | Err(Error::UserInUse) => {
                tracing::info!(%user_id, appservice = %service.id, "created a user an application service vouched for");
                Ok(())
            }
            Err(other) => Err(other),
        }
    }

    /// Creates the sender user of each service that has none yet.
    pub async fn register_appservice_senders(&self) -> Result<()> {
        for service in self.appservices.registrations.iter() {
            if self.accounts.user(&service.sender_localpart)?.is_some() {
                continue;
            }
            match self
                .accounts
                .register_for_appservice(&service.sender_localpart, None)
                .await
            {
                Ok(_) | Err(Error::UserInUse) => {}
                Err(other) => return Err(other),
            }
        }
        Ok(())
    }
}

/// Whether a service is interested in an event: through its room
/// (`through_room`, indices into the registrations), its sender, or the
/// user a member event is about (`member`).
pub fn interested_in_event(
    index: usize,
    service: &Registration,
    sender: &str,
    member: Option<&str>,
    through_room: &[usize],
) -> bool {
    through_room.contains(&index)
        || service.is_interested_in_user(sender)
        || member.is_some_and(|user| service.is_interested_in_user(user))
}

/// Rooms whose remembered interest is forgotten again when a draft is
/// gone (after its batch committed): a reader may have remembered the
/// interest from the database while the draft's member events were not
/// in it yet.
pub struct InterestReset {
    appservices: Arc<Appservices>,
    pub rooms: std::collections::BTreeSet<String>,
}

impl InterestReset {
    pub fn new(appservices: Arc<Appservices>) -> Self {
        InterestReset {
            appservices,
            rooms: Default::default(),
        }
    }
}

impl Drop for InterestReset {
    fn drop(&mut self) {
        for room_id in &self.rooms {
            self.appservices.forget_room(room_id);
        }
    }
}

/// The highest queue position stored for any service (0 for none): one
/// seek per service that has a queue.
pub fn last_queued_position(storage: &crate::storage::Storage) -> Result<u64> {
    use crate::storage::tables;
    use crate::storage::{Direction, KeyRange};
    let mut last = 0;
    for id in sender::queued_services(storage)? {
        let newest = storage.scan(
            tables::APPSERVICE_QUEUE,
            &KeyRange::prefix(&tables::str_prefix(&id)),
            Direction::Backward,
            1,
        )?;
        if let Some(((_, position), _)) = newest.first() {
            last = last.max(*position);
        }
    }
    Ok(last)
}

/// Why a ping did not reach the service.
#[derive(Debug, thiserror::Error)]
pub enum PingFailure {
    #[error("The application service has no URL")]
    UrlNotSet,
    #[error("The application service did not answer in time")]
    TimedOut,
    #[error("Cannot reach the application service: {0}")]
    Unreachable(String),
    #[error("The application service answered {status}")]
    BadStatus { status: u16, body: String },
}

/// An answer's body, or `None` past `limit` bytes or on a read error.
async fn read_bounded(mut answer: reqwest::Response, limit: usize) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    while let Some(chunk) = answer.chunk().await.ok()? {
        if body.len() + chunk.len() > limit {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    Some(body)
}

/// Percent-encodes one path segment.
fn encode(segment: &str) -> String {
    form_urlencoded::byte_serialize(segment.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn appservices() -> Appservices {
        let yaml = |id: &str, body: &str| {
            let text = format!(
                "id: {id}\nurl: null\nas_token: {id}-as\nhs_token: {id}-hs\nsender_localpart: {id}_bot\n{body}"
            );
            (id.to_owned(), Registration::from_yaml(&text).unwrap())
        };
        let irc = yaml(
            "irc",
            "namespaces:\n  users: [{exclusive: true, regex: '@irc_.*'}]\n  aliases: [{exclusive: true, regex: '#irc_.*'}]\n",
        );
        let watcher = yaml(
            "watcher",
            "namespaces:\n  users: [{exclusive: false, regex: '@.*:other'}]\n  rooms: [{exclusive: false, regex: '!watched'}]\n",
        );
        let registrations = Registrations::new("example.org", vec![irc, watcher]).unwrap();
        Appservices::new(registrations, AppservicesConfig::default(), 0).unwrap()
    }

    fn is_exclusive(result: Result<()>) -> bool {
        matches!(result, Err(Error::Exclusive(_)))
    }

    #[test]
    fn exclusive_users_and_aliases_are_refused_to_others() {
        let services = appservices();
        let irc = services.registrations.by_id("irc");
        let watcher = services.registrations.by_id("watcher");
        assert!(is_exclusive(
            services.check_user_free("@irc_bob:example.org", None)
        ));
        assert!(is_exclusive(
            services.check_user_free("@irc_bob:example.org", watcher)
        ));
        assert!(services
            .check_user_free("@irc_bob:example.org", irc)
            .is_ok());
        // A service's sender is its own too.
        assert!(is_exclusive(
            services.check_user_free("@irc_bot:example.org", None)
        ));
        // Not exclusive: anyone may have it.
        assert!(services.check_user_free("@carol:other", None).is_ok());
        assert!(is_exclusive(
            services.check_alias_free("#irc_x:example.org", None)
        ));
        assert!(services.check_alias_free("#irc_x:example.org", irc).is_ok());
        // A service names only aliases of its namespaces.
        assert!(is_exclusive(
            services.check_alias_free("#mine:example.org", irc)
        ));
        assert!(services.check_alias_free("#mine:example.org", None).is_ok());
    }

    #[test]
    fn a_room_interests_by_members_aliases_and_id() {
        let services = appservices();
        let members = |users: &[&str]| users.iter().map(|u| u.to_string()).collect::<Vec<_>>();
        let none: &[usize] = &[];
        assert_eq!(
            &*services.interest_of("!r", &members(&["@a:example.org"]), &[]),
            none
        );
        assert_eq!(
            &*services.interest_of("!r", &members(&["@irc_a:example.org"]), &[]),
            &[0]
        );
        assert_eq!(
            &*services.interest_of("!r", &members(&["@irc_bot:example.org"]), &[]),
            &[0]
        );
        assert_eq!(
            &*services.interest_of("!r", &[], &["#irc_chan:example.org".to_owned()]),
            &[0]
        );
        assert_eq!(
            &*services.interest_of("!watched:example.org", &[], &[]),
            &[1]
        );
        assert_eq!(
            &*services.interest_of(
                "!watched",
                &members(&["@irc_a:example.org", "@b:other"]),
                &[]
            ),
            &[0, 1]
        );
        assert!(services.concerns_user("@b:other"));
        assert!(!services.concerns_user("@b:example.org"));
    }

    #[test]
    fn remembered_interest_is_forgotten_with_the_draft() {
        let services = Arc::new(appservices());
        services.remember_interest("!r", Arc::from([0usize]), services.interest_epoch());
        assert!(services.remembered_interest("!r").is_some());
        {
            let mut reset = InterestReset::new(services.clone());
            reset.rooms.insert("!r".to_owned());
            // Remembered again meanwhile (a reader of the database).
            services.remember_interest("!r", Arc::from([]), services.interest_epoch());
        }
        assert!(services.remembered_interest("!r").is_none());
        // An interest read before a change is not remembered after it.
        let epoch = services.interest_epoch();
        services.forget_room("!other");
        services.remember_interest("!r", Arc::from([0usize]), epoch);
        assert!(services.remembered_interest("!r").is_none());
    }
}
