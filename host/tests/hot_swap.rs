//! Replacing components while the host serves: by file, by `agora deploy`,
//! by `agora rollback`, and by editing plugins.toml.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

/// A host whose probe runs from a copy in its own directory, so the test can replace it.
fn host_with_replaceable_probe() -> (TestHost, std::path::PathBuf) {
    let host = TestHost::start(|ports, dir| {
        let probe = dir.join("probe.wasm");
        std::fs::copy(component("probe"), &probe).unwrap();
        // Room for a request that outlasts a cold compile of the new version.
        standard_config(ports, &probe).replace("timeout_ms = 6000", "timeout_ms = 20000")
    });
    let probe = host.dir.path().join("probe.wasm");
    (host, probe)
}

async fn version(host: &TestHost) -> String {
    let reply = get(&host.url("/probe/version")).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    reply.json()["version"].as_str().unwrap().to_owned()
}

/// Requests `/probe/version` from several clients until stopped; returns the
/// count of each (status, version) seen.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    seen: Arc<Mutex<BTreeMap<(u16, String), usize>>>,
}

impl Load {
    fn start(host: &TestHost, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let url: &'static str = host.url("/probe/version").leak();
        let tasks = (0..clients)
            .map(|_| {
                let (stop, seen) = (stop.clone(), seen.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let reply = get(url).await;
                        let version = if reply.status == 200 {
                            reply.json()["version"].as_str().unwrap_or("?").to_owned()
                        } else {
                            reply.text()
                        };
                        *seen
                            .lock()
                            .unwrap()
                            .entry((reply.status, version))
                            .or_default() += 1;
                    }
                })
            })
            .collect();
        Load { stop, tasks, seen }
    }

    async fn finish(self) -> BTreeMap<(u16, String), usize> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

