//! The developer loop: `agora new` makes a component that builds and
//! serves at once, and `agora up --watch` rebuilds and swaps it as its
//! sources change, keeping the serving version when a build fails.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

/// The repository, whose SDK and lock file the new project uses.
fn repository() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The repository's `target/`: the new crate's dependencies are built
/// there already, so its builds take seconds, not minutes.
fn shared_target() -> String {
    std::path::absolute(repository().join("target"))
        .unwrap()
        .display()
        .to_string()
}

/// `agora new NAME` beside `plugins`, on the repository's SDK, with the
/// shared `target/`.
fn agora_new(name: &str, plugins: &Path) -> std::process::Output {
    let sdk = std::path::absolute(repository().join("components/sdk")).unwrap();
    let made = Command::new(env!("CARGO_BIN_EXE_agora"))
        .args(["new", name, "--config"])
        .arg(plugins)
        .arg("--sdk")
        .arg(&sdk)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", stderr(&made));
    made
}

/// A Cargo workspace like a developer's Agora project, with a component
/// made by `agora new`; returns its plugins.toml.
fn new_project(dir: &Path) -> String {
    std::fs::write(
        dir.join("Cargo.toml"),
        "[workspace]\nresolver = \"2\"\nmembers = [\"components/*\"]\n\n\
         [profile.component]\ninherits = \"release\"\nopt-level = \"s\"\nlto = true\n\
         strip = true\ncodegen-units = 1\nincremental = false\ndebug = false\n",
    )
    .unwrap();
    // The same dependency versions as the repository's, already built.
    std::fs::copy(repository().join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();
    let plugins = dir.join("plugins.toml");
    std::fs::write(&plugins, "# A developer's project.\n").unwrap();
    let made = agora_new("notes", &plugins);
    let said = String::from_utf8_lossy(&made.stdout);
    assert!(said.contains("added [components.notes]"), "{said}");
    std::fs::read_to_string(&plugins).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_component_serves_at_once_and_watch_swaps_in_each_good_build() {
    let target = shared_target();
    // Binaries of an earlier run would be served before any build.
    for stale in ["notes", "journal"] {
        let _ = std::fs::remove_file(format!("{target}/wasm32-wasip2/component/{stale}.wasm"));
    }
    let host = TestHost::start_with_flags(
        |_, dir| new_project(dir),
        &["--watch"],
        &[("CARGO_TARGET_DIR", &target)],
    );
    let notes = host.url("/notes");

    // The template serves: a route, its migration, its event and subscriber.
    let created = post_json(&notes, &json!({"text": "first"})).await;
    assert_eq!(created.status, 201, "{}", created.text());
    let seen = eventually(
        "the subscriber to see the note",
        Duration::from_secs(15),
        || async {
            let list = get(&notes).await.json();
            (list[0]["seen"] == true).then_some(list)
        },
    )
    .await;
    assert_eq!(seen[0]["text"], "first");
    let empty = post_json(&notes, &json!({"text": " "})).await;
    assert_error(&empty, 400, "bad_request");

    // An edit: rebuilt and swapped in while the host serves.
    let source = host.dir.path().join("components/notes/src/lib.rs");
    let original = std::fs::read_to_string(&source).unwrap();
    let edited = original.replace(
        "Ok(Response::ok(&notes))",
        "Ok(Response::ok(&serde_json::json!({ \"notes\": notes })))",
    );
    assert_ne!(edited, original, "the template changed: update this test");
    std::fs::write(&source, &edited).unwrap();
    eventually(
        "the edited version to serve",
        Duration::from_secs(240),
        || async {
            let list = get(&notes).await;
            (list.status == 200 && list.json()["notes"][0]["text"] == "first").then_some(())
        },
    )
    .await;
    let log = host.log();
    assert!(log.contains("sources changed; rebuilding"), "{log}");
    assert!(
        log.contains("Compiling notes"),
        "cargo's output is shown:\n{log}"
    );

    // A broken edit: the build fails, says why, and the last good version serves.
    std::fs::write(&source, format!("{edited}\nfn broken( {{\n")).unwrap();
    eventually(
        "the failed build in the log",
        Duration::from_secs(240),
        || async {
            host.log()
                .contains("the build failed (its output is above); the serving versions stay")
                .then_some(())
        },
    )
    .await;
    let log = host.log();
    assert!(
        log.contains("error: "),
        "the compiler's error is shown:\n{log}"
    );
    let list = get(&notes).await;
    assert_eq!(list.status, 200);
    assert_eq!(list.json()["notes"][0]["text"], "first");

    // A component added while the host watches is built and served.
    let plugins = host.plugins_path();
    agora_new("journal", &plugins);
    let journal = host.url("/journal");
    eventually(
        "the new component to serve",
        Duration::from_secs(240),
        || async {
            let created = post_json(&journal, &json!({"text": "day one"})).await;
            (created.status == 201).then_some(())
        },
    )
    .await;
}
