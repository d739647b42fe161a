//! Account data, tags, receipts, read markers, typing and presence, over HTTP.

mod common;

use common::{assert_error, token, TestServer};
use reqwest::{Method, StatusCode};
use ruma::RoomId;
use serde_json::{json, Value};

async fn room_with_message(server: &TestServer, token: &str) -> (String, String) {
    let room_id = server
        .create_room(token, json!({ "preset": "public_chat" }))
        .await;
    let (_, sent) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room_id}/send/m.room.message/1"),
            Some(token),
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    (room_id, sent["event_id"].as_str().unwrap().to_owned())
}

#[tokio::test]
async fn account_data_and_tags_round_trip() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let global = "/_matrix/client/v3/user/@alice:localhost/account_data/org.example.settings";
    let missing = server.get(global, Some(&alice)).await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, _) = server
        .put(global, Some(&alice), json!({ "theme": "dark" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, content) = server.get(global, Some(&alice)).await;
    assert_eq!(content, json!({ "theme": "dark" }));
    let other = server.get(global, Some(&bob)).await;
    assert_error(&other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let not_object = server.put(global, Some(&alice), json!([1])).await;
    assert_error(&not_object, StatusCode::BAD_REQUEST, "M_BAD_JSON");

    let (room_id, _) = room_with_message(&server, &alice).await;
    let base = format!("/_matrix/client/v3/user/@alice:localhost/rooms/{room_id}");
    let (status, _) = server
        .put(
            &format!("{base}/account_data/org.example.draft"),
            Some(&alice),
            json!({ "text": "…" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, draft) = server
        .get(
            &format!("{base}/account_data/org.example.draft"),
            Some(&alice),
        )
        .await;
    assert_eq!(draft["text"], "…");
    let fully_read = server
        .put(
            &format!("{base}/account_data/m.fully_read"),
            Some(&alice),
            json!({ "event_id": "$x" }),
        )
        .await;
    assert_error(&fully_read, StatusCode::METHOD_NOT_ALLOWED, "M_BAD_JSON");

    for (tag, order) in [("m.favourite", 0.5), ("u.work", 0.1)] {
        let (status, _) = server
            .put(
                &format!("{base}/tags/{tag}"),
                Some(&alice),
                json!({ "order": order }),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("{base}/tags/u.work"),
            Some(&alice),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, tags) = server.get(&format!("{base}/tags"), Some(&alice)).await;
    assert_eq!(tags, json!({ "tags": { "m.favourite": { "order": 0.5 } } }));
}

#[tokio::test]
async fn receipts_read_markers_and_typing() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let (room_id, event_id) = room_with_message(&server, &alice).await;
    let services = &server.server.as_ref().unwrap().services;
    let room = RoomId::parse(&room_id).unwrap();

    let outsider = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event_id}"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_error(&outsider, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/{event_id}"),
            Some(&bob),
            json!({ "thread_id": "main" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let receipts = services.user_data.receipts(&room, "m.read").unwrap();
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].0, "@bob:localhost");
    assert_eq!(receipts[0].1, "main");
    assert_eq!(receipts[0].2.event_id, event_id);
    let unknown = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.read/$nope"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let bad_type = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/receipt/m.seen/{event_id}"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_error(&bad_type, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/read_markers"),
            Some(&bob),
            json!({ "m.fully_read": event_id, "m.read.private": event_id }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, marker) = server
        .get(
            &format!(
                "/_matrix/client/v3/user/@bob:localhost/rooms/{room_id}/account_data/m.fully_read"
            ),
            Some(&bob),
        )
        .await;
    assert_eq!(marker, json!({ "event_id": event_id }));
    assert_eq!(
        services
            .user_data
            .receipts(&room, "m.read.private")
            .unwrap()
            .len(),
        1
    );

    let typing = format!("/_matrix/client/v3/rooms/{room_id}/typing/@bob:localhost");
    let (status, _) = server
        .put(
            &typing,
            Some(&bob),
            json!({ "typing": true, "timeout": 10000 }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(services.user_data.typing(&room), ["@bob:localhost"]);
    let (status, _) = server
        .put(&typing, Some(&bob), json!({ "typing": false }))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(services.user_data.typing(&room).is_empty());
    let for_other = server
        .put(&typing, Some(&alice), json!({ "typing": true }))
        .await;
    assert_error(&for_other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
}

#[tokio::test]
async fn presence_is_set_and_shown_to_room_mates() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let path = "/_matrix/client/v3/presence/@alice:localhost/status";
    let (_, initial) = server.get(path, Some(&alice)).await;
    assert_eq!(initial["presence"], "offline");
    let (status, _) = server
        .put(
            path,
            Some(&alice),
            json!({ "presence": "online", "status_msg": "here" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let invalid = server
        .put(path, Some(&alice), json!({ "presence": "asleep" }))
        .await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let stranger = server.get(path, Some(&bob)).await;
    assert_error(&stranger, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (room_id, _) = room_with_message(&server, &alice).await;
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{room_id}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    let (status, seen): (StatusCode, Value) = server.get(path, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(seen["presence"], "online");
    assert_eq!(seen["status_msg"], "here");
    assert_eq!(seen["currently_active"], true);
}

#[tokio::test]
async fn filters_are_stored_and_read_back() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let filter = json!({
        "event_fields": ["type", "content.body"],
        "room": { "timeline": { "limit": 10, "lazy_load_members": true }, "include_leave": true },
        "presence": { "not_types": ["*"] },
    });
    let (status, created) = server
        .post(
            "/_matrix/client/v3/user/@alice:localhost/filter",
            Some(&alice),
            filter.clone(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let id = created["filter_id"].as_str().unwrap();
    let path = format!("/_matrix/client/v3/user/@alice:localhost/filter/{id}");
    let (status, stored) = server.get(&path, Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(stored, filter);
    let other = server.get(&path, Some(&bob)).await;
    assert_error(&other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let missing = server
        .get(
            "/_matrix/client/v3/user/@alice:localhost/filter/nope",
            Some(&alice),
        )
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let malformed = server
        .post(
            "/_matrix/client/v3/user/@alice:localhost/filter",
            Some(&alice),
            json!({ "room": { "timeline": { "limit": "ten" } } }),
        )
        .await;
    assert_error(&malformed, StatusCode::BAD_REQUEST, "M_BAD_JSON");
}
