//! Registration, login, devices, profiles and account management, over HTTP.

mod common;

use std::sync::Arc;

use common::{assert_error, test_config, token, TestServer, PASSWORD};
use myelin::config::RegistrationMode;
use myelin::services::clock::ManualClock;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

#[tokio::test]
async fn open_registration_uses_the_dummy_stage() {
    let server = TestServer::start().await;
    let body = json!({ "username": "alice", "password": PASSWORD });
    let (status, challenge) = server.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(challenge["flows"], json!([{ "stages": ["m.login.dummy"] }]));
    assert!(challenge["session"].is_string());

    let answer = server.register("Alice").await;
    assert_eq!(answer["user_id"], "@alice:localhost");
    assert!(answer["device_id"].is_string());
    assert!(answer.get("refresh_token").is_none(), "{answer}");
    let (status, me) = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&answer)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], "@alice:localhost");
    assert_eq!(me["device_id"], answer["device_id"]);
    assert_eq!(me["is_guest"], false);

    // The name is now taken, and the check comes before authentication.
    let again = json!({ "username": "alice", "password": PASSWORD });
    let taken = server
        .post("/_matrix/client/v3/register", None, again)
        .await;
    assert_error(&taken, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let available = server
        .get("/_matrix/client/v3/register/available?username=alice", None)
        .await;
    assert_error(&available, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
    let (status, free) = server
        .get("/_matrix/client/v3/register/available?username=bob", None)
        .await;
    assert_eq!(
        (status, free),
        (StatusCode::OK, json!({ "available": true }))
    );
    for bad in ["has space", "_bridge", "12345", "UPPER"] {
        let path = format!("/_matrix/client/v3/register/available?username={bad}");
        let answer = server.get(&path, None).await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_USERNAME");
    }
}

#[tokio::test]
async fn registration_details_follow_the_spec() {
    let server = TestServer::start().await;
    let guest = server
        .post("/_matrix/client/v3/register?kind=guest", None, json!({}))
        .await;
    assert_error(&guest, StatusCode::FORBIDDEN, "M_GUEST_ACCESS_FORBIDDEN");
    let weird = server
        .post("/_matrix/client/v3/register?kind=robot", None, json!({}))
        .await;
    assert_error(&weird, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");

    // Completing authentication without a password is refused, and writes nothing.
    let (_, challenge) = server
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "nopass" }),
        )
        .await;
    let body = json!({
        "username": "nopass",
        "auth": { "type": "m.login.dummy", "session": challenge["session"] },
    });
    let missing = server.post("/_matrix/client/v3/register", None, body).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "M_MISSING_PARAM");
    let (status, _) = server
        .get(
            "/_matrix/client/v3/register/available?username=nopass",
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // inhibit_login creates the account but no device.
    let body = json!({
        "username": "quiet",
        "password": PASSWORD,
        "inhibit_login": true,
        "auth": { "type": "m.login.dummy" },
    });
    let (status, answer) = server.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer, json!({ "user_id": "@quiet:localhost" }));

    // A chosen device ID, display name and a refresh token.
    let body = json!({
        "username": "chooser",
        "password": PASSWORD,
        "device_id": "MYPHONE",
        "initial_device_display_name": "Phone",
        "refresh_token": true,
        "auth": { "type": "m.login.dummy" },
    });
    let (status, answer) = server.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["device_id"], "MYPHONE");
    assert!(answer["refresh_token"].is_string());
    assert!(answer["expires_in_ms"].as_u64().unwrap() > 0);
    let (_, device) = server
        .get("/_matrix/client/v3/devices/MYPHONE", Some(&token(&answer)))
        .await;
    assert_eq!(device["display_name"], "Phone");

    // No username: the server picks one.
    let body = json!({ "password": PASSWORD, "auth": { "type": "m.login.dummy" } });
    let (status, answer) = server.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(answer["user_id"].as_str().unwrap().ends_with(":localhost"));
}

