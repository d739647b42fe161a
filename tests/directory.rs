//! Room aliases and the public room directory, over HTTP.

mod common;

use common::{assert_error, join, token, TestServer};
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn aliases_resolve_join_and_delete() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let body = json!({ "room_alias_name": "plans", "preset": "public_chat", "name": "Plans" });
    let (status, created) = server
        .post("/_matrix/client/v3/createRoom", Some(&alice), body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{created}");
    let room_id = created["room_id"].as_str().unwrap();
    let again = server
        .post("/_matrix/client/v3/createRoom", Some(&alice), body)
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, "M_ROOM_IN_USE");
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&alice))
        .await;
    assert_eq!(
        joined["joined_rooms"].as_array().unwrap().len(),
        1,
        "the refused room was not made"
    );

    let (status, resolved) = server
        .get("/_matrix/client/v3/directory/room/%23plans:localhost", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        resolved,
        json!({ "room_id": room_id, "servers": ["localhost"] })
    );
    let (_, canonical) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/state/m.room.canonical_alias"),
            Some(&alice),
        )
        .await;
    assert_eq!(canonical["alias"], "#plans:localhost", "{canonical}");

    let (status, answer) = server
        .post(
            "/_matrix/client/v3/join/%23plans:localhost",
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["room_id"], room_id);

    let other = "/_matrix/client/v3/directory/room/%23other:localhost";
    let (status, _) = server
        .put(other, Some(&alice), json!({ "room_id": room_id }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let taken = server
        .put(other, Some(&bob), json!({ "room_id": room_id }))
        .await;
    assert_error(&taken, StatusCode::CONFLICT, "M_UNKNOWN");
    let (_, aliases) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room_id}/aliases"),
            Some(&bob),
        )
        .await;
    assert_eq!(
        aliases["aliases"],
        json!(["#other:localhost", "#plans:localhost"])
    );
    let refused = server.call(Method::DELETE, other, Some(&bob), None).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = server.call(Method::DELETE, other, Some(&alice), None).await;
    assert_eq!(status, StatusCode::OK);
    let gone = server.get(other, None).await;
    assert_error(&gone, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let remote = server
        .put(
            "/_matrix/client/v3/directory/room/%23x:elsewhere.org",
            Some(&alice),
            json!({ "room_id": room_id }),
        )
        .await;
    assert_error(&remote, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let invalid = server
        .get("/_matrix/client/v3/directory/room/plans", None)
        .await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn the_directory_lists_published_rooms() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let room_id = server
        .create_room(
            &alice,
            json!({ "visibility": "public", "name": "Gardening", "topic": "Tomatoes" }),
        )
        .await;
    server
        .post(
            "/_matrix/client/v3/createRoom",
            Some(&alice),
            json!({ "name": "Hidden" }),
        )
        .await;
    let (status, listed) = server.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(listed["total_room_count_estimate"], 1);
    let room = &listed["chunk"][0];
    assert_eq!(room["room_id"], room_id.as_str());
    assert_eq!(room["name"], "Gardening");
    assert_eq!(room["topic"], "Tomatoes");
    assert_eq!(room["num_joined_members"], 1);
    assert_eq!(room["join_rule"], "public");

    let search = |term: &str| {
        let body = json!({ "filter": { "generic_search_term": term } });
        let server = &server;
        let alice = alice.clone();
        async move {
            server
                .post("/_matrix/client/v3/publicRooms", Some(&alice), body)
                .await
        }
    };
    assert_eq!(
        search("TOMATO").await.1["chunk"].as_array().unwrap().len(),
        1
    );
    assert_eq!(search("zzz").await.1["chunk"].as_array().unwrap().len(), 0);

    let path = format!("/_matrix/client/v3/directory/list/room/{room_id}");
    let (_, visibility) = server.get(&path, None).await;
    assert_eq!(visibility, json!({ "visibility": "public" }));
    let refused = server
        .put(&path, Some(&bob), json!({ "visibility": "private" }))
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = server
        .put(&path, Some(&alice), json!({ "visibility": "private" }))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, listed) = server.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(listed["chunk"], json!([]));
}

