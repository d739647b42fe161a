//! User-interactive authentication (UIA) sessions.
//!
//! A request that needs UIA is answered 401 with the flows the client may
//! complete, and a session ID; the client repeats the request with an
//! `auth` object per stage until one flow is complete. This module tracks
//! sessions and stage progress; verifying a stage's credentials is the
//! caller's job (see [`super::Services::authorize_interactively`]).
//!
//! Sessions live in memory with a time-out and a cap: losing them on restart
//! only makes a client start its authentication again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use super::clock::Clock;
use super::error::{Error, Result};

/// Most sessions kept at once; the oldest is dropped past it.
const MAX_SESSIONS: usize = 10_000;

pub const STAGE_DUMMY: &str = "m.login.dummy";
pub const STAGE_PASSWORD: &str = "m.login.password";
pub const STAGE_REGISTRATION_TOKEN: &str = "m.login.registration_token";
pub const STAGE_EMAIL: &str = "m.login.email.identity";

/// What a client must complete: any one of the flows, each a list of stages.
#[derive(Clone, Debug)]
pub struct Flows(pub Vec<Vec<&'static str>>);

/// A stage the client is attempting now.
#[derive(Debug)]
pub struct Attempt {
    pub session: String,
    pub stage: String,
    pub auth: Value,
}

struct Session {
    /// What the session authorizes, e.g. `"delete_devices @alice:x"`: a
    /// session started for one operation cannot complete another.
    purpose: String,
    completed: Vec<String>,
    /// What the completed stages established (a validated address), for
    /// the operation once the flow is complete.
    facts: Vec<Value>,
    created_ms: u64,
}

pub struct Uia {
    sessions: Mutex<HashMap<String, Session>>,
    timeout_ms: u64,
    clock: Arc<dyn Clock>,
}

impl Uia {
    pub fn new(timeout_ms: u64, clock: Arc<dyn Clock>) -> Self {
        Uia {
            sessions: Mutex::new(HashMap::new()),
            timeout_ms,
            clock,
        }
    }

    /// Reads the request's `auth` object: either the stage to verify now,
    /// or an error that carries the 401 answer.
    pub fn begin(&self, purpose: &str, flows: &Flows, auth: Option<&Value>) -> Result<Attempt> {
        let now = self.clock.now_ms();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| now.saturating_sub(s.created_ms) < self.timeout_ms);

        let requested = auth.and_then(|a| a.get("session")).and_then(Value::as_str);
        let session_id = match requested {
            Some(id) => {
                let session = sessions
                    .get(id)
                    .ok_or_else(|| Error::Unknown(format!("Unknown session ID: {id}")))?;
                if session.purpose != purpose {
                    return Err(Error::Forbidden(
                        "Requested operation has changed during the UI authentication session."
                            .to_owned(),
                    ));
                }
                id.to_owned()
            }
            None => {
                if sessions.len() >= MAX_SESSIONS {
                    let oldest = sessions
                        .iter()
                        .min_by_key(|(_, s)| s.created_ms)
                        .map(|(id, _)| id.clone());
                    if let Some(oldest) = oldest {
                        sessions.remove(&oldest);
                    }
                }
                let id = crate::ids::new_secret("", &mut rand::thread_rng());
                let session = Session {
                    purpose: purpose.to_owned(),
                    completed: Vec::new(),
                    facts: Vec::new(),
                    created_ms: now,
                };
                sessions.insert(id.clone(), session);
                id
            }
        };
        let completed = sessions[&session_id].completed.clone();
        let stage = match auth.and_then(|a| a.get("type")).and_then(Value::as_str) {
            Some(stage) => stage.to_owned(),
            None => return Err(challenge(&session_id, flows, &completed, None)),
        };
        if !flows.0.iter().any(|flow| flow.contains(&stage.as_str())) {
            return Err(Error::Unrecognized(format!(
                "Unrecognised authentication stage {stage:?}"
            )));
        }
        Ok(Attempt {
            session: session_id,
            stage,
            auth: auth.cloned().unwrap_or(Value::Null),
        })
    }

    /// Records the outcome of an attempt, and what a successful stage
    /// established. Once a flow is complete, `Ok` with everything the
    /// session's stages established; otherwise the 401 answer, with the
    /// failure's message if it failed.
    pub fn finish(
        &self,
        attempt: Attempt,
        flows: &Flows,
        outcome: Result<Option<Value>, String>,
    ) -> Result<Vec<Value>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let Some(session) = sessions.get_mut(&attempt.session) else {
            return Err(Error::Unknown(format!(
                "Unknown session ID: {}",
                attempt.session
            )));
        };
        let fact = match outcome {
            Ok(fact) => fact,
            Err(message) => {
                let completed = session.completed.clone();
                return Err(challenge(
                    &attempt.session,
                    flows,
                    &completed,
                    Some(message),
                ));
            }
        };
        session.facts.extend(fact);
        if !session.completed.contains(&attempt.stage) {
            session.completed.push(attempt.stage);
        }
        let done = flows.0.iter().any(|flow| {
            flow.iter()
                .all(|stage| session.completed.iter().any(|c| c == stage))
        });
        if done {
            let facts = sessions
                .remove(&attempt.session)
                .map(|s| s.facts)
                .unwrap_or_default();
            Ok(facts)
        } else {
            let completed = session.completed.clone();
            Err(challenge(&attempt.session, flows, &completed, None))
        }
    }
}