#[tokio::test]
async fn token_registration_requires_a_configured_token() {
    let server = TestServer::start_with(|config| {
        config.registration = RegistrationMode::Token;
        config.registration_tokens = vec!["letmein".to_owned()];
    })
    .await;
    let validity = "/_matrix/client/v1/register/m.login.registration_token/validity";
    let (status, valid) = server.get(&format!("{validity}?token=letmein"), None).await;
    assert_eq!((status, valid), (StatusCode::OK, json!({ "valid": true })));
    let (_, invalid) = server.get(&format!("{validity}?token=nope"), None).await;
    assert_eq!(invalid, json!({ "valid": false }));
    let missing = server.get(validity, None).await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "M_MISSING_PARAM");

    let body = json!({ "username": "carol", "password": PASSWORD });
    let (status, challenge) = server.post("/_matrix/client/v3/register", None, body).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.registration_token"] }])
    );
    let session = challenge["session"].clone();
    // The dummy stage is not among the flows.
    let dummy = json!({
        "username": "carol", "password": PASSWORD,
        "auth": { "type": "m.login.dummy", "session": session },
    });
    let refused = server
        .post("/_matrix/client/v3/register", None, dummy)
        .await;
    assert_error(&refused, StatusCode::BAD_REQUEST, "M_UNRECOGNIZED");
    let wrong = json!({
        "username": "carol", "password": PASSWORD,
        "auth": { "type": "m.login.registration_token", "token": "nope", "session": session },
    });
    let (status, failed) = server
        .post("/_matrix/client/v3/register", None, wrong)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(failed["errcode"], "M_FORBIDDEN");
    assert_eq!(failed["session"], session);
    let right = json!({
        "username": "carol", "password": PASSWORD,
        "auth": { "type": "m.login.registration_token", "token": "letmein", "session": session },
    });
    let (status, answer) = server
        .post("/_matrix/client/v3/register", None, right)
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["user_id"], "@carol:localhost");
}

#[tokio::test]
async fn disabled_registration_refuses_everyone() {
    let server = TestServer::start_with(|config| {
        config.registration = RegistrationMode::Disabled;
    })
    .await;
    let body =
        json!({ "username": "dave", "password": PASSWORD, "auth": { "type": "m.login.dummy" } });
    let refused = server.post("/_matrix/client/v3/register", None, body).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let available = server
        .get("/_matrix/client/v3/register/available?username=dave", None)
        .await;
    assert_error(&available, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let validity = server
        .get(
            "/_matrix/client/v1/register/m.login.registration_token/validity?token=x",
            None,
        )
        .await;
    assert_error(&validity, StatusCode::FORBIDDEN, "M_FORBIDDEN");

    // Accounts made by the operator still log in.
    let services = &server.server.as_ref().unwrap().services;
    services
        .accounts
        .register("dave", Some(PASSWORD), false, None)
        .await
        .unwrap();
    let login = server.login("dave", None).await;
    assert_eq!(login["user_id"], "@dave:localhost");
}

#[tokio::test]
async fn two_devices_log_in_and_out_independently() {
    let server = TestServer::start().await;
    let (status, flows) = server.get("/_matrix/client/v3/login", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(flows["flows"], json!([{ "type": "m.login.password" }]));

    let registered = server.register("erin").await;
    let laptop = server.login("erin", Some("LAPTOP")).await;
    let phone = server.login("@erin:localhost", None).await;
    assert_eq!(laptop["device_id"], "LAPTOP");
    assert_ne!(laptop["device_id"], phone["device_id"]);
    assert_ne!(laptop["access_token"], phone["access_token"]);
    assert_eq!(laptop["home_server"], "localhost");
    assert!(laptop.get("refresh_token").is_none());

    for login in [&laptop, &phone] {
        let (_, me) = server
            .get("/_matrix/client/v3/account/whoami", Some(&token(login)))
            .await;
        assert_eq!(me["device_id"], login["device_id"]);
    }
    let (_, devices) = server
        .get("/_matrix/client/v3/devices", Some(&token(&phone)))
        .await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 3);

    // Logging out deletes the laptop's device and token; the phone lives on.
    let (status, _) = server
        .post(
            "/_matrix/client/v3/logout",
            Some(&token(&laptop)),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let dead = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&laptop)))
        .await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(dead.1["soft_logout"], false);
    let (status, _) = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&phone)))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, devices) = server
        .get("/_matrix/client/v3/devices", Some(&token(&phone)))
        .await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 2);

    // Logging out everywhere ends every token.
    let (status, _) = server
        .post(
            "/_matrix/client/v3/logout/all",
            Some(&token(&phone)),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    for login in [&registered, &phone] {
        let dead = server
            .get("/_matrix/client/v3/account/whoami", Some(&token(login)))
            .await;
        assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    }
}