#[tokio::test]
async fn an_upgrade_tombstones_the_old_room_and_moves_its_aliases() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let old = server
        .create_room(
            &alice,
            json!({
                "room_version": "10", "name": "Old", "topic": "t", "preset": "public_chat",
                "room_alias_name": "up", "visibility": "public",
            }),
        )
        .await;
    server
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    let refused = server
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&bob),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let unsupported = server
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&alice),
            json!({ "new_version": "8" }),
        )
        .await;
    assert_error(
        &unsupported,
        StatusCode::BAD_REQUEST,
        "M_UNSUPPORTED_ROOM_VERSION",
    );

    let (status, answer) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&alice),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let new = answer["replacement_room"].as_str().unwrap().to_owned();
    let (_, tombstone) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{old}/state/m.room.tombstone"),
            Some(&alice),
        )
        .await;
    assert_eq!(tombstone["replacement_room"], new.as_str());
    let (_, create) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{new}/state/m.room.create"),
            Some(&alice),
        )
        .await;
    assert_eq!(create["predecessor"]["room_id"], old.as_str());
    assert_eq!(create["room_version"], "12");
    let (_, name) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{new}/state/m.room.name"),
            Some(&alice),
        )
        .await;
    assert_eq!(name["name"], "Old");
    let (_, resolved) = server
        .get("/_matrix/client/v3/directory/room/%23up:localhost", None)
        .await;
    assert_eq!(resolved["room_id"], new.as_str());
    let (_, listed) = server.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(listed["chunk"][0]["room_id"], new.as_str());
    // Bob may follow into the new (public) room; the old one is closed to him.
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{new}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, levels) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{old}/state/m.room.power_levels"),
            Some(&alice),
        )
        .await;
    assert_eq!(levels["events_default"], 50);
    let again = server
        .post(
            &format!("/_matrix/client/v3/rooms/{old}/upgrade"),
            Some(&alice),
            json!({ "new_version": "12" }),
        )
        .await;
    assert_error(&again, StatusCode::BAD_REQUEST, "M_UNKNOWN");
}

/// The user IDs a user directory search finds, and whether it was limited.
async fn find_users(
    server: &TestServer,
    token: &str,
    term: &str,
    limit: u64,
) -> (Vec<String>, bool) {
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/user_directory/search",
            Some(token),
            json!({ "search_term": term, "limit": limit }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let ids = answer["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|result| result["user_id"].as_str().unwrap().to_owned())
        .collect();
    (ids, answer["limited"].as_bool().unwrap())
}

#[tokio::test]
async fn the_user_directory_finds_who_shares_a_room_or_is_in_a_public_one() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    server.register("dave").await;
    let eve = token(&server.register("eve").await);
    let shared = server
        .create_room(
            &alice,
            json!({ "preset": "private_chat", "invite": ["@bob:localhost"] }),
        )
        .await;
    join(&server, &bob, &shared).await;
    server
        .create_room(&carol, json!({ "preset": "public_chat" }))
        .await;
    server
        .create_room(&eve, json!({ "preset": "private_chat" }))
        .await;

    assert_eq!(
        find_users(&server, &alice, "BO", 10).await,
        (vec!["@bob:localhost".to_owned()], false)
    );
    assert_eq!(
        find_users(&server, &alice, "carol", 10).await.0,
        ["@carol:localhost"]
    );
    assert!(find_users(&server, &alice, "dave", 10).await.0.is_empty());
    assert!(find_users(&server, &alice, "eve", 10).await.0.is_empty());

    // A new display name is found at once, by any of its words.
    let (status, _) = server
        .put(
            "/_matrix/client/v3/profile/@bob:localhost/displayname",
            Some(&bob),
            json!({ "displayname": "Robert Smith" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/user_directory/search",
            Some(&alice),
            json!({ "search_term": "smi" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        answer["results"][0]["user_id"], "@bob:localhost",
        "{answer}"
    );
    assert_eq!(answer["results"][0]["display_name"], "Robert Smith");

    // Limited; and once Bob leaves, he is no longer found.
    let (found, limited) = find_users(&server, &alice, "localhost", 1).await;
    assert_eq!(found.len(), 1);
    assert!(limited);
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{shared}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(find_users(&server, &alice, "robert", 10).await.0.is_empty());

    // Bad input is refused.
    let (status, answer) = server
        .post(
            "/_matrix/client/v3/user_directory/search",
            Some(&alice),
            json!({ "limit": 3 }),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{answer}");

    // Configured to, the directory finds every local user.
    let everyone =
        TestServer::start_with(|config| config.user_directory_search_all_users = true).await;
    let alice = token(&everyone.register("alice").await);
    everyone.register("dave").await;
    assert_eq!(
        find_users(&everyone, &alice, "dave", 10).await.0,
        ["@dave:localhost"]
    );
}
