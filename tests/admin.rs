//! The Synapse-compatible admin API (`/_synapse/admin`): shared-secret
//! registration, users, devices, rooms (with deletion and purge), media
//! and server notices, each for an admin and refused to a user who is not.

mod common;

use common::{assert_error, join, send_text, token, TestServer, PASSWORD};
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

const SECRET: &str = "the admins' shared secret";

/// The hex HMAC-SHA1 of a registration, as Synapse's tools compute it.
fn registration_mac(secret: &str, nonce: &str, user: &str, password: &str, admin: bool) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    let role: &[u8] = if admin { b"admin" } else { b"notadmin" };
    for (i, part) in [nonce.as_bytes(), user.as_bytes(), password.as_bytes(), role]
        .iter()
        .enumerate()
    {
        if i > 0 {
            mac.update(b"\0");
        }
        mac.update(part);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn nonce(server: &TestServer) -> String {
    let (status, answer) = server.get("/_synapse/admin/v1/register", None).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer["nonce"].as_str().unwrap().to_owned()
}

/// Registers through the shared secret; returns the answer.
async fn register_with_secret(server: &TestServer, user: &str, admin: bool) -> Value {
    let nonce = nonce(server).await;
    let body = json!({
        "nonce": nonce,
        "username": user,
        "password": PASSWORD,
        "admin": admin,
        "mac": registration_mac(SECRET, &nonce, user, PASSWORD, admin),
    });
    let (status, answer) = server.post("/_synapse/admin/v1/register", None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn start() -> TestServer {
    TestServer::start_with(|config| {
        config.registration_shared_secret = Some(SECRET.to_owned());
        config.server_notices.enabled = true;
        config.server_notices.localpart = "_server".to_owned();
    })
    .await
}

async fn login_as(server: &TestServer, user: &str, password: &str) -> (StatusCode, Value) {
    let body = json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": user },
        "password": password,
    });
    server.post("/_matrix/client/v3/login", None, body).await
}

async fn login_status(server: &TestServer, user: &str, password: &str) -> StatusCode {
    login_as(server, user, password).await.0
}

#[tokio::test]
async fn shared_secret_registration_checks_the_mac_and_the_nonce() {
    let server = start().await;
    let nonce1 = nonce(&server).await;
    let wrong = json!({
        "nonce": nonce1,
        "username": "mallory",
        "password": PASSWORD,
        "admin": true,
        "mac": registration_mac("not the secret", &nonce1, "mallory", PASSWORD, true),
    });
    let refused = server
        .post("/_synapse/admin/v1/register", None, wrong)
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    // A MAC of other fields (admin claimed, notadmin signed) is refused too.
    let nonce2 = nonce(&server).await;
    let tampered = json!({
        "nonce": nonce2,
        "username": "mallory",
        "password": PASSWORD,
        "admin": true,
        "mac": registration_mac(SECRET, &nonce2, "mallory", PASSWORD, false),
    });
    let refused = server
        .post("/_synapse/admin/v1/register", None, tampered)
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    assert_eq!(
        login_status(&server, "mallory", PASSWORD).await,
        StatusCode::FORBIDDEN
    );

    let admin = register_with_secret(&server, "root", true).await;
    assert_eq!(admin["user_id"], "@root:localhost");
    assert_eq!(admin["home_server"], "localhost");
    assert!(admin["device_id"].is_string());
    let whoami = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&admin)))
        .await;
    assert_eq!(whoami.1["user_id"], "@root:localhost", "{}", whoami.1);

    // A nonce serves once.
    let nonce3 = nonce(&server).await;
    let body = json!({
        "nonce": nonce3,
        "username": "first",
        "password": PASSWORD,
        "admin": false,
        "mac": registration_mac(SECRET, &nonce3, "first", PASSWORD, false),
    });
    let (status, _) = server
        .post("/_synapse/admin/v1/register", None, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK);
    let mut again = body;
    again["username"] = json!("second");
    again["mac"] = json!(registration_mac(SECRET, &nonce3, "second", PASSWORD, false));
    let reused = server
        .post("/_synapse/admin/v1/register", None, again)
        .await;
    assert_error(&reused, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Without a configured secret the endpoint is off.
    let plain = TestServer::start().await;
    let off = plain.get("/_synapse/admin/v1/register", None).await;
    assert_error(&off, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn every_admin_endpoint_refuses_a_user_who_is_not_an_admin() {
    let server = start().await;
    let admin = token(&register_with_secret(&server, "root", true).await);
    let bob = token(&server.register("bob").await);
    let room = server
        .create_room(&admin, json!({ "preset": "public_chat" }))
        .await;
    let endpoints: Vec<(Method, String, Value)> = vec![
        (Method::GET, "/v2/users".into(), json!(null)),
        (Method::GET, "/v2/users/@bob:localhost".into(), json!(null)),
        (
            Method::PUT,
            "/v2/users/@eve:localhost".into(),
            json!({ "password": "x" }),
        ),
        (
            Method::POST,
            "/v1/deactivate/@root:localhost".into(),
            json!({}),
        ),
        (
            Method::POST,
            "/v1/reset_password/@root:localhost".into(),
            json!({ "new_password": "x" }),
        ),
        (
            Method::GET,
            "/v2/users/@root:localhost/devices".into(),
            json!(null),
        ),
        (
            Method::GET,
            "/v2/users/@root:localhost/devices/X".into(),
            json!(null),
        ),
        (
            Method::DELETE,
            "/v2/users/@root:localhost/devices/X".into(),
            json!({}),
        ),
        (
            Method::POST,
            "/v2/users/@root:localhost/delete_devices".into(),
            json!({ "devices": [] }),
        ),
        (Method::GET, "/v1/whois/@root:localhost".into(), json!(null)),
        (
            Method::GET,
            "/v1/users/@root:localhost/media".into(),
            json!(null),
        ),
        (Method::DELETE, "/v1/media/localhost/abc".into(), json!({})),
        (
            Method::POST,
            "/v1/media/quarantine/localhost/abc".into(),
            json!({}),
        ),
        (
            Method::POST,
            "/v1/media/unquarantine/localhost/abc".into(),
            json!({}),
        ),
        (Method::GET, "/v1/rooms".into(), json!(null)),
        (Method::GET, format!("/v1/rooms/{room}"), json!(null)),
        (Method::DELETE, format!("/v1/rooms/{room}"), json!({})),
        (
            Method::GET,
            format!("/v1/rooms/{room}/members"),
            json!(null),
        ),
        (Method::GET, format!("/v1/rooms/{room}/state"), json!(null)),
        (Method::DELETE, format!("/v2/rooms/{room}"), json!({})),
        (
            Method::GET,
            format!("/v2/rooms/{room}/delete_status"),
            json!(null),
        ),
        (
            Method::GET,
            "/v2/rooms/delete_status/abc".into(),
            json!(null),
        ),
        (
            Method::POST,
            format!("/v1/join/{room}"),
            json!({ "user_id": "@bob:localhost" }),
        ),
        (
            Method::POST,
            "/v1/send_server_notice".into(),
            json!({ "user_id": "@bob:localhost", "content": {} }),
        ),
        (
            Method::PUT,
            "/v1/send_server_notice/t1".into(),
            json!({ "user_id": "@bob:localhost", "content": {} }),
        ),
    ];
    for (method, path, body) in &endpoints {
        let path = format!("/_synapse/admin{path}");
        let body = (!body.is_null()).then(|| body.clone());
        let answer = server
            .call(method.clone(), &path, Some(&bob), body.clone())
            .await;
        assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
        let anonymous = server.call(method.clone(), &path, None, body).await;
        assert_error(&anonymous, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    }
    // Nothing the refused requests asked for happened.
    assert_eq!(
        login_status(&server, "root", PASSWORD).await,
        StatusCode::OK
    );
    let rooms = server.get("/_synapse/admin/v1/rooms", Some(&admin)).await;
    assert_eq!(rooms.1["total_rooms"], 1, "{}", rooms.1);
    let eve = server
        .get("/_synapse/admin/v2/users/@eve:localhost", Some(&admin))
        .await;
    assert_error(&eve, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // The version is for anyone.
    let (status, version) = server.get("/_synapse/admin/v1/server_version", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version["server_version"], env!("CARGO_PKG_VERSION"));
}

#[tokio::test]
async fn admins_list_make_change_and_deactivate_users_and_their_devices() {
    let server = start().await;
    let admin = token(&register_with_secret(&server, "root", true).await);
    server.register_device("bob", "BOBPHONE").await;
    server.login("bob", Some("BOBLAPTOP")).await;
    server.register("carol").await;
    let users = |query: &'static str| {
        let server = &server;
        let admin = admin.clone();
        async move {
            let (status, answer) = server
                .get(&format!("/_synapse/admin/v2/users{query}"), Some(&admin))
                .await;
            assert_eq!(status, StatusCode::OK, "{answer}");
            answer
        }
    };
    let all = users("").await;
    assert_eq!(all["total"], 3, "{all}");
    let names: Vec<&str> = all["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["@bob:localhost", "@carol:localhost", "@root:localhost"]
    );
    assert_eq!(all["users"][2]["admin"], true);
    let first = users("?limit=2").await;
    assert_eq!(first["users"].as_array().unwrap().len(), 2);
    assert_eq!(first["next_token"], "2");
    let rest = users("?from=2&limit=2").await;
    assert_eq!(rest["users"][0]["name"], "@root:localhost");
    assert!(rest.get("next_token").is_none(), "{rest}");
    assert_eq!(users("?name=car").await["total"], 1);
    assert_eq!(
        users("?admins=true").await["users"][0]["name"],
        "@root:localhost"
    );
    let bad = server
        .get("/_synapse/admin/v2/users?limit=many", Some(&admin))
        .await;
    assert_error(&bad, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Create (201), then change (200).
    let (status, dave) = server
        .put(
            "/_synapse/admin/v2/users/@dave:localhost",
            Some(&admin),
            json!({ "password": "dave's password", "displayname": "Dave", "admin": false }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{dave}");
    assert_eq!(dave["displayname"], "Dave");
    assert_eq!(
        login_status(&server, "dave", "dave's password").await,
        StatusCode::OK
    );
    let (status, dave) = server
        .put(
            "/_synapse/admin/v2/users/@dave:localhost",
            Some(&admin),
            json!({ "displayname": "David", "admin": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dave}");
    let (_, queried) = server
        .get("/_synapse/admin/v2/users/@dave:localhost", Some(&admin))
        .await;
    assert_eq!(queried["displayname"], "David");
    assert_eq!(queried["admin"], true);
    assert_eq!(queried["locked"], false);
    // An admin cannot be locked; once no longer one, they can.
    let refused = server
        .put(
            "/_synapse/admin/v2/users/@dave:localhost",
            Some(&admin),
            json!({ "locked": true }),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, dave) = server
        .put(
            "/_synapse/admin/v2/users/@dave:localhost",
            Some(&admin),
            json!({ "admin": false, "locked": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{dave}");
    assert_eq!(dave["admin"], false);
    assert_eq!(dave["locked"], true);
    assert_eq!(queried["deactivated"], false);
    let remote = server
        .get(
            "/_synapse/admin/v2/users/@dave:elsewhere.example",
            Some(&admin),
        )
        .await;
    assert_error(&remote, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Devices: list, one, delete one, delete several.
    let (_, devices) = server
        .get(
            "/_synapse/admin/v2/users/@bob:localhost/devices",
            Some(&admin),
        )
        .await;
    assert_eq!(devices["total"], 2, "{devices}");
    let (status, phone) = server
        .get(
            "/_synapse/admin/v2/users/@bob:localhost/devices/BOBPHONE",
            Some(&admin),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(phone["display_name"], "bob's phone");
    assert_eq!(phone["user_id"], "@bob:localhost");
    let (status, _) = server
        .call(
            Method::DELETE,
            "/_synapse/admin/v2/users/@bob:localhost/devices/BOBPHONE",
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let gone = server
        .get(
            "/_synapse/admin/v2/users/@bob:localhost/devices/BOBPHONE",
            Some(&admin),
        )
        .await;
    assert_error(&gone, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (status, _) = server
        .post(
            "/_synapse/admin/v2/users/@bob:localhost/delete_devices",
            Some(&admin),
            json!({ "devices": ["BOBLAPTOP"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, devices) = server
        .get(
            "/_synapse/admin/v2/users/@bob:localhost/devices",
            Some(&admin),
        )
        .await;
    assert_eq!(devices["total"], 0, "{devices}");

    // A new password, and the old one stops working.
    let carol_session = token(&server.login("carol", None).await);
    let (status, _) = server
        .post(
            "/_synapse/admin/v1/reset_password/@carol:localhost",
            Some(&admin),
            json!({ "new_password": "carol's new password" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        login_status(&server, "carol", PASSWORD).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        login_status(&server, "carol", "carol's new password").await,
        StatusCode::OK
    );
    let logged_out = server
        .get("/_matrix/client/v3/account/whoami", Some(&carol_session))
        .await;
    assert_error(&logged_out, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // Whois, through the admin path.
    let carol = token(&login_as(&server, "carol", "carol's new password").await.1);
    let (status, whois) = server
        .get("/_synapse/admin/v1/whois/@carol:localhost", Some(&admin))
        .await;
    assert_eq!(status, StatusCode::OK, "{whois}");
    assert_eq!(whois["user_id"], "@carol:localhost");
    assert_eq!(whois["devices"].as_object().unwrap().len(), 2, "{whois}");

    // Deactivation with erase: carol's message stays visible to bob, who
    // was there, and is hidden from erin, who joins later.
    let bob = token(&server.login("bob", None).await);
    let room = server
        .create_room(&carol, json!({ "preset": "public_chat" }))
        .await;
    join(&server, &bob, &room).await;
    let message = send_text(&server, &carol, &room, "t1", "remember me").await;
    let (status, answer) = server
        .post(
            "/_synapse/admin/v1/deactivate/@carol:localhost",
            Some(&admin),
            json!({ "erase": true }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["id_server_unbind_result"].is_string(), "{answer}");
    assert_eq!(
        login_status(&server, "carol", "carol's new password").await,
        StatusCode::FORBIDDEN
    );
    let (_, carol_now) = server
        .get("/_synapse/admin/v2/users/@carol:localhost", Some(&admin))
        .await;
    assert_eq!(carol_now["deactivated"], true);
    assert_eq!(carol_now["erased"], true);
    let erin = token(&server.register("erin").await);
    join(&server, &erin, &room).await;
    let event = format!("/_matrix/client/v3/rooms/{room}/event/{message}");
    let (status, seen) = server.get(&event, Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{seen}");
    assert_eq!(seen["content"]["body"], "remember me");
    let hidden = server.get(&event, Some(&erin)).await;
    assert_error(&hidden, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // Reactivated with a new password, carol is no longer erased.
    let (status, carol_back) = server
        .put(
            "/_synapse/admin/v2/users/@carol:localhost",
            Some(&admin),
            json!({ "deactivated": false, "password": "carol again" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{carol_back}");
    assert_eq!(carol_back["deactivated"], false);
    assert_eq!(carol_back["erased"], false);
    assert_eq!(
        login_status(&server, "carol", "carol again").await,
        StatusCode::OK
    );
    // Deactivation with no body at all, as curl sends it.
    let response = server
        .http
        .post(server.url("/_synapse/admin/v1/deactivate/@carol:localhost"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        login_status(&server, "carol", "carol again").await,
        StatusCode::FORBIDDEN
    );
    // Erased again by that second deactivation? No: it did not ask to.
    let (_, carol_now) = server
        .get("/_synapse/admin/v2/users/@carol:localhost", Some(&admin))
        .await;
    assert_eq!(carol_now["erased"], false);
    let (_, deactivated_list) = server
        .get("/_synapse/admin/v2/users?deactivated=true", Some(&admin))
        .await;
    assert!(deactivated_list["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "@carol:localhost"));
    let (_, active_list) = server.get("/_synapse/admin/v2/users", Some(&admin)).await;
    assert!(!active_list["users"]
        .as_array()
        .unwrap()
        .iter()
        .any(|u| u["name"] == "@carol:localhost"));
}

/// Waits for a room deletion to finish; returns its last status.
async fn deletion_done(server: &TestServer, admin: &str, delete_id: &str) -> Value {
    for _ in 0..200 {
        let (status, answer) = server
            .get(
                &format!("/_synapse/admin/v2/rooms/delete_status/{delete_id}"),
                Some(admin),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        if answer["status"] == "complete" || answer["status"] == "failed" {
            return answer;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the deletion did not finish");
}

#[tokio::test]
async fn admins_list_inspect_join_and_delete_rooms() {
    let server = start().await;
    let admin = token(&register_with_secret(&server, "root", true).await);
    let bob = token(&server.register("bob").await);
    let carol = token(&server.register("carol").await);
    let public = server
        .create_room(
            &bob,
            json!({ "preset": "public_chat", "name": "Town square", "room_alias_name": "square", "visibility": "public" }),
        )
        .await;
    let private = server
        .create_room(
            &admin,
            json!({ "preset": "private_chat", "name": "Back office" }),
        )
        .await;
    send_text(&server, &bob, &public, "t1", "hello square").await;

    let (status, list) = server.get("/_synapse/admin/v1/rooms", Some(&admin)).await;
    assert_eq!(status, StatusCode::OK, "{list}");
    assert_eq!(list["total_rooms"], 2);
    assert_eq!(list["rooms"][0]["name"], "Back office");
    assert_eq!(list["rooms"][1]["name"], "Town square");
    assert_eq!(list["rooms"][1]["canonical_alias"], "#square:localhost");
    assert_eq!(list["rooms"][1]["public"], true);
    let (_, found) = server
        .get("/_synapse/admin/v1/rooms?search_term=town", Some(&admin))
        .await;
    assert_eq!(found["total_rooms"], 1);
    assert_eq!(found["rooms"][0]["room_id"], public.as_str());
    let (_, paged) = server
        .get("/_synapse/admin/v1/rooms?limit=1", Some(&admin))
        .await;
    assert_eq!(paged["next_batch"], 1, "{paged}");

    // Make carol join the public room, and the private one (the admin
    // invites her first).
    for room in [&public, &private] {
        let (status, answer) = server
            .post(
                &format!("/_synapse/admin/v1/join/{room}"),
                Some(&admin),
                json!({ "user_id": "@carol:localhost" }),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        assert_eq!(answer["room_id"], room.as_str());
    }
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&carol))
        .await;
    assert_eq!(
        joined["joined_rooms"].as_array().unwrap().len(),
        2,
        "{joined}"
    );

    let (status, details) = server
        .get(&format!("/_synapse/admin/v1/rooms/{public}"), Some(&admin))
        .await;
    assert_eq!(status, StatusCode::OK, "{details}");
    assert_eq!(details["joined_members"], 2);
    assert_eq!(details["joined_local_members"], 2);
    assert_eq!(details["join_rules"], "public");
    assert_eq!(details["history_visibility"], "shared");
    assert_eq!(details["creator"], "@bob:localhost");
    assert_eq!(details["joined_local_devices"], 2);
    let (_, members) = server
        .get(
            &format!("/_synapse/admin/v1/rooms/{public}/members"),
            Some(&admin),
        )
        .await;
    assert_eq!(members["total"], 2);
    let (_, state) = server
        .get(
            &format!("/_synapse/admin/v1/rooms/{public}/state"),
            Some(&admin),
        )
        .await;
    assert!(state["state"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["type"] == "m.room.name" && e["content"]["name"] == "Town square"));
    let unknown = server
        .get("/_synapse/admin/v1/rooms/!nowhere:localhost", Some(&admin))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    let (_, before) = server.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let since = before["next_batch"].as_str().unwrap().to_owned();

    // Delete the public room in the background, blocked and purged.
    let (status, started) = server
        .call(
            Method::DELETE,
            &format!("/_synapse/admin/v2/rooms/{public}"),
            Some(&admin),
            Some(json!({ "block": true, "purge": true })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{started}");
    let delete_id = started["delete_id"].as_str().unwrap();
    let done = deletion_done(&server, &admin, delete_id).await;
    assert_eq!(done["status"], "complete", "{done}");
    let mut kicked: Vec<&str> = done["shutdown_room"]["kicked_users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap())
        .collect();
    kicked.sort();
    assert_eq!(kicked, ["@bob:localhost", "@carol:localhost"]);
    assert_eq!(
        done["shutdown_room"]["local_aliases"],
        json!(["#square:localhost"])
    );
    let (_, by_room) = server
        .get(
            &format!("/_synapse/admin/v2/rooms/{public}/delete_status"),
            Some(&admin),
        )
        .await;
    assert_eq!(by_room["results"][0]["delete_id"], delete_id);

    // Gone: from the list, the alias, the directory, the members' rooms,
    // its events; and blocked for joins.
    let (_, list) = server.get("/_synapse/admin/v1/rooms", Some(&admin)).await;
    assert_eq!(list["total_rooms"], 1, "{list}");
    let alias = server
        .get(
            "/_matrix/client/v3/directory/room/%23square:localhost",
            None,
        )
        .await;
    assert_error(&alias, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let (_, directory) = server.get("/_matrix/client/v3/publicRooms", None).await;
    assert_eq!(
        directory["chunk"].as_array().unwrap().len(),
        0,
        "{directory}"
    );
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&bob))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]));
    let messages = server
        .get(
            &format!("/_matrix/client/v3/rooms/{public}/messages?dir=b"),
            Some(&bob),
        )
        .await;
    // Bob, a former member, reads up to his leave: of the room's history
    // only his leave is left.
    assert_eq!(messages.0, StatusCode::OK, "{}", messages.1);
    let kinds: Vec<&str> = messages.1["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["m.room.member"], "{}", messages.1);
    let blocked = server
        .post(
            &format!("/_matrix/client/v3/rooms/{public}/join"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(blocked.0, StatusCode::FORBIDDEN, "{}", blocked.1);
    let (status, sync) = server.get("/_matrix/client/v3/sync", Some(&bob)).await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    assert!(sync["rooms"]["join"].get(&public).is_none(), "{sync}");
    // A client that synced before learns that it left.
    let (status, sync) = server
        .get(
            &format!("/_matrix/client/v3/sync?since={since}"),
            Some(&bob),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{sync}");
    let left = &sync["rooms"]["leave"][&public];
    let leave = left["timeline"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:localhost");
    assert_eq!(
        leave.map(|e| &e["content"]["membership"]),
        Some(&json!("leave")),
        "{sync}"
    );
    // A second deletion of the room finds nothing to delete.
    let again = server
        .call(
            Method::DELETE,
            &format!("/_synapse/admin/v2/rooms/{public}"),
            Some(&admin),
            Some(json!({})),
        )
        .await;
    assert_error(&again, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // The synchronous v1 deletion, without purge: the members leave.
    let (status, shutdown) = server
        .call(
            Method::DELETE,
            &format!("/_synapse/admin/v1/rooms/{private}"),
            Some(&admin),
            Some(json!({ "purge": false })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{shutdown}");
    assert_eq!(
        shutdown["kicked_users"].as_array().unwrap().len(),
        2,
        "{shutdown}"
    );
    let (_, joined) = server
        .get("/_matrix/client/v3/joined_rooms", Some(&carol))
        .await;
    assert_eq!(joined["joined_rooms"], json!([]));
    let missing = server
        .get(
            "/_synapse/admin/v2/rooms/delete_status/nothing",
            Some(&admin),
        )
        .await;
    assert_error(&missing, StatusCode::NOT_FOUND, "M_NOT_FOUND");
}

#[tokio::test]
async fn admins_list_quarantine_and_delete_media() {
    let server = start().await;
    let admin = token(&register_with_secret(&server, "root", true).await);
    let bob = token(&server.register("bob").await);
    let mut ids = Vec::new();
    for (name, bytes) in [
        ("one.txt", &b"first file"[..]),
        ("two.txt", &b"second file!"[..]),
    ] {
        let response = server
            .http
            .post(server.url(&format!("/_matrix/media/v3/upload?filename={name}")))
            .bearer_auth(&bob)
            .header("content-type", "text/plain")
            .body(bytes.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let answer: Value = response.json().await.unwrap();
        let uri = answer["content_uri"].as_str().unwrap();
        ids.push(uri.rsplit('/').next().unwrap().to_owned());
    }
    let (status, media) = server
        .get(
            "/_synapse/admin/v1/users/@bob:localhost/media",
            Some(&admin),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{media}");
    assert_eq!(media["total"], 2);
    // Newest first.
    assert_eq!(media["media"][0]["upload_name"], "two.txt");
    assert_eq!(media["media"][0]["media_length"], 12);
    assert_eq!(media["media"][1]["media_id"], ids[0].as_str());

    let download = |id: String| {
        let server = &server;
        let bob = bob.clone();
        async move {
            server
                .http
                .get(server.url(&format!("/_matrix/client/v1/media/download/localhost/{id}")))
                .bearer_auth(&bob)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(download(ids[0].clone()).await, StatusCode::OK);
    let path = format!("/_synapse/admin/v1/media/quarantine/localhost/{}", ids[0]);
    let (status, _) = server.post(&path, Some(&admin), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(download(ids[0].clone()).await, StatusCode::NOT_FOUND);
    let (_, media) = server
        .get(
            "/_synapse/admin/v1/users/@bob:localhost/media",
            Some(&admin),
        )
        .await;
    assert_eq!(media["media"][1]["quarantined_by"], "@root:localhost");
    let path = format!("/_synapse/admin/v1/media/unquarantine/localhost/{}", ids[0]);
    let (status, _) = server.post(&path, Some(&admin), json!({})).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(download(ids[0].clone()).await, StatusCode::OK);

    let path = format!("/_synapse/admin/v1/media/localhost/{}", ids[1]);
    let (status, deleted) = server.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK, "{deleted}");
    assert_eq!(deleted["deleted_media"], json!([ids[1]]));
    assert_eq!(deleted["total"], 1);
    assert_eq!(download(ids[1].clone()).await, StatusCode::NOT_FOUND);
    let (_, media) = server
        .get(
            "/_synapse/admin/v1/users/@bob:localhost/media",
            Some(&admin),
        )
        .await;
    assert_eq!(media["total"], 1);
    // The same bytes uploaded twice share one file: deleting one media
    // keeps the other readable.
    let mut twins = Vec::new();
    for _ in 0..2 {
        let response = server
            .http
            .post(server.url("/_matrix/media/v3/upload?filename=twin.txt"))
            .bearer_auth(&bob)
            .body(b"twin content".to_vec())
            .send()
            .await
            .unwrap();
        let answer: Value = response.json().await.unwrap();
        let uri = answer["content_uri"].as_str().unwrap();
        twins.push(uri.rsplit('/').next().unwrap().to_owned());
    }
    let twin_path = format!("/_synapse/admin/v1/media/localhost/{}", twins[0]);
    let (status, _) = server
        .call(Method::DELETE, &twin_path, Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(download(twins[0].clone()).await, StatusCode::NOT_FOUND);
    assert_eq!(download(twins[1].clone()).await, StatusCode::OK);
    let twin_path = format!("/_synapse/admin/v1/media/localhost/{}", twins[1]);
    let (status, _) = server
        .call(Method::DELETE, &twin_path, Some(&admin), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let again = server.call(Method::DELETE, &path, Some(&admin), None).await;
    assert_error(&again, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    // The file itself is gone from the media directory.
    let files = walk_files(&server.dir.path().join("media"));
    assert_eq!(files.len(), 1, "{files:?}");
}

fn walk_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk_files(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test]
async fn server_notices_reach_the_user_in_one_tagged_room() {
    let server = start().await;
    let admin = token(&register_with_secret(&server, "root", true).await);
    let bob = token(&server.register("bob").await);
    let notice = |txn: Option<&'static str>, body: &'static str| {
        let server = &server;
        let admin = admin.clone();
        async move {
            let content = json!({
                "user_id": "@bob:localhost",
                "content": { "msgtype": "m.text", "body": body },
            });
            let answer = match txn {
                Some(txn) => {
                    let path = format!("/_synapse/admin/v1/send_server_notice/{txn}");
                    server.put(&path, Some(&admin), content).await
                }
                None => {
                    server
                        .post(
                            "/_synapse/admin/v1/send_server_notice",
                            Some(&admin),
                            content,
                        )
                        .await
                }
            };
            assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
            answer.1["event_id"].as_str().unwrap().to_owned()
        }
    };
    notice(None, "the server restarts at noon").await;
    let (_, sync) = server.get("/_matrix/client/v3/sync", Some(&bob)).await;
    let invites = sync["rooms"]["invite"].as_object().expect("an invite");
    assert_eq!(invites.len(), 1, "{sync}");
    let room = invites.keys().next().unwrap().clone();
    let inviter = invites[&room]["invite_state"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["type"] == "m.room.member" && e["state_key"] == "@bob:localhost")
        .map(|e| e["sender"].clone());
    assert_eq!(inviter, Some(json!("@_server:localhost")), "{sync}");
    join(&server, &bob, &room).await;
    let first = notice(Some("n1"), "and again at six").await;
    let repeated = notice(Some("n1"), "and again at six").await;
    assert_eq!(first, repeated);
    notice(Some("n2"), "done").await;

    let (_, messages) = server
        .get(
            &format!("/_matrix/client/v3/rooms/{room}/messages?dir=b&limit=10"),
            Some(&bob),
        )
        .await;
    let bodies: Vec<&str> = messages["chunk"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "m.room.message")
        .map(|e| e["content"]["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        ["done", "and again at six", "the server restarts at noon"]
    );
    let (_, tags) = server
        .get(
            &format!("/_matrix/client/v3/user/@bob:localhost/rooms/{room}/tags"),
            Some(&bob),
        )
        .await;
    assert!(tags["tags"].get("m.server_notice").is_some(), "{tags}");
    // Bob cannot write in it.
    let content = json!({ "msgtype": "m.text", "body": "reply" });
    let (status, _) = server
        .put(
            &format!("/_matrix/client/v3/rooms/{room}/send/m.room.message/r1"),
            Some(&bob),
            content,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);

    let nobody = server
        .post(
            "/_synapse/admin/v1/send_server_notice",
            Some(&admin),
            json!({ "user_id": "@nobody:localhost", "content": { "body": "x" } }),
        )
        .await;
    assert_error(&nobody, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let plain = TestServer::start().await;
    let root = plain
        .server
        .as_ref()
        .unwrap()
        .services
        .accounts
        .register("root", Some(PASSWORD), true, None)
        .await;
    assert!(root.is_ok());
    plain.register("bob").await;
    let root = token(&plain.login("root", None).await);
    let off = plain
        .post(
            "/_synapse/admin/v1/send_server_notice",
            Some(&root),
            json!({ "user_id": "@bob:localhost", "content": { "body": "x" } }),
        )
        .await;
    assert_error(&off, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}
