//! The contract of [`Coordinator`], run against every backend: `local`
//! always, `postgres` whenever PostgreSQL answers (see
//! [`crate::testing::answers`]), as two hosts sharing one namespace.

use std::sync::Arc;
use std::time::Duration;

use super::local::LocalCoordinator;
use super::postgres::PostgresCoordinator;
use super::{Claim, Commit, Coordinator, PostgresConfig};
use crate::testing;

fn claim(partition: u32) -> Claim {
    Claim {
        subscriber: "payments".into(),
        topic: "order.placed".into(),
        partition,
    }
}

/// A PostgreSQL host of namespace `ns`.
async fn postgres_host(ns: &str, lease_seconds: u64) -> Arc<dyn Coordinator> {
    let config = PostgresConfig {
        url: testing::POSTGRES_URL.into(),
        namespace: ns.into(),
        lease_seconds,
    };
    Arc::new(PostgresCoordinator::connect(&config).await.unwrap())
}

async fn offsets_move_only_from_where_they_were(name: &str, host: &dyn Coordinator) {
    let c = claim(0);
    host.heartbeat(std::slice::from_ref(&c)).await.unwrap();
    assert_eq!(host.committed(&c).await.unwrap(), 0, "{name}");
    assert_eq!(host.commit(&c, 0, 5).await.unwrap(), Commit::Done, "{name}");
    assert_eq!(host.committed(&c).await.unwrap(), 5, "{name}");
    assert_eq!(
        host.commit(&c, 0, 7).await.unwrap(),
        Commit::Moved(5),
        "{name}: a commit from a stale offset"
    );
    host.rewind(&c, 2).await.unwrap();
    assert_eq!(
        host.commit(&c, 5, 9).await.unwrap(),
        Commit::Moved(2),
        "{name}: after a rewind"
    );
    assert_eq!(host.committed(&c).await.unwrap(), 2, "{name}");
    assert_eq!(
        host.committed(&claim(1)).await.unwrap(),
        0,
        "{name}: another partition"
    );
}

#[tokio::test]
async fn offsets_move_only_from_where_they_were_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let local = LocalCoordinator::open(dir.path()).unwrap();
    offsets_move_only_from_where_they_were("local", &local).await;
    assert!(local.lock("outbox:c").await.unwrap().is_none(), "alone");
    drop(local);
    let reopened = LocalCoordinator::open(dir.path()).unwrap();
    assert_eq!(reopened.committed(&claim(0)).await.unwrap(), 2, "kept");

    if testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        let ns = testing::unique("co");
        let host = postgres_host(&ns, 10).await;
        offsets_move_only_from_where_they_were("postgres", &*host).await;
        drop(host);
        testing::drop_namespace(&ns).await;
    }
}

/// Two hosts: the first takes every lease; once the second joins, each
/// has a share of two, and what the first gives back the second takes.
/// A host that lost a lease cannot commit; one that leaves hands all over.
#[tokio::test]
async fn hosts_share_leases_and_hand_them_over() {
    if !testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        return;
    }
    let ns = testing::unique("co");
    let wanted: Vec<Claim> = (0..4).map(claim).collect();
    let a = postgres_host(&ns, 10).await;
    let first = a.heartbeat(&wanted).await.unwrap();
    assert_eq!((first.held.len(), first.share(&claim(0))), (4, 4));

    let b = postgres_host(&ns, 10).await;
    let joined = b.heartbeat(&wanted).await.unwrap();
    assert_eq!(
        (joined.held.len(), joined.share(&claim(0))),
        (0, 2),
        "all taken"
    );
    let a_now = a.heartbeat(&wanted).await.unwrap();
    assert_eq!((a_now.held.len(), a_now.share(&claim(0))), (4, 2));
    let given: Vec<Claim> = a_now.held[2..].to_vec();
    a.release(&given).await.unwrap();
    let mut b_now = b.heartbeat(&wanted).await.unwrap().held;
    b_now.sort();
    let mut given_sorted = given.clone();
    given_sorted.sort();
    assert_eq!(
        b_now, given_sorted,
        "the second host takes what was given back"
    );

    b.commit(&given[0], 0, 3).await.unwrap();
    assert_eq!(
        a.commit(&given[0], 3, 4).await.unwrap(),
        Commit::Lost,
        "a host without the lease"
    );
    assert_eq!(b.committed(&given[0]).await.unwrap(), 3);

    // A host that subscribes to nothing (another version, say) takes no
    // share from those that do.
    let idle = postgres_host(&ns, 10).await;
    assert!(idle.heartbeat(&[]).await.unwrap().held.is_empty());
    assert_eq!(a.heartbeat(&wanted).await.unwrap().share(&claim(0)), 2);
    idle.leave().await.unwrap();

    b.leave().await.unwrap();
    let after = a.heartbeat(&wanted).await.unwrap();
    assert_eq!(
        (after.held.len(), after.share(&claim(0))),
        (4, 4),
        "the leaver's leases at the next heartbeat"
    );
    drop((a, b));
    testing::drop_namespace(&ns).await;
}

