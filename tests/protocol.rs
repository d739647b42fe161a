//! Matrix errors for bad requests, CORS, discovery and limits, over HTTP.

mod common;

use common::{assert_error, token, TestServer, PASSWORD};
use myelin::config::RateLimit;
use reqwest::{Method, StatusCode};
use serde_json::json;

#[tokio::test]
async fn every_failure_is_a_matrix_error() {
    let server = TestServer::start_with(|config| config.max_request_body_bytes = 4096).await;
    let answer = server.register("oli").await;
    let token = token(&answer);

    let unknown = server.get("/_matrix/client/v3/no/such/thing", None).await;
    assert_error(&unknown, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let outside = server.get("/favicon.ico", None).await;
    assert_error(&outside, StatusCode::NOT_FOUND, "M_UNRECOGNIZED");
    let method = server
        .call(Method::DELETE, "/_matrix/client/v3/login", None, None)
        .await;
    assert_error(&method, StatusCode::METHOD_NOT_ALLOWED, "M_UNRECOGNIZED");

    let not_json = server
        .http
        .post(server.url("/_matrix/client/v3/login"))
        .body("type=password")
        .send()
        .await
        .unwrap();
    let not_json = (not_json.status(), not_json.json().await.unwrap());
    assert_error(&not_json, StatusCode::BAD_REQUEST, "M_NOT_JSON");
    let empty = server
        .http
        .post(server.url("/_matrix/client/v3/login"))
        .send()
        .await
        .unwrap();
    let empty = (empty.status(), empty.json().await.unwrap());
    assert_error(&empty, StatusCode::BAD_REQUEST, "M_NOT_JSON");
    let array = server
        .post("/_matrix/client/v3/login", None, json!([1]))
        .await;
    assert_error(&array, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let shape = server
        .post("/_matrix/client/v3/login", None, json!({ "type": 5 }))
        .await;
    assert_error(&shape, StatusCode::BAD_REQUEST, "M_BAD_JSON");
    let shape = server
        .post(
            "/_matrix/client/v3/delete_devices",
            Some(&token),
            json!({ "devices": "ABC" }),
        )
        .await;
    assert_error(&shape, StatusCode::BAD_REQUEST, "M_BAD_JSON");

    let missing = server.get("/_matrix/client/v3/account/whoami", None).await;
    assert_error(&missing, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let wrong = server
        .get("/_matrix/client/v3/account/whoami", Some("mya_forged"))
        .await;
    assert_error(&wrong, StatusCode::UNAUTHORIZED, "M_UNKNOWN_TOKEN");
    // The deprecated query parameter is still accepted.
    let path = format!("/_matrix/client/v3/account/whoami?access_token={token}");
    let (status, _) = server.get(&path, None).await;
    assert_eq!(status, StatusCode::OK);

    let big = json!({ "displayname": "x".repeat(5000) });
    let too_large = server
        .put(
            "/_matrix/client/v3/profile/@oli:localhost/displayname",
            Some(&token),
            big,
        )
        .await;
    assert_error(&too_large, StatusCode::PAYLOAD_TOO_LARGE, "M_TOO_LARGE");
    let (_, name) = server
        .get(
            "/_matrix/client/v3/profile/@oli:localhost/displayname",
            None,
        )
        .await;
    assert_eq!(
        name["displayname"], "oli",
        "the refused request changed nothing"
    );

    // The older r0 prefix serves the same API.
    let (status, me) = server
        .get("/_matrix/client/r0/account/whoami", Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(me["user_id"], "@oli:localhost");
}

#[tokio::test]
async fn rate_limits_answer_429_with_a_retry_time() {
    let server = TestServer::start_with(|config| {
        config.rate_limits.enabled = true;
        config.rate_limits.login = RateLimit {
            per_second: 0.01,
            burst: 2,
        };
    })
    .await;
    let services = &server.server.as_ref().unwrap().services;
    services
        .accounts
        .register("pat", Some(PASSWORD), false, None)
        .await
        .unwrap();
    let body = json!({ "type": "m.login.password", "user": "pat", "password": PASSWORD });
    for _ in 0..2 {
        let (status, answer) = server
            .post("/_matrix/client/v3/login", None, body.clone())
            .await;
        assert_eq!(status, StatusCode::OK, "{answer}");
    }
    let response = server
        .http
        .post(server.url("/_matrix/client/v3/login"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(response.headers().contains_key("retry-after"));
    let answer: serde_json::Value = response.json().await.unwrap();
    assert_eq!(answer["errcode"], "M_LIMIT_EXCEEDED");
    let retry = answer["retry_after_ms"].as_u64().unwrap();
    assert!(retry > 90_000 && retry <= 100_000, "{retry}");
}

#[tokio::test]
async fn browsers_get_cors_headers() {
    let server = TestServer::start().await;
    let response = server
        .http
        .get(server.url("/_matrix/client/versions"))
        .header("Origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let error = server
        .http
        .get(server.url("/_matrix/client/v3/account/whoami"))
        .header("Origin", "https://app.example")
        .send()
        .await
        .unwrap();
    assert_eq!(error.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(error.headers()["access-control-allow-origin"], "*");

    let preflight = server
        .http
        .request(Method::OPTIONS, server.url("/_matrix/client/v3/login"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(preflight.status(), StatusCode::OK);
    let headers = preflight.headers();
    assert_eq!(headers["access-control-allow-origin"], "*");
    let methods = headers["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("PUT") && methods.contains("DELETE"),
        "{methods}"
    );
    let allowed = headers["access-control-allow-headers"].to_str().unwrap();
    assert!(allowed.contains("authorization"), "{allowed}");
}

#[tokio::test]
async fn discovery_endpoints_describe_the_server() {
    let server = TestServer::start().await;
    let (status, versions) = server.get("/_matrix/client/versions", None).await;
    assert_eq!(status, StatusCode::OK);
    assert!(versions["versions"]
        .as_array()
        .unwrap()
        .contains(&json!("v1.1")));
    assert!(versions["unstable_features"].is_object());

    let token = token(&server.register("quinn").await);
    let needs_token = server.get("/_matrix/client/v3/capabilities", None).await;
    assert_error(&needs_token, StatusCode::UNAUTHORIZED, "M_MISSING_TOKEN");
    let (status, capabilities) = server
        .get("/_matrix/client/v3/capabilities", Some(&token))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        capabilities["capabilities"]["m.change_password"]["enabled"],
        true
    );
    let versions = &capabilities["capabilities"]["m.room_versions"];
    assert_eq!(versions["default"], "12");
    assert_eq!(
        versions["available"],
        json!({ "10": "stable", "11": "stable", "12": "stable" })
    );

    let unset = server.get("/.well-known/matrix/client", None).await;
    assert_error(&unset, StatusCode::NOT_FOUND, "M_NOT_FOUND");
    let health = server.http.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert_eq!(health.text().await.unwrap(), "OK");

    let configured = TestServer::start_with(|config| {
        config.well_known.client_base_url = Some("https://matrix.example.org".to_owned());
    })
    .await;
    let (status, well_known) = configured.get("/.well-known/matrix/client", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        well_known,
        json!({ "m.homeserver": { "base_url": "https://matrix.example.org" } })
    );
}