/// The 401 body: flows, params, session, progress, and why the last
/// attempt failed, if it did.
fn challenge(session: &str, flows: &Flows, completed: &[String], failure: Option<String>) -> Error {
    let flows: Vec<Value> = flows
        .0
        .iter()
        .map(|stages| json!({ "stages": stages }))
        .collect();
    let mut body = json!({ "flows": flows, "params": {}, "session": session });
    if !completed.is_empty() {
        body["completed"] = json!(completed);
    }
    if let Some(message) = failure {
        body["errcode"] = json!("M_FORBIDDEN");
        body["error"] = json!(message);
    }
    Error::AuthRequired(Box::new(body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::clock::ManualClock;

    fn body(error: Error) -> Value {
        match error {
            Error::AuthRequired(body) => *body,
            other => panic!("expected a 401 challenge, got {other:?}"),
        }
    }

    #[test]
    fn a_flow_completes_stage_by_stage() {
        let uia = Uia::new(60_000, Arc::new(ManualClock::new(0)));
        let flows = Flows(vec![vec![STAGE_REGISTRATION_TOKEN, STAGE_DUMMY]]);
        let first = body(uia.begin("register", &flows, None).unwrap_err());
        assert_eq!(first["flows"][0]["stages"][1], STAGE_DUMMY);
        let session = first["session"].as_str().unwrap().to_owned();

        let auth = json!({"type": STAGE_REGISTRATION_TOKEN, "session": session});
        let attempt = uia.begin("register", &flows, Some(&auth)).unwrap();
        let fact = json!({"established": "by the first stage"});
        let progress = body(
            uia.finish(attempt, &flows, Ok(Some(fact.clone())))
                .unwrap_err(),
        );
        assert_eq!(progress["completed"], json!([STAGE_REGISTRATION_TOKEN]));

        let auth = json!({"type": STAGE_DUMMY, "session": session});
        let attempt = uia.begin("register", &flows, Some(&auth)).unwrap();
        // The completed flow gives what its stages established.
        assert_eq!(uia.finish(attempt, &flows, Ok(None)).unwrap(), vec![fact]);
        // A finished session cannot be replayed.
        assert!(matches!(
            uia.begin("register", &flows, Some(&auth)),
            Err(Error::Unknown(_))
        ));
    }

    #[test]
    fn failures_unknown_stages_and_changed_operations_are_refused() {
        let clock = Arc::new(ManualClock::new(0));
        let uia = Uia::new(1000, clock.clone());
        let flows = Flows(vec![vec![STAGE_PASSWORD]]);
        let session = body(uia.begin("op A", &flows, None).unwrap_err())["session"].clone();
        let auth = json!({"type": STAGE_PASSWORD, "session": session});
        let attempt = uia.begin("op A", &flows, Some(&auth)).unwrap();
        let failed = body(
            uia.finish(attempt, &flows, Err("Invalid password".into()))
                .unwrap_err(),
        );
        assert_eq!(failed["errcode"], "M_FORBIDDEN");
        assert_eq!(failed["session"], session);

        let other = uia.begin("op B", &flows, Some(&auth));
        assert!(matches!(other, Err(Error::Forbidden(_))));
        let dummy = json!({"type": STAGE_DUMMY, "session": session});
        let unknown_stage = uia.begin("op A", &flows, Some(&dummy));
        assert!(matches!(unknown_stage, Err(Error::Unrecognized(_))));
        clock.advance_ms(1000);
        let expired = uia.begin("op A", &flows, Some(&auth));
        assert!(matches!(expired, Err(Error::Unknown(_))));
    }
}