/// A host that stops beating (killed) loses its leases when they expire,
/// and the other host takes them then, not before.
#[tokio::test]
async fn a_dead_hosts_leases_expire_and_are_taken_over() {
    if !testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        return;
    }
    let ns = testing::unique("co");
    let wanted: Vec<Claim> = (0..2).map(claim).collect();
    let dead = postgres_host(&ns, 3).await;
    assert_eq!(dead.heartbeat(&wanted).await.unwrap().held.len(), 2);
    let survivor = postgres_host(&ns, 3).await;
    assert!(survivor.heartbeat(&wanted).await.unwrap().held.is_empty());
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let taken = survivor.heartbeat(&wanted).await.unwrap();
    assert_eq!(
        (taken.held.len(), taken.share(&claim(0))),
        (2, 2),
        "expired leases, and the dead host no longer counted"
    );
    drop((dead, survivor));
    testing::drop_namespace(&ns).await;
}

/// An outbox lock is held by one host at a time; the next waits for it,
/// and a lock dropped without unlocking (a cancelled task) is freed too.
#[tokio::test]
async fn a_lock_is_held_by_one_host_at_a_time() {
    if !testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        return;
    }
    let ns = testing::unique("co");
    let (a, b) = (postgres_host(&ns, 10).await, postgres_host(&ns, 10).await);
    for release_by_drop in [false, true] {
        let held = a.lock("outbox:orders").await.unwrap().expect("shared");
        let waiting = tokio::spawn({
            let b = b.clone();
            async move { b.lock("outbox:orders").await.unwrap().expect("shared") }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "the second host waits");
        // Another name is not held up.
        a.lock("outbox:payments")
            .await
            .unwrap()
            .unwrap()
            .unlock()
            .await;
        if release_by_drop {
            drop(held);
        } else {
            held.unlock().await;
        }
        let next = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the lock passes on")
            .unwrap();
        next.unlock().await;
    }
    drop((a, b));
    testing::drop_namespace(&ns).await;
}

/// A host restarted on its data directory is the same host and takes its
/// leases back at once; a second host on the same directory, alive at the
/// same time, is another host.
#[tokio::test]
async fn a_restarted_host_takes_its_leases_back_at_once() {
    if !testing::answers("PostgreSQL", testing::POSTGRES_ADDR).await {
        return;
    }
    use super::CoordinationSettings;
    let ns = testing::unique("co");
    let dir = tempfile::tempdir().unwrap();
    let config = PostgresConfig {
        url: testing::POSTGRES_URL.into(),
        namespace: ns.clone(),
        lease_seconds: 10,
    };
    let wanted: Vec<Claim> = (0..2).map(claim).collect();
    let before = config.start(dir.path()).await.unwrap();
    assert_eq!(before.heartbeat(&wanted).await.unwrap().held.len(), 2);
    let beside = config.start(dir.path()).await.unwrap();
    assert!(
        beside.heartbeat(&wanted).await.unwrap().held.is_empty(),
        "a live host's directory does not make another host it"
    );
    drop((before, beside)); // killed: nothing given back
    let after = config.start(dir.path()).await.unwrap();
    assert_eq!(after.heartbeat(&wanted).await.unwrap().held.len(), 2);
    drop(after);
    testing::drop_namespace(&ns).await;
}
