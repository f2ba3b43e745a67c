//! `rediss://` (TLS) and ACL users: a Redis server of the test's own with TLS only, and a user
//! with a password, reached through the adapters' URLs.

use std::time::Duration;

use stem_host::backend::redis::{RedisBackend, RedisBackendOptions};
use stem_host::backend::{ResultBackend, TaskState, TaskStatus};
use stem_host::broker::Broker;
use stem_host::broker::redis::{RedisBroker, RedisBrokerOptions};
use stem_host::codec::Payload;
use stem_host::envelope::Envelope;

use crate::redis_server::OwnRedis;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_urls_and_acl_users_reach_every_adapter() {
    let server = OwnRedis::start_tls();
    let admin = ::redis::Client::open(server.url("")).unwrap();
    let mut admin = admin
        .get_multiplexed_async_connection()
        .await
        .expect("TLS connection");
    let () = ::redis::cmd("ACL")
        .arg(&["SETUSER", "stem", "on", ">s3cret", "~*", "&*", "+@all"][..])
        .query_async(&mut admin)
        .await
        .unwrap();

    let url = server.url("stem:s3cret@");
    let backend = RedisBackend::connect(&url, RedisBackendOptions::default())
        .await
        .unwrap();
    backend
        .set(&TaskStatus::new("tls-task", TaskState::Succeeded), None)
        .await
        .unwrap();
    let seen = backend
        .wait("tls-task", Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(seen.map(|s| s.state), Some(TaskState::Succeeded));

    let broker = RedisBroker::connect(&url, RedisBrokerOptions::default())
        .await
        .unwrap();
    broker
        .publish(&Envelope::new("hello.add", Payload::json("{}")))
        .await
        .unwrap();
    assert_eq!(broker.stats("default").await.unwrap().ready, 1);

    let refused = RedisBackend::connect(&server.url("stem:wrong@"), RedisBackendOptions::default())
        .await
        .err()
        .expect("a wrong password is refused");
    let message = refused.to_string();
    assert!(
        message.contains("cannot open Redis at rediss://stem:***@"),
        "{message}"
    );
    assert!(
        !message.contains("wrong"),
        "the password leaked into: {message}"
    );
}