#[tokio::test]
async fn login_refuses_bad_credentials_and_shapes() {
    let server = TestServer::start().await;
    server.register("frank").await;
    let login = |body: Value| server.post("/_matrix/client/v3/login", None, body);
    let wrong = login(json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "frank" },
        "password": "wrong",
    }))
    .await;
    assert_error(&wrong, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let nobody = login(json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "nobody" },
        "password": PASSWORD,
    }))
    .await;
    assert_error(&nobody, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let kind = login(json!({ "type": "m.login.magic", "password": PASSWORD })).await;
    assert_error(&kind, StatusCode::BAD_REQUEST, "M_UNKNOWN");
    let no_password = login(json!({
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "frank" },
    }))
    .await;
    assert_error(&no_password, StatusCode::BAD_REQUEST, "M_MISSING_PARAM");
    // The legacy `user` field still works.
    let (status, legacy) = login(json!({
        "type": "m.login.password", "user": "frank", "password": PASSWORD,
        "refresh_token": true,
    }))
    .await;
    assert_eq!(status, StatusCode::OK, "{legacy}");
    assert!(legacy["refresh_token"].is_string());
}

#[tokio::test]
async fn refresh_tokens_renew_expired_access_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&dir);
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let server = TestServer::start_in(dir, config, Some(clock.clone())).await;
    server.register("gina").await;
    let body = json!({
        "type": "m.login.password", "user": "gina", "password": PASSWORD, "refresh_token": true,
    });
    let (_, login) = server.post("/_matrix/client/v3/login", None, body).await;
    let lifetime = login["expires_in_ms"].as_u64().unwrap();
    clock.advance_ms(lifetime);
    let expired = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&login)))
        .await;
    assert_error(&expired, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    assert_eq!(expired.1["soft_logout"], true);

    let body = json!({ "refresh_token": login["refresh_token"] });
    let (status, renewed) = server
        .post("/_matrix/client/v3/refresh", None, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{renewed}");
    let (status, me) = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&renewed)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["device_id"], login["device_id"]);
    let reused = server.post("/_matrix/client/v3/refresh", None, body).await;
    assert_error(&reused, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
}

