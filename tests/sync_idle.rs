//! Waiting syncs cost no CPU: a hundred of them held open for two seconds
//! use almost none of the process's CPU time. Alone in its own test binary
//! so that no other test's work is counted.

mod common;

use std::time::Duration;

use common::{token, TestServer};
use reqwest::StatusCode;
use serde_json::Value;

/// User plus system CPU time of this process, in milliseconds.
fn cpu_time_ms() -> u64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes a whole rusage into the pointer it is given.
    let usage = unsafe {
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let ms = |t: libc::timeval| t.tv_sec as u64 * 1000 + t.tv_usec as u64 / 1000;
    ms(usage.ru_utime) + ms(usage.ru_stime)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_waiting_syncs_use_no_cpu() {
    let server = TestServer::start().await;
    let alice = token(&server.register("alice").await);
    server.create_room(&alice, serde_json::json!({})).await;
    let (status, first) = server.get("/_matrix/client/v3/sync", Some(&alice)).await;
    assert_eq!(status, StatusCode::OK);
    let since = first["next_batch"].as_str().unwrap().to_owned();
    let url = server.url(&format!(
        "/_matrix/client/v3/sync?since={since}&timeout=4000"
    ));
    let waiting: Vec<_> = (0..100)
        .map(|_| {
            let (url, alice) = (url.clone(), alice.clone());
            tokio::spawn(async move {
                let answer = reqwest::Client::new()
                    .get(url)
                    .bearer_auth(alice)
                    .send()
                    .await
                    .unwrap();
                answer.json::<Value>().await.unwrap()
            })
        })
        .collect();
    // Let every request arrive and settle into its wait, then measure.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let before = cpu_time_ms();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let used = cpu_time_ms() - before;
    for answer in waiting {
        let answer = answer.await.unwrap();
        assert!(answer["rooms"]["join"].as_object().unwrap().is_empty());
    }
    // A wait that polled even every 10 ms would cost 100 × 200 wake-ups
    // here; an event-driven one costs nothing until its timeout.
    assert!(used < 200, "100 idle syncs used {used} ms of CPU in 2 s");
}
