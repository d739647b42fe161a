//! The push rules API: the server-default rules, the user's own rules and
//! changes (placed, enabled, with new actions, deleted), their errors, and
//! the rules as account data in `/sync`, kept across a restart.

mod common;

use common::{assert_error, send_message, test_config, token, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const RULES: &str = "/_matrix/client/v3/pushrules";

fn ids(rules: &Value) -> Vec<String> {
    rules
        .as_array()
        .unwrap()
        .iter()
        .map(|rule| rule["rule_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_default_rules_are_served_and_the_users_changes_kept() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);

    let (status, all) = server.get(&format!("{RULES}/"), Some(&alice)).await;
    assert_eq!(status, StatusCode::OK, "{all}");
    let global = &all["global"];
    let overrides = ids(&global["override"]);
    assert_eq!(overrides[0], ".m.rule.master");
    for expected in [
        ".m.rule.suppress_notices",
        ".m.rule.invite_for_me",
        ".m.rule.member_event",
        ".m.rule.is_user_mention",
        ".m.rule.is_room_mention",
        ".m.rule.tombstone",
        ".m.rule.reaction",
        ".m.rule.room.server_acl",
        ".m.rule.suppress_edits",
    ] {
        assert!(
            overrides.contains(&expected.to_owned()),
            "{expected}: {overrides:?}"
        );
    }
    let underrides = ids(&global["underride"]);
    for expected in [
        ".m.rule.call",
        ".m.rule.encrypted_room_one_to_one",
        ".m.rule.room_one_to_one",
        ".m.rule.message",
        ".m.rule.encrypted",
    ] {
        assert!(
            underrides.contains(&expected.to_owned()),
            "{expected}: {underrides:?}"
        );
    }
    let master = &global["override"][0];
    assert_eq!(
        (master["default"].clone(), master["enabled"].clone()),
        (json!(true), json!(false))
    );
    // The same rules under `global/`, and as account data.
    let (_, scope) = server.get(&format!("{RULES}/global/"), Some(&alice)).await;
    assert_eq!(&scope, global);
    let (_, data) = server
        .get(
            "/_matrix/client/v3/user/@alice:localhost/account_data/m.push_rules",
            Some(&alice),
        )
        .await;
    assert_eq!(data, all);
    let (_, initial) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    let events = initial["account_data"]["events"].as_array().unwrap();
    let rules = events
        .iter()
        .find(|e| e["type"] == "m.push_rules")
        .expect("rules in the initial sync");
    assert_eq!(rules["content"], all);
    let since = initial["next_batch"].as_str().unwrap().to_owned();

    // A rule of the user's: muting a room (the legacy dont_notify is
    // dropped, as it means nothing).
    let mute = json!({
        "conditions": [{ "kind": "event_match", "key": "room_id", "pattern": "!noisy:localhost" }],
        "actions": ["dont_notify"],
    });
    let (status, answer) = server
        .put(&format!("{RULES}/global/override/mute"), Some(&alice), mute)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, rule) = server
        .get(&format!("{RULES}/global/override/mute"), Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(rule["rule_id"], "mute");
    assert_eq!(rule["default"], false);
    assert_eq!(rule["enabled"], true);
    assert_eq!(rule["actions"], json!([]));
    assert_eq!(rule["conditions"][0]["pattern"], "!noisy:localhost");
    // Placed before it.
    let first = json!({ "conditions": [], "actions": ["notify"] });
    let (status, _) = server
        .put(
            &format!("{RULES}/global/override/first?before=mute"),
            Some(&alice),
            first,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, all) = server.get(&format!("{RULES}/"), Some(&alice)).await;
    let overrides = ids(&all["global"]["override"]);
    let position = |id: &str| overrides.iter().position(|r| r == id).unwrap();
    assert!(position("first") < position("mute"), "{overrides:?}");
    // A change shows up in an incremental sync.
    let (_, next) = server
        .get(
            &format!("/_matrix/client/v3/sync?since={since}"),
            Some(&alice),
        )
        .await;
    let events = next["account_data"]["events"].as_array().unwrap();
    let rules = events
        .iter()
        .find(|e| e["type"] == "m.push_rules")
        .expect("changed rules");
    assert_eq!(rules["content"], all);

    // Other kinds.
    let room_rule = json!({ "actions": ["notify", { "set_tweak": "sound", "value": "default" }] });
    assert_eq!(
        server
            .put(
                &format!("{RULES}/global/room/!quiet:localhost"),
                Some(&alice),
                room_rule
            )
            .await
            .0,
        StatusCode::OK
    );
    let sender_rule = json!({ "actions": [] });
    assert_eq!(
        server
            .put(
                &format!("{RULES}/global/sender/@bob:localhost"),
                Some(&alice),
                sender_rule
            )
            .await
            .0,
        StatusCode::OK
    );
    let content_rule =
        json!({ "pattern": "cake*", "actions": ["notify", { "set_tweak": "highlight" }] });
    assert_eq!(
        server
            .put(
                &format!("{RULES}/global/content/cake"),
                Some(&alice),
                content_rule
            )
            .await
            .0,
        StatusCode::OK
    );
    let (_, rule) = server
        .get(&format!("{RULES}/global/content/cake"), Some(&alice))
        .await;
    assert_eq!(rule["pattern"], "cake*");
    assert_eq!(
        rule["actions"],
        json!(["notify", { "set_tweak": "highlight" }])
    );

    // Enabled, and actions, of a default rule.
    let path = format!("{RULES}/global/override/.m.rule.master/enabled");
    assert_eq!(
        server
            .put(&path, Some(&alice), json!({ "enabled": true }))
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        server.get(&path, Some(&alice)).await.1,
        json!({ "enabled": true })
    );
    let path = format!("{RULES}/global/underride/.m.rule.message/actions");
    let actions = json!({ "actions": ["notify", { "set_tweak": "sound", "value": "ding" }] });
    assert_eq!(
        server.put(&path, Some(&alice), actions.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(server.get(&path, Some(&alice)).await.1, actions);

    // Bad input, each refused with nothing changed.
    let before = server.get(&format!("{RULES}/"), Some(&alice)).await.1;
    let notify = json!({ "conditions": [], "actions": ["notify"] });
    let refusals = [
        (
            Method::PUT,
            "override/x?before=missing".to_owned(),
            notify.clone(),
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            Method::PUT,
            "override/x?after=.m.rule.master".to_owned(),
            notify.clone(),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/.mine".to_owned(),
            notify.clone(),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/x".to_owned(),
            json!({ "actions": ["notify"] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/x".to_owned(),
            json!({ "conditions": [], "actions": ["explode"] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/x".to_owned(),
            json!({ "conditions": [{ "key": "x" }], "actions": [] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/x".to_owned(),
            json!({ "conditions": [] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "content/x".to_owned(),
            json!({ "actions": [] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "sender/not-a-user".to_owned(),
            json!({ "actions": [] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "room/not-a-room".to_owned(),
            json!({ "actions": [] }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "elsewhere/x".to_owned(),
            notify.clone(),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/.m.rule.master/enabled".to_owned(),
            json!({ "enabled": "yes" }),
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::PUT,
            "override/missing/enabled".to_owned(),
            json!({ "enabled": true }),
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            Method::PUT,
            "override/missing/actions".to_owned(),
            json!({ "actions": [] }),
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            Method::DELETE,
            "override/.m.rule.master".to_owned(),
            Value::Null,
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            Method::DELETE,
            "override/missing".to_owned(),
            Value::Null,
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            Method::GET,
            "override/missing".to_owned(),
            Value::Null,
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
    ];
    for (method, path, body, status, errcode) in refusals {
        let body = (!body.is_null()).then_some(body);
        let answer = server
            .call(
                method,
                &format!("{RULES}/global/{path}"),
                Some(&alice),
                body,
            )
            .await;
        assert_error(&answer, status, errcode);
    }
    let scoped = server
        .get(&format!("{RULES}/device/override/mute"), Some(&alice))
        .await;
    assert_error(&scoped, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let broken = server
        .http
        .put(server.url(&format!("{RULES}/global/override/x")))
        .bearer_auth(&alice)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(broken.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        server.get(&format!("{RULES}/"), Some(&alice)).await.1,
        before
    );
    let answer = server
        .put(
            "/_matrix/client/v3/user/@alice:localhost/account_data/m.push_rules",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(answer.0, StatusCode::METHOD_NOT_ALLOWED);
    assert_error(
        &server.get(&format!("{RULES}/"), None).await,
        StatusCode::UNAUTHORIZED,
        "M_MISSING_TOKEN",
    );

    // Deleting one of the user's rules.
    let path = format!("{RULES}/global/override/mute");
    assert_eq!(
        server
            .call(Method::DELETE, &path, Some(&alice), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_error(
        &server.get(&path, Some(&alice)).await,
        StatusCode::NOT_FOUND,
        "M_NOT_FOUND",
    );

    // Everything is kept across a restart; Bob's rules are his own.
    let kept = server.get(&format!("{RULES}/"), Some(&alice)).await.1;
    let dir = server.stop().await;
    let config = test_config(&dir);
    let server = TestServer::start_in(dir, config, None).await;
    assert_eq!(server.get(&format!("{RULES}/"), Some(&alice)).await.1, kept);
    let bob = token(&server.register("bob").await);
    let (_, bobs) = server.get(&format!("{RULES}/"), Some(&bob)).await;
    assert_eq!(bobs["global"]["override"][0]["enabled"], false);
    assert!(!ids(&bobs["global"]["override"]).contains(&"first".to_owned()));
}

/// Alice's counts in `room_id` by an initial sync with `filter`.
async fn counts(server: &TestServer, token: &str, room_id: &str, filter: &str) -> Value {
    let path = format!(
        "/_matrix/client/v3/sync?filter={}",
        form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>()
    );
    let (status, answer) = server.get(&path, Some(token)).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let room = &answer["rooms"]["join"][room_id];
    json!({
        "unread": room["unread_notifications"],
        "threads": room.get("unread_thread_notifications").cloned().unwrap_or(json!({})),
    })
}

#[tokio::test]
async fn unread_counts_follow_the_rules_the_receipts_and_the_threads() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let room_id = server
        .create_room(&bob, json!({ "preset": "public_chat", "name": "Three" }))
        .await;
    for member in [&alice, &carol] {
        common::join(&server, member, &room_id).await;
    }
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    let all = "{}";
    let threaded = r#"{"room":{"timeline":{"unread_thread_notifications":true}}}"#;

    // Messages notify; a mention highlights; a notice and an edit do not
    // count (their default rules say so).
    let root = send_message(&server, &bob, &room_id, "1", text("a root")).await;
    send_message(&server, &carol, &room_id, "2", text("hello")).await;
    let mention = json!({ "msgtype": "m.text", "body": "Alice?", "m.mentions": { "user_ids": ["@alice:localhost"] } });
    send_message(&server, &carol, &room_id, "3", mention).await;
    send_message(
        &server,
        &bob,
        &room_id,
        "4",
        json!({ "msgtype": "m.notice", "body": "bot" }),
    )
    .await;
    let edit = json!({
        "msgtype": "m.text", "body": "* hello!",
        "m.new_content": { "msgtype": "m.text", "body": "hello!" },
        "m.relates_to": { "rel_type": "m.replace", "event_id": root },
    });
    send_message(&server, &bob, &room_id, "5", edit).await;
    // Two replies in a thread.
    for (txn, body) in [("6", "in thread"), ("7", "in thread again")] {
        let reply = json!({
            "msgtype": "m.text", "body": body,
            "m.relates_to": { "rel_type": "m.thread", "event_id": root, "is_falling_back": true, "m.in_reply_to": { "event_id": root } },
        });
        send_message(&server, &carol, &room_id, txn, reply).await;
    }
    let seen = counts(&server, &alice, &room_id, all).await;
    assert_eq!(
        seen["unread"],
        json!({ "notification_count": 5, "highlight_count": 1 }),
        "{seen}"
    );
    assert_eq!(seen["threads"], json!({}));
    let seen = counts(&server, &alice, &room_id, threaded).await;
    assert_eq!(
        seen["unread"],
        json!({ "notification_count": 3, "highlight_count": 1 }),
        "{seen}"
    );
    assert_eq!(
        seen["threads"],
        json!({ root.clone(): { "notification_count": 2, "highlight_count": 0 } })
    );

    // A receipt in the thread reads the thread only; one on the main
    // timeline reads the rest.
    let last_in_thread = send_message(
        &server,
        &carol,
        &room_id,
        "8",
        json!({
            "msgtype": "m.text", "body": "third",
            "m.relates_to": { "rel_type": "m.thread", "event_id": root },
        }),
    )
    .await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{last_in_thread}"),
            Some(&alice),
            json!({ "thread_id": root }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let seen = counts(&server, &alice, &room_id, threaded).await;
    assert_eq!(
        seen["unread"],
        json!({ "notification_count": 3, "highlight_count": 1 }),
        "{seen}"
    );
    assert_eq!(seen["threads"], json!({}), "{seen}");
    let latest_main = send_message(&server, &bob, &room_id, "9", text("main again")).await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{latest_main}"),
            Some(&alice),
            json!({ "thread_id": "main" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let seen = counts(&server, &alice, &room_id, all).await;
    assert_eq!(
        seen["unread"],
        json!({ "notification_count": 0, "highlight_count": 0 }),
        "{seen}"
    );

    // A muted room (an override rule without actions) counts nothing;
    // sliding sync agrees.
    send_message(&server, &bob, &room_id, "10", text("one")).await;
    send_message(&server, &bob, &room_id, "11", text("two")).await;
    assert_eq!(
        counts(&server, &alice, &room_id, all).await["unread"]["notification_count"],
        2
    );
    let sliding = |token: String| {
        let server = &server;
        async move {
            let body = json!({ "lists": { "all": { "ranges": [[0, 10]], "timeline_limit": 1 } } });
            let (status, answer) = server
                .post(
                    "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync",
                    Some(&token),
                    body,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            answer
        }
    };
    let answer = sliding(alice.clone()).await;
    assert_eq!(
        answer["rooms"][&room_id]["notification_count"], 2,
        "{answer}"
    );
    let mute = json!({
        "conditions": [{ "kind": "event_match", "key": "room_id", "pattern": room_id }],
        "actions": [],
    });
    let (status, _) = server
        .put(&format!("{RULES}/global/override/mute"), Some(&alice), mute)
        .await;
    assert_eq!(status, StatusCode::OK);
    send_message(&server, &bob, &room_id, "12", text("three")).await;
    assert_eq!(
        counts(&server, &alice, &room_id, all).await["unread"]["notification_count"],
        0
    );
    let answer = sliding(alice.clone()).await;
    assert_eq!(
        answer["rooms"][&room_id]["notification_count"], 0,
        "{answer}"
    );
    // Bob's and Carol's rules are their own: Carol still counts Bob's.
    assert!(
        counts(&server, &carol, &room_id, all).await["unread"]["notification_count"]
            .as_u64()
            .unwrap()
            > 0
    );
}

#[tokio::test]
async fn unread_counts_after_a_restart_come_from_what_the_notifier_recorded() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(&bob, json!({ "preset": "public_chat" }))
        .await;
    common::join(&server, &alice, &room_id).await;
    let text = |body: &str| json!({ "msgtype": "m.text", "body": body });
    send_message(&server, &bob, &room_id, "1", text("one")).await;
    let mention = json!({ "msgtype": "m.text", "body": "Alice?", "m.mentions": { "user_ids": ["@alice:localhost"] } });
    send_message(&server, &bob, &room_id, "2", mention).await;
    send_message(
        &server,
        &bob,
        &room_id,
        "3",
        json!({ "msgtype": "m.notice", "body": "bot" }),
    )
    .await;
    // Dave joins after those: they are not his to count.
    let dave = token(&server.register("dave").await);
    common::join(&server, &dave, &room_id).await;
    send_message(&server, &bob, &room_id, "4", text("four")).await;
    let expected = [
        (
            &alice,
            json!({ "notification_count": 3, "highlight_count": 1 }),
        ),
        (
            &dave,
            json!({ "notification_count": 1, "highlight_count": 0 }),
        ),
    ];
    for (user, counted) in &expected {
        assert_eq!(
            counts(&server, user, &room_id, "{}").await["unread"],
            *counted
        );
    }
    // Wait until the notifier has judged everything, then start afresh:
    // nothing is remembered, and the counts are read from its records.
    let notified = |server: &TestServer| {
        let services = server.server.as_ref().unwrap().services.clone();
        async move {
            for _ in 0..200 {
                let upto = services
                    .sync
                    .notified_upto
                    .load(std::sync::atomic::Ordering::Acquire);
                let since = services
                    .sync
                    .notified_since
                    .load(std::sync::atomic::Ordering::Acquire);
                if since != u64::MAX && upto != u64::MAX && upto >= services.sync.current() {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("the notifier did not catch up");
        }
    };
    notified(&server).await;
    let config = server.server.as_ref().unwrap().services.config.clone();
    let dir = server.stop().await;
    let server = TestServer::start_in(dir, (*config).clone(), None).await;
    notified(&server).await;
    for (user, counted) in &expected {
        assert_eq!(
            counts(&server, user, &room_id, "{}").await["unread"],
            *counted
        );
    }
}