/// Runs a UIA-protected request: first without auth (401 and flows), then
/// with a wrong password (401 and M_FORBIDDEN), then the right one.
async fn with_password_uia(
    server: &TestServer,
    method: Method,
    path: &str,
    token: &str,
    user: &str,
    mut body: Value,
) -> (StatusCode, Value) {
    let (status, challenge) = server
        .call(method.clone(), path, Some(token), Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    assert_eq!(
        challenge["flows"],
        json!([{ "stages": ["m.login.password"] }])
    );
    let session = challenge["session"].clone();
    let auth = |password: &str| {
        json!({
            "type": "m.login.password",
            "identifier": { "type": "m.id.user", "user": user },
            "password": password,
            "session": session,
        })
    };
    body["auth"] = auth("wrong");
    let (status, failed) = server
        .call(method.clone(), path, Some(token), Some(body.clone()))
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{failed}");
    assert_eq!(failed["errcode"], "M_FORBIDDEN");
    body["auth"] = auth(PASSWORD);
    server.call(method, path, Some(token), Some(body)).await
}

#[tokio::test]
async fn devices_are_renamed_and_deleted_with_interactive_auth() {
    let server = TestServer::start().await;
    let main = server.register("hank").await;
    let main_token = token(&main);
    let tablet = server.login("hank", Some("TABLET")).await;
    let (status, _) = server
        .put(
            "/_matrix/client/v3/devices/TABLET",
            Some(&main_token),
            json!({ "display_name": "Tablet" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, device) = server
        .get("/_matrix/client/v3/devices/TABLET", Some(&main_token))
        .await;
    assert_eq!(device["display_name"], "Tablet");
    assert_eq!(device["device_id"], "TABLET");
    assert!(device["last_seen_ts"].is_u64());
    let unknown = server
        .get("/_matrix/client/v3/devices/NOPE", Some(&main_token))
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let rename_unknown = server
        .put(
            "/_matrix/client/v3/devices/NOPE",
            Some(&main_token),
            json!({}),
        )
        .await;
    assert_error(&rename_unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Another user's password does not authorize hank's deletion.
    server.register("ivy").await;
    let (_, challenge) = server
        .call(
            Method::DELETE,
            "/_matrix/client/v3/devices/TABLET",
            Some(&main_token),
            None,
        )
        .await;
    let as_ivy = json!({ "auth": {
        "type": "m.login.password",
        "identifier": { "type": "m.id.user", "user": "ivy" },
        "password": PASSWORD,
        "session": challenge["session"],
    }});
    let refused = server
        .call(
            Method::DELETE,
            "/_matrix/client/v3/devices/TABLET",
            Some(&main_token),
            Some(as_ivy),
        )
        .await;
    assert_error(&refused, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&tablet)))
        .await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the refused deletion changed nothing"
    );

    let (status, answer) = with_password_uia(
        &server,
        Method::DELETE,
        "/_matrix/client/v3/devices/TABLET",
        &main_token,
        "hank",
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let dead = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&tablet)))
        .await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // Several at once.
    let one = server.login("hank", Some("ONE")).await;
    let two = server.login("hank", Some("TWO")).await;
    let (status, answer) = with_password_uia(
        &server,
        Method::POST,
        "/_matrix/client/v3/delete_devices",
        &main_token,
        "@hank:localhost",
        json!({ "devices": ["ONE", "TWO", "NEVER_EXISTED"] }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    for login in [&one, &two] {
        let dead = server
            .get("/_matrix/client/v3/account/whoami", Some(&token(login)))
            .await;
        assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    }
    let (_, devices) = server
        .get("/_matrix/client/v3/devices", Some(&main_token))
        .await;
    assert_eq!(devices["devices"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn profiles_round_trip() {
    let server = TestServer::start().await;
    let jo = token(&server.register("jo").await);
    let kim = token(&server.register("kim").await);
    let (status, profile) = server
        .get("/_matrix/client/v3/profile/@jo:localhost", None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(profile, json!({ "displayname": "jo" }));

    let base = "/_matrix/client/v3/profile/@jo:localhost";
    let (status, _) = server
        .put(
            &format!("{base}/displayname"),
            Some(&jo),
            json!({ "displayname": "Jo Q" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            &format!("{base}/avatar_url"),
            Some(&jo),
            json!({ "avatar_url": "mxc://localhost/abc" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .put(
            &format!("{base}/org.example.pronouns"),
            Some(&jo),
            json!({ "org.example.pronouns": ["they"] }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, name) = server.get(&format!("{base}/displayname"), None).await;
    assert_eq!(name, json!({ "displayname": "Jo Q" }));
    let (_, profile) = server.get(base, None).await;
    assert_eq!(
        profile,
        json!({
            "displayname": "Jo Q",
            "avatar_url": "mxc://localhost/abc",
            "org.example.pronouns": ["they"],
        })
    );
    let (status, _) = server
        .call(
            Method::DELETE,
            &format!("{base}/avatar_url"),
            Some(&jo),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let gone = server.get(&format!("{base}/avatar_url"), None).await;
    assert_error(&gone, StatusCode::NOT_FOUND, "M_NOT_FOUND");

    // Refusals change nothing.
    let other = server
        .put(
            &format!("{base}/displayname"),
            Some(&kim),
            json!({ "displayname": "x" }),
        )
        .await;
    assert_error(&other, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let missing = server
        .put(
            &format!("{base}/displayname"),
            Some(&jo),
            json!({ "avatar_url": "x" }),
        )
        .await;
    assert_error(&missing, StatusCode::BAD_REQUEST, "M_MISSING_PARAM");
    let bad_key = server
        .put(
            &format!("{base}/NotAKey"),
            Some(&jo),
            json!({ "NotAKey": 1 }),
        )
        .await;
    assert_error(&bad_key, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    let long_key = format!("org.{}", "x".repeat(300));
    let too_long = server
        .put(
            &format!("{base}/{long_key}"),
            Some(&jo),
            json!({ long_key.clone(): 1 }),
        )
        .await;
    assert_error(&too_long, StatusCode::BAD_REQUEST, "M_KEY_TOO_LARGE");
    let big = json!({ "org.example.big": "x".repeat(70 * 1024) });
    let too_big = server
        .put(&format!("{base}/org.example.big"), Some(&jo), big)
        .await;
    assert_error(&too_big, StatusCode::BAD_REQUEST, "M_PROFILE_TOO_LARGE");
    let (_, name) = server.get(&format!("{base}/displayname"), None).await;
    assert_eq!(name, json!({ "displayname": "Jo Q" }));

    let unknown = server
        .get("/_matrix/client/v3/profile/@nobody:localhost", None)
        .await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let invalid = server
        .get("/_matrix/client/v3/profile/not-a-user", None)
        .await;
    assert_error(&invalid, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
}

#[tokio::test]
async fn password_change_keeps_this_device_and_ends_the_others() {
    let server = TestServer::start().await;
    let here = token(&server.register("lee").await);
    let elsewhere = token(&server.login("lee", None).await);
    let (status, answer) = with_password_uia(
        &server,
        Method::POST,
        "/_matrix/client/v3/account/password",
        &here,
        "lee",
        json!({ "new_password": "a brand new secret" }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (status, _) = server
        .get("/_matrix/client/v3/account/whoami", Some(&here))
        .await;
    assert_eq!(status, StatusCode::OK);
    let dead = server
        .get("/_matrix/client/v3/account/whoami", Some(&elsewhere))
        .await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let old = server
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "user": "lee", "password": PASSWORD }),
        )
        .await;
    assert_error(&old, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = server
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "user": "lee", "password": "a brand new secret" }),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn deactivation_ends_the_account_for_good() {
    let server = TestServer::start().await;
    let mo = token(&server.register("mo").await);
    let (status, answer) = with_password_uia(
        &server,
        Method::POST,
        "/_matrix/client/v3/account/deactivate",
        &mo,
        "mo",
        json!({ "erase": true }),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    // Nothing was bound on an identity server, so nothing failed to unbind.
    assert_eq!(answer["id_server_unbind_result"], "success");
    let dead = server
        .get("/_matrix/client/v3/account/whoami", Some(&mo))
        .await;
    assert_error(&dead, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    let login = server
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.password", "user": "mo", "password": PASSWORD }),
        )
        .await;
    assert_error(&login, StatusCode::FORBIDDEN, "M_USER_DEACTIVATED");
    let profile = server
        .get("/_matrix/client/v3/profile/@mo:localhost", None)
        .await;
    assert_error(&profile, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let reuse = server
        .post(
            "/_matrix/client/v3/register",
            None,
            json!({ "username": "mo", "password": PASSWORD }),
        )
        .await;
    assert_error(&reuse, StatusCode::BAD_REQUEST, "M_USER_IN_USE");
}

#[tokio::test]
async fn data_survives_a_graceful_restart() {
    let server = TestServer::start().await;
    let answer = server.register("nia").await;
    let dir = server.stop().await;
    let config = test_config(&dir);
    let server = TestServer::start_in(dir, config, None).await;
    let (status, me) = server
        .get("/_matrix/client/v3/account/whoami", Some(&token(&answer)))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], "@nia:localhost");
    server.login("nia", None).await;
}

#[tokio::test]
async fn turn_credentials_openid_tokens_and_support_contacts() {
    // Nothing configured: no TURN server, no support document.
    let bare = TestServer::start().await;
    let alice = token(&bare.register("alice").await);
    let (status, answer) = bare
        .get("/_matrix/client/v3/voip/turnServer", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(answer, json!({}));
    let (status, _) = bare.get("/.well-known/matrix/support", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let server = TestServer::start_with(|config| {
        config.turn.uris = vec!["turn:turn.example.org?transport=udp".to_owned()];
        config.turn.shared_secret = Some("s3cret".to_owned());
        config.turn.user_lifetime_ms = 3_600_000;
        config.well_known.support_page = Some("https://example.org/help".to_owned());
        config.well_known.support_contacts = vec![myelin::config::SupportContact {
            role: "m.role.admin".to_owned(),
            matrix_id: Some("@admin:localhost".to_owned()),
            email_address: None,
        }];
    })
    .await;
    let alice = token(&server.register("alice").await);
    server.register("bob").await;

    // Time-limited TURN credentials as coturn checks them.
    let (status, turn) = server
        .get("/_matrix/client/v3/voip/turnServer", Some(&alice))
        .await;
    assert_eq!(status, StatusCode::OK, "{turn}");
    assert_eq!(turn["uris"], json!(["turn:turn.example.org?transport=udp"]));
    assert_eq!(turn["ttl"], 3600);
    let username = turn["username"].as_str().unwrap();
    let (expiry, user) = username.split_once(':').unwrap();
    assert_eq!(user, "@alice:localhost");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry: u64 = expiry.parse().unwrap();
    assert!(
        expiry > now + 3500 && expiry <= now + 3601,
        "{expiry} {now}"
    );
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha1::Sha1>::new_from_slice(b"s3cret").unwrap();
    mac.update(username.as_bytes());
    let expected = ruma::serde::Base64::<ruma::serde::base64::Standard>::new(
        mac.finalize().into_bytes().to_vec(),
    )
    .encode();
    assert_eq!(turn["password"], expected.as_str());

    // An OpenID token, for oneself only, that other services check.
    let path = "/_matrix/client/v3/user/@alice:localhost/openid/request_token";
    let (status, openid) = server.post(path, Some(&alice), json!({})).await;
    assert_eq!(status, StatusCode::OK, "{openid}");
    assert_eq!(openid["token_type"], "Bearer");
    assert_eq!(openid["matrix_server_name"], "localhost");
    assert_eq!(openid["expires_in"], 3600);
    let answer = server
        .post(
            "/_matrix/client/v3/user/@bob:localhost/openid/request_token",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let check = |token: String| {
        let server = &server;
        async move {
            server
                .get(
                    &format!("/_matrix/federation/v1/openid/userinfo?access_token={token}"),
                    None,
                )
                .await
        }
    };
    let (status, info) = check(openid["access_token"].as_str().unwrap().to_owned()).await;
    assert_eq!(status, StatusCode::OK, "{info}");
    assert_eq!(info["sub"], "@alice:localhost");
    let answer = check("not-a-token".to_owned()).await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");

    // Whom to contact.
    let (status, support) = server.get("/.well-known/matrix/support", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        support,
        json!({
            "contacts": [{ "role": "m.role.admin", "matrix_id": "@admin:localhost" }],
            "support_page": "https://example.org/help",
        })
    );
}

#[tokio::test]
async fn a_new_device_signs_in_with_a_token_from_an_existing_one() {
    // Off by default.
    let off = TestServer::start().await;
    let alice = token(&off.register("alice").await);
    let answer = off
        .post(
            "/_matrix/client/v1/login/get_token",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_error(&answer, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let (_, capabilities) = off
        .get("/_matrix/client/v3/capabilities", Some(&alice))
        .await;
    assert_eq!(
        capabilities["capabilities"]["m.get_login_token"]["enabled"],
        false
    );

    let server = TestServer::start_with(|config| {
        config.login_via_existing_session.enabled = true;
    })
    .await;
    let alice = token(&server.register("alice").await);
    let (_, flows) = server.get("/_matrix/client/v3/login", None).await;
    assert!(flows["flows"]
        .as_array()
        .unwrap()
        .iter()
        .any(|flow| flow["type"] == "m.login.token" && flow["get_login_token"] == true));

    // The password again first.
    let (status, challenge) = server
        .post(
            "/_matrix/client/v1/login/get_token",
            Some(&alice),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{challenge}");
    let session = challenge["session"].as_str().unwrap();
    let (status, answer) = server
        .post(
            "/_matrix/client/v1/login/get_token",
            Some(&alice),
            json!({ "auth": {
                "type": "m.login.password",
                "identifier": { "type": "m.id.user", "user": "alice" },
                "password": PASSWORD,
                "session": session,
            } }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert_eq!(answer["expires_in_ms"], 120_000);
    let login_token = answer["login_token"].as_str().unwrap().to_owned();

    // Once.
    let body = json!({ "type": "m.login.token", "token": login_token, "device_id": "TABLET" });
    let (status, login) = server
        .post("/_matrix/client/v3/login", None, body.clone())
        .await;
    assert_eq!(status, StatusCode::OK, "{login}");
    assert_eq!(login["user_id"], "@alice:localhost");
    assert_eq!(login["device_id"], "TABLET");
    let (status, whoami) = server
        .get(
            "/_matrix/client/v3/account/whoami",
            Some(login["access_token"].as_str().unwrap()),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(whoami["device_id"], "TABLET");
    let answer = server.post("/_matrix/client/v3/login", None, body).await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let answer = server
        .post(
            "/_matrix/client/v3/login",
            None,
            json!({ "type": "m.login.token" }),
        )
        .await;
    assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{}", answer.1);
}

#[tokio::test]
async fn admins_suspend_and_lock_accounts_and_look_users_up() {
    let server = TestServer::start().await;
    server
        .services()
        .accounts
        .register("admin", Some(PASSWORD), true, None)
        .await
        .unwrap();
    let admin = token(&server.login("admin", None).await);
    let alice = token(&server.register("alice").await);
    let bob = token(&server.register("bob").await);
    let shared = server
        .create_room(&alice, json!({ "preset": "public_chat" }))
        .await;
    common::join(&server, &bob, &shared).await;
    server.create_room(&alice, json!({})).await;

    // Whois: oneself or an admin.
    let (status, whois) = server
        .get(
            "/_matrix/client/v3/admin/whois/@alice:localhost",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{whois}");
    assert_eq!(whois["devices"].as_object().unwrap().len(), 1);
    let answer = server
        .get(
            "/_matrix/client/v3/admin/whois/@bob:localhost",
            Some(&alice),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    let (status, _) = server
        .get(
            "/_matrix/client/v3/admin/whois/@bob:localhost",
            Some(&admin),
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // Mutual rooms.
    let (status, mutual) = server
        .get(
            "/_matrix/client/v1/mutual_rooms?user_id=@bob:localhost",
            Some(&alice),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{mutual}");
    assert_eq!(mutual["joined"], json!([shared]));
    for query in ["user_id=@alice:localhost", ""] {
        let answer = server
            .get(
                &format!("/_matrix/client/v1/mutual_rooms?{query}"),
                Some(&alice),
            )
            .await;
        assert_error(&answer, StatusCode::BAD_REQUEST, "M_INVALID_PARAM");
    }

    // Only admins suspend, and only local, existing, non-admin users.
    let suspend = "/_matrix/client/v1/admin/suspend/@bob:localhost";
    let answer = server
        .put(suspend, Some(&alice), json!({ "suspended": true }))
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_FORBIDDEN");
    for (path, status, errcode) in [
        (
            "/_matrix/client/v1/admin/suspend/@bob:elsewhere.org",
            StatusCode::BAD_REQUEST,
            "M_INVALID_PARAM",
        ),
        (
            "/_matrix/client/v1/admin/suspend/@nobody:localhost",
            StatusCode::NOT_FOUND,
            "M_NOT_FOUND",
        ),
        (
            "/_matrix/client/v1/admin/suspend/@admin:localhost",
            StatusCode::FORBIDDEN,
            "M_FORBIDDEN",
        ),
    ] {
        let answer = server
            .put(path, Some(&admin), json!({ "suspended": true }))
            .await;
        assert_error(&answer, status, errcode);
    }
    let (status, answer) = server
        .put(suspend, Some(&admin), json!({ "suspended": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, answer) = server.get(suspend, Some(&admin)).await;
    assert_eq!(answer["suspended"], true);

    // Suspended, Bob reads and leaves, but neither speaks nor makes rooms.
    let path = format!("/_matrix/client/v3/rooms/{shared}/send/m.room.message/s1");
    let answer = server
        .put(
            &path,
            Some(&bob),
            json!({ "msgtype": "m.text", "body": "hi" }),
        )
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_USER_SUSPENDED");
    let answer = server
        .post("/_matrix/client/v3/createRoom", Some(&bob), json!({}))
        .await;
    assert_error(&answer, StatusCode::FORBIDDEN, "M_USER_SUSPENDED");
    let (status, _) = server
        .get("/_matrix/client/v3/sync?timeout=0", Some(&bob))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server
        .post(
            &format!("/_matrix/client/v3/rooms/{shared}/leave"),
            Some(&bob),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    server
        .put(suspend, Some(&admin), json!({ "suspended": false }))
        .await;
    let (status, _) = server
        .post("/_matrix/client/v3/createRoom", Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);

    // Locked, Bob can only log out.
    let lock = "/_matrix/client/v1/admin/lock/@bob:localhost";
    let (status, answer) = server
        .put(lock, Some(&admin), json!({ "locked": true }))
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let (_, answer) = server.get(lock, Some(&admin)).await;
    assert_eq!(answer["locked"], true);
    let answer = server
        .get("/_matrix/client/v3/account/whoami", Some(&bob))
        .await;
    assert_error(&answer, StatusCode::UNAUTHORIZED, "M_USER_LOCKED");
    assert_eq!(answer.1["soft_logout"], true);
    let (status, _) = server
        .post("/_matrix/client/v3/logout", Some(&bob), json!({}))
        .await;
    assert_eq!(status, StatusCode::OK);
}