fn assert_only_successes(seen: &BTreeMap<(u16, String), usize>) {
    let failures: Vec<_> = seen
        .iter()
        .filter(|((status, _), _)| *status != 200)
        .collect();
    assert!(
        failures.is_empty(),
        "failed requests during the swap: {failures:?}"
    );
    for version in ["v1", "v2"] {
        assert!(
            seen.contains_key(&(200, version.to_owned())),
            "{version} served: {seen:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn replacing_the_file_swaps_under_load_and_in_flight_requests_finish_on_the_old_version() {
    let (host, probe) = host_with_replaceable_probe();
    assert_eq!(version(&host).await, "v1");
    let load = Load::start(&host, 4);
    let in_flight = tokio::spawn(get(host.url("/probe/slow?ms=8000").leak()));
    tokio::time::sleep(Duration::from_millis(300)).await;

    replace_atomically(&probe, &std::fs::read(component("probe-v2")).unwrap());
    let swapped_at = eventually("v2 to serve", Duration::from_secs(30), || async {
        (version(&host).await == "v2").then(Instant::now)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = load.finish().await;

    let slow = in_flight.await.unwrap();
    let finished_at = Instant::now();
    assert_eq!(
        slow.json(),
        json!({"version": "v1"}),
        "the in-flight request finished on v1"
    );
    assert!(
        finished_at > swapped_at,
        "it was still in flight when v2 took over"
    );
    assert_only_successes(&seen);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_version_is_refused_and_the_old_one_keeps_serving() {
    let (host, probe) = host_with_replaceable_probe();
    let garbage = host.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm this is not a component").unwrap();

    let out = host.cli(&["deploy", "probe", garbage.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("not a valid component"),
        "{}",
        stderr(&out)
    );
    assert_eq!(version(&host).await, "v1");

    let bad_migration = component("probe-bad-migration");
    let out = host.cli(&["deploy", "probe", bad_migration.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("migration `0002_broken` failed"),
        "{}",
        stderr(&out)
    );
    assert_eq!(version(&host).await, "v1");
    // The refused migration left the schema as it was: the data is still usable.
    assert_eq!(
        put(&host.url("/probe/kv/after"), "refusal").await.status,
        204
    );

    let out = host.cli(&["deploy", "nobody", component("probe-v2").to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("no component named `nobody`"),
        "{}",
        stderr(&out)
    );

    replace_atomically(&probe, b"not wasm at all");
    eventually(
        "the refusal to be logged",
        Duration::from_secs(15),
        || async { host.log().contains("hot swap refused").then_some(()) },
    )
    .await;
    assert_eq!(version(&host).await, "v1");
}

#[tokio::test(flavor = "multi_thread")]
async fn deploy_and_rollback_from_the_cli_under_load() {
    let host = TestHost::standard();
    let load = Load::start(&host, 4);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = host.cli(&["deploy", "probe", component("probe-v2").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("deployed probe version"));
    assert_eq!(version(&host).await, "v2");
    tokio::time::sleep(Duration::from_millis(200)).await;

    let out = host.cli(&["rollback", "probe"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(version(&host).await, "v1");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = load.finish().await;
    assert_only_successes(&seen);

    let out = host.cli(&["rollback", "probe"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("has no previous version"),
        "{}",
        stderr(&out)
    );
}

/// A reload that changes two components, the second of them broken, is
/// refused as a whole: the first one's new migration is not committed under
/// its old version, which keeps serving on the schema it had.
#[tokio::test(flavor = "multi_thread")]
async fn a_refused_reload_migrates_none_of_its_components() {
    let host = TestHost::standard();
    assert_eq!(put(&host.url("/probe/kv/before"), "kept").await.status, 204);
    let before = schema_and_ledger(&host, "probe");

    // Components load in name order: probe, swapped to v2 (which brings a
    // good migration), loads before the broken one after it.
    let garbage = host.dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm this is not a component").unwrap();
    let original = std::fs::read_to_string(host.plugins_path()).unwrap();
    let edited = format!(
        "{}\n[components.zz-broken]\nwasm = \"{}\"\nroutes = [\"/broken\"]\n",
        original.replace(
            &component("probe").display().to_string(),
            &component("probe-v2").display().to_string(),
        ),
        garbage.display(),
    );
    assert_ne!(edited, original);
    replace_atomically(&host.plugins_path(), edited.as_bytes());
    eventually(
        "the refusal to be logged",
        Duration::from_secs(30),
        || async { host.log().contains("hot swap refused").then_some(()) },
    )
    .await;
    assert!(
        host.log()
            .contains("component `zz-broken` is not a valid component"),
        "{}",
        host.log()
    );

    assert_eq!(schema_and_ledger(&host, "probe"), before);
    assert_eq!(version(&host).await, "v1");
    assert_eq!(get(&host.url("/broken")).await.status, 404);
    assert_eq!(
        get(&host.url("/probe/kv/before")).await.json()["value"],
        "kept"
    );
    assert_eq!(
        put(&host.url("/probe/kv/after"), "v1 writes").await.status,
        204
    );

    // Without the broken component, the same change applies, migration and all.
    replace_atomically(
        &host.plugins_path(),
        edited
            .split("[components.zz-broken]")
            .next()
            .unwrap()
            .as_bytes(),
    );
    eventually("v2 to serve", Duration::from_secs(30), || async {
        (version(&host).await == "v2").then_some(())
    })
    .await;
    assert!(schema_and_ledger(&host, "probe")
        .1
        .iter()
        .any(|row| row[0] == "0002_v2_notes"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deployed_version_survives_a_restart() {
    let mut host = TestHost::standard();
    let out = host.cli(&["deploy", "probe", component("probe-v2").to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    host.restart();
    assert_eq!(version(&host).await, "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn editing_plugins_toml_reroutes_removes_and_relimits_live() {
    let host = TestHost::standard();
    let original = std::fs::read_to_string(host.plugins_path()).unwrap();

    // Re-route hello and drop probe.
    let hello_only = original
        .split("[components.probe]")
        .next()
        .unwrap()
        .replace(r#"routes = ["/hello"]"#, r#"routes = ["/hello", "/greet"]"#);
    replace_atomically(&host.plugins_path(), hello_only.as_bytes());
    eventually("/greet to be routed", Duration::from_secs(15), || async {
        (get(&host.url("/greet")).await.status == 200).then_some(())
    })
    .await;
    assert_eq!(get(&host.url("/probe/version")).await.status, 404);

    // Bring probe back with a shorter deadline.
    let relimited = original.replace("timeout_ms = 6000", "timeout_ms = 300");
    replace_atomically(&host.plugins_path(), relimited.as_bytes());
    eventually("probe to come back", Duration::from_secs(15), || async {
        (get(&host.url("/probe/version")).await.status == 200).then_some(())
    })
    .await;
    let slow = get(&host.url("/probe/slow?ms=1000")).await;
    assert_error(&slow, 504, "deadline_exceeded");
    assert_eq!(get(&host.url("/greet")).await.status, 404);

    // A broken edit is refused; the running configuration stays.
    replace_atomically(
        &host.plugins_path(),
        relimited.replace("routes", "rooutes").as_bytes(),
    );
    eventually(
        "the refusal to be logged",
        Duration::from_secs(15),
        || async { host.log().contains("unknown field `rooutes`").then_some(()) },
    )
    .await;
    assert_eq!(get(&host.url("/probe/version")).await.status, 200);
    assert_eq!(get(&host.url("/hello")).await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_edit_of_plugins_toml_is_one_reload_attempt() {
    let host = TestHost::standard();
    let original = std::fs::read_to_string(host.plugins_path()).unwrap();
    let reloads = || {
        host.log()
            .matches("a watched file changed; reloading")
            .count()
    };

    // A good edit: applied once, and the host's own reads of the file that
    // follow do not count as edits.
    let rerouted = original.replace(r#"routes = ["/hello"]"#, r#"routes = ["/hello", "/greet"]"#);
    replace_atomically(&host.plugins_path(), rerouted.as_bytes());
    eventually("/greet to be routed", Duration::from_secs(15), || async {
        (get(&host.url("/greet")).await.status == 200).then_some(())
    })
    .await;
    // Long enough for a reload loop to show itself many times over.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reloads(), 1, "{}", host.log());

    // A refused edit: one attempt, one logged refusal.
    replace_atomically(
        &host.plugins_path(),
        rerouted.replace("routes", "rooutes").as_bytes(),
    );
    eventually(
        "the refusal to be logged",
        Duration::from_secs(15),
        || async { host.log().contains("unknown field `rooutes`").then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(reloads(), 2, "{}", host.log());
    assert_eq!(
        host.log().matches("hot swap refused").count(),
        1,
        "{}",
        host.log()
    );
    assert_eq!(get(&host.url("/greet")).await.status, 200);
}
